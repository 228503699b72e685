"""The SAE architectures beyond ReLU and TopK: JumpReLU, BatchTopK, Matryoshka BatchTopK, Gated;
and the sparse decoder of TopK, BatchTopK and Matryoshka (the same loss and gradients as the
dense product), and every architecture on a CUDA device when one is present.

Each is checked against its paper's definition computed by hand here (forward pass, loss
terms, straight-through gradients), trained through the real loop on toy data with known
features (`sae_assets.core.sae.toy`), encoded feature-slice by feature-slice, saved in the
SAELens layout and loaded back, and refused with a named config key when its sweep point is
out of range. Tiny shapes, CPU, single-threaded torch.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from support import fused_and_graph_losses, toy_sae_config
from safetensors.torch import load_file

from sae_assets.core.config import ConfigError, DictionaryPoint, ModelConfig, SaeConfig, config_from_dict
from sae_assets.core.model.lm import build_embedded_model
from sae_assets.core.model.training import train_language_model
from sae_assets.core.sae import (
    ARCHITECTURES, BatchTopKSae, GatedSae, JumpReLUSae, MatryoshkaSae, StepInfo, build_sae, load_sae, make_sae,
    save_sae, train_sae,
)
from sae_assets.core.sae.base import SparseAutoencoder
from sae_assets.core.sae.batchtopk import batch_topk, batch_topk_activation, batch_topk_codes
from sae_assets.core.sae.checkpoint import CHECKPOINT_FILE
from sae_assets.core.sae.evaluation import evaluate_dictionary
from sae_assets.core.sae.metrics import reconstruction_stats
from sae_assets.core.sae.resample import resample_dead_features
from sae_assets.core.sae.sparse import sparse_decode
from sae_assets.core.sae.toy import make_toy_data, toy_batches
from sae_assets.core.sae.topk import auxk_loss, topk_activation, topk_codes
from sae_assets.core.sae.training import make_optimizer, train_step

D, G, B = 32, 64, 128
JUMPRELU = DictionaryPoint("jumprelu", G, 0.01)
BATCHTOPK = DictionaryPoint("batchtopk", G, 4.0)
MATRYOSHKA = DictionaryPoint("matryoshka", G, 4.0, prefixes=(8, 16, 64))
GATED = DictionaryPoint("gated", G, 0.5)
POINTS = [JUMPRELU, BATCHTOPK, MATRYOSHKA, GATED]
SAELENS_NAMES = {"jumprelu": "jumprelu", "batchtopk": "jumprelu", "matryoshka": "jumprelu", "gated": "gated"}


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def toy():
    return make_toy_data(G, D, seed=0, mean_active=3.0, exponent=0.5)


def _cfg(point: DictionaryPoint, steps: int, **changes) -> SaeConfig:
    return toy_sae_config(point, steps, B, **changes)


def _sample(toy, rows: int = 1024, seed: int = 99) -> torch.Tensor:
    return next(toy_batches(toy, rows, seed=seed)(0))


def _built(toy, point: DictionaryPoint, scale: float = 1.0):
    return build_sae(point, D, _cfg(point, 10), _sample(toy) * scale)


def _perturbed(sae):
    """The SAE with every per-feature parameter moved off its initial value (so tests see them)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.b_enc.add_(0.1 * torch.randn(sae.width, generator=g))
        if isinstance(sae, GatedSae):
            sae.r_mag.copy_(0.3 * torch.randn(sae.width, generator=g))
            sae.b_mag.copy_(0.2 * torch.randn(sae.width, generator=g))
        if isinstance(sae, JumpReLUSae):
            sae.log_threshold.copy_(torch.log(0.05 + 0.5 * torch.rand(sae.width, generator=g)))
        if isinstance(sae, BatchTopKSae):
            sae.threshold.fill_(0.4)
    return sae


# --- the loop: each trains, resamples, is scored ------------------------------------------------

@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.key)
def test_each_trains_through_the_loop_with_resampling_and_is_scored(toy, point):
    cfg = _cfg(point, 60, resample=True, resample_steps=(30,))
    sae = build_sae(point, D, cfg, _sample(toy))
    assert type(sae) is ARCHITECTURES[point.architecture]
    with torch.no_grad():
        sae.b_enc[:4] = -100.0  # four features that cannot fire: they die and get resampled
    held_out = _sample(toy, 512, seed=7) * 3.0
    before = sae.loss(held_out).mse.item()
    outcome = train_sae(sae, toy_batches(toy, B, seed=1), cfg, point, log_every=20)
    after = sae.loss(held_out).mse.item()
    assert outcome.steps == 60 and outcome.resamples == 1
    assert after < 0.5 * before, (before, after)
    assert bool((sae.b_enc[:4] > -100.0).all())  # revived
    stats = reconstruction_stats(sae, [held_out[:256], held_out[256:]])  # sae_metrics' code
    assert 0 < stats.fvu < 1 and 0 < stats.l0 < G and stats.n_tokens == 512


def _successor_tokens(n: int, seed: int, vocab: int = 50, ctx: int = 16) -> torch.Tensor:
    """(n, ctx) sequences counting up from a random start, modulo the vocabulary."""
    starts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(ctx)) % vocab


def test_each_is_scored_by_the_sae_metrics_evaluation_on_a_real_model():
    lm_cfg = ModelConfig(n_layers=1, d_model=D, n_heads=2, d_mlp=64, batch_size=16, train_tokens=16 * 16 * 30,
                         learning_rate=1e-2, warmup_steps=5, seed=0)
    model = build_embedded_model(lm_cfg, vocab_size=50, context_length=16)
    train_language_model(model, _successor_tokens(64, 0), _successor_tokens(8, 1), lm_cfg, eval_every=1000)
    hook = "blocks.0.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(_successor_tokens(256, 2), names_filter=hook)
    acts_ND = cache[hook].reshape(-1, D).float()
    for point in POINTS:
        cfg = _cfg(point, 40)
        sae = build_sae(point, D, cfg, acts_ND[:1024])
        train_sae(sae, lambda start: (acts_ND[(i * B) % 3072:(i * B) % 3072 + B] for i in range(start, 10**6)),
                  cfg, point)
        got = evaluate_dictionary(model, sae, hook, _successor_tokens(8, 3).numpy(), _successor_tokens(4, 4).numpy(),
                                  _successor_tokens(8, 5).numpy(), batch_size=4).metrics
        assert 0 < got["l0"] < G and 0 < got["fvu"] < 1, (point.key, got)
        assert got["sae_loss"] < got["zero_ablation_loss"] and got["loss_recovered"] > 0, (point.key, got)


# --- JumpReLU -------------------------------------------------------------------------------------

def test_jumprelu_forward_and_l0_penalty_follow_the_definition(toy):
    sae = _perturbed(_built(toy, JUMPRELU))
    x = _sample(toy, 64)
    xs = x * sae.input_scale
    z = xs @ sae.W_enc + sae.b_enc  # no pre-encoder bias (apply_b_dec_to_input False)
    theta = sae.log_threshold.exp()
    out = sae.loss(x, StepInfo(step=100, total_steps=100))
    assert torch.allclose(out.f, z * (z > theta))
    assert torch.allclose(out.sparsity, 0.01 * (z > theta).float().sum(-1).mean())
    assert out.aux.item() == 0.0 and torch.allclose(out.total, out.mse + out.sparsity)
    assert out.l0.item() == pytest.approx((z > theta).float().sum(-1).mean().item())


def test_jumprelu_threshold_learns_through_both_straight_through_estimators(toy):
    eps = 0.2  # wide enough that many pre-activations fall inside the kernel
    sae = JumpReLUSae(D, G, l0_coefficient=0.5, bandwidth=eps)
    point_sae = _perturbed(_built(toy, JUMPRELU))
    sae.load_state_dict(point_sae.state_dict())
    x = _sample(toy, 64)
    # The generic graph, whose f is attached (the fused loss is tested equal to it below)
    out = SparseAutoencoder.loss(sae, x)
    theta, z = sae.log_threshold.exp().detach(), sae.pre_activations(x * sae.input_scale).detach()
    kernel = ((z - theta).abs() < eps / 2).float() / eps  # K((z - theta) / eps) / eps
    assert kernel.sum() > 0
    # through the L0 penalty: d/dtheta H = -K/eps, and d theta / d log theta = theta
    (grad_l0,) = torch.autograd.grad(out.sparsity, sae.log_threshold, retain_graph=True)
    assert torch.allclose(grad_l0, 0.5 * (-kernel).sum(0) / x.shape[0] * theta, atol=1e-6)
    assert (grad_l0 <= 0).all() and (grad_l0 < 0).any()  # the penalty pushes thresholds up
    # through the activation: d/dtheta JumpReLU = -(theta / eps) K, times dMSE/df
    grad_f, grad_act = torch.autograd.grad(out.mse, [out.f, sae.log_threshold])
    assert torch.allclose(grad_act, (-theta * kernel * grad_f).sum(0) * theta, atol=1e-6)
    assert grad_act.abs().sum() > 0


def test_jumprelu_l0_penalty_raises_thresholds_and_lowers_l0(toy):
    sae = JumpReLUSae(D, G, l0_coefficient=1.0, bandwidth=0.5, init_threshold=0.05)
    sae.load_state_dict({**_built(toy, JUMPRELU).state_dict(), "log_threshold": torch.full((G,), -3.0)})
    optimizer = make_optimizer(sae, 0.05)
    x = _sample(toy, 256)
    l0_before, theta_before = sae.loss(x).l0.item(), sae.log_threshold.detach().clone()
    for step, batch in zip(range(30), toy_batches(toy, B, seed=2)(0)):
        train_step(sae, optimizer, batch, StepInfo(step, 30), 0.05)
    assert (sae.log_threshold > theta_before).float().mean() > 0.9
    assert sae.loss(x).l0.item() < 0.7 * l0_before


def test_jumprelu_l0_pseudo_derivative_reaches_the_pre_activations_as_well_as_the_thresholds(toy):
    """H(z - theta) is a function of z - theta: d/dz = +K/eps, d/dtheta = -K/eps (Anthropic's
    January 2025 update), so the L0 term lowers pre-activations near a threshold and raises it."""
    eps = 0.2
    sae = _perturbed(_built(toy, JUMPRELU))
    sae.bandwidth = eps
    z = sae.pre_activations(_sample(toy, 64) * sae.input_scale).detach().requires_grad_()
    theta = sae.log_threshold.exp().detach()
    kernel = ((z - theta).abs() < eps / 2).float() / eps
    assert kernel.sum() > 0
    grad_z, grad_log_theta = torch.autograd.grad(sae.l0(z), [z, sae.log_threshold])
    assert torch.allclose(grad_z, kernel / z.shape[0])
    assert torch.allclose(grad_log_theta, -kernel.sum(0) / z.shape[0] * theta, atol=1e-6)


def test_jumprelu_l0_follows_its_coefficient_within_a_short_run(toy):
    """100x the L0 coefficient, 150 steps: the L0 must fall well below. With the L0 term reaching
    only the log thresholds (and theta_0 = eps = 0.001), Adam moves log theta by about lr a step
    whatever the coefficient, and both runs ended at the same L0."""
    held_out = _sample(toy, 512, seed=7)
    l0 = {}
    for coefficient in (0.01, 1.0):
        point = DictionaryPoint("jumprelu", G, coefficient)
        cfg = _cfg(point, 150, init="anthropic")
        sae = build_sae(point, D, cfg, _sample(toy))
        train_sae(sae, toy_batches(toy, B, seed=1), cfg, point)
        with torch.no_grad():
            l0[coefficient] = (sae.encode(held_out) > 0).float().sum(-1).mean().item()
    assert l0[1.0] < 0.5 * l0[0.01], l0


# --- BatchTopK --------------------------------------------------------------------------------------

def test_batchtopk_keeps_k_per_row_on_average_over_the_batch(toy):
    sae = _built(toy, BATCHTOPK)
    x = _sample(toy, 64)
    out = sae.loss(x, StepInfo(dead_F=torch.zeros(G, dtype=torch.bool)))
    per_row = (out.f != 0).sum(-1)
    assert int(per_row.sum()) == 4 * 64 and out.l0.item() == 4.0
    assert per_row.min() < 4 < per_row.max()  # a batch budget, not TopK's per-row one
    relu_z = sae.pre_activations(x * sae.input_scale).relu()
    kth = relu_z.flatten().sort(descending=True).values[4 * 64 - 1]
    assert torch.equal(out.f != 0, relu_z >= kth) and torch.allclose(out.f[out.f != 0], relu_z[relu_z >= kth])
    assert out.sparsity.item() == 0.0 and out.aux.item() == 0.0


@pytest.mark.parametrize("case", ["plain", "one-heavy-row", "heavy-rows", "few-positive"])
def test_staged_batch_topk_keeps_exactly_the_one_stage_entries(case):
    g = torch.Generator().manual_seed(4)
    acts = torch.randn(96, 512, generator=g).relu()
    lift = 10.0 + torch.rand(96, 512, generator=g)  # no ties at the K-th value (either would be right)
    if case == "heavy-rows":  # ten rows with 40 top entries each (> 4k): a rerun with wider rows
        acts[:10, :40] += lift[:10, :40]
    if case == "one-heavy-row":  # one row holds all of them (> half the width): one top-k over everything
        acts[5] += lift[5]
    if case == "few-positive":  # fewer positive entries than k x B: zeros tie at the K-th value
        acts = acts * (torch.rand(96, 512, generator=g) < 0.005)
    values, indices = batch_topk(acts, 4)
    want_values, want_indices = acts.flatten().topk(4 * 96, sorted=False)
    assert indices.unique().numel() == 4 * 96
    assert torch.equal(torch.zeros(96 * 512).scatter(0, indices, values),
                       torch.zeros(96 * 512).scatter(0, want_indices, want_values))


def test_batchtopk_inference_threshold_gives_about_k_per_token(toy):
    sae = _built(toy, BATCHTOPK)
    assert float(sae.threshold) == 0.0
    with torch.no_grad():
        sae.loss(_sample(toy, 128))  # no gradients: an evaluation, not a training step
    sae.eval()
    sae.loss(_sample(toy, 128))  # eval mode: neither
    assert int(sae.threshold_batches) == 0 and float(sae.threshold) == 0.0
    sae.train()
    mins = []
    for batch in zip(range(150), toy_batches(toy, B, seed=3)(0)):
        f = sae.loss(batch[1]).f
        mins.append(float(f[f > 0].min().detach()))
    assert int(sae.threshold_batches) == 150 and float(sae.threshold) > 0
    expected = torch.tensor(mins[:100]).double().mean() * 0.99**50  # mean of 100, then EMA of 50
    expected += sum(0.01 * 0.99 ** (149 - i) * m for i, m in enumerate(mins) if i >= 100)
    assert float(sae.threshold) == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():
        f_inf = sae.encode(_sample(toy, 2048, seed=11))
    assert torch.equal(f_inf, sae.activate(sae.pre_activations(_sample(toy, 2048, seed=11) * sae.input_scale)))
    assert (f_inf != 0).sum(-1).float().mean().item() == pytest.approx(4.0, rel=0.2)


def test_batchtopk_auxk_trains_only_dead_latents(toy):
    sae = _built(toy, BATCHTOPK)
    x = _sample(toy, 64)
    dead_F = torch.zeros(G, dtype=torch.bool)
    dead_F[::3] = True
    out = sae.loss(x, StepInfo(dead_F=dead_F))
    assert out.aux.item() > 0 and torch.allclose(out.total, out.mse + out.aux)
    sae.zero_grad()
    out.aux.backward()
    grad_F = sae.W_enc.grad.abs().sum(0)
    assert (grad_F[~dead_F] == 0).all() and (grad_F[dead_F] > 0).any()


def test_batchtopk_resume_restores_the_threshold_bit_identically(toy, tmp_path):
    cfg = _cfg(BATCHTOPK, 12)
    batches = toy_batches(toy, B, seed=5)
    whole = build_sae(BATCHTOPK, D, cfg, _sample(toy))
    expected = train_sae(whole, batches, cfg, BATCHTOPK, checkpoint_dir=tmp_path / "whole", log_every=2)

    def killed_at_6(start: int):
        for step, x in zip(range(start, 6), batches(start)):
            yield x
        raise _Killed

    with pytest.raises(_Killed):
        train_sae(build_sae(BATCHTOPK, D, cfg, _sample(toy)), killed_at_6, cfg, BATCHTOPK,
                  checkpoint_dir=tmp_path / "resumed", log_every=2)
    assert (tmp_path / "resumed" / CHECKPOINT_FILE).exists()
    second = build_sae(BATCHTOPK, D, cfg, _sample(toy))
    resumed = train_sae(second, batches, cfg, BATCHTOPK, checkpoint_dir=tmp_path / "resumed", log_every=2)
    assert resumed.curve == expected.curve and int(second.threshold_batches) == 12
    for name, value in whole.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name


class _Killed(Exception):
    pass


# --- Matryoshka -------------------------------------------------------------------------------------

def test_matryoshka_loss_is_the_sum_of_prefix_losses(toy):
    sae = _perturbed(_built(toy, MATRYOSHKA))
    x = _sample(toy, 64)
    xs = x * sae.input_scale
    f = batch_topk_activation(sae.pre_activations(xs), 4)
    by_hand = sum(((f[:, :m] @ sae.W_dec[:m] + sae.b_dec - xs) ** 2).sum(-1).mean() for m in (8, 16, 64))
    out = sae.loss(x)
    assert torch.allclose(out.f, f)
    assert torch.allclose(out.total, by_hand, rtol=1e-5)
    assert torch.allclose(out.mse, ((f @ sae.W_dec + sae.b_dec - xs) ** 2).sum(-1).mean())
    dead_F = torch.zeros(G, dtype=torch.bool)
    dead_F[40:] = True
    with_aux = sae.loss(x, StepInfo(dead_F=dead_F))
    auxk = BatchTopKSae.penalties(sae, xs, sae.pre_activations(xs), f, f @ sae.W_dec + sae.b_dec,
                                  StepInfo(dead_F=dead_F))[1]
    assert auxk.item() > 0 and torch.allclose(with_aux.total, by_hand + auxk, rtol=1e-5)


def test_matryoshka_default_prefixes_and_keys():
    assert DictionaryPoint("matryoshka", 1024, 32).matryoshka_prefixes == (128, 256, 512, 1024)
    assert DictionaryPoint("matryoshka", 4, 1).matryoshka_prefixes == (1, 2, 4)
    default = DictionaryPoint("matryoshka", 1024, 32)
    assert default.key == "matryoshka-w1024-k32"
    assert DictionaryPoint("matryoshka", 1024, 32, (128, 256, 512, 1024)).key == default.key  # the same model
    other = DictionaryPoint("matryoshka", 1024, 32, (64, 1024))
    assert other.key == "matryoshka-w1024-k32-p64_1024" and other.key != default.key
    assert not set("|,[]") & set(other.key)
    assert MatryoshkaSae(D, 64, k=4).prefixes == (8, 16, 32, 64)


# --- Gated ------------------------------------------------------------------------------------------

def test_gated_forward_and_losses_follow_the_definition(toy):
    sae = _perturbed(_built(toy, GATED))
    x = _sample(toy, 64)
    xs = x * sae.input_scale
    centred = xs - sae.b_dec
    pi_gate = centred @ sae.W_enc + sae.b_gate
    pi_mag = centred @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (pi_gate > 0).float() * pi_mag.relu()
    out = sae.loss(x, StepInfo(step=100, total_steps=100))
    assert torch.allclose(out.f, f, atol=1e-5) and torch.allclose(sae.encode(x), f, atol=1e-5)
    assert torch.allclose(out.mse, ((f @ sae.W_dec + sae.b_dec - xs) ** 2).sum(-1).mean(), rtol=1e-5)
    assert torch.allclose(out.sparsity, 0.5 * (pi_gate.relu() * sae.W_dec.norm(dim=-1)).sum(-1).mean(), rtol=1e-5)
    assert torch.allclose(out.aux, ((pi_gate.relu() @ sae.W_dec + sae.b_dec - xs) ** 2).sum(-1).mean(), rtol=1e-5)
    # the gate's own reconstruction uses frozen decoder copies: it moves the gate, never the
    # decoder (b_dec only through the input centring, as the paper's x - b_dec)
    sae.zero_grad()
    out.aux.backward()
    assert sae.W_dec.grad is None and sae.r_mag.grad is None and sae.b_mag.grad is None
    frozen_aux = ((pi_gate.relu() @ sae.W_dec.detach() + sae.b_dec.detach() - xs) ** 2).sum(-1).mean()
    expected = torch.autograd.grad(frozen_aux, [sae.W_enc, sae.b_enc, sae.b_dec])
    for got, want in zip((sae.W_enc.grad, sae.b_enc.grad, sae.b_dec.grad), expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6) and want.abs().sum() > 0


def test_gated_sparsity_closes_gates_rather_than_shrinking_decoder_rows(toy):
    """The decoder is frozen in the gate's L1 as in its reconstruction: the penalty trains the
    gate alone. With the norms live in the penalty, the L1 shrank decoder rows behind open gates
    (at L1 3 here: the smallest row at 4% of the median norm, L0 ~20) instead of closing them."""
    sae = _perturbed(_built(toy, GATED))
    out = sae.loss(_sample(toy, 64), StepInfo(step=100, total_steps=100))
    assert torch.autograd.grad(out.sparsity, [sae.W_dec], allow_unused=True) == (None,)
    point = DictionaryPoint("gated", G, 3.0)
    cfg = _cfg(point, 200, init="anthropic")
    sae = build_sae(point, D, cfg, _sample(toy))
    train_sae(sae, toy_batches(toy, B, seed=1), cfg, point)
    norm = sae.W_dec.detach().norm(dim=-1)
    with torch.no_grad():
        l0 = (sae.encode(_sample(toy, 512, seed=7)) > 0).float().sum(-1).mean().item()
    assert norm.min() > 0.5 * norm.median(), norm
    assert l0 < 15, l0


def test_resampling_resets_per_feature_parameters_and_their_adam_state(toy):
    for point in (JUMPRELU, GATED):
        sae = _perturbed(_built(toy, point))
        optimizer = make_optimizer(sae, 1e-3)
        train_step(sae, optimizer, _sample(toy, 64), StepInfo(), 1e-3)
        dead_F = torch.zeros(G, dtype=torch.bool)
        dead_F[:5] = True
        own = [sae.log_threshold] if point is JUMPRELU else [sae.r_mag, sae.b_mag]
        before = [p.detach().clone() for p in own]
        resample_dead_features(sae, optimizer, _sample(toy, 256), dead_F, torch.Generator().manual_seed(0))
        initial = [torch.tensor(sae.init_threshold).log()] if point is JUMPRELU else [torch.tensor(0.0)] * 2
        for param, old, value in zip(own, before, initial):
            assert torch.allclose(param[:5], value.expand(5)) and torch.equal(param[5:], old[5:])
            state = optimizer.state[param]
            assert (state["exp_avg"][:5] == 0).all() and (state["exp_avg_sq"][:5] == 0).all()


# --- slices, files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.key)
def test_encode_range_equals_the_slice_of_encode(toy, point):
    sae = _perturbed(_built(toy, point, scale=2.0))
    assert sae.elementwise_activation
    x = _sample(toy, 128) * 2.0
    with torch.no_grad():
        full = sae.encode(x)
        assert (full != 0).any()
        for lo, hi in ((0, G), (0, 7), (5, 37), (60, 64)):
            assert torch.allclose(sae.encode_range(x, lo, hi), full[:, lo:hi], atol=1e-6), (lo, hi)


def _saelens_forward(cfg: dict, tensors: dict, x: torch.Tensor) -> torch.Tensor:
    """Features as SAELens 6's JumpReLUSAE / GatedSAE compute them from these files."""
    sae_in = x - tensors["b_dec"] * cfg["apply_b_dec_to_input"]
    if cfg["architecture"] == "jumprelu":
        z = sae_in @ tensors["W_enc"] + tensors["b_enc"]
        return z.relu() * (z > tensors["threshold"].relu())
    gate = (sae_in @ tensors["W_enc"] + tensors["b_gate"]) > 0
    return gate * (sae_in @ (tensors["W_enc"] * tensors["r_mag"].exp()) + tensors["b_mag"]).relu()


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.key)
def test_save_load_round_trip_in_saelens_layout(toy, tmp_path, point):
    sae = _perturbed(_built(toy, point, scale=5.0))
    assert float(sae.input_scale) != pytest.approx(1.0)
    save_sae(sae, tmp_path / "sae", hook_name="blocks.0.hook_resid_post")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    tensors = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert cfg["architecture"] == SAELENS_NAMES[point.architecture]
    assert cfg["sae_assets"]["architecture"] == point.architecture and "k" not in cfg
    names = {"W_enc", "W_dec", "b_dec"} | ({"b_gate", "r_mag", "b_mag"} if point is GATED else {"b_enc", "threshold"})
    assert set(tensors) == names and all(v.dtype == torch.float32 for v in tensors.values())
    if point in (BATCHTOPK, MATRYOSHKA):
        assert torch.equal(tensors["threshold"], torch.full((G,), 0.4))
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(sae) and loaded.hyperparameters() == sae.hyperparameters()
    x = _sample(toy, 256) * 5.0
    with torch.no_grad():
        x_hat, f = sae(x)
        loaded_hat, loaded_f = loaded(x)
        lens_f = _saelens_forward(cfg, tensors, x)
    for got in (loaded_f, lens_f):
        assert torch.equal(got != 0, f != 0) and torch.allclose(got, f, rtol=1e-4, atol=1e-5)
    assert torch.allclose(loaded_hat, x_hat, rtol=1e-4, atol=1e-5)
    assert torch.allclose(loaded.encode_range(x, 3, 20), f[:, 3:20], rtol=1e-4, atol=1e-5)


def test_a_saelens_written_jumprelu_or_gated_file_loads_without_our_block(toy, tmp_path):
    for point in (JUMPRELU, GATED):
        sae = _perturbed(_built(toy, point))
        save_sae(sae, tmp_path / point.architecture, hook_name="blocks.0.hook_resid_post")
        cfg_path = tmp_path / point.architecture / "cfg.json"
        cfg = json.loads(cfg_path.read_text())
        del cfg["sae_assets"]  # as SAELens would write it (input scale 1 here)
        cfg_path.write_text(json.dumps(cfg))
        loaded = load_sae(tmp_path / point.architecture)
        assert type(loaded) is type(sae)
        x = _sample(toy, 64)
        assert torch.allclose(loaded.encode(x), sae.encode(x), rtol=1e-4, atol=1e-5)


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("entry", "field", "words"), [
    ({"architecture": "batchtopk", "width": 16, "sparsity": 32}, "sparsity", "k <= width (16)"),
    ({"architecture": "matryoshka", "width": 16, "sparsity": 2.5}, "sparsity", "whole number"),
    ({"architecture": "jumprelu", "width": 16, "sparsity": -0.001}, "sparsity", "must be > 0"),
    ({"architecture": "gated", "width": 16, "sparsity": 0}, "sparsity", "must be > 0"),
    ({"architecture": "matryoshka", "width": 16, "sparsity": 2, "prefixes": [8, 4, 16]}, "prefixes",
     "strictly increasing"),
    ({"architecture": "matryoshka", "width": 16, "sparsity": 2, "prefixes": [4, 8]}, "prefixes",
     "ending at the width 16"),
    ({"architecture": "matryoshka", "width": 16, "sparsity": 2, "prefixes": [0, 16]}, "prefixes", ">= 1"),
    ({"architecture": "topk", "width": 16, "sparsity": 2, "prefixes": [8, 16]}, "prefixes", "only for architecture"),
])
def test_bad_hyperparameters_name_the_sweep_point_and_the_key(entry, field, words):
    good = {"architecture": "relu", "width": 16, "sparsity": 1}
    with pytest.raises(ConfigError) as err:
        config_from_dict({"sae": {"sweep": [good, entry]}})
    message = str(err.value)
    assert f"'sae.sweep[{entry['architecture']}-w16-" in message and f"].{field}'" in message, message
    assert words in message, message


def test_modules_refuse_out_of_range_arguments():
    for make in (lambda: BatchTopKSae(D, 8, k=9), lambda: MatryoshkaSae(D, 8, k=2, prefixes=(4, 2, 8)),
                 lambda: MatryoshkaSae(D, 8, k=2, prefixes=(2, 4)), lambda: JumpReLUSae(D, 8, l0_coefficient=-1),
                 lambda: JumpReLUSae(D, 8, l0_coefficient=1, init_threshold=0),
                 lambda: GatedSae(D, 8, l1_coefficient=-1),
                 lambda: BatchTopKSae(D, 8, k=2, threshold_decay=1.0)):
        with pytest.raises(ValueError):
            make()
    cfg = _cfg(MATRYOSHKA, 10)
    assert make_sae(MATRYOSHKA, D, cfg).prefixes == (8, 16, 64)
    assert make_sae(DictionaryPoint("matryoshka", G, 4.0), D, cfg).prefixes == (8, 16, 32, 64)


# --- sparse decoding (TopK, BatchTopK, Matryoshka) ---------------------------------------------------

TOPK = DictionaryPoint("topk", G, 4.0)
SPARSE_POINTS = [TOPK, BATCHTOPK, MATRYOSHKA]


def _loss_and_grads(sae, x, info):
    sae.zero_grad()
    out = sae.loss(x, info)
    out.total.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("point", SPARSE_POINTS, ids=lambda p: p.key)
@pytest.mark.parametrize("dead_every", [0, 3], ids=["none-dead", "auxk"])
def test_sparse_decoder_gives_the_dense_loss_and_gradients(toy, point, dead_every):
    sparse = _perturbed(_built(toy, point, scale=2.0))
    dense = copy.deepcopy(sparse)
    dense.sparse_decoder = False
    assert sparse.sparse_decoder and not dense.sparse_decoder
    dead_F = torch.zeros(G, dtype=torch.bool)
    if dead_every:
        dead_F[::dead_every] = True
    x = _sample(toy, 96) * 2.0
    (got, got_grads), (want, want_grads) = (_loss_and_grads(m, x, StepInfo(dead_F=dead_F)) for m in (sparse, dense))
    assert torch.equal(got.f, want.f) and got.l0.item() == want.l0.item()
    assert torch.equal(got.fired_F, want.fired_F) and torch.equal(got.fired_F, (want.f != 0).any(0))
    assert got.l0.item() == (want.f != 0).sum().item() / len(x)
    for name in ("total", "mse", "aux"):
        assert torch.allclose(getattr(got, name), getattr(want, name), rtol=1e-5), name
    assert (got.aux.item() > 0) == bool(dead_every) or point is MATRYOSHKA  # Matryoshka's aux has the prefixes
    assert set(got_grads) == set(want_grads) >= {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name, want_grad in want_grads.items():
        scale = want_grad.abs().max().item()
        assert scale > 0 and torch.allclose(got_grads[name], want_grad, rtol=1e-4, atol=1e-5 * scale), name
    if isinstance(sparse, BatchTopKSae):  # the same threshold update on both paths
        assert torch.equal(sparse.threshold, dense.threshold) and int(sparse.threshold_batches) == 1


def test_jumprelu_fused_loss_equals_the_autograd_graph(toy):
    """JumpReLU's loss has its own backward (`_JumpReLULoss`): values, the gradients of every
    parameter (the thresholds' pseudo-derivatives of both terms included) and of the input, and
    the fired features equal those of the generic graph (`jumprelu` and `step` under autograd).
    A wide bandwidth puts many entries inside the thresholds' window."""
    sae = _perturbed(_built(toy, JUMPRELU, scale=2.0))
    sae.bandwidth = 0.3
    with torch.no_grad():
        sae.log_threshold.copy_(torch.linspace(-3, 0, G))
        sae.log_threshold[0] = 20.0  # never fires
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
    x = _sample(toy, 96) * 2.0
    (fused, fused_grads, fused_gx), (graph, graph_grads, graph_gx) = fused_and_graph_losses(
        sae, x, StepInfo(step=3, total_steps=10))
    for name in ("total", "mse", "sparsity", "aux", "l0"):
        assert torch.allclose(getattr(fused, name), getattr(graph, name), rtol=1e-5, atol=1e-6), name
    assert fused.sparsity.item() > 0 and torch.equal(fused.f, graph.f.detach())
    assert torch.equal(fused.fired_F, graph.fired_F) and 0 < int(fused.fired_F.sum()) < G
    assert set(fused_grads) == set(graph_grads) >= {"W_enc", "b_enc", "W_dec", "b_dec", "log_threshold"}
    for name, want in graph_grads.items():
        scale = want.abs().max().item()
        assert scale > 0 and torch.allclose(fused_grads[name], want, rtol=1e-4, atol=1e-5 * scale), name
    assert torch.allclose(fused_gx, graph_gx, rtol=1e-4, atol=1e-5 * graph_gx.abs().max().item())


def test_centred_encoder_gradients_equal_plain_autograd(toy):
    sae = _perturbed(_built(toy, BATCHTOPK, scale=2.0))
    assert sae.apply_b_dec_to_input
    xs = (_sample(toy, 64) * 2.0 * sae.input_scale).requires_grad_()
    params = [xs, sae.W_enc, sae.b_enc, sae.b_dec]
    pre = sae.pre_activations(xs)
    by_hand = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert torch.allclose(pre, by_hand, atol=1e-5)
    weights = torch.randn(pre.shape, generator=torch.Generator().manual_seed(2))
    got = torch.autograd.grad((pre * weights).sum(), params)
    want = torch.autograd.grad((by_hand * weights).sum(), params, retain_graph=True)
    for name, g, w in zip(("x", "W_enc", "b_enc", "b_dec"), got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item()), name
    codes = batch_topk_codes(pre.detach(), 4)  # the kept entries alone, through pre_entries' sparse backward
    entries = sae.pre_entries(xs, pre.detach(), codes.rows_N, codes.features_N)
    assert torch.equal(entries, pre.detach()[codes.rows_N, codes.features_N])
    weights_N = torch.randn(entries.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((entries * weights_N).sum(), params)
    want = torch.autograd.grad((by_hand[codes.rows_N, codes.features_N] * weights_N).sum(), params)
    for name, g, w in zip(("x", "W_enc", "b_enc", "b_dec"), got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item()), name


def test_sparse_codes_decode_as_the_dense_product_with_empty_rows():
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(G, D, generator=g, requires_grad=True)
    pre = torch.randn(6, G, generator=g)
    pre[2] = -1.0  # a row BatchTopK leaves empty
    codes = batch_topk_codes(pre, 3)
    assert codes.offsets_B.tolist() == sorted(codes.offsets_B.tolist()) and codes.offsets_B[0] == 0
    assert (codes.rows_N == 2).sum() == 0 and codes.values_N.numel() == 18
    f = codes.dense()
    assert torch.equal(f, batch_topk_activation(pre, 3))
    assert torch.allclose(sparse_decode(codes, W_dec), f @ W_dec, atol=1e-6)
    rows = topk_codes(pre, 5)
    assert torch.equal(rows.dense(), topk_activation(pre, 5))
    assert torch.allclose(sparse_decode(rows, W_dec), rows.dense() @ W_dec, atol=1e-6)


def test_matryoshka_sparse_prefixes_equal_the_dense_ones(toy):
    sae = _perturbed(_built(toy, MATRYOSHKA))
    pre = sae.pre_activations(_sample(toy, 64) * sae.input_scale)
    codes = batch_topk_codes(pre, 4)
    got = sae.prefix_reconstructions_sparse(codes)
    want = sae.prefix_reconstructions(codes.dense())
    assert got.shape == (64, 3, D)
    for level, part in enumerate(want):
        assert torch.allclose(got[:, level], part, atol=1e-5), level


def test_auxk_through_the_sparse_decoder_equals_its_dense_definition(toy):
    sae = _perturbed(_built(toy, TOPK, scale=2.0))
    xs = _sample(toy, 96) * 2.0 * sae.input_scale
    pre = sae.pre_activations(xs)
    x_hat = topk_activation(pre, 4) @ sae.W_dec + sae.b_dec
    dead_F = torch.zeros(G, dtype=torch.bool)
    dead_F[::3] = True  # 22 dead, more than aux_k
    got = auxk_loss(sae.W_dec, xs, pre, x_hat, dead_F, 16)
    f_aux = topk_activation(pre.masked_fill(~dead_F, float("-inf")), 16)  # the dense definition
    want = ((f_aux @ sae.W_dec - (xs - x_hat).detach()) ** 2).sum(-1).mean()
    assert got.item() > 0 and torch.allclose(got, want, rtol=1e-5)
    got_grads = torch.autograd.grad(got, [sae.W_dec, sae.W_enc], retain_graph=True)
    want_grads = torch.autograd.grad(want, [sae.W_dec, sae.W_enc])
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6 * w.abs().max().item())
    assert (got_grads[0][~dead_F] == 0).all() and (got_grads[0][dead_F] != 0).any()  # dead rows only
    assert auxk_loss(sae.W_dec, xs, pre, x_hat, torch.zeros(G, dtype=torch.bool), 16).item() == 0.0


# --- CUDA ---------------------------------------------------------------------------------------------

ALL_POINTS = [DictionaryPoint("relu", G, 0.5), TOPK, *POINTS]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("point", ALL_POINTS, ids=lambda p: p.key)
def test_cuda_loss_gradients_and_training_match_the_cpu(toy, tmp_path, point):
    cpu = _perturbed(_built(toy, point, scale=2.0))
    gpu = copy.deepcopy(cpu).cuda()
    dead_F = torch.zeros(G, dtype=torch.bool)
    dead_F[::4] = True
    x = _sample(toy, 96) * 2.0
    (c_out, c_grads) = _loss_and_grads(cpu, x, StepInfo(dead_F=dead_F))
    (g_out, g_grads) = _loss_and_grads(gpu, x.cuda(), StepInfo(dead_F=dead_F.cuda()))
    assert torch.allclose(g_out.total.cpu(), c_out.total, rtol=1e-4)
    assert ((g_out.f.cpu() != 0) != (c_out.f != 0)).float().mean() < 0.01
    for name, want in c_grads.items():
        assert g_grads[name].device.type == "cuda"
        assert torch.allclose(g_grads[name].cpu(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item()), name
    with torch.no_grad():
        assert torch.allclose(gpu.encode(x.cuda()).cpu(), cpu.encode(x), rtol=1e-4, atol=1e-4)
    cfg = _cfg(point, 20, device="cuda", resample=True, resample_steps=(10,))
    sae = build_sae(point, D, cfg, _sample(toy))
    outcome = train_sae(sae, toy_batches(toy, B, seed=1), cfg, point, checkpoint_dir=tmp_path / "ckpt")
    assert outcome.steps == 20 and all(p.device.type == "cuda" for p in sae.parameters())
    save_sae(sae, tmp_path / "sae", hook_name="blocks.0.hook_resid_post")
    loaded = load_sae(tmp_path / "sae", device="cuda")
    held = _sample(toy, 128, seed=4).cuda()
    with torch.no_grad():
        assert torch.allclose(loaded(held)[0], sae(held)[0], rtol=1e-4, atol=1e-4)
