"""sae_assets.core.sae: architectures, losses, initialisations, training pieces, resume and the SAELens layout.

Tiny shapes on toy data with known ground-truth features (`sae_assets.core.sae.toy`); torch
runs single-threaded here (faster for these shapes and immune to a busy machine).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from support import fused_and_graph_losses, toy_sae_config

from sae_assets.core.config import DictionaryPoint, SaeConfig, replace
from sae_assets.core.sae import (
    INITIALIZERS, ReluSae, SaeTrainingError, StepInfo, build_sae, export_tensors, init_decoder, load_sae, save_sae,
    train_sae,
)
from sae_assets.core.sae.checkpoint import CHECKPOINT_FILE
from sae_assets.core.sae.relu import l1_warmup_scale
from sae_assets.core.sae.resample import resample_dead_features
from sae_assets.core.sae.schedule import LrScheduler
from sae_assets.core.sae.toy import make_toy_data, mmcs, toy_batches
from sae_assets.core.sae.tracker import DeadFeatureTracker
from sae_assets.core.sae.training import make_optimizer, train_step

D, G, B = 32, 64, 128
RELU = DictionaryPoint("relu", G, 0.5)
TOPK = DictionaryPoint("topk", G, 4.0)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def toy():
    return make_toy_data(G, D, seed=0, mean_active=3.0, exponent=0.5)


def _cfg(point: DictionaryPoint, steps: int, **changes) -> SaeConfig:
    return toy_sae_config(point, steps, B, **changes)


def _sample(toy, rows: int = 1024) -> torch.Tensor:
    batches = toy_batches(toy, rows, seed=99)
    return next(batches(0))


def _with_dead(sae, n: int = 8):
    """The SAE with its first n features unable to fire (so they die and get resampled)."""
    with torch.no_grad():
        sae.b_enc[:n] = -100.0
    return sae


def _weights(sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


# --- architectures and losses -----------------------------------------------------------------

@pytest.mark.parametrize("point", [RELU, TOPK], ids=lambda p: p.key)
def test_training_reduces_mse_on_toy_data(toy, point):
    cfg = _cfg(point, 150)
    sae = build_sae(point, D, cfg, _sample(toy))
    held_out = _sample(toy, 512) * 3.0  # the caller's units need not be the scaled ones
    before = sae.loss(held_out).mse.item()
    outcome = train_sae(sae, toy_batches(toy, B, seed=1), replace(cfg), point, log_every=50)
    after = sae.loss(held_out).mse.item()
    assert outcome.steps == 150 and [row["step"] for row in outcome.curve] == [50, 100, 150]
    assert after < 0.5 * before, (before, after)
    assert set(outcome.curve[0]) == {"step", "tokens", "loss", "mse", "l0", "dead_fraction", "lr"}


def test_input_scale_makes_mean_norm_sqrt_d_and_outputs_stay_in_caller_units(toy):
    sample = _sample(toy) * 7.0
    sae = build_sae(RELU, D, _cfg(RELU, 10), sample)
    scaled_norm = (sample * sae.input_scale).norm(dim=-1).mean().item()
    assert scaled_norm == pytest.approx(math.sqrt(D), rel=1e-5)
    with torch.no_grad():
        sae.b_dec.fill_(0.5)
        x_hat, f = sae(sample)
        assert torch.allclose(x_hat, (f @ sae.W_dec + sae.b_dec) / sae.input_scale)
        assert torch.allclose(sae.decode(torch.zeros(1, G)), sae.b_dec / sae.input_scale)


def test_relu_loss_is_l1_weighted_by_decoder_norms_with_warmup(toy):
    sae = ReluSae(D, G, l1_coefficient=2.0, l1_warmup_fraction=0.5)
    with torch.no_grad():
        sae.initialize(init_decoder("anthropic", _sample(toy), G, torch.Generator().manual_seed(0)))
        sae.W_dec.mul_(torch.linspace(0.1, 3.0, G)[:, None])  # unequal row norms
        sae.b_enc.fill_(0.1)
        sae.input_scale.fill_(1.7)
    x = _sample(toy, 64)
    xs = x * 1.7
    f = torch.relu(xs @ sae.W_enc + sae.b_enc)
    weighted = (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    full = sae.loss(x, StepInfo(step=100, total_steps=100))
    half = sae.loss(x, StepInfo(step=25, total_steps=100))  # half way through a 50-step warm-up
    assert torch.allclose(full.sparsity, 2.0 * weighted)
    assert torch.allclose(half.sparsity, 1.0 * weighted)
    assert not torch.allclose(full.sparsity, 2.0 * f.sum(-1).mean())  # not the plain L1
    assert torch.allclose(full.total, full.mse + full.sparsity) and full.aux.item() == 0.0
    assert torch.allclose(full.mse, ((f @ sae.W_dec + sae.b_dec - xs) ** 2).sum(-1).mean())
    assert l1_warmup_scale(0, 100, 0.5) == 0.0 and l1_warmup_scale(50, 100, 0.5) == 1.0


def test_relu_fused_loss_equals_the_autograd_graph(toy):
    """ReLU's loss has its own backward (`_ReluRecipeLoss`): its values, gradients (weights and
    input) and per-feature counts equal those of the generic autograd graph, including a zero
    decoder row and a feature that never fires."""
    sae = ReluSae(D, G, l1_coefficient=2.0, l1_warmup_fraction=0.5)
    with torch.no_grad():
        sae.initialize(init_decoder("anthropic", _sample(toy), G, torch.Generator().manual_seed(0)))
        sae.W_dec.mul_(torch.linspace(0.1, 3.0, G)[:, None])
        sae.W_dec[5] = 0.0
        sae.b_enc.fill_(0.1)
        sae.b_enc[7] = -1e3  # never fires
        sae.b_dec.normal_(0, 0.1)
        sae.input_scale.fill_(1.7)
    x = _sample(toy, 64)
    (fused, fused_grads, fused_gx), (graph, graph_grads, graph_gx) = fused_and_graph_losses(
        sae, x, StepInfo(step=30, total_steps=100))
    for name in ("total", "mse", "sparsity", "aux", "l0"):
        assert torch.allclose(getattr(fused, name), getattr(graph, name), rtol=1e-5, atol=1e-5), name
    assert torch.equal(fused.f, graph.f.detach()) and torch.equal(fused.fired_F, graph.fired_F)
    assert torch.equal(fused.fired_F, (graph.f != 0).any(0)) and not fused.fired_F[7] and fused.fired_F.sum() > 1
    assert fused.l0.item() == (graph.f != 0).sum().item() / len(x)
    for name, a in fused_grads.items():
        assert torch.allclose(a, graph_grads[name], rtol=1e-4, atol=1e-5), name
    assert torch.allclose(fused_gx, graph_gx, rtol=1e-4, atol=1e-5)
    assert fused_grads["W_dec"].abs().sum() > 0  # not trivially zero


def test_topk_l0_is_k_and_auxk_needs_dead_latents(toy):
    sae = build_sae(TOPK, D, _cfg(TOPK, 10), _sample(toy))
    x = _sample(toy, 64)
    x = x[x.norm(dim=-1) > 0]  # a row where no toy feature fired is all zeros: nothing to activate
    none_dead = sae.loss(x, StepInfo(dead_F=torch.zeros(G, dtype=torch.bool)))
    assert none_dead.l0.item() == 4.0 and ((none_dead.f != 0).sum(-1) == 4).all()
    assert none_dead.aux.item() == 0.0 and none_dead.sparsity.item() == 0.0
    assert sae.loss(x).aux.item() == 0.0  # no mask at all
    dead_F = torch.zeros(G, dtype=torch.bool)
    dead_F[::3] = True
    some_dead = sae.loss(x, StepInfo(dead_F=dead_F))
    assert some_dead.aux.item() > 0.0
    assert torch.allclose(some_dead.total, some_dead.mse + some_dead.aux)
    sae.zero_grad()
    some_dead.aux.backward()
    enc_grad_F = sae.W_enc.grad.abs().sum(0)
    assert (enc_grad_F[~dead_F] == 0).all() and (enc_grad_F[dead_F] > 0).any()


def test_topk_keeps_decoder_rows_unit_norm(toy):
    sae = build_sae(TOPK, D, _cfg(TOPK, 10), _sample(toy))
    optimizer = make_optimizer(sae, 1e-2)
    for step, x in zip(range(5), toy_batches(toy, B)(0)):
        train_step(sae, optimizer, x, StepInfo(step, 5), 1e-2)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(G), atol=1e-5)


# --- initialisations --------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(INITIALIZERS))
def test_each_init_is_deterministic_with_unit_rows(toy, method):
    sample = _sample(toy)
    first = init_decoder(method, sample, G, torch.Generator().manual_seed(3))
    again = init_decoder(method, sample, G, torch.Generator().manual_seed(3))
    other = init_decoder(method, sample, G, torch.Generator().manual_seed(4))
    assert first.shape == (G, D) and torch.equal(first, again)
    assert torch.allclose(first.norm(dim=-1), torch.ones(G), atol=1e-5)
    assert not torch.equal(first, other)  # every method draws something (svd: its data rows)


def test_architectures_scale_the_init_as_their_recipe_says(toy):
    relu = build_sae(RELU, D, _cfg(RELU, 10), _sample(toy))
    topk = build_sae(TOPK, D, _cfg(TOPK, 10), _sample(toy))
    assert torch.allclose(relu.W_dec.norm(dim=-1), torch.full((G,), 0.1))
    assert torch.allclose(topk.W_dec.norm(dim=-1), torch.ones(G))
    sample = _sample(toy)
    for sae in (relu, topk):
        assert torch.equal(sae.W_enc, sae.W_dec.T) and (sae.b_enc == 0).all()
        # b_dec starts at the data mean, in the SAE's scaled units.
        assert torch.allclose(sae.b_dec, (sample.float() * sae.input_scale).mean(dim=0), atol=1e-5)


def test_data_informed_inits_start_at_higher_mmcs_than_orthogonal(toy):
    sample = _sample(toy, 2048)
    start = {m: mmcs(init_decoder(m, sample, G, torch.Generator().manual_seed(0)), toy.features_GD)
             for m in ("orthogonal", "xavier", "data", "svd", "kmeans_rare", "outlier_rare")}
    assert start["orthogonal"] < 0.45 and start["xavier"] < 0.45
    for method in ("data", "svd", "kmeans_rare", "outlier_rare"):
        assert start[method] > start["orthogonal"] + 0.1, start
    assert mmcs(toy.features_GD, toy.features_GD) == pytest.approx(1.0)


# --- training pieces ------------------------------------------------------------------------

def test_scheduler_warmup_constant_decay_and_rewarm():
    sched = LrScheduler(1.0, 100, warmup_steps=10, decay_fraction=0.2, rewarm_steps=10)
    assert sched.lr(0) == pytest.approx(0.1) and sched.lr(5) == pytest.approx(0.55)
    assert sched.lr(10) == sched.lr(50) == sched.lr(79) == 1.0
    assert sched.lr(90) == pytest.approx(0.5) and sched.lr(99) == pytest.approx(0.05)
    sched.on_resample(40)
    assert sched.lr(39) == 1.0 and sched.lr(40) == pytest.approx(0.1)
    assert sched.lr(45) == pytest.approx(0.55) and sched.lr(50) == 1.0
    sched.on_resample(85)  # a re-warm-up inside the decay multiplies with it
    assert sched.lr(85) == pytest.approx(0.1 * 0.75)
    copy = LrScheduler(1.0, 100, warmup_steps=10, decay_fraction=0.2, rewarm_steps=10)
    copy.load_state_dict(sched.state_dict())
    assert [copy.lr(s) for s in range(100)] == [sched.lr(s) for s in range(100)]
    off = LrScheduler(1.0, 100, warmup_steps=10, rewarm_steps=10, rewarm_after_resample=False)
    off.on_resample(40)
    assert off.lr(40) == 1.0


def test_dead_feature_tracker_counts_tokens_since_firing():
    tracker = DeadFeatureTracker(4, dead_after_tokens=20)
    fires = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 10)
    tracker.update(fires)
    tracker.update(fires)
    assert tracker.tokens_since_fired_F.tolist() == [0, 20, 20, 20] and not tracker.dead_mask().any()
    tracker.update(torch.tensor([[0.0, 0.0, 2.0, 0.0]] * 10))
    assert tracker.dead_mask().tolist() == [False, True, False, True]
    assert tracker.dead_fraction() == 0.5
    tracker.reset(torch.tensor([1]))
    assert tracker.dead_mask().tolist() == [False, False, False, True]
    copy = DeadFeatureTracker(4, 20)
    copy.load_state_dict(tracker.state_dict())
    assert torch.equal(copy.tokens_since_fired_F, tracker.tokens_since_fired_F)


def test_resampling_revives_dead_features_and_resets_only_their_adam_state(toy):
    sae = build_sae(RELU, D, _cfg(RELU, 10), _sample(toy))
    optimizer = make_optimizer(sae, 1e-3)
    batches = toy_batches(toy, B)(0)
    for step in range(3):
        train_step(sae, optimizer, next(batches), StepInfo(step, 10), 1e-3)
    dead_F = torch.zeros(G, dtype=torch.bool)
    dead_F[[1, 5, 17, 40]] = True
    with torch.no_grad():
        sae.b_enc[dead_F] = -100.0  # truly dead: they never fire
    before, adam_before = _weights(sae), {id(p): {k: v.clone() for k, v in optimizer.state[p].items()}
                                          for p in sae.parameters()}
    x = next(batches)
    revived = resample_dead_features(sae, optimizer, x, dead_F, torch.Generator().manual_seed(0))
    assert sorted(revived.tolist()) == [1, 5, 17, 40]
    live_enc_norm = before["W_enc"][:, ~dead_F].norm(dim=0).mean()
    assert torch.allclose(sae.W_dec[dead_F].norm(dim=-1), torch.ones(4))
    assert torch.allclose(sae.W_enc[:, dead_F].norm(dim=0), torch.full((4,), 0.2 * live_enc_norm.item()))
    assert (sae.b_enc[dead_F] == 0).all()
    assert (sae.encode(x)[:, dead_F] > 0).any(0).all()  # each revived feature fires on the batch
    for name, dim in (("W_enc", 1), ("W_dec", 0), ("b_enc", 0), ("b_dec", None)):
        param = getattr(sae, name)
        live = param if dim is None else param.index_select(dim, (~dead_F).nonzero().squeeze(-1))
        old = before[name] if dim is None else before[name].index_select(dim, (~dead_F).nonzero().squeeze(-1))
        assert torch.equal(live, old), name
        for key in ("exp_avg", "exp_avg_sq"):
            state, old_state = optimizer.state[param][key], adam_before[id(param)][key]
            if dim is None:
                assert torch.equal(state, old_state)
                continue
            dead_idx, live_idx = dead_F.nonzero().squeeze(-1), (~dead_F).nonzero().squeeze(-1)
            assert (state.index_select(dim, dead_idx) == 0).all(), (name, key)
            assert torch.equal(state.index_select(dim, live_idx), old_state.index_select(dim, live_idx))


def test_training_loop_resamples_dead_features_and_rewarms_lr(toy):
    cfg = _cfg(RELU, 12, resample=True, resample_steps=(6,), dead_after_tokens=2 * B, lr_warmup_steps=0,
               lr_decay_fraction=0.0, rewarm_steps=4)
    sae = _with_dead(build_sae(RELU, D, cfg, _sample(toy)))
    outcome = train_sae(sae, toy_batches(toy, B), cfg, RELU, log_every=1)
    lrs = {row["step"]: row["lr"] for row in outcome.curve}  # row step s+1 carries step s's LR
    assert outcome.resamples == 1
    assert lrs[6] == pytest.approx(3e-3) and lrs[7] == pytest.approx(3e-4) and lrs[11] == pytest.approx(3e-3)
    assert (sae.encode(_sample(toy))[:, :8] > 0).any(0).all()


# --- checkpoints, resume, failures --------------------------------------------------------------

class _Killed(Exception):
    pass


def _killing(batches, kill_at_step: int):
    def wrapped(start_step: int):
        for step, x in zip(range(start_step, 10**9), batches(start_step)):
            if step == kill_at_step:
                raise _Killed
            yield x
    return wrapped


@pytest.mark.parametrize("point", [RELU, TOPK], ids=lambda p: p.key)
def test_kill_and_resume_is_bit_identical(toy, tmp_path, point):
    cfg = _cfg(point, 16, resample=True, resample_steps=(6,), dead_after_tokens=2 * B, rewarm_steps=3)
    batches = toy_batches(toy, B, seed=5)
    whole = _with_dead(build_sae(point, D, cfg, _sample(toy)))
    expected = train_sae(whole, batches, cfg, point, checkpoint_dir=tmp_path / "whole", log_every=2)
    assert expected.resamples == 1

    first = _with_dead(build_sae(point, D, cfg, _sample(toy)))
    seen: list[int] = []
    with pytest.raises(_Killed):
        train_sae(first, _killing(batches, 10), cfg, point, checkpoint_dir=tmp_path / "resumed",
                  on_checkpoint=lambda path, step: seen.append(step), log_every=2)
    assert seen == [4, 8] and (tmp_path / "resumed" / CHECKPOINT_FILE).exists()
    torch.manual_seed(12345)  # a fresh process would have other global RNG state
    second = build_sae(point, D, cfg, _sample(toy))  # weights come from the checkpoint
    resumed = train_sae(second, batches, cfg, point, checkpoint_dir=tmp_path / "resumed", log_every=2)
    assert resumed.curve == expected.curve and resumed.resamples == 1 and resumed.steps == 16
    for name, value in _weights(whole).items():
        assert torch.equal(value, second.state_dict()[name]), name
    again = train_sae(build_sae(point, D, cfg, _sample(toy)), batches, cfg, point,
                      checkpoint_dir=tmp_path / "resumed")
    assert again.curve == expected.curve and again.tokens_per_second == 0.0  # finished run: no step taken


def test_nan_input_raises_naming_the_step_and_keeps_last_good_checkpoint(toy, tmp_path):
    cfg = _cfg(RELU, 10, checkpoint_every=2)
    clean = toy_batches(toy, B, seed=2)

    def poisoned(start_step: int):
        for step, x in zip(range(start_step, 10**9), clean(start_step)):
            if step == 5:
                x = x.clone()
                x[3, 7] = float("nan")
            yield x

    good: dict[int, dict] = {}
    train_sae(build_sae(RELU, D, cfg, _sample(toy)), clean, cfg, RELU, checkpoint_dir=tmp_path / "clean",
              on_checkpoint=lambda p, s: good.setdefault(s, torch.load(p, weights_only=True)["model"]))
    with pytest.raises(SaeTrainingError, match=r"step 5\b.*NaN") as err:
        train_sae(build_sae(RELU, D, cfg, _sample(toy)), poisoned, cfg, RELU, checkpoint_dir=tmp_path / "bad")
    assert err.value.step == 5
    saved = torch.load(tmp_path / "bad" / CHECKPOINT_FILE, weights_only=True)
    assert saved["progress"]["step"] == 4
    for name, value in saved["model"].items():
        assert torch.isfinite(value).all() and torch.equal(value, good[4][name]), name
    assert [p.name for p in (tmp_path / "bad").iterdir()] == [CHECKPOINT_FILE]  # no temp file left


def test_resume_refuses_a_checkpoint_of_another_config(toy, tmp_path):
    cfg = _cfg(RELU, 4)
    train_sae(build_sae(RELU, D, cfg, _sample(toy)), toy_batches(toy, B), cfg, RELU, checkpoint_dir=tmp_path,
              fingerprint="lr-1e-3")
    other = replace(cfg, learning_rate=1e-4)
    with pytest.raises(ValueError, match="another run"):
        train_sae(build_sae(RELU, D, other, _sample(toy)), toy_batches(toy, B), other, RELU, checkpoint_dir=tmp_path,
                  fingerprint="lr-1e-4")
    # The same fingerprint resumes (here: a finished run, so no step is taken).
    again = train_sae(build_sae(RELU, D, cfg, _sample(toy)), toy_batches(toy, B), cfg, RELU, checkpoint_dir=tmp_path,
                      fingerprint="lr-1e-3")
    assert again.steps == 4 and again.tokens_per_second == 0.0


def test_batches_running_out_is_an_error(toy):
    cfg = _cfg(RELU, 8)

    def short(start_step: int):
        return iter([next(toy_batches(toy, B)(s)) for s in range(start_step, 5)])

    with pytest.raises(SaeTrainingError, match="ran out at step 5 of 8"):
        train_sae(build_sae(RELU, D, cfg, _sample(toy)), short, cfg, RELU)


# --- SAELens layout -----------------------------------------------------------------------------

def _saelens_forward(cfg: dict, tensors: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What SAELens 6's StandardSAE / TopKSAE compute from these files (normalize_activations none)."""
    sae_in = x - tensors["b_dec"] * cfg["apply_b_dec_to_input"]
    hidden_pre = sae_in @ tensors["W_enc"] + tensors["b_enc"]
    if cfg["architecture"] == "standard":
        f = torch.relu(hidden_pre)
    else:
        top = hidden_pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(hidden_pre).scatter(-1, top.indices, torch.relu(top.values))
    return f @ tensors["W_dec"] + tensors["b_dec"], f


@pytest.mark.parametrize("point", [RELU, TOPK], ids=lambda p: p.key)
def test_save_load_round_trip_in_saelens_layout(toy, tmp_path, point):
    cfg = _cfg(point, 30)
    sample = _sample(toy) * 5.0
    sae = build_sae(point, D, cfg, sample)
    train_sae(sae, lambda s: (x * 5.0 for x in toy_batches(toy, B)(s)), cfg, point)
    assert float(sae.input_scale) != pytest.approx(1.0)
    save_sae(sae, tmp_path / "sae", hook_name="blocks.1.hook_resid_post", extra={"model_name": "toy", "run": 7})
    saved_cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert saved_cfg["architecture"] == {"relu": "standard", "topk": "topk"}[point.architecture]
    assert (saved_cfg["d_in"], saved_cfg["d_sae"], saved_cfg["dtype"]) == (D, G, "float32")
    assert saved_cfg["normalize_activations"] == "none" and saved_cfg["device"] == "cpu"
    assert saved_cfg["apply_b_dec_to_input"] is (point.architecture == "topk")
    meta = saved_cfg["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["hook_layer"] == 1 and meta["model_name"] == "toy"
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert saved_cfg.get("k") == (4 if point.architecture == "topk" else None)
    assert saved_cfg["sae_assets"]["extra"] == {"run": 7}
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"W_enc": (D, G), "b_enc": (G,), "W_dec": (G, D),
                                                               "b_dec": (D,)}
    assert all(v.dtype == torch.float32 for v in tensors.values())
    x = _sample(toy, 256) * 5.0
    with torch.no_grad():
        x_hat, f = sae(x)
        loaded_hat, loaded_f = load_sae(tmp_path / "sae")(x)
        lens_hat, lens_f = _saelens_forward(saved_cfg, tensors, x)
    assert type(load_sae(tmp_path / "sae")) is type(sae)
    for got_hat, got_f in ((loaded_hat, loaded_f), (lens_hat, lens_f)):
        assert torch.equal(got_f != 0, f != 0)
        assert torch.allclose(got_f, f, rtol=1e-4, atol=1e-5) and torch.allclose(got_hat, x_hat, rtol=1e-4, atol=1e-5)
    assert torch.equal(export_tensors(sae)["W_enc"], tensors["W_enc"])


def test_decoder_directions_are_in_the_models_units():
    sae = ReluSae(8, 16, l1_coefficient=1.0)
    sae.set_input_scale_from(torch.randn(64, 8) * 5)
    x_BD = torch.randn(4, 8) * 5
    f_BF = sae.encode(x_BD)
    # Decoding is linear in f: x_hat - (b_dec / s) = f @ decoder_directions().
    expected = sae.decode(f_BF) - (sae.b_dec / sae.input_scale)
    assert torch.allclose(f_BF @ sae.decoder_directions(), expected, atol=1e-5)
    assert torch.equal(sae.decoder_directions(3, 5), sae.decoder_directions()[3:5])
    assert not sae.decoder_directions().requires_grad
