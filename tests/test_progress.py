"""Progress lines (sae_assets.core.progress): the first line, the time-based cadence, the final
line and its fields, on a fake clock; then lines coming out of the long core loops on tiny
shapes, whose results are the same with a progress log as without. The lines reaching a run's
Dagster event log are checked in tests/test_sae_assets.py, on its materialized graph."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from support import HOOK, shard_table

from sae_assets.core.activations.caching import cache_activations
from sae_assets.core.config import DictionaryPoint, ModelConfig, SaeConfig
from sae_assets.core.features import windows as feature_windows
from sae_assets.core.features.sampling import sample_activation_table
from sae_assets.core.model.lm import build_embedded_model
from sae_assets.core.model.training import train_language_model
from sae_assets.core.progress import QUIET, ProgressLog, format_duration
from sae_assets.core.sae import ReluSae, build_sae, train_sae
from sae_assets.core.sae.toy import make_toy_data, toy_batches

LINE = re.compile(r"^(?P<what>\S+): step (?P<done>\d+)/(?P<total>\d+) \((?P<pct>[\d.]+)%\)"
                  r"(, (?P<rate>[\d,]+) tokens/s)?(, loss (?P<loss>\S+))?, (ETA (?P<eta>.+)|done in (?P<took>.+))$")


class FakeClock:
    """Seconds that move only when told (`now`), or by `tick` at every reading."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def recorder(every_seconds: float = 10.0, tick: float = 0.0, what: str = "sae_dictionary[relu-w64-l1_0.3]"):
    lines: list[str] = []
    clock = FakeClock(tick)
    return ProgressLog(what, emit=lines.append, every_seconds=every_seconds, clock=clock), lines, clock


def fields(line: str) -> dict:
    match = LINE.match(line)
    assert match, f"not a progress line: {line!r}"
    return match.groupdict()


@pytest.fixture(autouse=True, scope="module")
def _single_thread():  # faster for tiny shapes, immune to a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the reporter ------------------------------------------------------------------------------

def test_first_update_gives_a_line_with_every_field() -> None:
    log, lines, clock = recorder()
    log.start(1000)
    clock.now = 20.0
    log.update(300, tokens=246_900, loss=0.01234)
    assert lines == ["sae_dictionary[relu-w64-l1_0.3]: step 300/1000 (30.0%), 12,345 tokens/s, loss 0.01234, "
                     "ETA 47s"]  # 700 steps left at 15 steps/s


def test_lines_follow_the_clock_not_the_step_count() -> None:
    log, lines, clock = recorder(every_seconds=10.0)
    log.start(100)
    for step, at in enumerate([1, 2, 9, 10.9, 11, 12, 20.9, 21], start=1):
        clock.now = at
        log.update(step, tokens=step * 64)
    assert [int(fields(line)["done"]) for line in lines] == [1, 5, 8]  # at t=1, then t=11 >= 1+10, t=21 >= 11+10
    log.update(9, tokens=9 * 64)
    assert len(lines) == 3, "no line before every_seconds have passed since the last"


def test_close_gives_the_final_line_once() -> None:
    log, lines, clock = recorder()
    log.start(4)
    for step in range(1, 5):
        clock.now = step
        log.update(step, tokens=step * 100, loss=1.0 / step)
    assert len(lines) == 1
    clock.now = 65.0
    log.close()
    log.close()
    assert len(lines) == 2
    final = fields(lines[-1])
    assert (final["done"], final["total"], final["pct"], final["loss"]) == ("4", "4", "100.0", "0.25")
    assert final["took"] == "1m 05s" and final["eta"] is None and final["rate"] == "6"  # 400 tokens in 65 s


def test_no_final_duplicate_when_the_last_update_showed_it() -> None:
    log, lines, clock = recorder(every_seconds=0.0)
    log.start(2)
    for step in (1, 2):
        clock.now = step
        log.update(step, tokens=step)
    log.close()
    assert [fields(line)["done"] for line in lines] == ["1", "2"]
    assert fields(lines[-1])["took"] == "2s"


def test_loss_only_when_given_and_eta_from_the_mean_rate_since_start() -> None:
    log, lines, clock = recorder(every_seconds=0.0)
    clock.now = 100.0
    log.start(100, done=40)  # a resumed run: its own 10 steps in 20 s set the pace
    clock.now = 120.0
    log.update(50, tokens=5000)
    line = fields(lines[-1])
    assert line["loss"] is None and "loss" not in lines[-1]
    assert line["rate"] == "250" and line["eta"] == "1m 40s"  # 50 steps left at 0.5 steps/s


def test_eta_unknown_until_time_has_passed() -> None:
    log, lines, _ = recorder()
    log.start(10)
    log.update(1, tokens=10)
    assert fields(lines[-1])["eta"] == "unknown" and fields(lines[-1])["rate"] is None


def test_without_emit_nothing_happens_not_even_a_clock_reading() -> None:
    def clock() -> float:
        raise AssertionError("a quiet progress log read the clock")

    before = dict(vars(QUIET))
    for quiet in (ProgressLog("x", clock=clock), QUIET):
        quiet.start(10)
        quiet.update(3, tokens=30, loss=1.0)
        quiet.close()
    assert vars(QUIET) == before, "QUIET is shared by every loop: it must keep no state"


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (59.4, "59s"), (60, "1m 00s"), (65, "1m 05s"),
                                               (3599, "59m 59s"), (3600 * 2 + 180, "2h 03m")])
def test_durations(seconds, text) -> None:
    assert format_duration(seconds) == text


# --- the core loops --------------------------------------------------------------------------------

def steps_shown(lines: list[str]) -> list[int]:
    return [int(fields(line)["done"]) for line in lines]


def test_sae_training_reports_steps_loss_and_eta_and_trains_the_same() -> None:
    toy = make_toy_data(32, 16, seed=0, mean_active=3.0)
    point = DictionaryPoint("relu", 32, 0.5)
    cfg = SaeConfig(sweep=(point,), train_tokens=64 * 12, batch_size=64, lr_warmup_steps=2, resample=False,
                    checkpoint_every=100, seed=0)
    sample = next(toy_batches(toy, 256, seed=9)(0))
    quiet = train_sae(build_sae(point, 16, cfg, sample), toy_batches(toy, 64), cfg, point, log_every=1)
    # The clock ticks 1 s per reading: start at 1, step s updates at 1 + s, close at 14.
    log, lines, _ = recorder(every_seconds=4.0, tick=1.0)
    loud = train_sae(build_sae(point, 16, cfg, sample), toy_batches(toy, 64), cfg, point, log_every=1,
                     progress_log=log)
    assert loud.curve == quiet.curve
    assert steps_shown(lines) == [1, 5, 9, 12]
    first, last = fields(lines[0]), fields(lines[-1])
    assert first["total"] == "12" and first["rate"] == "64" and first["eta"] == "11s"
    assert float(first["loss"]) == pytest.approx(quiet.curve[0]["loss"], rel=1e-3)
    assert last["took"] == "13s" and float(last["loss"]) == pytest.approx(quiet.curve[-1]["loss"], rel=1e-3)


def test_language_model_training_reports_every_step_at_cadence_zero() -> None:
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, batch_size=4, train_tokens=4 * 8 * 6,
                      warmup_steps=1, seed=0)
    tokens = torch.randint(0, 20, (24, 8), generator=torch.Generator().manual_seed(0))

    def train(progress_log=None):
        torch.manual_seed(0)
        model = build_embedded_model(cfg, vocab_size=20, context_length=8)
        return train_language_model(model, tokens[:16], tokens[16:], cfg, log_every=1, progress_log=progress_log)

    log, lines, _ = recorder(every_seconds=0.0, tick=1.0, what="language_model")
    loud, quiet = train(log), train()
    assert loud.curve == quiet.curve and loud.val_loss == quiet.val_loss
    assert steps_shown(lines) == [1, 2, 3, 4, 5, 6]
    assert all(fields(line)["rate"] == "32" for line in lines)  # B*T = 32 tokens per 1 s step
    assert [float(fields(line)["loss"]) for line in lines] == pytest.approx(
        [entry["train_loss"] for entry in quiet.curve], rel=1e-3)


def test_caching_sampling_and_windows_report_batches_and_tokens() -> None:
    cfg = ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0)
    model = build_embedded_model(cfg, vocab_size=20, context_length=8)
    tokens_ST = np.random.default_rng(0).integers(0, 20, (10, 8)).astype(np.int32)
    first_S = np.arange(10, dtype=np.int64) * 8
    cache = lambda progress_log=None: list(cache_activations(  # noqa: E731
        model, tokens_ST, first_S, hook_points=["blocks.0.hook_resid_post"], dtype="float32", batch_size=4,
        progress_log=progress_log))
    log, lines, _ = recorder(every_seconds=0.0, tick=1.0, what="cached_activations[shard-0000]")
    assert [b.equals(c) for b, c in zip(cache(log), cache())] == [True] * 3
    assert steps_shown(lines) == [1, 2, 3] and fields(lines[-1])["total"] == "3"
    assert [fields(line)["rate"] for line in lines] == ["32", "32", "27"]  # 80 tokens in 3 s
    assert all(fields(line)["loss"] is None for line in lines)

    torch.manual_seed(0)
    sae = ReluSae(6, 8, l1_coefficient=1.0)
    with torch.no_grad():
        for parameter in sae.parameters():  # fresh encoders fire rarely; these fire on about half the tokens
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    table = shard_table(0, 5, seed=1)  # 50 tokens
    sample = lambda progress_log=None: sample_activation_table(  # noqa: E731
        table, hook=HOOK, encode_range=lambda x: sae.encode_range(x, 0, 8), lo=0, hi=8, top_k=2, sample_k=4,
        seed=3, batch_size=20, progress_log=progress_log)
    log, lines, _ = recorder(every_seconds=0.0, what="feature_samples")
    samples = sample(log)
    assert samples.top.equals(sample().top) and samples.sample.equals(sample().sample)
    assert steps_shown(lines) == [1, 2, 3] and fields(lines[-1])["took"] is not None

    shown = feature_windows.select_shown_examples(samples, random_examples=2, activation_levels=2,
                                                  examples_per_level=1)
    windows = lambda progress_log=None: feature_windows.gather_context_windows(  # noqa: E731
        shown, table, lambda x: sae.encode_range(x, 0, 8), shard=0, hook=HOOK, context_length=10, before=2, after=1,
        lo=0, batch_size=4, where="test", progress_log=progress_log)
    log, lines, _ = recorder(every_seconds=0.0, tick=1.0, what="context_gather[shard-0000]")
    assert windows(log).equals(windows())
    window_tokens = len(set(np.concatenate([np.arange(r["first_token_index"], r["first_token_index"] + len(r["token_ids"]))
                                            for r in windows().to_pylist()])))
    n_batches = -(-window_tokens // 4)
    assert n_batches > 2
    assert steps_shown(lines) == list(range(1, n_batches + 1)) and fields(lines[0])["rate"] == "4"
