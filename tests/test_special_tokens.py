"""Special tokens (sae_assets/core/corpus/special_tokens.py): which ids are special, the filters
that keep their positions out of SAE training and the feature statistics, the config keys that
switch it, and the browser documents that mark them. The whole-graph checks (no special token
among any feature's examples, training and evaluation rows without them, and with exclusion off
they come back) are in tests/test_feature_assets.py, which owns the graph fixture; the
evaluation's masks in tests/test_sae_metrics.py; the browser's marking in
tests/test_feature_browser.py."""

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from support import HOOK, SHARD_WIDTH, shard_table
from tokenizers import AddedToken

from sae_assets.core.activations.reader import ShuffledActivationReader
from sae_assets.core.config import ConfigError, config_from_dict
from sae_assets.core.corpus import tokenization
from sae_assets.core.corpus.special_tokens import keep_positions, resolve_special_token_ids
from sae_assets.core.features import panels, site_data
from sae_assets.core.features import windows as feature_windows
from sae_assets.core.features.merge import merge_feature_samples
from sae_assets.core.features.sampling import sample_activation_table
from sae_assets.core.sae.relu import ReluSae

TEXTS = ["def f(x):\n    return x + 1\n", "Return the sum of a and b.", "class A:\n    pass\n"] * 20


@pytest.fixture(scope="module")
def bpe():
    return tokenization.train_bpe(TEXTS, 280)


def test_auto_is_the_end_of_text_id_and_every_token_the_tokenizer_flags_special(bpe):
    eos = tokenization.end_of_text_id(bpe)
    assert resolve_special_token_ids("auto", bpe, eos_id=eos) == (eos,)
    bpe.add_special_tokens([AddedToken("<pad>", special=True)])  # a pretrained model's padding token
    bpe.add_tokens([AddedToken("<not-special>", special=False)])
    pad, plain = bpe.token_to_id("<pad>"), bpe.token_to_id("<not-special>")
    assert resolve_special_token_ids("auto", bpe, eos_id=eos) == (eos, pad)
    assert plain not in resolve_special_token_ids("auto", bpe, eos_id=eos)
    assert resolve_special_token_ids((7, 3, 7), bpe, eos_id=eos) == (3, 7)  # a list is taken as given
    with pytest.raises(ConfigError, match=r"'special_tokens.token_ids\[1\]' is 9999, not an id of the tokenizer"):
        resolve_special_token_ids((3, 9999), bpe, eos_id=eos)


@pytest.mark.parametrize(("data", "needle"), [
    ({"special_tokens": {"token_ids": [1, -2]}}, "'special_tokens.token_ids[1]' is -2; token ids are >= 0"),
    ({"special_tokens": {"token_ids": [5000]}}, "'special_tokens.token_ids[0]' is 5000, not below tokenizer.vocab_size"),
    ({"special_tokens": {"token_ids": "eos"}}, "'special_tokens.token_ids' is 'eos', which fits none of its forms"),
    ({"special_tokens": {"token_ids": [True]}}, "'special_tokens.token_ids' is [True], which fits none"),
    ({"special_tokens": {"exclude": "yes"}}, "'special_tokens.exclude' must be true or false"),
    ({"special_tokens": {"ids": [1]}}, "unknown config key 'special_tokens.ids'"),
])
def test_bad_special_token_settings_name_the_key(data, needle):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert needle in str(info.value)


def test_the_exclusion_hashed_into_identities_is_none_when_switched_off():
    assert config_from_dict({}).special_token_exclusion == "auto"
    assert config_from_dict({"special_tokens": {"token_ids": [3, 1]}}).special_token_exclusion == (3, 1)
    off = config_from_dict({"special_tokens": {"exclude": False, "token_ids": [3, 1]}})
    assert off.special_token_exclusion == () and off.special_tokens.token_ids == (3, 1)
    # A pretrained tokenizer's vocabulary is only known once loaded: ids are checked then.
    named = {"model": {"kind": "named", "name": "gpt2"}, "tokenizer": {"kind": "pretrained", "vocab_size": 300}}
    assert config_from_dict({**named, "special_tokens": {"token_ids": [50256]}}).special_tokens.token_ids == (50256,)


def test_the_sampler_drops_excluded_rows_batch_by_batch_as_if_they_were_never_cached():
    table = shard_table(0, 6, seed=1)  # token ids in 0..49
    ids = table.column("token_id").to_numpy()
    excluded = (0, 3, 17)
    keep = keep_positions(ids, excluded)
    assert keep.shape == ids.shape and keep.sum() == (~np.isin(ids, excluded)).sum() < len(ids)
    assert keep_positions(ids.reshape(6, -1), ()).all()
    torch.manual_seed(0)
    W_DW = torch.randn(SHARD_WIDTH, 12)
    sample = dict(hook=HOOK, encode_range=lambda x: (x @ W_DW).relu(), lo=0, hi=12, top_k=3, sample_k=5, seed=2)
    # batch_size 7 cuts batches across special rows; one batch (rows 0..6 or so) may be all kept
    dropped = sample_activation_table(table, batch_size=7, exclude_token_ids=excluded, **sample)
    filtered = sample_activation_table(table.filter(pa.array(keep)), batch_size=7, **sample)
    assert dropped.n_tokens == int(keep.sum())
    for a, b in zip(dropped.stored(), filtered.stored()):  # the same entries; values up to the product's rounding
        assert a.column_names == b.column_names and a.num_rows == b.num_rows
        for name in a.column_names:
            x, y = a.column(name).to_numpy(zero_copy_only=False), b.column(name).to_numpy(zero_copy_only=False)
            if name in ("activation", "sum", "max", "hist") or x.dtype == object:
                assert np.allclose(np.stack(x) if x.dtype == object else x,
                                   np.stack(y) if y.dtype == object else y, rtol=1e-5), name
            else:
                assert np.array_equal(x, y), name
    assert not np.isin(dropped.top.column("token_index").to_numpy(),
                       table.column("token_index").to_numpy()[~keep]).any()
    everything = sample_activation_table(table, batch_size=7, **sample)
    assert everything.n_tokens == len(ids) and not everything.top.equals(dropped.top)
    with pytest.raises(ValueError, match="no column 'token_id'"):
        sample_activation_table(table.drop_columns(["token_id"]), batch_size=7, exclude_token_ids=excluded, **sample)


def test_the_reader_drops_excluded_rows_and_keeps_every_other_row_once_per_epoch():
    tables = [shard_table(b, 7, seed=b) for b in range(3)]
    excluded = (1, 2, 40)
    every = np.concatenate([t.column("token_index").to_numpy() for t in tables])
    ids = np.concatenate([t.column("token_id").to_numpy() for t in tables])
    want = np.sort(every[~np.isin(ids, excluded)])
    plain = ShuffledActivationReader(tables, hook=HOOK, batch_size=16, seed=5, with_token_index=True)
    reader = ShuffledActivationReader(tables, hook=HOOK, batch_size=16, seed=5, with_token_index=True,
                                      exclude_token_ids=excluded)
    for epoch in range(2):
        batches = list(reader.epoch(epoch))
        assert all(len(index) == 16 for _, index in batches[:-1]) and 0 < len(batches[-1][1]) <= 16
        got = np.concatenate([index.numpy() for _, index in batches])
        assert np.array_equal(np.sort(got), want), epoch
        # The kept rows come in the order the unfiltered reader gives them, with their activations.
        full_acts, full_index = zip(*plain.epoch(epoch))
        full_index = np.concatenate([i.numpy() for i in full_index])
        order = full_index[np.isin(full_index, want)]
        assert np.array_equal(got, order)
        full_acts = np.concatenate([a.numpy() for a in full_acts])[np.isin(full_index, want)]
        assert np.array_equal(np.concatenate([a.numpy() for a, _ in batches]), full_acts)
    with pytest.raises(ValueError, match="skip_batches needs a reader without exclude_token_ids"):
        next(reader.epoch(0, skip_batches=1))


def test_feature_documents_list_the_window_positions_of_special_tokens():
    """site_json's examples carry `special`: the browser marks those positions (app.js)."""
    table = shard_table(0, 8, seed=2)
    torch.manual_seed(0)
    sae = ReluSae(table.column(HOOK).type.list_size, 6, l1_coefficient=1.0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    samples = merge_feature_samples([sample_activation_table(
        table, hook=HOOK, encode_range=lambda x: sae.encode_range(x, 0, 6), lo=0, hi=6, top_k=3, sample_k=6, seed=0,
        batch_size=32)])
    shown = feature_windows.select_shown_examples(samples, random_examples=2, activation_levels=1, examples_per_level=1)
    windows = feature_windows.gather_context_windows(
        shown, table, lambda x: sae.encode_range(x, 0, 6), shard=0, hook=HOOK, context_length=10, before=4, after=3,
        lo=0, batch_size=32, where="test")
    strings = [f"t{i}" for i in range(50)]
    logits = panels.logit_effects(sae.decoder_directions(0, 6), torch.randn(table.column(HOOK).type.list_size, 50), 2)
    assert windows.num_rows > 0
    special = {windows.column("token_ids")[0].as_py()[0], 11, 23}  # one occurs in a window for certain
    docs = list(site_data.feature_documents(samples, shown, windows, strings, logits=logits, activation_levels=1,
                                            dictionary="tiny", special_ids=special))
    by_key = {(w["feature"], w["token_index"]): w["token_ids"] for w in windows.to_pylist()}
    marked = 0
    for doc in docs:
        for example in [*doc["top"], *doc["random"], *(e for level in doc["levels"] for e in level["examples"])]:
            ids = by_key[(doc["feature"], example["token_index"])]
            assert example.get("special", []) == [p for p, i in enumerate(ids) if i in special]
            marked += len(example.get("special", []))
    assert marked > 0
    plain = list(site_data.feature_documents(samples, shown, windows, strings, logits=logits, activation_levels=1,
                                             dictionary="tiny"))
    assert all("special" not in e for doc in plain for e in doc["top"])


def test_the_keys_make_stale_exactly_the_assets_whose_bytes_they_change():
    from sae_assets import definitions  # noqa: F401  (declares every asset's identity)
    from sae_assets.defs.identity import DECLARED

    def changed(edit: dict, base: dict | None = None) -> set[str]:
        before = config_from_dict({"special_tokens": base or {}})
        after = config_from_dict({"special_tokens": {**(base or {}), **edit}})
        return {name for name, ident in DECLARED.items() if ident.code_version(after) != ident.code_version(before)}

    excluding = {"sae_dictionary", "sae_metrics", "feature_samples", "feature_examples"}
    assert changed({"exclude": False}) == excluding
    assert changed({"token_ids": [0]}) == excluding | {"site_json"}  # which tokens are excluded, and marked
    assert changed({"token_ids": [0]}, base={"exclude": False}) == {"site_json"}  # marked only


def test_the_browser_marks_special_tokens_in_context(tmp_path):
    """app.js gives the window positions an example lists in `special` the class `special`, and
    no other token (headless Chromium on a one-feature synthetic site)."""
    from browser import headless_chromium, require_chromium

    require_chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from sae_assets.core.features.site_index import SiteRange
    from sae_assets.defs import site_files

    tokens = ["x", " =", "<|endoftext|>", "def", " f", "<pad>"]
    example = {"token_index": 4, "activation": 2.0, "center": 3, "tokens": tokens, "acts": [0, 1.0, 0.5, 2.0, 0, 0],
               "special": [2, 5]}
    plain = {**example, "token_index": 9, "tokens": ["a", "b", "c", "d", "e", "f"]}
    del plain["special"]
    doc = {"feature": 0, "dictionary": "tiny", "count": 2, "density": 0.1, "max": 2.0, "mean": 1.5,
           "histogram": [1, 1], "top": [example, plain], "random": [plain], "levels": [],
           "logits": {"top": [["d", 1.0]], "bottom": [["x", -1.0]]}}
    site = tmp_path / "site"
    site.mkdir()
    part = SiteRange([site_data.index_row(doc)], [(0, json.dumps(doc))], 20, [0.1, 1.0, 10.0])
    site_files.write_site_files(lambda name: site / name, [part], dictionary="tiny")
    driver = headless_chromium(tmp_path / "profile", "1000,800")
    try:
        driver.get((site / "index.html").as_uri() + "#feature=0")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "0")
        rows = driver.find_elements(By.CSS_SELECTOR, "#top-examples .example")
        assert len(rows) == 2
        marked = [[i for i, span in enumerate(row.find_elements(By.CSS_SELECTOR, ".tok"))
                   if "special" in span.get_attribute("class").split()] for row in rows]
        assert marked == [[2, 5], []]
        chip = driver.find_elements(By.CSS_SELECTOR, "#top-examples .tok.special")[0]
        assert chip.text == "<|endoftext|>"
        assert driver.execute_script("return getComputedStyle(arguments[0]).borderStyle", chip) == "dashed"
        assert len(driver.find_elements(By.CSS_SELECTOR, "#random-examples .tok.special")) == 0
    finally:
        driver.quit()
