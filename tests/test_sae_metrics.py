"""Tests for sae_assets.core.sae.metrics: reconstruction stats, density summaries and loss
recovered, against hand-made dictionaries whose answers are known (identity = perfect,
zeros = zero ablation, a gate that keeps some tokens and zeroes the rest) on a 1-layer
embedded model trained for a few steps; the one-call evaluation (sae_assets.core.sae.evaluation)
against them, its standard errors, and the evaluation samples (sae_assets.core.sae.data). Runs
in seconds on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sae_assets.core import schemas
from sae_assets.core.config import ModelConfig, RunConfig, SaeConfig, TokenizerConfig
from sae_assets.core.model.lm import split_is_validation
from sae_assets.core.sae.data import evaluation_sample, sample_sequences
from sae_assets.core.sae.evaluation import evaluate_dictionary, ratio_and_se
from sae_assets.core.model.lm import build_embedded_model, evaluate_loss, forward_logits, next_token_loss
from sae_assets.core.model.training import train_language_model
from sae_assets.core.sae.metrics import (
    _replace_once,
    dead_fraction,
    dense_fraction,
    density_histogram,
    feature_density,
    loss_recovered,
    reconstruction_stats,
)

VOCAB, CTX, D = 50, 16, 32
CFG = ModelConfig(n_layers=1, d_model=D, n_heads=2, d_mlp=64, batch_size=16, train_tokens=16 * CTX * 40,
                  learning_rate=1e-2, warmup_steps=5, seed=0)
RESID = "blocks.0.hook_resid_post"  # after the last block: only ln_final + unembed follow, per position


class Linear:
    """encode = relu?(x @ W_enc), decode = f @ W_dec (+ bias): enough for identity-like cases."""

    def __init__(self, W_enc, W_dec, b_dec=None, relu=False):
        self.W_enc, self.W_dec, self.relu = W_enc, W_dec, relu
        self.b_dec = torch.zeros(W_dec.shape[1]) if b_dec is None else b_dec

    def encode(self, x_ND):
        f_NF = x_ND @ self.W_enc
        return f_NF.relu() if self.relu else f_NF

    def decode(self, f_NF):
        return f_NF @ self.W_dec + self.b_dec


class Gate:
    """Passes a token's activation through where its first coordinate is > 0, else zeros."""

    W_dec = torch.eye(D)

    def encode(self, x_ND):
        return x_ND * (x_ND[:, :1] > 0)

    def decode(self, f_NF):
        return f_NF


def identity(width=D):
    return Linear(torch.eye(width), torch.eye(width))


def zeros(width=D, features=8):
    return Linear(torch.zeros(width, features), torch.zeros(features, width))


def successor_corpus(n, seed):
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(CTX)) % VOCAB  # (n, CTX)


@pytest.fixture(scope="module")
def model():
    m = build_embedded_model(CFG, vocab_size=VOCAB, context_length=CTX)
    train_language_model(m, successor_corpus(64, 0), successor_corpus(8, 1), CFG, eval_every=1000)
    return m


@pytest.fixture(scope="module")
def tokens():
    noisy = torch.randint(0, VOCAB, (7, CTX), generator=torch.Generator().manual_seed(3))
    return torch.where(torch.rand(7, CTX, generator=torch.Generator().manual_seed(4)) < 0.05, noisy,
                       successor_corpus(7, 2))  # (7, CTX): predictable but for a few random tokens


def hook_acts(model, tokens, hook):
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    return cache[hook]  # (M, T, D)


def per_token_loss(logits_MTV, tokens):
    return next_token_loss(logits_MTV, tokens, reduction="none").reshape(tokens.shape[0], -1).double()


# --- loss recovered ---------------------------------------------------------------------------


@pytest.mark.parametrize("hook", [RESID, "blocks.0.hook_mlp_out"])
def test_perfect_dictionary_recovers_everything_and_zero_dictionary_nothing(model, tokens, hook):
    perfect = loss_recovered(model, identity(), tokens, hook, batch_size=3)
    assert perfect.clean_loss == pytest.approx(evaluate_loss(model, tokens, batch_size=7), abs=1e-6)
    assert perfect.sae_loss == perfect.clean_loss
    assert perfect.recovered_vs_zero == 1.0 and perfect.recovered_vs_mean == 1.0
    assert perfect.kl_divergence == 0.0
    assert perfect.n_tokens == 7 * (CTX - 1)
    # the splice is real: ablating the hook changes the forward pass, and makes it worse
    assert perfect.zero_ablation_loss > perfect.clean_loss + 0.1
    assert perfect.mean_ablation_loss > perfect.clean_loss + 0.1

    empty = loss_recovered(model, zeros(), tokens, hook, batch_size=3)
    assert empty.sae_loss == empty.zero_ablation_loss == perfect.zero_ablation_loss
    assert empty.recovered_vs_zero == 0.0
    assert empty.kl_divergence > 0.1
    assert empty.clean_loss == perfect.clean_loss and empty.mean_ablation_loss == perfect.mean_ablation_loss


def test_partial_dictionary_matches_per_token_mixture(model, tokens):
    """At the last resid_post each position's logits depend only on its own activation, so a
    dictionary that keeps some tokens and zeroes the rest has a predictable loss."""
    keep_MT = hook_acts(model, tokens, RESID)[..., 0] > 0  # (M, T)
    assert 0.2 < keep_MT.float().mean() < 0.8
    with torch.no_grad():
        clean_MT = per_token_loss(forward_logits(model, tokens), tokens)
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[(RESID, lambda a, hook: torch.zeros_like(a))])
    zero_MT = per_token_loss(zeroed, tokens)
    expected = torch.where(keep_MT[:, :-1], clean_MT, zero_MT).mean().item()

    result = loss_recovered(model, Gate(), tokens, RESID, batch_size=3)
    assert result.clean_loss == pytest.approx(clean_MT.mean().item(), abs=1e-6)
    assert result.zero_ablation_loss == pytest.approx(zero_MT.mean().item(), abs=1e-6)
    assert result.sae_loss == pytest.approx(expected, abs=1e-6)
    want = (result.zero_ablation_loss - expected) / (result.zero_ablation_loss - result.clean_loss)
    assert 0.05 < want < 0.95 and result.recovered_vs_zero == pytest.approx(want, abs=1e-5)
    assert result.kl_divergence > 0
    # batching does not change exact token averages
    one_batch = loss_recovered(model, Gate(), tokens, RESID, batch_size=7)
    assert one_batch == pytest.approx(result, abs=1e-6)


def test_mean_ablation_uses_the_eval_mean_or_the_given_one(model, tokens):
    mean_D = hook_acts(model, tokens, RESID).double().mean(dim=(0, 1))
    implied = loss_recovered(model, identity(), tokens, RESID, batch_size=4)
    given = loss_recovered(model, identity(), tokens, RESID, batch_size=4, mean_activation=mean_D)
    assert implied.mean_ablation_loss == pytest.approx(given.mean_ablation_loss, abs=1e-6)
    assert implied.mean_ablation_loss != implied.zero_ablation_loss
    at_zero = loss_recovered(model, identity(), tokens, RESID, batch_size=4, mean_activation=torch.zeros(D))
    assert at_zero.mean_ablation_loss == at_zero.zero_ablation_loss
    # a dictionary that always predicts the mean is exactly mean ablation
    mean_predictor = Linear(torch.zeros(D, 4), torch.zeros(4, D), b_dec=mean_D.float())
    flat = loss_recovered(model, mean_predictor, tokens, RESID, batch_size=4, mean_activation=mean_D.float())
    assert flat.recovered_vs_mean == 0.0


def test_loss_recovered_is_deterministic_and_restores_train_mode(model, tokens):
    model.train()
    try:
        a = loss_recovered(model, Gate(), tokens, "blocks.0.hook_mlp_out", batch_size=2)
        assert model.training
    finally:
        model.eval()
    b = loss_recovered(model, Gate(), tokens, "blocks.0.hook_mlp_out", batch_size=2)
    assert a == b and not model.training


def test_loss_recovered_errors_name_the_problem(model, tokens):
    with pytest.raises(ValueError, match=r"D=32.*D=16"):
        loss_recovered(model, identity(16), tokens, RESID, batch_size=4)
    with pytest.raises(ValueError, match=r"mean_activation.*D=31.*D=32"):
        loss_recovered(model, identity(), tokens, RESID, batch_size=4, mean_activation=torch.zeros(31))
    with pytest.raises(ValueError, match=r"did you mean 'blocks.0.hook_resid_post'"):
        loss_recovered(model, identity(), tokens, "blocks.0.hook_resid_pots", batch_size=4)
    with pytest.raises(ValueError, match=r"\(M>=1, T>=2\)"):
        loss_recovered(model, identity(), tokens[:, :1], RESID, batch_size=4)

    poisoned = build_embedded_model(CFG, vocab_size=VOCAB, context_length=CTX)
    with torch.no_grad():
        poisoned.state_dict()["embed.weight"][VOCAB - 1] = float("nan")
    bad = tokens % (VOCAB - 1)
    bad[4, 3] = VOCAB - 1
    # attention spreads the NaN over its sequence (0 * NaN at masked positions), and only there
    with pytest.raises(ValueError, match=r"hook 'blocks.0.hook_resid_post': 16 activation rows contain NaN "
                                         r"or inf \(first at token sequence 4, position 0\)"):
        loss_recovered(poisoned, identity(), bad, RESID, batch_size=3)


def test_replacement_hook_applies_once_under_aliases():
    calls = []
    hook_fn = _replace_once(lambda a: calls.append(1) or a * 2)
    x = torch.ones(2, 3)
    out = hook_fn(x, None)
    assert hook_fn(out, None) is out and len(calls) == 1  # second alias call sees the first's output
    assert torch.equal(hook_fn(x.clone(), None), x * 2) and len(calls) == 2  # a new forward pass


# --- reconstruction stats ---------------------------------------------------------------------


def offset_data(n=1000, width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g, dtype=torch.float64) * 0.5 + 100.0  # large mean, small spread


def test_perfect_and_mean_predictor_fvu():
    x = offset_data().float()
    perfect = reconstruction_stats(identity(8), [x[:300], x[300:]])
    assert perfect.fvu == 0.0 and perfect.mse == 0.0 and perfect.n_tokens == 1000
    mean_D = x.double().mean(dim=0)
    predictor = Linear(torch.zeros(8, 3), torch.zeros(3, 8), b_dec=mean_D.float())
    stats = reconstruction_stats(predictor, [x[:123], x[123:700], x[700:]])
    assert stats.fvu == pytest.approx(1.0, abs=1e-5)
    assert stats.l0 == 0.0 and dead_fraction(stats.feature_counts) == 1.0
    np.testing.assert_allclose(stats.activation_mean, mean_D.numpy(), rtol=1e-12)


def test_streaming_equals_one_shot_and_direct_formulas():
    x = offset_data(seed=1)
    g = torch.Generator().manual_seed(2)
    W_enc = torch.randn(8, 12, generator=g, dtype=torch.float64)
    sae = Linear(W_enc, torch.randn(12, 8, generator=g, dtype=torch.float64) * 0.1, relu=True)
    one = reconstruction_stats(sae, [x])
    cuts = [0, 1, 17, 17, 400, 999, 1000]  # includes an empty and a one-row batch
    streamed = reconstruction_stats(sae, (x[a:b] for a, b in zip(cuts, cuts[1:])))
    f = (x @ sae.W_enc).relu()
    err = (x - f @ sae.W_dec).square().sum(dim=1)
    assert np.array_equal(streamed.feature_counts, one.feature_counts)
    assert np.array_equal(one.feature_counts, (f != 0).sum(dim=0).numpy())
    assert streamed.n_tokens == one.n_tokens == 1000
    assert streamed.l0 == one.l0 == pytest.approx((f != 0).sum(dim=1).double().mean().item(), abs=0)
    for got in (one, streamed):
        assert got.mse == pytest.approx(err.mean().item(), rel=1e-12)
        assert got.mse_per_element == pytest.approx(err.mean().item() / 8, rel=1e-12)
        assert got.fvu == pytest.approx((err.sum() / (x - x.mean(dim=0)).square().sum()).item(), rel=1e-9)
    assert 0.5 < one.l0 < 11.5


def test_reconstruction_errors_name_the_problem():
    x = offset_data(n=10, width=8).float()
    with pytest.raises(ValueError, match=r"activation batch 0.*D=8.*D=6"):
        reconstruction_stats(identity(6), [x])
    bad = x.clone()
    bad[5, 2] = float("nan")
    with pytest.raises(ValueError, match=r"activation batch 1: 1 activation rows contain NaN.*row 5 \(row 15 of"):
        reconstruction_stats(identity(8), [x, bad])
    with pytest.raises(ValueError, match="no activation rows"):
        reconstruction_stats(identity(8), [])


# --- density ----------------------------------------------------------------------------------


def test_density_summaries_and_histogram():
    tokens = 10**9
    density = np.array([0.0, 0.0, 1.0, 0.5, 0.1, 0.2, 10**-2.9, 1e-9, 10**-7.9])
    counts = np.round(density * tokens).astype(np.int64)
    np.testing.assert_allclose(feature_density(counts, tokens), density, rtol=0.05)
    assert feature_density(counts, tokens)[3] == 0.5
    assert dead_fraction(counts) == pytest.approx(2 / 9)
    assert dense_fraction(counts, tokens) == pytest.approx(3 / 9)  # 0.1 itself is not > 0.1
    assert dense_fraction(counts, tokens, threshold=0.05) == pytest.approx(4 / 9)

    hist = density_histogram(counts, tokens)
    assert hist.edges.shape == (33,) and hist.edges[0] == -8.0 and hist.edges[-1] == 0.0
    assert hist.counts.sum() + hist.never_fired == len(counts) and hist.never_fired == 2
    assert hist.counts[0] == 2  # 1e-9 clipped into the first bin, with 10^-7.9
    # density 1 (log10 = 0, the right edge), 0.5 (-0.30), 0.2 (-0.70), 0.1 (-1, a left edge)
    assert hist.counts[-4:].tolist() == [1, 1, 1, 1]
    assert hist.counts[20] == 1  # 10^-2.9 in [-3, -2.75)
    with pytest.raises(ValueError, match="tokens > 0"):
        feature_density(counts, 0)
    with pytest.raises(ValueError, match="whole number of steps"):
        density_histogram(counts, tokens, step=0.3)


# --- the one-call evaluation --------------------------------------------------------------------


def noisy_corpus(n, seed):
    """(n, CTX) numpy: successor sequences with ~5% random tokens."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, VOCAB, (n, CTX), generator=g)
    return torch.where(torch.rand(n, CTX, generator=g) < 0.05, noise, successor_corpus(n, seed + 1)).numpy()


def test_evaluation_agrees_with_the_streaming_functions(model):
    eval_ST, mean_ST, density_ST = noisy_corpus(12, 10), noisy_corpus(6, 20), noisy_corpus(20, 30)
    for sae in (Gate(), identity(), zeros()):
        got = evaluate_dictionary(model, sae, RESID, eval_ST, mean_ST, density_ST, batch_size=5)
        mean_D = hook_acts(model, torch.from_numpy(mean_ST), RESID).double().mean(dim=(0, 1))
        recovered = loss_recovered(model, sae, torch.from_numpy(eval_ST), RESID, batch_size=4, mean_activation=mean_D)
        stats = reconstruction_stats(sae, [hook_acts(model, torch.from_numpy(eval_ST), RESID).reshape(-1, D)])
        density = reconstruction_stats(sae, [hook_acts(model, torch.from_numpy(density_ST), RESID).reshape(-1, D)])
        m = got.metrics
        assert m["l0"] == pytest.approx(stats.l0) and m["mse"] == pytest.approx(stats.mse, abs=1e-9)
        assert m["fvu"] == pytest.approx(stats.fvu, rel=1e-9, abs=1e-12)
        for name, field in (("clean_loss", "clean_loss"), ("sae_loss", "sae_loss"), ("kl_divergence", "kl_divergence"),
                            ("zero_ablation_loss", "zero_ablation_loss"), ("mean_ablation_loss", "mean_ablation_loss"),
                            ("loss_recovered", "recovered_vs_zero"), ("loss_recovered_vs_mean", "recovered_vs_mean")):
            assert m[name] == pytest.approx(getattr(recovered, field), abs=1e-9), name
        assert np.array_equal(got.feature_counts, density.feature_counts)  # dead features: the density sample
        assert got.density_tokens == m["dead_counted_over_tokens"] == 20 * CTX
        assert m["dead_fraction"] == dead_fraction(density.feature_counts)
        assert m["eval_tokens"] == 12 * CTX and m["eval_sequences"] == 12 and m["mean_ablation_tokens"] == 6 * CTX
        assert got.histogram.never_fired + got.histogram.counts.sum() == len(got.feature_counts)


def test_mean_ablation_takes_its_mean_from_the_mean_sequences_only(model):
    eval_ST, mean_ST = noisy_corpus(8, 10), noisy_corpus(8, 40)
    got = evaluate_dictionary(model, Gate(), RESID, eval_ST, mean_ST, eval_ST, batch_size=8).metrics
    own = evaluate_dictionary(model, Gate(), RESID, eval_ST, eval_ST, eval_ST, batch_size=8).metrics
    from_mean = hook_acts(model, torch.from_numpy(mean_ST), RESID).double().mean(dim=(0, 1))
    expected = loss_recovered(model, Gate(), torch.from_numpy(eval_ST), RESID, batch_size=8, mean_activation=from_mean)
    assert got["mean_ablation_loss"] == pytest.approx(expected.mean_ablation_loss, abs=1e-9)
    assert got["mean_ablation_loss"] != pytest.approx(own["mean_ablation_loss"], abs=1e-6)
    assert got["sae_loss"] == own["sae_loss"] and got["loss_recovered"] == own["loss_recovered"]


def test_standard_errors_are_positive_and_shrink_with_more_sequences(model):
    tokens_ST = noisy_corpus(96, 50)
    few = evaluate_dictionary(model, Gate(), RESID, tokens_ST[:6], tokens_ST[-8:], tokens_ST[:6], batch_size=16)
    many = evaluate_dictionary(model, Gate(), RESID, tokens_ST[:88], tokens_ST[-8:], tokens_ST[:88], batch_size=16)
    for name in ("fvu_se", "loss_recovered_se", "loss_recovered_vs_mean_se"):
        assert 0 < many.metrics[name] < few.metrics[name] and math.isfinite(few.metrics[name]), name
        assert many.metrics[name] < 0.6 * few.metrics[name], name  # ~ 1 / sqrt(sequences)
    perfect = evaluate_dictionary(model, identity(), RESID, tokens_ST[:6], tokens_ST[-8:], tokens_ST[:6], batch_size=16)
    assert perfect.metrics["loss_recovered_se"] == 0.0 and perfect.metrics["fvu_se"] == 0.0
    single = evaluate_dictionary(model, Gate(), RESID, tokens_ST[:1], tokens_ST[-8:], tokens_ST[:1], batch_size=16)
    assert math.isnan(single.metrics["loss_recovered_se"])


def test_ratio_standard_error_matches_the_spread_over_repeated_samples():
    g = np.random.default_rng(0)
    def draw(m):
        b = g.gamma(4.0, 1.0, m)
        return b * 0.6 + g.normal(0, 0.5, m), b
    estimates, errors = [], []
    for _ in range(2000):
        a, b = draw(40)
        r, se = ratio_and_se(torch.from_numpy(a), torch.from_numpy(b))
        estimates.append(r)
        errors.append(se)
    assert np.mean(estimates) == pytest.approx(0.6, abs=0.01)
    assert np.mean(errors) == pytest.approx(np.std(estimates), rel=0.1)
    assert all(math.isnan(v) for v in ratio_and_se(torch.ones(3), torch.zeros(3)))


# --- the evaluation samples -----------------------------------------------------------------------


def shard_first_indices(sequences_per_shard, shards):
    """(S,) first global token indices of `shards` token shards of `sequences_per_shard` sequences."""
    offsets = np.arange(sequences_per_shard, dtype=np.int64) * CTX
    return np.concatenate([schemas.global_token_index(k, offsets) for k in range(shards)])


def run_config(**sae):
    return RunConfig(tokenizer=TokenizerConfig(context_length=CTX), model=ModelConfig(val_fraction=0.25, seed=3),
                     sae=SaeConfig(**{"eval_sequences": 16, "dead_after_tokens": 40 * CTX, "seed": 5, **sae}))


def test_evaluation_sequences_are_spread_over_all_shards_and_ignore_row_grouping():
    first_S = shard_first_indices(200, 4)
    cfg = run_config()
    sample = evaluation_sample(first_S, cfg)
    picked = first_S[sample.eval_S]
    held = split_is_validation(first_S, 0.25, 3)
    assert len(picked) == 16 and held[sample.eval_S].all()
    shards = set(schemas.shard_of_token(picked).tolist())
    assert len(shards) >= 3, f"evaluation sequences come from shards {shards} only"
    assert np.array_equal(picked, np.sort(picked))
    # the old rule (the first held-out sequences in global order) took them all from shard 0
    assert set(schemas.shard_of_token(np.sort(first_S[held])[:16]).tolist()) == {0}
    # the same sequences, grouped by shard in another order, or shuffled: the same sample
    for order in (np.arange(len(first_S))[::-1], np.random.default_rng(1).permutation(len(first_S)),
                  np.concatenate([np.flatnonzero(schemas.shard_of_token(first_S) == k) for k in (2, 0, 3, 1)])):
        again = evaluation_sample(first_S[order], cfg)
        assert np.array_equal(first_S[order][again.eval_S], picked)
        assert np.array_equal(first_S[order][again.mean_S], first_S[sample.mean_S])
    # one shard holding every sequence: the sample is spread over all of it, not its start
    one = shard_first_indices(800, 1)
    spread = one[evaluation_sample(one, cfg).eval_S] // CTX
    assert spread.max() - spread.min() > 400
    assert not np.array_equal(picked, first_S[evaluation_sample(first_S, run_config(seed=6)).eval_S])


def test_mean_sequences_are_training_sequences_and_dead_features_get_a_larger_sample():
    first_S = shard_first_indices(200, 4)
    sample = evaluation_sample(first_S, run_config())
    held = split_is_validation(first_S, 0.25, 3)
    assert len(sample.mean_S) == 16 and not held[sample.mean_S].any(), "the mean must come from training tokens"
    assert held[sample.density_S].all() and len(sample.density_S) == 40  # dead_after_tokens / CTX sequences
    assert set(sample.eval_S) <= set(sample.density_S)
    few = sample_sequences(first_S, heldout=True, val_fraction=0.25, split_seed=3, seed=5, count=10**6)
    assert len(few) == held.sum()  # a count above what exists takes all of it
    assert len(evaluation_sample(first_S, run_config(dead_after_tokens=0)).density_S) == 16
    with pytest.raises(ValueError, match="sae.eval_sequences=0"):
        evaluation_sample(first_S, run_config(eval_sequences=0))


def test_special_tokens_are_spliced_and_scored_nowhere_but_the_model_still_sees_them(model):
    """special_tokens.exclude: the reconstruction and the ablations replace only non-special
    activations, and L0, MSE, FVU, the mean-ablation mean and the firing counts skip special
    positions. At the last resid_post each position's logits depend only on its own activation,
    so the spliced loss is a per-position mixture: clean where the token is special."""
    eval_ST, mean_ST, density_ST = noisy_corpus(12, 10), noisy_corpus(6, 20), noisy_corpus(20, 30)
    special = [0, 7, 13, 21, 34, 45]
    keep = {name: ~np.isin(t, special) for name, t in (("eval", eval_ST), ("mean", mean_ST), ("density", density_ST))}
    assert 0.7 < keep["eval"].mean() < 0.95
    eval_T = torch.from_numpy(eval_ST)
    mean_D = hook_acts(model, torch.from_numpy(mean_ST), RESID).reshape(-1, D)[
        torch.from_numpy(keep["mean"].reshape(-1))].double().mean(dim=0)
    with torch.no_grad():
        clean_MT = per_token_loss(forward_logits(model, eval_T), eval_T)
        zero_MT = per_token_loss(model.run_with_hooks(eval_T, fwd_hooks=[(RESID, lambda a, hook: torch.zeros_like(a))]),
                                 eval_T)
        mean_MT = per_token_loss(model.run_with_hooks(eval_T, fwd_hooks=[
            (RESID, lambda a, hook: mean_D.to(a.dtype).expand_as(a).contiguous())]), eval_T)
    kept_MT = torch.from_numpy(keep["eval"][:, :-1])
    for sae in (zeros(), Gate()):
        got = evaluate_dictionary(model, sae, RESID, eval_ST, mean_ST, density_ST, batch_size=5,
                                  exclude_token_ids=special)
        m = got.metrics
        acts = hook_acts(model, eval_T, RESID).reshape(-1, D)[torch.from_numpy(keep["eval"].reshape(-1))]
        stats = reconstruction_stats(sae, [acts])
        density = reconstruction_stats(sae, [hook_acts(model, torch.from_numpy(density_ST), RESID).reshape(-1, D)[
            torch.from_numpy(keep["density"].reshape(-1))]])
        assert m["eval_tokens"] == keep["eval"].sum() and m["mean_ablation_tokens"] == keep["mean"].sum()
        assert got.density_tokens == keep["density"].sum()
        assert m["l0"] == pytest.approx(stats.l0) and m["mse"] == pytest.approx(stats.mse, abs=1e-9)
        assert m["fvu"] == pytest.approx(stats.fvu, rel=1e-9, abs=1e-12)
        assert np.array_equal(got.feature_counts, density.feature_counts)
        assert m["clean_loss"] == pytest.approx(clean_MT.mean().item(), abs=1e-6)
        assert m["zero_ablation_loss"] == pytest.approx(torch.where(kept_MT, zero_MT, clean_MT).mean().item(), abs=1e-6)
        assert m["mean_ablation_loss"] == pytest.approx(torch.where(kept_MT, mean_MT, clean_MT).mean().item(), abs=1e-6)
    # the zero dictionary: spliced exactly where the zero ablation is, so nothing recovered
    assert evaluate_dictionary(model, zeros(), RESID, eval_ST, mean_ST, density_ST, batch_size=5,
                               exclude_token_ids=special).metrics["loss_recovered"] == 0.0
    # ids that never occur change nothing
    plain = evaluate_dictionary(model, Gate(), RESID, eval_ST, mean_ST, density_ST, batch_size=5).metrics
    absent = evaluate_dictionary(model, Gate(), RESID, eval_ST, mean_ST, density_ST, batch_size=5,
                                 exclude_token_ids=[VOCAB + 3]).metrics
    assert absent == plain
    with pytest.raises(ValueError, match="every position of eval_ST is an excluded special token"):
        evaluate_dictionary(model, Gate(), RESID, eval_ST, mean_ST, density_ST, batch_size=5,
                            exclude_token_ids=list(range(VOCAB)))
