"""Feature documents in Neuronpedia's bulk-import layout, as SAEDashboard's exporter writes it.

One export holds `release.jsonl`, `model.jsonl`, `sourceset.jsonl`, `source.jsonl` (one row
each) and, per batch, `features/<batch>.jsonl.gz` (one row per feature) and
`activations/<batch>.jsonl.gz` (one row per example window). Row fields follow Neuronpedia's
database models (SourceRelease, Model, SourceSet, Source, Feature, Activation). Rows here are
deterministic (ids derive from source, feature and example; no creation times: the importer's
defaults apply), so a rerun writes the same bytes. `neuronpedia_feature` is the intermediate
per-feature dict in the field names of SAEDashboard's older `batch-<n>.json` files, from which
`feature_row` and `activation_rows` are built. An interval example's `binMin`/`binMax`/`binContains`
are its activation interval and that interval's share of the feature's non-zero activations (a
fraction, which Neuronpedia shows as "Contains x%"; SAEDashboard divides by every token instead);
top and random examples carry -1 there (no interval). Writing is `sae_assets.defs.site_files`'s
job; tests/test_site_panels.py checks the schema of every file.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple


class ExportNames(NamedTuple):
    """Who and what an export describes."""

    model_id: str  # Neuronpedia model id, e.g. "gpt2-small"
    source_set: str  # the SAE set's name, e.g. "res-jb"
    layer: int  # the hook's block number
    hook: str  # the TransformerLens hook name
    creator: str = "sae-assets"


def layer_of(hook: str) -> int:
    """The block number of a TransformerLens hook name (0 for a hook outside the blocks)."""
    match = re.match(r"^blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else 0


def slug(text: str) -> str:
    """Lower-case letters, digits and dashes: the form Neuronpedia ids take."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-") or "sae"


def source_id(names: ExportNames) -> str:
    return f"{names.layer}-{names.source_set}"


def _centres(edges: Sequence[float], n: int, *, log: bool) -> list[float]:
    mid = (lambda a, b: math.sqrt(a * b)) if log else (lambda a, b: (a + b) / 2)
    return [float(f"{mid(edges[i], edges[i + 1]):.4g}") for i in range(n)]


def neuronpedia_feature(doc: dict[str, Any], hist_edges: Sequence[float]) -> dict[str, Any]:
    """A document in the field layout of SAEDashboard's `batch-<n>.json` `features` entries."""
    counts = doc["histogram"]
    centers = _centres(hist_edges, len(counts), log=True)  # log-spaced activation bins
    nonzero = [i for i, c in enumerate(counts) if c]
    span = range(nonzero[0], nonzero[-1] + 1) if nonzero else range(0)
    activations = []
    for example in doc["top"] + doc["random"]:
        activations.append({"bin_min": -1, "bin_max": -1, "bin_contains": -1, "tokens": example["tokens"],
                            "values": example["acts"], "qualifying_token_index": example["center"]})
    for level in doc["levels"]:
        for example in level["examples"]:
            activations.append({"bin_min": level["low"], "bin_max": level["high"],
                                "bin_contains": level.get("share", -1),
                                "tokens": example["tokens"], "values": example["acts"],
                                "qualifying_token_index": example["center"]})
    logit_hist = doc.get("logit_histogram") or {"counts": [], "edges": []}
    aligned = doc.get("neuron_alignment") or []
    neighbours = doc.get("neighbours") or []
    return {
        "feature_index": doc["feature"], "frac_nonzero": doc["density"], "max_act_approx": doc["max"],
        "pos_str": [t for t, _ in doc["logits"]["top"]], "pos_values": [v for _, v in doc["logits"]["top"]],
        "neg_str": [t for t, _ in doc["logits"]["bottom"]], "neg_values": [v for _, v in doc["logits"]["bottom"]],
        "freq_hist_data_bar_heights": [counts[i] for i in span], "freq_hist_data_bar_values": [centers[i] for i in span],
        "logits_hist_data_bar_heights": list(logit_hist["counts"]),
        "logits_hist_data_bar_values": _centres(logit_hist["edges"], len(logit_hist["counts"]), log=False),
        "activations": activations, "decoder_weights_dist": [],
        "topk_cos_sim_indices": [i for i, _ in neighbours], "topk_cos_sim_values": [c for _, c in neighbours],
        "neuron_alignment_indices": [a[0] for a in aligned], "neuron_alignment_values": [a[1] for a in aligned],
        "neuron_alignment_l1": [a[2] for a in aligned],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
    }


_COPIED = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
           "correlated_neurons_indices", "correlated_neurons_pearson", "correlated_neurons_l1",
           "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
           "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
           "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
           "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "decoder_weights_dist")


def feature_row(feature: dict[str, Any], names: ExportNames) -> dict[str, Any]:
    """A `features/*.jsonl.gz` row (Neuronpedia's Feature) from a `neuronpedia_feature` dict."""
    row = {"modelId": names.model_id, "layer": source_id(names), "index": str(feature["feature_index"]),
           "creatorId": names.creator, "maxActApprox": feature["max_act_approx"], "hasVector": False,
           "vector": [], "vectorLabel": None, "hookName": None,
           "topkCosSimIndices": feature["topk_cos_sim_indices"], "topkCosSimValues": feature["topk_cos_sim_values"]}
    row.update({name: feature[name] for name in _COPIED})
    row["sourceSetName"] = names.source_set
    return row


def activation_rows(feature: dict[str, Any], names: ExportNames) -> list[dict[str, Any]]:
    """The `activations/*.jsonl.gz` rows (Neuronpedia's Activation) of a `neuronpedia_feature` dict."""
    rows, layer = [], source_id(names)
    for n, example in enumerate(feature["activations"]):
        values = example["values"]
        peak = max(values)
        rows.append({
            "id": f"{names.model_id}@{layer}@{feature['feature_index']}@{n}", "tokens": example["tokens"],
            "index": str(feature["feature_index"]), "layer": layer, "modelId": names.model_id,
            "maxValue": peak, "maxValueTokenIndex": values.index(peak), "minValue": min(values), "values": values,
            "creatorId": names.creator, "dataSource": None, "dataIndex": None, "dfaValues": [],
            "dfaTargetIndex": None, "dfaMaxValue": None, "lossValues": [], "logitContributions": None,
            "binMin": example["bin_min"], "binMax": example["bin_max"], "binContains": example["bin_contains"],
            "qualifyingTokenIndex": example["qualifying_token_index"]})
    return rows


def header_rows(names: ExportNames, *, description: str, dataset: str, prompts: int,
                tokens_per_prompt: int) -> dict[str, dict[str, Any]]:
    """{file name: its one row} of release.jsonl, model.jsonl, sourceset.jsonl and source.jsonl."""
    release = names.source_set
    return {
        "release.jsonl": {"name": release, "description": description, "descriptionShort": description,
                          "creatorName": names.creator, "creatorNameShort": names.creator,
                          "creatorId": names.creator, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
                          "urls": [], "creatorEmail": None, "defaultSourceSetName": None, "defaultSourceId": None,
                          "defaultUmapSourceIds": []},
        "model.jsonl": {"id": names.model_id, "instruct": names.model_id.endswith("-it"),
                        "creatorId": names.creator, "displayNameShort": names.model_id,
                        "displayName": names.model_id, "tlensId": None, "dimension": None, "visibility": "PUBLIC",
                        "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False,
                        "layers": 0, "neuronsPerLayer": 0, "owner": "", "website": None},
        "sourceset.jsonl": {"modelId": names.model_id, "name": names.source_set, "creatorId": names.creator,
                            "hasDashboards": True, "visibility": "PUBLIC", "description": description,
                            "type": "", "creatorName": names.creator, "urls": [], "creatorEmail": None,
                            "releaseName": release, "defaultOfModelId": None, "defaultRange": 1,
                            "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                            "showHeadAttribution": False, "showUmap": False},
        "source.jsonl": {"id": source_id(names), "modelId": names.model_id, "setName": names.source_set,
                         "creatorId": names.creator, "hasDashboards": True, "inferenceEnabled": False,
                         "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None, "saelensSaeId": None,
                         "hfRepoId": None, "hfFolderId": None, "visibility": "PUBLIC", "defaultOfModelId": None,
                         "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
                         "num_prompts": prompts, "num_tokens_in_prompt": tokens_per_prompt, "dataset": dataset,
                         "notes": None},
    }


def jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    """One JSON object per line, UTF-8, NaN refused."""
    return b"".join(json.dumps(row, ensure_ascii=False, allow_nan=False).encode() + b"\n" for row in rows)


def jsonl_gz(rows: Iterable[dict[str, Any]]) -> bytes:
    """`jsonl(rows)` gzipped with a zero timestamp, so equal rows give equal bytes."""
    return gzip.compress(jsonl(rows), compresslevel=6, mtime=0)
