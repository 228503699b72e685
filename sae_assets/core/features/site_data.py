"""The feature browser's data: one JSON document per feature, index rows and a Neuronpedia export.

`feature_documents` joins a range's merged samples (statistics, histogram), the examples the
page shows (`feature_windows.select_shown_examples`), their context windows and the decoder
direction's logit effects into plain dicts, ready for `json.dumps`. Token ids become strings
through `token_strings` (each id decoded alone; bytes of a split UTF-8 character show as
U+FFFD). Strings stay raw here: the browser inserts them as text, never as HTML.
`neuronpedia_feature` maps a document onto the fields of Neuronpedia's upload batches
(SAEDashboard's NeuronpediaRunner layout). Tests: tests/test_feature_assets.py, tests/test_feature_browser.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sae_assets.core.features.merge import FeatureSamples

# Letter key: W features in the range, D model width, V vocabulary, N logit effects kept.


def _byte_level_alphabet() -> dict[str, int]:
    """{character: byte} of the byte-level BPE alphabet (GPT-2's): printable bytes stand for
    themselves, the other 68 are shifted to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


def token_strings(tokenizer) -> list[str]:
    """Display string of every token id of a HF `tokenizers.Tokenizer`.

    A byte-level token holding part of a UTF-8 character decodes to U+FFFD; it is shown as
    its bytes instead (e.g. '\\xe2\\x80'), so different partial tokens stay distinguishable.
    """
    alphabet = _byte_level_alphabet()
    strings = []
    for i in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([i], skip_special_tokens=False)
        piece = tokenizer.id_to_token(i) or ""
        if "\ufffd" in text and piece and all(ch in alphabet for ch in piece):
            text = bytes(alphabet[ch] for ch in piece).decode("utf-8", errors="backslashreplace")
        strings.append(text)
    return strings


def _num(x: float, digits: int = 4) -> float:
    """A float rounded to `digits` significant digits (JSON size), NaN/inf refused."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x} in the feature browser's data")
    return float(f"{x:.{digits}g}")


def logit_effects(W_dec_WD: torch.Tensor, W_U_DV: torch.Tensor, n: int) -> tuple[np.ndarray, ...]:
    """Decoder rows (W, D) through the unembedding (D, V): (top ids, top values, bottom ids, bottom values), each (W, n).

    The full (W, V) product exists only for one feature range at a time.
    """
    effects_WV = (W_dec_WD.float() @ W_U_DV.float().to(W_dec_WD.device)).cpu()
    n = min(n, effects_WV.shape[1])
    top = effects_WV.topk(n, dim=1)
    bottom = effects_WV.topk(n, dim=1, largest=False)
    return top.indices.numpy(), top.values.numpy(), bottom.indices.numpy(), bottom.values.numpy()


def _windows_by_key(windows: pa.Table) -> dict[tuple[int, int], tuple[int, list[int], list[float]]]:
    out = {}
    feature, tok = windows.column("feature").to_pylist(), windows.column("token_index").to_pylist()
    first = windows.column("first_token_index").to_pylist()
    ids, acts = windows.column("token_ids").to_pylist(), windows.column("activations").to_pylist()
    for f, t, s, i, a in zip(feature, tok, first, ids, acts):
        out[(f, t)] = (t - s, i, a)
    return out


def _example(key, activation, windows, strings) -> dict[str, Any]:
    center, ids, acts = windows[key]
    return {"token_index": int(key[1]), "activation": _num(activation), "center": center,
            "tokens": [strings[i] for i in ids], "acts": [_num(a, 3) for a in acts]}


def feature_documents(samples: FeatureSamples, shown: pa.Table, windows: pa.Table, strings: Sequence[str], *,
                      logits: tuple[np.ndarray, ...], activation_levels: int,
                      dictionary: str) -> Iterator[dict[str, Any]]:
    """One JSON-ready document per feature of the range, in feature order."""
    win = _windows_by_key(windows)
    stats = samples.stats.to_pydict()
    examples: dict[int, dict[str, list]] = {}
    for f, t, a, role, level in zip(*(shown.column(c).to_pylist()
                                      for c in ("feature", "token_index", "activation", "role", "level"))):
        by_role = examples.setdefault(f, {"top": [], "random": [], "level": []})
        entry = _example((f, t), a, win, strings)
        by_role[role].append({**entry, "level": level} if role == "level" else entry)
    top_ids, top_vals, bottom_ids, bottom_vals = logits
    for w, f in enumerate(stats["feature"]):
        count, peak = stats["count"][w], stats["max"][w]
        mine = examples.get(f, {"top": [], "random": [], "level": []})
        levels = [{"level": i, "low": _num(peak * (i - 1) / activation_levels), "high": _num(peak * i / activation_levels),
                   "examples": [e for e in mine["level"] if e["level"] == i]}
                  for i in range(activation_levels, 0, -1)] if count else []
        yield {
            "feature": int(f), "dictionary": dictionary, "count": int(count),
            "density": _num(count / max(samples.n_tokens, 1)), "max": _num(peak),
            "mean": _num(stats["sum"][w] / count) if count else 0.0,
            "histogram": [int(c) for c in stats["hist"][w]],
            "top": mine["top"], "random": mine["random"], "levels": levels,
            "logits": {"top": [[strings[i], _num(v)] for i, v in zip(top_ids[w], top_vals[w])],
                       "bottom": [[strings[i], _num(v)] for i, v in zip(bottom_ids[w], bottom_vals[w])]},
        }


def index_row(doc: dict[str, Any], n_tokens: int = 5) -> list:
    """[feature, density, max, top tokens] of a document: what the feature list shows and searches."""
    seen: list[str] = []
    for example in doc["top"]:
        token = example["tokens"][example["center"]]
        if token not in seen:
            seen.append(token)
        if len(seen) == n_tokens:
            break
    return [doc["feature"], doc["density"], doc["max"], seen]


def neuronpedia_feature(doc: dict[str, Any], hist_edges: Sequence[float]) -> dict[str, Any]:
    """A document in the field layout of a Neuronpedia upload batch's `features` entries."""
    counts = doc["histogram"]
    centers = [_num(math.sqrt(hist_edges[i] * hist_edges[i + 1])) for i in range(len(counts))]  # log-midpoints
    nonzero = [i for i, c in enumerate(counts) if c]
    span = range(nonzero[0], nonzero[-1] + 1) if nonzero else range(0)
    activations = []
    for example in doc["top"] + doc["random"]:
        activations.append({"bin_min": -1, "bin_max": -1, "bin_contains": -1, "tokens": example["tokens"],
                            "values": example["acts"], "qualifying_token_index": example["center"]})
    for level in doc["levels"]:
        for example in level["examples"]:
            activations.append({"bin_min": level["low"], "bin_max": level["high"], "bin_contains": -1,
                                "tokens": example["tokens"], "values": example["acts"],
                                "qualifying_token_index": example["center"]})
    return {
        "feature_index": doc["feature"], "frac_nonzero": doc["density"], "max_act_approx": doc["max"],
        "pos_str": [t for t, _ in doc["logits"]["top"]], "pos_values": [v for _, v in doc["logits"]["top"]],
        "neg_str": [t for t, _ in doc["logits"]["bottom"]], "neg_values": [v for _, v in doc["logits"]["bottom"]],
        "freq_hist_data_bar_heights": [counts[i] for i in span], "freq_hist_data_bar_values": [centers[i] for i in span],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "activations": activations, "decoder_weights_dist": [],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
    }
