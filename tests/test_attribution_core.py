"""Per-datum parameter shifts (sae_assets.core.attribution) on a tiny TL-native model, CPU.

The capture is checked against independent references: the stored shifts of every datum
(with top_k = every tracked entry) sum to the update the optimizer applied (SGD exactly;
Adam: the applied update less momentum and weight decay, computed here from the optimizer
state); the stored top-k equals a dense top-k of per-datum gradients from one backward pass
*per datum*; capture leaves training bit-identical. Also: neuron grouping (row of mlp.in,
column of mlp.out) against an activation-hook ablation, the heuristic on a planted token
that always moves one neuron, and clear errors for bad input.
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
import torch

from sae_assets.core.attribution import ablation, analysis, heuristic, tables
from sae_assets.core.attribution.capture import ShiftCapture
from sae_assets.core.attribution.records import step_ranges
from sae_assets.core.attribution.tensors import DEFAULT_KINDS, TENSOR_KINDS, track
from sae_assets.core.attribution.topk import DatumTopK
from sae_assets.core.config import ConfigError, ModelConfig, config_from_dict
from sae_assets.core.model.lm import build_embedded_model, next_token_loss
from sae_assets.core.model.training import train_language_model, train_step

VOCAB, CTX, B = 40, 12, 6
CFG = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, batch_size=B, train_tokens=B * CTX * 8,
                  learning_rate=1e-2, warmup_steps=2, seed=0)


def tiny_model(cfg: ModelConfig = CFG):
    return build_embedded_model(cfg, vocab_size=VOCAB, context_length=CTX)


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, CTX), generator=generator) for _ in range(n)]


def weights(model, kinds=DEFAULT_KINDS) -> list[torch.Tensor]:
    return [module.weight for module in track(model, kinds)[1]]


def run_capture(model, optimizer, data, *, top_k, kinds=DEFAULT_KINDS, max_grad_norm=0.3, lr=0.05, probe=None):
    """Train on `data` with a capture; `probe(step, model, optimizer)` runs before each step."""
    got = []
    with ShiftCapture(model, datum_ids=np.arange(B) * 100, top_k=top_k, ranges=step_ranges(len(data), len(data)),
                      sink=got.append, kinds=kinds) as capture:
        for step, tokens in enumerate(data, start=1):
            if probe is not None:
                probe(step, model, optimizer)
            capture.begin_step(step, torch.arange(B))
            train_step(model, optimizer, tokens, lr=lr, max_grad_norm=max_grad_norm, step=step, capture=capture)
        capture.close()
    [captured] = got
    return capture, pl.from_arrow(captured.shifts), pl.from_arrow(captured.steps)


def dense_sum(shifts: pl.DataFrame, step: int, total: int) -> np.ndarray:
    """(total,) float64 sum over data of the stored shifts of one step."""
    mine = shifts.filter(pl.col("step") == step)
    out = np.zeros(total)
    np.add.at(out, mine["flat_index"].to_numpy(), mine["value"].to_numpy().astype(np.float64))
    return out


def snapshot(step, model, optimizer, into, kinds=DEFAULT_KINDS):
    params = weights(model, kinds)
    into[step] = ([p.detach().double().clone() for p in params],
                  [optimizer.state.get(p, {}).get("exp_avg", torch.zeros_like(p)).double().clone() for p in params])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_shifts_sum_exactly_to_the_applied_update(weight_decay):
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=weight_decay)
    total = track(model)[0].total
    before = {}
    capture, shifts, steps = run_capture(model, optimizer, batches(3), top_k=total,
                                         probe=lambda s, m, o: snapshot(s, m, o, before))
    assert capture.optimizer_kind == "sgd" and shifts.height == 3 * B * total
    after = [p.detach().double() for p in weights(model)]
    theta0 = before[3][0]
    applied = torch.cat([(a - b + 0.05 * weight_decay * b).reshape(-1) for a, b in zip(after, theta0)]).numpy()
    summed = dense_sum(shifts, 3, total)
    # Exact up to float32 rounding: of the stored weights (theta_after) and of the float32 shares.
    rounding = 2 * np.finfo(np.float32).eps * torch.cat([a.reshape(-1) for a in after]).abs().numpy()
    assert (np.abs(summed - applied) <= rounding + 1e-6 * np.abs(applied).max()).all()
    assert (steps["clip_coefficient"] < 1).all(), "max_grad_norm=0.3 clips, so the coefficient is exercised"
    assert steps["sum_check_error"].max() < 1e-4 and steps["carried_norm"].max() == 0.0
    assert (steps["decay_norm"] > 0).all() == (weight_decay > 0)
    assert steps["topk_mass"].to_numpy() == pytest.approx(1.0)


def test_adam_shifts_sum_to_the_attributable_part_of_the_update():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    total = track(model)[0].total
    before = {}
    capture, shifts, steps = run_capture(model, optimizer, batches(3), top_k=total, lr=0.01,
                                         probe=lambda s, m, o: snapshot(s, m, o, before))
    assert capture.optimizer_kind == "adam"
    theta0, m_prev = before[3]
    parts = []
    for p, t0, m0 in zip(weights(model), theta0, m_prev):
        state = optimizer.state[p]
        denom = state["exp_avg_sq"].double().sqrt() / (1 - 0.95 ** 3) ** 0.5 + 1e-8
        carried = -0.01 / (1 - 0.9 ** 3) * 0.9 * m0 / denom
        parts.append((p.detach().double() - t0 - carried + 0.01 * 0.1 * t0).reshape(-1))
    attributable = torch.cat(parts).numpy()
    summed = dense_sum(shifts, 3, total)
    scale = max(np.abs(attributable).max(), 1e-6 * np.abs(shifts["value"].to_numpy()).max())
    assert np.abs(summed - attributable).max() <= 2e-4 * scale
    assert steps["sum_check_error"].max() < 1e-2
    assert steps.filter(pl.col("step") > 1)["carried_norm"].min() > 0, "momentum is reported, not attributed"
    assert steps["decay_norm"].min() > 0


def reference_shifts(model, tokens, kinds, max_grad_norm) -> tuple[float, list[torch.Tensor]]:
    """(clip coefficient, per tracked weight (B, rows, columns) gradients), from one backward pass
    per datum on a copy of the model before the step."""
    twin = tiny_model()
    twin.load_state_dict(model.state_dict())
    twin.train()
    per_datum = []
    for i in range(B):
        twin.zero_grad(set_to_none=True)
        loss = next_token_loss(twin(tokens[i : i + 1]), tokens[i : i + 1], reduction="sum") / (B * (CTX - 1))
        loss.backward()
        per_datum.append({n: p.grad.detach().clone() for n, p in twin.named_parameters()})
    total_grad = {n: sum(g[n] for g in per_datum) for n in per_datum[0]}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in total_grad.values()]))
    coefficient = min(1.0, max_grad_norm / (float(norm) + 1e-6))
    names = {id(p): n for n, p in twin.named_parameters()}
    tracked = [names[id(w)] for w in weights(twin, kinds)]
    return coefficient, [torch.stack([g[n] for g in per_datum]) for n in tracked]


def adam_scale(optimizer, param, step: int, lr: float, coefficient: float) -> torch.Tensor:
    """The step's per-datum scale from the optimizer state it left (AdamW defaults)."""
    denom = optimizer.state[param]["exp_avg_sq"].sqrt() / (1 - 0.999 ** step) ** 0.5 + 1e-8
    return -lr * (1 - 0.9) / (1 - 0.9 ** step) * coefficient / denom


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_stored_topk_equals_a_dense_reference(kind):
    kinds = TENSOR_KINDS  # embeddings and unembedding too: every per-datum gradient path
    model = tiny_model()
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.05), "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01)}
    optimizer = make[kind](model.parameters())
    data, lr, k = batches(3, seed=1), 0.05 if kind == "sgd" else 0.01, 25
    references, scales = {}, {}

    def step_scales(step, m, o):
        coefficient = references[step][0]
        if kind == "sgd":
            return [torch.tensor(-lr * coefficient)] * len(references[step][1])
        return [adam_scale(o, w, step, lr, coefficient) for w in weights(m, kinds)]

    def probe(step, m, o):
        if step > 1:  # the state step-1 left behind, before this step overwrites it
            scales[step - 1] = step_scales(step - 1, m, o)
        references[step] = reference_shifts(m, data[step - 1], kinds, 0.3)

    _, shifts, steps = run_capture(model, optimizer, data, top_k=k, kinds=kinds, lr=lr, probe=probe)
    scales[3] = step_scales(3, model, optimizer)
    for step in (1, 2, 3):
        coefficient, grads = references[step]
        assert steps["clip_coefficient"][step - 1] == pytest.approx(coefficient, rel=1e-4) and coefficient < 1
        dense = torch.cat([(g * s).reshape(B, -1) for g, s in zip(grads, scales[step])], dim=1).numpy()
        order = np.argsort(-np.abs(dense), axis=1, kind="stable")[:, :k]
        mine = shifts.filter(pl.col("step") == step)
        stored_index = mine["flat_index"].to_numpy().reshape(B, k)
        stored_value = mine["value"].to_numpy().reshape(B, k)
        assert np.array_equal(stored_index, order)
        np.testing.assert_allclose(stored_value, np.take_along_axis(dense, order, 1), rtol=2e-4,
                                   atol=1e-6 * np.abs(dense).max())
        assert mine["datum_id"].to_list() == [i * 100 for i in range(B) for _ in range(k)]


def test_capture_leaves_the_trained_weights_identical():
    generator = torch.Generator().manual_seed(0)
    train, val = torch.randint(0, VOCAB, (30, CTX), generator=generator), torch.randint(0, VOCAB, (4, CTX))
    plain, captured = tiny_model(), tiny_model()
    result = train_language_model(plain, train, val, CFG)
    got = []
    with ShiftCapture(captured, datum_ids=np.arange(30), top_k=7, ranges=step_ranges(result.steps, 3),
                      sink=got.append) as capture:
        again = train_language_model(captured, train, val, CFG, capture=capture)
    a, b = plain.state_dict(), captured.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a) and again.val_loss == result.val_loss
    assert [(r.start, r.end) for r in got] == [(1, 3), (4, 6), (7, 8)]
    assert sum(r.shifts.num_rows for r in got) == result.steps * B * 7
    assert max(r.steps.column("sum_check_error").to_numpy().max() for r in got) < 1e-2


def test_each_step_records_each_datum_once_when_batches_straddle_epochs():
    generator = torch.Generator().manual_seed(1)
    train, val = torch.randint(0, VOCAB, (9, CTX), generator=generator), torch.randint(0, VOCAB, (4, CTX))
    got, model = [], tiny_model()  # 9 rows, batches of 6: every other batch straddles two epochs
    with ShiftCapture(model, datum_ids=np.arange(9) * 10, top_k=5, ranges=step_ranges(8, 8),
                      sink=got.append) as capture:
        train_language_model(model, train, val, CFG, capture=capture)
    shifts = pl.from_arrow(got[0].shifts)
    per_datum = shifts.group_by("step", "datum_id").len()
    assert per_datum.height == 8 * B and (per_datum["len"] == 5).all(), "one top-k per (step, datum)"
    seen = per_datum.group_by("datum_id").len()["len"]
    assert seen.len() == 9 and seen.max() - seen.min() <= 1
    with ShiftCapture(tiny_model(), datum_ids=np.arange(9), top_k=5, ranges=[(1, 1)], sink=got.append) as capture:
        with pytest.raises(ValueError, match=r"training step 3 holds a training row twice \(\[4, 1, 4\]\)"):
            capture.begin_step(3, torch.tensor([4, 1, 4]))


def test_streaming_topk_matches_brute_force_and_orders_canonically():
    generator = torch.Generator().manual_seed(3)
    parts = [torch.randn(4, n, generator=generator) for n in (5, 300, 17, 1)]
    for k in (1, 9, 323, 1000):
        top = DatumTopK(k)
        offset = 0
        for part in parts:
            top.add(part, offset)
            offset += part.shape[1]
        values, index = top.result()
        dense = torch.cat(parts, dim=1).numpy()
        order = np.argsort(-np.abs(dense), axis=1, kind="stable")[:, :k]
        assert np.array_equal(index, order) and np.array_equal(values, np.take_along_axis(dense, order, 1))
    ties = DatumTopK(2)
    ties.add(torch.tensor([[1.0, -1.0, 1.0, 0.5]]), 10)
    assert ties.result()[1].tolist() == [[10, 11]]
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        DatumTopK(0)


def test_neuron_is_a_row_of_mlp_in_and_a_column_of_mlp_out():
    model = tiny_model()
    layout, _ = track(model)
    frame = pl.DataFrame({
        "step": [1] * 6, "datum_id": [0] * 6, "rank": list(range(6)),
        "tensor": ["blocks.0.mlp.in.weight", "blocks.0.mlp.out.weight", "blocks.0.mlp.out.weight",
                   "blocks.0.attn.q.weight", "blocks.0.attn.o.weight", "blocks.0.attn.o.weight"],
        "row": [5, 7, 5, 9, 9, 1], "column": [3, 5, 9, 0, 1, 9], "value": [1.0] * 6,
    }, schema_overrides={"row": pl.Int32, "column": pl.Int32, "step": pl.Int32, "rank": pl.Int32,
                         "value": pl.Float32})
    units = tables.with_units(frame, layout)
    assert units.select("unit_kind", "unit").rows() == [
        ("mlp_neuron", 5), ("mlp_neuron", 5), ("mlp_neuron", 9),  # in: row; out: column
        ("attention_head", 1), ("attention_head", 0), ("attention_head", 1)]  # d_head 8: q row, o column
    # Zeroing the weights of neuron 5 equals zeroing its activation (hook_post) in the forward pass.
    tokens = batches(1)[0]
    with torch.no_grad():
        hooked = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_post", zero_unit(5))])
        with ablation.zero_ablated(model, "mlp_neuron", 0, 5):
            ablated = model(tokens)
            assert float(model.blocks[0].mlp.out.original_component.weight[:, 5].abs().sum()) == 0.0
        restored = model(tokens)
        clean = tiny_model()(tokens)
    assert torch.allclose(ablated, hooked, atol=1e-5) and not torch.allclose(ablated, clean, atol=1e-3)
    assert torch.equal(restored, clean), "the ablation restores the weights exactly"


def test_a_head_ablation_zeroes_that_head_only():
    model, tokens = tiny_model(), batches(1)[0]

    def zero_head(z, hook):
        z[:, :, 1, :] = 0.0
        return z

    with torch.no_grad():
        hooked = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head)])
        with ablation.zero_ablated(model, "attention_head", 0, 1):
            ablated = model(tokens)
            q = model.blocks[0].attn.q.original_component.weight
            assert float(q[8:].abs().sum()) == 0.0 and float(q[:8].abs().sum()) > 0.0  # d_head 8: head 1's rows
    assert torch.allclose(ablated, hooked, atol=1e-5)
    with pytest.raises(ValueError, match="outside layer 0"):
        with ablation.zero_ablated(model, "attention_head", 0, 2):
            pass


def zero_unit(j):
    def hook(activation, hook):
        activation[..., j] = 0.0
        return activation
    return hook


def test_heuristic_filters_by_count_then_relative_frequency_then_count():
    train_freq = np.full(10, 0.1)
    counts = np.array([100, 30, 25, 24, 2, 19, 0, 0, 0, 0])  # 0 common, 4 rare and above relative, 5 below c
    train_freq[0], train_freq[4] = 0.5, 0.0001
    found = heuristic.notable_tokens(counts, train_freq, min_count=20, top_relative=3, top_count=2)
    assert found.token_ids.tolist() == [1, 2]  # 0 loses on relative frequency; 4 and 5 are below c=20
    assert found.counts.tolist() == [30, 25] and found.relative_freq[0] == pytest.approx(30 / 200 / 0.1)
    assert heuristic.notable_tokens(counts, train_freq, min_count=200, top_relative=3, top_count=2).token_ids.size == 0


def planted(seed=0, n=48, token=7):
    """Sequences over tokens 10..39; the even ones also hold `token` at positions 2, 6 and 10."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(10, VOCAB, (n, CTX), generator=generator)
    data[::2, 2::4] = token
    return data


def plant(model, token: int, neuron: int, dim: int = 3) -> None:
    """Residual dimension `dim` carries only `token` (embedding, not positions or attention), and
    neuron `neuron` reads only `dim`, with a bias that keeps it off elsewhere."""
    with torch.no_grad():
        embed = model.embed.original_component.weight
        embed[:, dim] = 0.0
        embed[token, dim] = 2.0
        model.pos_embed.original_component.weight[:, dim] = 0.0
        out = model.blocks[0].attn.o.original_component
        out.weight[dim], out.bias[dim] = 0.0, 0.0
        mlp_in = getattr(model.blocks[0].mlp, "in").original_component
        mlp_in.weight[neuron] = 0.0
        mlp_in.weight[neuron, dim], mlp_in.bias[neuron] = 3.0, -4.0


def test_heuristic_finds_a_token_that_always_moves_one_neuron():
    model, token, neuron = tiny_model(), 7, 11
    plant(model, token, neuron)
    data = planted(token=token)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    got = []
    with ShiftCapture(model, datum_ids=np.arange(len(data)) * 16, top_k=8, ranges=step_ranges(8, 8),
                      sink=got.append, kinds=["mlp.in", "mlp.out"]) as capture:
        for step, idx in enumerate(torch.arange(len(data)).reshape(8, B), start=1):
            capture.begin_step(step, idx)
            train_step(model, optimizer, data[idx], lr=0.05, max_grad_norm=0.0, step=step, capture=capture)
    shifts = pl.from_arrow(tables.publish_shifts(got[0].shifts, capture.layout, 8))
    data_of = tables.unit_data(tables.with_units(shifts, capture.layout))
    attributed = set(data_of.filter(pl.col("unit") == neuron)["datum_id"].to_list())
    holding = set((np.arange(0, len(data), 2) * 16).tolist())
    assert attributed <= holding and len(attributed) >= 0.75 * len(holding), "the planted neuron moves on the token"
    train_freq = np.bincount(data.reshape(-1).numpy(), minlength=VOCAB) / data.numel()
    found = pl.from_arrow(heuristic.unit_notable_tokens(
        data_of, np.arange(len(data)) * 16, data.numpy(), train_freq, [f"t{i}" for i in range(VOCAB)],
        min_count=8, top_relative=5, top_count=3))
    mine = found.filter(pl.col("unit") == neuron)
    assert mine["token_id"][0] == token and mine["token"][0] == "t7"
    assert mine["relative_freq"][0] == pytest.approx(2.0), "every attributed datum holds the token"
    elsewhere = found.filter((pl.col("unit") != neuron) & (pl.col("token_id") == token))
    assert (elsewhere["relative_freq"] < mine["relative_freq"][0]).all()


def test_flip_counts_follow_the_seed_definition():
    clean = np.array([[1, 1, 2, 3]])
    ablated = np.array([[1, 2, 2, 1]])
    instances, flips = ablation.flip_counts(clean, ablated, 5)
    assert instances[1].item() == 3 and flips[1].item() == 2  # positions 0 (same), 1 (1->2), 3 (3->1)
    assert instances[2].item() == 2 and flips[2].item() == 1
    assert instances[3].item() == 1 and flips[3].item() == 1
    assert ablation.notable_proportion(instances, flips, [1, 2]) == pytest.approx(3 / 5)
    assert ablation.notable_proportion(instances, flips, [4]) is None
    assert ablation.control_unit(32, 0, 5, seed=0) != 5
    assert ablation.control_unit(32, 0, 5, seed=0) == ablation.control_unit(32, 0, 5, seed=0)


def test_bad_input_is_named():
    model = tiny_model()
    sink = lambda r: None  # noqa: E731
    with pytest.raises(ValueError, match="attribution.top_k must be >= 1"):
        ShiftCapture(model, datum_ids=np.arange(4), top_k=0, ranges=[(1, 2)], sink=sink)
    with pytest.raises(ValueError, match="unknown: \\['mlp.mid'\\]"):
        track(model, ["mlp.in", "mlp.mid"])
    with pytest.raises(ValueError, match="SGD momentum is not supported"):
        run_capture(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), batches(1), top_k=3)
    with pytest.raises(ValueError, match="capture ranges run to step 5"):  # training stopped early
        capture = ShiftCapture(tiny_model(), datum_ids=np.arange(4), top_k=3, ranges=[(1, 5)], sink=sink)
        capture.close()
    for data, needle in (({"attribution": {"top_k": 0}}, "'attribution.top_k' must be >= 1"),
                         ({"attribution": {"tensors": ["mlp.mid"]}}, "'attribution.tensors[0]' is 'mlp.mid'"),
                         ({"attribution": {"ablation_kind": "layer"}}, "'attribution.ablation_kind' is 'layer'"),
                         ({"attribution": {"heuristic_min_count": 0}}, "'attribution.heuristic_min_count'")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            config_from_dict(data)


def test_non_finite_shifts_name_the_step():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(3)
    with pytest.raises(ValueError, match=r"blocks.0.attn.q.weight are not finite at step 1\b"):
        run_capture(model, optimizer, data, top_k=3, lr=float("inf"))


def test_training_corpus_counts_unigrams_over_the_training_rows_only():
    tokens_ST = np.array([[0, 1, 1], [2, 2, 2], [1, 3, 3]])
    first_S = np.array([0, 3, 6])
    train_S = np.array([True, False, True])
    corpus = analysis.training_corpus(tokens_ST, first_S, train_S, ["a", "b", "c", "d", "e"])
    assert corpus.datum_ids.tolist() == [0, 6] and corpus.tokens.tolist() == [[0, 1, 1], [1, 3, 3]]
    assert corpus.train_freq.tolist() == [1 / 6, 3 / 6, 0.0, 2 / 6, 0.0]  # the held-out row's 2s are not counted


def test_paired_sign_flip_test_is_exact_one_sided_and_drops_missing_pairs():
    from sae_assets.core.attribution.significance import paired_sign_flip_test

    # Three positive differences: only the all-plus sign vector reaches the observed sum.
    assert paired_sign_flip_test([0.5, 0.4, 0.3], [0.1, 0.1, 0.1]).p_value == pytest.approx(1 / 8)
    # d = (1, -1): sums over the four sign vectors are 0, 2, -2, 0; three reach the observed 0.
    assert paired_sign_flip_test([1.0, 0.0], [0.0, 1.0]).p_value == pytest.approx(3 / 4)
    # One-sided: the control beating the unit gives a large p, not a small one.
    assert paired_sign_flip_test([0.1, 0.1, 0.1], [0.5, 0.4, 0.3]).p_value == pytest.approx(1.0)
    test = paired_sign_flip_test([0.2, None, 0.3], [0.1, 0.5, None])
    assert (test.pairs, test.mean_difference) == (1, pytest.approx(0.1))
    assert paired_sign_flip_test([None], [0.2]).p_value is None
    # The Monte Carlo draw agrees with the exact enumeration on 14 pairs, and is seeded.
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=14), rng.uniform(size=14) - 0.1
    exact = paired_sign_flip_test(a, b).p_value
    drawn = paired_sign_flip_test(a, b, exact_max=0, draws=100_000, seed=1)
    assert drawn.method.startswith("monte-carlo") and drawn.p_value == pytest.approx(exact, abs=0.01)
    assert paired_sign_flip_test(a, b, exact_max=0, draws=5000, seed=1) == \
        paired_sign_flip_test(a, b, exact_max=0, draws=5000, seed=1)


def test_activation_ranks_equal_a_brute_force_selectivity_ranking():
    from sae_assets.core.attribution.activation_baseline import activation_ranks, sample_sequences

    model = tiny_model()
    tokens_ST = torch.cat(batches(3)).numpy()
    rows = sample_sequences(len(tokens_ST), 10, seed=4)
    assert len(rows) == len(set(rows.tolist())) == 10 and np.all(np.diff(rows) > 0)
    sample = tokens_ST[rows]
    units = [("mlp_neuron", 0, 5), ("mlp_neuron", 0, 17), ("attention_head", 0, 1), ("mlp_neuron", 0, 2)]
    notable = {units[0]: {3, 11}, units[1]: {7}, units[2]: {3}, units[3]: {VOCAB + 5}}  # the last never occurs
    got = activation_ranks(model, sample, units, notable, batch_size=4)
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.from_numpy(sample.astype(np.int64)),
                                        names_filter="blocks.0.mlp.hook_post")
    acts_NH = cache["blocks.0.mlp.hook_post"].reshape(-1, CFG.d_mlp).double().numpy()
    flat = sample.reshape(-1)
    want = []
    for unit, tokens in ((5, [3, 11]), (17, [7])):
        selectivity = acts_NH[np.isin(flat, tokens)].mean(0) - acts_NH.mean(0)
        want.append(1 + int((selectivity > selectivity[unit]).sum()))
    assert got == [want[0], want[1], None, None]
    assert all(1 <= r <= CFG.d_mlp for r in got[:2])
