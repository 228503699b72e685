"""Transcoders: a sweep point that reads one hook and reconstructs another (an MLP's input ->
its output), from the core module to the browsed feature pages.

Core: every architecture trains as a transcoder on toy pairs (x, y) = (c A, c B) of the same
sparse codes c and recovers y from x; the fused ReLU / JumpReLU losses keep their gradients
equal to the autograd graph with a target; files round-trip in SAELens' transcoder layout;
resampling points revived decoders at targets and encoders at inputs; the shuffled reader
serves two hook columns side by side; the config refuses bad points by key. Metrics: an oracle
"transcoder" (the MLP itself) spliced in at the output hook recovers the clean loss exactly.
Graph: a tiny graph caches three hooks in one pass, trains and scores a transcoder point and
builds the feature browser on its features (computed on the input hook), in Chromium.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from support import TINY, fused_and_graph_losses, toy_sae_config, write_run_config

from sae_assets.core.activations.reader import ShuffledActivationReader
from sae_assets.core.config import ConfigError, DictionaryPoint, config_from_dict, replace
from sae_assets.core.sae import StepInfo, build_sae, load_sae, save_sae, train_sae
from sae_assets.core.sae.build import make_sae
from sae_assets.core.sae.evaluation import evaluate_dictionary
from sae_assets.core.sae.resample import resample_dead_features
from sae_assets.core.sae.toy import make_toy_data, mmcs, toy_batches
from sae_assets.core.sae.training import make_optimizer

D, E, G, F = 12, 10, 24, 48  # input width, target width, toy features, dictionary width
SPARSITY = {"relu": 0.3, "jumprelu": 0.05, "gated": 0.3, "topk": 4, "batchtopk": 4, "matryoshka": 4}
MLP_IN, MLP_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def pairs():
    """Toy codes over G directions in D + E dims: a row's first D values are x, the rest y."""
    return make_toy_data(G, D + E, seed=3, mean_active=3.0, exponent=0.5)


def _point(arch: str) -> DictionaryPoint:
    return DictionaryPoint(arch, F, SPARSITY[arch])


def _fvu(sae, rows: torch.Tensor) -> float:
    x, y = rows[:, :D], rows[:, D:]
    with torch.no_grad():
        error = (sae.decode(sae.encode(x)) - y).pow(2).sum()
    return float(error / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize("arch", list(SPARSITY))
def test_every_architecture_trains_as_a_transcoder_from_one_space_to_another(pairs, arch):
    point = _point(arch)
    cfg = toy_sae_config(point, 400, 128, init="orthogonal", learning_rate=3e-3)
    batches = toy_batches(pairs, 128, seed=1)
    sae = build_sae(point, D, cfg, next(batches(0)), d_out=E)
    assert sae.transcoder and sae.W_enc.shape == (D, F) and sae.W_dec.shape == (F, E) and sae.b_dec.shape == (E,)
    held_out = next(toy_batches(pairs, 2048, seed=99)(0))
    before = _fvu(sae, held_out)
    train_sae(sae, batches, cfg, point)
    after = _fvu(sae, held_out)
    # y is a function of x through the shared codes; the decoder must find the codes' y-directions.
    assert after < 0.35 and after < before / 3, (before, after)
    assert mmcs(sae.W_dec, pairs.features_GD[:, D:]) > 0.7
    with pytest.raises(ValueError, match="needs target_BD"):
        sae.loss(held_out[:8, :D])


@pytest.mark.parametrize("arch", ["relu", "jumprelu"])
def test_fused_transcoder_losses_have_the_autograd_graphs_gradients(pairs, arch):
    torch.manual_seed(0)
    sae = make_sae(_point(arch), D, toy_sae_config(_point(arch), 10, 64), d_out=E)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.input_scale.fill_(1.7)
        sae.output_scale.fill_(0.6)
    rows = next(toy_batches(pairs, 64)(0))
    (fused, fused_grads, fused_gx), (graph, graph_grads, graph_gx) = fused_and_graph_losses(
        sae, rows[:, :D], StepInfo(step=30, total_steps=100), target=rows[:, D:])
    expected_mse = (sae.decode_scaled(graph.f.detach()) - rows[:, D:] * 0.6).pow(2).sum(-1).mean()
    assert torch.allclose(fused.mse, expected_mse, rtol=1e-5) and torch.allclose(graph.mse, expected_mse, rtol=1e-5)
    for name in ("total", "mse", "sparsity", "l0"):
        assert torch.allclose(getattr(fused, name), getattr(graph, name), rtol=1e-5, atol=1e-5), name
    for name, grad in fused_grads.items():  # includes the target's gradient
        assert torch.allclose(grad, graph_grads[name], rtol=1e-4, atol=1e-5), name
    assert torch.allclose(fused_gx, graph_gx, rtol=1e-4, atol=1e-5)
    assert fused_grads["target"].abs().sum() > 0


@pytest.mark.parametrize("arch,saelens", [("relu", "transcoder"), ("jumprelu", "jumprelu_transcoder"),
                                          ("batchtopk", "jumprelu_transcoder"), ("topk", "topk_transcoder"),
                                          ("gated", "gated_transcoder")])
def test_transcoder_files_round_trip_in_saelens_transcoder_layout(pairs, arch, saelens, tmp_path):
    point = _point(arch)
    cfg = toy_sae_config(point, 30, 64, init="orthogonal")
    sae = build_sae(point, D, cfg, next(toy_batches(pairs, 256)(0)), d_out=E)
    train_sae(sae, toy_batches(pairs, 64), cfg, point)
    directory = save_sae(sae, tmp_path / arch, hook_name=MLP_IN, hook_name_out=MLP_OUT)
    saved = json.loads((directory / "cfg.json").read_text())
    assert saved["architecture"] == saelens and saved["d_in"] == D and saved["d_out"] == E
    assert saved["apply_b_dec_to_input"] is False
    assert saved["metadata"]["hook_name"] == MLP_IN and saved["metadata"]["hook_name_out"] == MLP_OUT
    assert saved["metadata"]["hook_layer_out"] == 0
    loaded = load_sae(directory)
    x = next(toy_batches(pairs, 32, seed=5)(0))[:, :D] * 2
    assert loaded.transcoder and torch.allclose(loaded(x)[0], sae(x)[0], atol=1e-5)
    assert torch.equal(loaded.encode(x) != 0, sae.encode(x) != 0)
    with pytest.raises(ValueError, match="hook_name_out"):
        save_sae(sae, tmp_path / "unnamed", hook_name=MLP_IN)


def test_resampling_a_transcoder_aims_decoders_at_targets_and_encoders_at_inputs(pairs):
    point = _point("relu")
    sae = build_sae(point, D, toy_sae_config(point, 10, 64, init="orthogonal"), next(toy_batches(pairs, 256)(0)),
                    d_out=E)
    rows = next(toy_batches(pairs, 256, seed=7)(0))
    rows = rows[rows.norm(dim=-1) > 0]
    x, y = rows[:, :D], rows[:, D:]
    dead_F = torch.zeros(F, dtype=torch.bool)
    dead_F[::5] = True
    revived = resample_dead_features(sae, make_optimizer(sae, 1e-3), x, dead_F, torch.Generator().manual_seed(0),
                                     target_BE=y)
    assert torch.equal(revived, dead_F.nonzero().squeeze(-1))
    targets = torch.nn.functional.normalize(y * sae.output_scale - sae.b_dec, dim=-1)  # (N, E)
    inputs = torch.nn.functional.normalize(x * sae.input_scale, dim=-1)  # (N, D)
    with torch.no_grad():
        for feature in revived.tolist():
            row = int((targets @ sae.W_dec[feature]).argmax())  # the drawn row: its target direction is the decoder
            assert float(targets[row] @ sae.W_dec[feature]) == pytest.approx(1.0, abs=1e-5)
            column = torch.nn.functional.normalize(sae.W_enc[:, feature], dim=0)
            assert float(inputs[row] @ column) == pytest.approx(1.0, abs=1e-5), "the same row's input is the encoder"
    with pytest.raises(ValueError, match="needs its targets"):
        resample_dead_features(sae, make_optimizer(sae, 1e-3), x, dead_F, torch.Generator())
    with pytest.raises(ValueError, match="not for a transcoder"):
        resample_dead_features(sae, make_optimizer(sae, 1e-3), x, dead_F, torch.Generator(), method="rare",
                               target_BE=y)


def _bucket(n: int, seed: int, chunks_a: int, chunks_b: int) -> pa.Table:
    """A shuffled-bucket-like table with hook columns 'a' (width 3) and 'b' (width 2), chunked differently."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=(n, 2)).astype(np.float32)

    def column(values, chunks):
        cuts = np.linspace(0, n, chunks + 1).astype(int)
        return pa.chunked_array([pa.FixedSizeListArray.from_arrays(pa.array(values[lo:hi].reshape(-1)), values.shape[1])
                                 for lo, hi in zip(cuts, cuts[1:])])
    index = np.arange(n, dtype=np.int64) + seed * 1000
    return pa.table({"token_index": pa.chunked_array([pa.array(index)]), "a": column(a, chunks_a),
                     "b": column(b, chunks_b)})


def test_the_reader_serves_two_hooks_side_by_side_row_for_row():
    buckets = [_bucket(50, 1, 3, 2), _bucket(37, 2, 1, 4)]
    both = ShuffledActivationReader(buckets, hook=("a", "b"), batch_size=16, seed=4, with_token_index=True)
    only_a = ShuffledActivationReader(buckets, hook="a", batch_size=16, seed=4, with_token_index=True)
    only_b = ShuffledActivationReader(buckets, hook="b", batch_size=16, seed=4, with_token_index=True)
    rows = list(zip(both.epoch(1), only_a.epoch(1), only_b.epoch(1)))
    assert sum(len(pair[0][0]) for pair in rows) == 87
    for (ab, index), (a, index_a), (b, index_b) in rows:
        assert ab.shape[1] == 5 and torch.equal(index, index_a) and torch.equal(index, index_b)
        assert torch.equal(ab, torch.cat([a, b], dim=1))
    with pytest.raises(KeyError, match="no column 'c'"):
        ShuffledActivationReader(buckets, hook=("a", "c"), batch_size=16, seed=4)


def _config(**sae):
    data = {"activations": {"hook_points": ["blocks.0.hook_resid_post", MLP_IN, MLP_OUT]},
            "sae": {"sweep": [{"architecture": "relu", "width": 64, "sparsity": 1}], **sae}}
    return config_from_dict(data)


def test_transcoder_points_are_keyed_hashed_and_checked_by_key():
    point = {"architecture": "topk", "width": 64, "sparsity": 8, "hook": MLP_IN, "target_hook": MLP_OUT}
    cfg = _config(sweep=[{"architecture": "relu", "width": 64, "sparsity": 1}, point])
    transcoder = cfg.sae.sweep[1]
    assert transcoder.key == f"topk-w64-k8-in-{MLP_IN}-out-{MLP_OUT}"
    assert cfg.point_hooks(transcoder) == (MLP_IN, MLP_OUT) and transcoder.is_transcoder
    assert cfg.point_hooks(cfg.sae.sweep[0]) == ("blocks.0.hook_resid_post",) * 2
    assert cfg.training_columns(transcoder) == (MLP_IN, MLP_OUT)  # its rows: input | target
    assert cfg.training_columns(cfg.sae.sweep[0]) == ("blocks.0.hook_resid_post",)
    # A point without hooks hashes as it did before the fields existed.
    assert set(cfg.sae.sweep[0].as_dict()) == {"architecture", "width", "sparsity"}
    bad = {
        "target_hook": ({**point, "target_hook": "blocks.0.hook_resid_mid"}, r"sae.sweep\[.*\].target_hook.*not cached"),
        "hook": ({**point, "hook": "blocks.0.hook_attn_out"}, r"sae.sweep\[.*\].hook.*not cached"),
        "same": ({**point, "target_hook": MLP_IN}, r"target_hook.*is the hook the point reads"),
    }
    for name, (spec, message) in bad.items():
        with pytest.raises(ConfigError, match=message):
            _config(sweep=[spec])
    with pytest.raises(ConfigError, match=r"sae.init.*transcoder topk-w64-k8"):
        _config(sweep=[point], init="svd")
    with pytest.raises(ConfigError, match=r"sae.resample_method.*transcoder"):
        _config(sweep=[point], resample_method="rare")
    assert _config(sweep=[point], resample=False, resample_method="rare").sae.resample_method == "rare"


class _OracleTranscoder:
    """The MLP itself as a 'dictionary' from its input to its output: features = the input."""

    def __init__(self, model, d_model: int, *, zero: bool = False):
        native = model.blocks[0].mlp.original_component  # its plain Linear layers: no hook fires again
        self.fc_in, self.act, self.fc_out = native.fc_in.original_component, native.act, native.fc_out.original_component
        self.zero, self.d_in = zero, d_model
        self.W_dec = torch.zeros(d_model, d_model)

    def encode(self, x):
        return x

    def decode(self, f):
        return torch.zeros_like(f) if self.zero else self.fc_out(self.act(self.fc_in(f)))


def test_a_transcoder_is_spliced_in_at_its_output_hook_from_its_input_hook():
    from sae_assets.core.config import ModelConfig
    from sae_assets.core.model.lm import build_embedded_model

    model = build_embedded_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32), vocab_size=50,
                                 context_length=8)
    tokens = np.random.default_rng(0).integers(0, 50, size=(12, 8))

    def evaluate(dictionary, hook=MLP_IN, target=MLP_OUT):
        return evaluate_dictionary(model, dictionary, hook, tokens[:6], tokens[6:], tokens[:6], batch_size=4,
                                   target_hook=target).metrics

    exact = evaluate(_OracleTranscoder(model, 16))
    assert exact["fvu"] == pytest.approx(0.0, abs=1e-10) and exact["mse"] == pytest.approx(0.0, abs=1e-10)
    assert exact["sae_loss"] == pytest.approx(exact["clean_loss"], abs=1e-6)
    assert exact["loss_recovered"] == pytest.approx(1.0, abs=1e-5) and exact["kl_divergence"] == pytest.approx(0, abs=1e-6)
    zeroed = evaluate(_OracleTranscoder(model, 16, zero=True))  # outputs zero: the zero ablation of the MLP
    assert zeroed["sae_loss"] == pytest.approx(zeroed["zero_ablation_loss"], abs=1e-6)
    assert zeroed["loss_recovered"] == pytest.approx(0.0, abs=1e-5) and zeroed["fvu"] > 0.5
    with pytest.raises(ValueError, match="did not run before its target hook"):
        evaluate(_OracleTranscoder(model, 16), hook=MLP_OUT, target=MLP_IN)


@pytest.fixture(scope="module")
def transcoder_graph(tmp_path_factory):
    import dagster as dg

    from sae_assets.definitions import build_resources
    from sae_assets.demo import materialize_all

    directory = tmp_path_factory.mktemp("transcoders")
    sweep = [{"architecture": "relu", "width": 64, "sparsity": 0.3, "hook": MLP_IN, "target_hook": MLP_OUT},
             {"architecture": "topk", "width": 64, "sparsity": 4}]
    config_path = write_run_config(
        directory, TINY, {"root": str(directory / "artifacts")},
        activations={"hook_points": ["blocks.0.hook_resid_post", MLP_IN, MLP_OUT], "batch_size": 16},
        sae={**TINY["sae"], "sweep": sweep},
        features={"dictionary": f"relu-w64-l1_0.3-in-{MLP_IN}-out-{MLP_OUT}", "range_width": 32, "top_k": 4,
                  "random_examples": 2, "activation_levels": 2, "examples_per_level": 1, "batch_size": 100,
                  "window_before": 4, "window_after": 2})
    instance = dg.DagsterInstance.ephemeral()
    materialize_all(instance, config_path, log=lambda *_: None)
    return instance, config_path, build_resources(config_path)["storage"].store()


def test_the_graph_trains_scores_and_browses_a_transcoder(transcoder_graph, tmp_path):
    from resources.arrow_files import open_ipc_table
    from sae_assets.core.activations.reader import to_numpy_matrix
    from sae_assets.core.config import load_config
    from sae_assets.core.schemas import SHARD_BITS
    from sae_assets.defs.activation_assets import ACTIVATIONS_FILE
    from sae_assets.defs.dictionary_assets import load_dictionary
    from sae_assets.defs.site_files import read_feature_script

    instance, config_path, store = transcoder_graph
    cfg = load_config(config_path)
    key = cfg.feature_dictionary.key
    # One forward pass cached all three hooks: one manifest per shard holds every column.
    shard = store.require("cached_activations", "shard-0000")
    assert set(shard.extra["format"]["hook_widths"]) == {"blocks.0.hook_resid_post", MLP_IN, MLP_OUT}
    manifest = store.require("sae_dictionary", key)
    assert (manifest.extra["hook"], manifest.extra["target_hook"]) == (MLP_IN, MLP_OUT)
    saved = json.loads(store.read_bytes(manifest, "cfg.json"))
    assert saved["architecture"] == "transcoder" and saved["metadata"]["hook_name_out"] == MLP_OUT
    sae, _ = load_dictionary(store, key)
    assert sae.transcoder
    # Scored against the MLP's output and spliced in there: better than zero-ablating the MLP.
    metrics = store.require("sae_metrics", key).extra["metrics"]
    assert metrics["fvu"] < 0.9 and metrics["loss_recovered"] > 0.2, metrics
    assert metrics["zero_ablation_loss"] > metrics["clean_loss"]
    sae_metrics = store.require("sae_metrics", "topk-w64-k4").extra["metrics"]  # the SAE beside it is unchanged
    assert sae_metrics["zero_ablation_loss"] != metrics["zero_ablation_loss"], "each is ablated at its own hook"
    # The browser's features are the transcoder's, computed on its input hook.
    site = store.require("feature_site", None)
    site_dir = store.fetch(site, "index.html").parent
    acts = to_numpy_matrix(open_ipc_table(store.fetch(shard, ACTIVATIONS_FILE)).column(MLP_IN))  # shard 0: row = offset
    checked = 0
    for path in sorted(site_dir.glob("feature-*.js"))[:12]:
        doc = read_feature_script(path.read_text())[0]
        for example in doc["top"]:
            row = int(example["token_index"])
            if row >> SHARD_BITS != 0:  # shard 0's rows only
                continue
            with torch.no_grad():
                expected = float(sae.encode(torch.from_numpy(acts[row:row + 1]))[0, doc["feature"]])
            assert expected == pytest.approx(example["activation"], rel=2e-3, abs=1e-5)
            checked += 1
    assert checked > 0


def test_transcoder_feature_pages_open_in_chromium(transcoder_graph, tmp_path):
    from browser import headless_chromium, require_chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from sae_assets.defs.site_files import read_feature_script

    require_chromium()
    _, _, store = transcoder_graph
    site_dir = store.fetch(store.require("feature_site", None), "index.html").parent
    docs = [read_feature_script(p.read_text())[0] for p in sorted(site_dir.glob("feature-*.js"))]
    doc = next(d for d in docs if d["top"])
    driver = headless_chromium(tmp_path / "profile", "1200,1400")
    try:
        driver.get((site_dir / "index.html").as_uri() + f"#feature={doc['feature']}")
        WebDriverWait(driver, 20).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == str(doc["feature"]))
        centres = driver.find_elements(By.CSS_SELECTOR, "#top-examples .tok.center")
        assert [float(c.get_attribute("data-act")) for c in centres] == pytest.approx(
            [e["activation"] for e in doc["top"]], rel=2e-3)
        assert "-out-blocks.0.hook_mlp_out" in driver.find_element(By.TAG_NAME, "body").text
        driver.get((site_dir / "index.html").as_uri() + "#overview")
        WebDriverWait(driver, 20).until(
            lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-overview") == "ready")
        said = driver.find_element(By.CSS_SELECTOR, "#overview-view .hooks").text
        assert said == f"transcoder: reads {MLP_IN}, reconstructs {MLP_OUT}"
    finally:
        driver.quit()
