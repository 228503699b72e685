"""One identity per asset (sae_assets/defs/identity.py): every config key is declared by the
assets whose bytes it shapes or named as shaping none, the code version and the manifest hash
come from the same keys, and no asset writes around its declaration. The checks against a
materialized graph (manifests, staleness, a new sweep point) are in tests/test_feature_assets.py,
which owns the whole-graph fixture."""

import re
from pathlib import Path

import pytest

from sae_assets import definitions
from sae_assets.core.config import RunConfig, config_keys, load_config
from sae_assets.defs import identity
from sae_assets.defs.identity import DECLARED, NOT_SHAPING_KEYS, AssetIdentity, identity_of

DEFS = Path(definitions.__file__).parent / "defs"


def test_every_config_key_shapes_some_asset_or_is_named_as_shaping_none():
    declared = {key for ident in DECLARED.values() for key in ident.keys}
    undecided = [key for key in config_keys() if key not in declared and key not in NOT_SHAPING_KEYS]
    assert not undecided, f"declare these keys beside the assets they shape, or in NOT_SHAPING_KEYS: {undecided}"
    assert not declared & set(NOT_SHAPING_KEYS)
    assert set(NOT_SHAPING_KEYS) <= set(config_keys()), "NOT_SHAPING_KEYS names keys that do not exist"


def test_every_asset_of_the_graph_has_one_identity_and_derives_its_code_version_from_it():
    cfg = load_config(overrides={"features": {"neuronpedia_export": True}})
    assets = definitions.graph_assets(cfg)
    names = {a.key.to_user_string() for a in assets}
    assert {name for name in names if "__" not in name} == set(DECLARED)
    # The packaged config serves both sweep points: the second's feature assets are copies of the
    # declared ones, named for it, reading their keys with the browser on it.
    served = {name for name in names if "__" in name}
    assert {name.split("__")[0] for name in served} == {"feature_samples", "feature_examples", "context_gather",
                                                         "context_windows", "site_json", "feature_matches"}
    assert {name.split("__")[1] for name in served} == {"topk_w1024_k32"}
    second = cfg.sae.sweep[1]
    for name in served:
        ident = identity_of(next(a for a in assets if a.key.to_user_string() == name))
        assert ident.dictionary == second.key
        base = DECLARED[name.split("__")[0]]
        assert ident.code_version(cfg) == base.code_version(cfg.browsing(second.key))
        if "feature_dictionary" in base.keys:
            assert ident.code_version(cfg) != base.code_version(cfg)
    for asset in assets:
        ident = identity_of(asset)
        assert asset.code_versions_by_key[asset.key] == ident.code_version(cfg)
        assert asset.op.pool == ident.pool


def test_code_version_and_manifest_hash_change_with_exactly_the_same_keys():
    """For every asset and every key it declares, a changed value changes both its code version
    and its manifest hash; for a key it does not declare, neither."""
    base = RunConfig()
    changed = {  # one valid edit of a key of each section, and of a derived value
        "corpus.min_document_chars": {"corpus": {"min_document_chars": 41}},
        "tokenizer.context_length": {"tokenizer": {"context_length": 64}},
        "model.seed": {"model": {"seed": 1}},
        "activations.dtype": {"activations": {"dtype": "float16"}},
        "shuffle.block_rows": {"shuffle": {"block_rows": 100}},
        "sae.aux_k": {"sae": {"aux_k": 8}},
        "sae.eval_sequences": {"sae": {"eval_sequences": 7}},
        "features.window_after": {"features": {"window_after": 3}},
        "attribution.ablation_units": {"attribution": {"ablation_units": 3}},
        "sae_hook": {"activations": {"hook_points": ["blocks.0.hook_resid_post"]}},
    }
    every_key = {key for ident in DECLARED.values() for key in ident.keys}
    for key, override in changed.items():
        edited = load_config(overrides=override)
        assert edited.value_at(key) != base.value_at(key)
        moved = {k for k in every_key if edited.value_at(k) != base.value_at(k)}  # the edit and what derives from it
        for ident in DECLARED.values():
            partition = "relu-w1024-l1_5" if ident.partition_config else "shard-0000"
            code_changed = ident.code_version(edited) != ident.code_version(base)
            hash_changed = ident.config_hash(edited, partition) != ident.config_hash(base, partition)
            assert code_changed == hash_changed == bool(moved & set(ident.keys)), (ident.name, key)
            if key in ident.keys:
                assert code_changed, (ident.name, key)


def test_a_partition_carries_its_sweep_point_in_the_manifest_hash_not_the_code_version():
    base = RunConfig()
    grown = load_config(overrides={"sae": {"sweep": [
        {"architecture": "relu", "width": 1024, "sparsity": 5}, {"architecture": "topk", "width": 1024, "sparsity": 32},
        {"architecture": "topk", "width": 2048, "sparsity": 64}]}})
    for ident in DECLARED.values():
        assert ident.code_version(grown) == ident.code_version(base), ident.name
    sae = DECLARED["sae_dictionary"]
    assert sae.config_hash(grown, "relu-w1024-l1_5") == sae.config_hash(base, "relu-w1024-l1_5")
    assert sae.config_hash(grown, "relu-w1024-l1_5") != sae.config_hash(grown, "topk-w1024-k32")


def test_an_architectures_training_revision_is_in_its_dictionaries_hash_and_no_other():
    """SparseAutoencoder.training_revision: a point of an architecture whose training changed in
    code carries the revision (so its stored dictionaries are stale); one at revision 0 hashes
    as the plain point, as before revisions existed."""
    from sae_assets.core.sae import ARCHITECTURES

    cfg = load_config(overrides={"sae": {"sweep": [
        {"architecture": "relu", "width": 64, "sparsity": 5},
        {"architecture": "jumprelu", "width": 64, "sparsity": 0.1}]}})
    relu, jumprelu = cfg.sae.sweep
    assert ARCHITECTURES["relu"].training_revision == 0 and ARCHITECTURES["jumprelu"].training_revision > 0
    assert identity.dictionary_point(cfg, relu.key) == relu.as_dict()
    assert identity.dictionary_point(cfg, jumprelu.key) == {
        **jumprelu.as_dict(), "training_revision": ARCHITECTURES["jumprelu"].training_revision}



def test_training_revisions_come_with_a_version_of_sae_dictionary_that_marks_them_stale():
    """Dagster's staleness is the code version (the partition hash is not read), so the revisions
    in the code must be the ones sae_dictionary's current version was bumped for."""
    from sae_assets.core.sae import ARCHITECTURES
    from sae_assets.defs.dictionary_assets import SAE_DICTIONARY, TRAINED_REVISIONS

    revisions = {name: cls.training_revision for name, cls in ARCHITECTURES.items() if cls.training_revision}
    assert revisions == TRAINED_REVISIONS, "bump SAE_DICTIONARY's version and TRAINED_REVISIONS together"
    assert SAE_DICTIONARY.version != "2", "version 2 trained JumpReLU and Gated the old way"


def test_no_asset_module_writes_around_its_identity():
    """Every partition is written through AssetIdentity.writer, so its manifest hash is the declared one."""
    for module in DEFS.glob("*.py"):
        if module.name == "identity.py":
            continue
        text = module.read_text()
        assert not re.search(r"store\.writer\(|\.section_hash\(|code_version=\"", text), \
            f"{module.name} writes a partition or sets a code version around its AssetIdentity"


def test_declarations_refuse_unknown_not_shaping_and_repeated_keys():
    with pytest.raises(Exception, match="config key 'sae.nope' does not exist"):
        AssetIdentity("probe_unknown", version="1", keys=("sae.nope",))
    with pytest.raises(ValueError, match="shapes no bytes"):
        AssetIdentity("probe_device", version="1", keys=("sae.device",))
    with pytest.raises(ValueError, match="declares its identity twice"):
        AssetIdentity("sae_dictionary", version="9", keys=())
    with pytest.raises(TypeError, match="comes from the identity declaration"):
        DECLARED["tokenizer"].asset(code_version="2")
    assert "probe_unknown" not in DECLARED and "probe_device" not in DECLARED
    assert identity.device_assets()["sae_dictionary"] == "sae.device"
