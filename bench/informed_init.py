"""The findings of "Informed initialization of sparse dictionaries" (SERI MATS 3.0), reproduced on toy data.

One command prints five tables and saves two plots (bench/results/):
1. every initialisation of `sae_assets.core.sae.init` in the scenarios 128/256, 128/512 and
   128/1024: MMCS at step 0 and the steps to MMCS 0.95 / 0.98 / 0.99, over seeds 0..S-1
   (plot `informed_init_mmcs.png`: mean MMCS against step, one panel per scenario);
2. the rare-feature ratio (the share of dictionary rows the rare-feature methods fill with
   collected rare-feature vectors, the rest being raw data rows, as in the write-up) swept
   from 0.1% to 20% for 'kmeans_rare' (centroid subtraction) and 'outlier_rare' (local
   outlier factor), steps to 0.99 against the data and orthogonal baselines
   (plot `informed_init_rare_ratio.png`);
3. dead-feature resampling on the same toy data: none, Anthropic's, 'rare' (rare-feature
   vectors of the worst-reconstructed inputs, `sae_assets.core.sae.resample`) and 'reinit'
   (random directions), at fixed steps, with a quarter of the latents dead from the start;
   MMCS just after the first resample and at the end, ground-truth features recovered (some
   decoder row at cosine >= 0.95) and dead latents at the end.

Toy data (`sae_assets.core.sae.toy`): G unit ground-truth directions in D = 128 dimensions,
Zipf-like firing probabilities, uniform(0, 1) coefficients. A ReLU SAE of width G (the Anthropic
2024 recipe, no L1 warm-up so that the step caps do not change the runs) is trained on fresh
batches with the library's `train_step`; MMCS is measured every 5 steps and a run of tables 1
and 2 stops at MMCS 0.99 or at its scenario's step cap (`--caps`, sized so that the 123 runs took
~40 min with 4 workers on 2 cores shared with other jobs); a threshold that some seed did not
reach within the cap is reported as such ("k/S reached"). Finished runs are kept in
.data/experiments/informed_init_runs.jsonl, so an interrupted run resumes (delete it after
changing the code or the toy settings):

    .venv/bin/python bench/informed_init.py            # make experiments
    .venv/bin/python bench/informed_init.py --quick    # 128/256 only, 2 seeds, a smoke test
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import _common
import torch

from sae_assets.core.config import DictionaryPoint, SaeConfig
from sae_assets.core.sae import INITIALIZERS, StepInfo, build_sae
from sae_assets.core.sae.build import INIT_STREAM, seeded_generator
from sae_assets.core.sae.init import DEFAULT_RARE_FRACTION, kmeans_rare_init, outlier_rare_init
from sae_assets.core.sae.resample import resample_dead_features
from sae_assets.core.sae.schedule import LrScheduler
from sae_assets.core.sae.toy import make_toy_data, mmcs, toy_batches
from sae_assets.core.sae.tracker import DeadFeatureTracker
from sae_assets.core.sae.training import make_optimizer, train_step

# Letter key: N sample rows, D input width, G ground-truth features, F dictionary rows.

THRESHOLDS = (0.95, 0.98, 0.99)
RARE_RATIOS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.10, 0.20)
RARE_INITS = {"kmeans_rare": kmeans_rare_init, "outlier_rare": outlier_rare_init}
RESAMPLERS = ("none", "anthropic", "rare", "reinit")
RECOVERED_COSINE = 0.95
RESAMPLE_STEPS, RESAMPLE_AT, DEAD_AFTER_BATCHES = 1000, (200, 400, 600), 20
DEAD_AT_START = 0.25
"""The toy SAEs hardly lose latents on their own, so the resampling comparison starts with this
share of latents dead (never firing): how much of what they should learn does each method get back?"""
SAMPLE_ROWS = 4096
"""Rows of toy data the data-informed initialisations see (drawn apart from the training batches)."""
RESULTS = _common.REPO_ROOT / "bench" / "results"
CACHE = _common.REPO_ROOT / ".data" / "experiments" / "informed_init_runs.jsonl"
"""Finished runs, one JSON line each: a rerun resumes (delete the file after changing the code)."""


class Toy(NamedTuple):
    """Data and training settings shared by every run."""

    d: int = 128
    batch: int = 256
    l1: float = 0.7
    lr: float = 3e-3
    mean_active: float = 5.0
    exponent: float = 0.5


class Job(NamedTuple):
    toy: Toy
    n_features: int
    init: str
    seed: int
    steps: int
    rare_fraction: float | None = None
    """For the rare-feature inits: the share of rows they collect (None: the library default)."""
    resample: str = "none"
    resample_at: tuple[int, ...] = ()
    dead_after_batches: int = 0
    dead_at_start: float = 0.0
    """Share of latents made dead at step 0 (encoder bias -100: they never fire until resampled)."""
    stop_at_top: bool = True
    eval_every: int = 5
    """MMCS is measured at step 0 and every this many steps (and at the last step)."""


class Outcome(NamedTuple):
    history: list[tuple[int, float]]
    """(step, MMCS after that many training steps), every `eval_every` steps."""
    recovered: float
    """Share of ground-truth features with a decoder row at cosine >= RECOVERED_COSINE, at the end."""
    dead: int
    """Latents dead at the end (not fired for dead_after_batches batches); 0 without tracking."""


def _build(job: Job, sample_ND: torch.Tensor):
    point = DictionaryPoint("relu", job.n_features, job.toy.l1)
    cfg = SaeConfig(sweep=(point,), train_tokens=job.toy.batch * job.steps, batch_size=job.toy.batch,
                    init=job.init, seed=job.seed, learning_rate=job.toy.lr, l1_warmup_fraction=0.0,
                    resample=False)
    sae = build_sae(point, job.toy.d, cfg, sample_ND)
    if job.rare_fraction is not None:  # the same build with another rare-feature ratio
        b_dec_D = sae.b_dec.detach().clone()
        W_dec_FD = RARE_INITS[job.init](sample_ND * sae.input_scale, job.n_features,
                                        seeded_generator(job.seed, INIT_STREAM), rare_fraction=job.rare_fraction)
        sae.initialize(W_dec_FD)
        with torch.no_grad():
            sae.b_dec.copy_(b_dec_D)
    return sae


def run(job: Job) -> Outcome:
    """Train one SAE on the job's toy data; MMCS every `eval_every` steps."""
    torch.set_num_threads(1)
    data = make_toy_data(job.n_features, job.toy.d, seed=job.seed, mean_active=job.toy.mean_active,
                         exponent=job.toy.exponent)
    batches = toy_batches(data, job.toy.batch, seed=job.seed)
    sample_ND = torch.cat([next(batches(10**9 + i)) for i in range(SAMPLE_ROWS // job.toy.batch)])
    sae = _build(job, sample_ND)
    optimizer = make_optimizer(sae, job.toy.lr)
    scheduler = LrScheduler(job.toy.lr, job.steps, rewarm_steps=50)
    tracker = DeadFeatureTracker(job.n_features, job.dead_after_batches * job.toy.batch)
    generator = torch.Generator().manual_seed(job.seed)
    with torch.no_grad():
        sae.b_enc[:round(job.dead_at_start * job.n_features)] = -100.0
    history = [(0, mmcs(sae.W_dec, data.features_GD))]
    for step, x_BD in zip(range(job.steps), batches(0)):
        if job.resample != "none" and step in job.resample_at and bool(tracker.dead_mask().any()):
            revived = resample_dead_features(sae, optimizer, x_BD, tracker.dead_mask(), generator,
                                             method=job.resample)
            tracker.reset(revived)
            scheduler.on_resample(step)
        out = train_step(sae, optimizer, x_BD, StepInfo(step, job.steps), scheduler.lr(step))
        tracker.update(out.f.detach())
        if (step + 1) % job.eval_every and step + 1 < job.steps:
            continue
        history.append((step + 1, mmcs(sae.W_dec, data.features_GD)))
        if job.stop_at_top and history[-1][1] >= THRESHOLDS[-1]:
            break
    with torch.no_grad():
        rows_FD = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1)
        best_G = (data.features_GD @ rows_FD.T).max(dim=-1).values
    dead = int(tracker.dead_mask().sum()) if job.dead_after_batches else 0
    return Outcome(history, float((best_G >= RECOVERED_COSINE).float().mean()), dead)


def ratio_job(toy: Toy, G: int, init: str, seed: int, cap: int, ratio: float) -> Job:
    """The ratio-sweep run (the library default ratio is the run of the init table)."""
    return Job(toy, G, init, seed, cap, None if ratio == DEFAULT_RARE_FRACTION else ratio)


def first_reach(history: list[tuple[int, float]], threshold: float) -> int | None:
    return next((step for step, value in history if value >= threshold), None)


def steps_cell(outcomes: list[Outcome], threshold: float) -> str:
    """Mean steps over the seeds that reached `threshold`, '(k/n)' when not all did."""
    steps = [s for o in outcomes if (s := first_reach(o.history, threshold)) is not None]
    if not steps:
        return f"not reached (0/{len(outcomes)})"
    tail = "" if len(steps) == len(outcomes) else f" ({len(steps)}/{len(outcomes)} reached)"
    return f"{statistics.mean(steps):.0f} ± {statistics.pstdev(steps):.0f}{tail}"


def mean_std(values: list[float], digits: int = 3) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _run_keyed(job: Job) -> tuple[Job, Outcome]:
    return job, run(job)


def _load_cache(path: Path | None) -> dict[str, Outcome]:
    if path is None or not path.exists():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {row["job"]: Outcome([tuple(p) for p in row["history"]], row["recovered"], row["dead"]) for row in rows}


def run_all(jobs: list[Job], workers: int, cache: Path | None) -> dict[Job, Outcome]:
    """Every distinct job once, in the given order, each finished run appended to `cache` so that an
    interrupted experiment resumes; progress on stderr."""
    done_before = _load_cache(cache)
    results = {job: done_before[repr(job)] for job in jobs if repr(job) in done_before}
    todo = [j for j in dict.fromkeys(jobs) if j not in results]
    if not todo:
        return results
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
        for done, (job, outcome) in enumerate(pool.imap_unordered(_run_keyed, todo), 1):
            results[job] = outcome
            if cache is not None:
                with cache.open("a") as f:
                    f.write(json.dumps({"job": repr(job), **outcome._asdict()}) + "\n")
            if done % 10 == 0 or done == len(todo):
                print(f"  {done}/{len(todo)} runs done", file=sys.stderr, flush=True)
    return results


def init_table(results: dict[Job, Outcome], toy: Toy, G: int, cap: int, seeds: int) -> str:
    rows = []
    for init in INITIALIZERS:
        outcomes = [results[Job(toy, G, init, s, cap)] for s in range(seeds)]
        start, stop = [o.history[0][1] for o in outcomes], [o.history[-1][1] for o in outcomes]
        rows.append([init, mean_std(start)] + [steps_cell(outcomes, t) for t in THRESHOLDS] + [mean_std(stop, 4)])
    return markdown(["init", "MMCS at step 0"] + [f"steps to {t}" for t in THRESHOLDS] + ["MMCS at stop"], rows)


def ratio_table(results: dict[Job, Outcome], toy: Toy, G: int, cap: int, seeds: int) -> str:
    rows = []
    for init in RARE_INITS:
        for ratio in RARE_RATIOS:
            outcomes = [results[ratio_job(toy, G, init, s, cap, ratio)] for s in range(seeds)]
            rows.append([init, f"{100 * ratio:g}%", mean_std([o.history[0][1] for o in outcomes])]
                        + [steps_cell(outcomes, t) for t in THRESHOLDS])
    for base in ("data", "orthogonal"):
        outcomes = [results[Job(toy, G, base, s, cap)] for s in range(seeds)]
        rows.append([base, "-", mean_std([o.history[0][1] for o in outcomes])]
                    + [steps_cell(outcomes, t) for t in THRESHOLDS])
    return markdown(["init", "rare ratio", "MMCS at step 0"] + [f"steps to {t}" for t in THRESHOLDS], rows)


def resample_jobs(toy: Toy, G: int, inits: tuple[str, ...], seeds: int, steps: int, at: tuple[int, ...],
                  dead_after: int, dead_at_start: float) -> list[Job]:
    return [Job(toy, G, init, s, steps, resample=method, resample_at=at if method != "none" else (),
                dead_after_batches=dead_after, dead_at_start=dead_at_start, stop_at_top=False)
            for init in inits for method in RESAMPLERS for s in range(seeds)]


def resample_table(results: dict[Job, Outcome], jobs: list[Job], steps: int) -> str:
    first_resample = min(j.resample_at[0] for j in jobs if j.resample_at)
    rows, after = [], first_resample + jobs[0].eval_every  # MMCS just after the first resample
    for init in dict.fromkeys(j.init for j in jobs):
        for method in RESAMPLERS:
            outcomes = [results[j] for j in jobs if j.init == init and j.resample == method]
            rows.append([init, method, mean_std([dict(o.history)[after] for o in outcomes]),
                         mean_std([o.history[-1][1] for o in outcomes], 4),
                         mean_std([100 * o.recovered for o in outcomes], 1),
                         mean_std([float(o.dead) for o in outcomes], 1), steps_cell(outcomes, 0.99)])
    return markdown(["init", "resampling", f"MMCS at step {after}", f"MMCS at step {steps}",
                     f"% features recovered (cos >= {RECOVERED_COSINE})",
                     "dead latents at end", "steps to 0.99"], rows)


def _padded_mean(histories: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Steps and mean MMCS over seeds; a run that stopped at 0.99 counts with its last value."""
    longest = max(histories, key=len)
    return ([step for step, _ in longest],
            [statistics.mean(h[min(i, len(h) - 1)][1] for h in histories) for i in range(len(longest))])


def plot_mmcs(results: dict[Job, Outcome], toy: Toy, caps: dict[int, int], seeds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(caps), figsize=(5 * len(caps), 4), squeeze=False)
    for ax, (G, cap) in zip(axes[0], caps.items()):
        for init in INITIALIZERS:
            histories = [results[Job(toy, G, init, s, cap)].history for s in range(seeds)]
            ax.plot(*_padded_mean(histories), label=init, lw=1.2)
        for t in THRESHOLDS:
            ax.axhline(t, color="grey", lw=0.5, ls=":")
        ax.set(title=f"{toy.d}/{G} (mean of {seeds} seeds)", xlabel="training step", ylabel="MMCS", ylim=(0.2, 1.0))
    axes[0][0].legend(fontsize=8)
    fig.suptitle("MMCS against step per initialisation (runs stop at 0.99 and hold their value)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratio(results: dict[Job, Outcome], toy: Toy, caps: dict[int, int], seeds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def censored(job_of_seed) -> float:  # a seed that never reached 0.99 counts as the cap
        return statistics.mean(first_reach(results[job_of_seed(s)].history, 0.99) or job_of_seed(s).steps
                               for s in range(seeds))

    fig, axes = plt.subplots(1, len(caps), figsize=(5 * len(caps), 4), squeeze=False)
    for ax, (G, cap) in zip(axes[0], caps.items()):
        for init in RARE_INITS:
            steps = [censored(lambda s: ratio_job(toy, G, init, s, cap, r)) for r in RARE_RATIOS]
            ax.plot([100 * r for r in RARE_RATIOS], steps, marker="o", label=init)
        for base, style in (("data", "--"), ("orthogonal", ":")):
            ax.axhline(censored(lambda s: Job(toy, G, base, s, cap)), color="black", ls=style, lw=1, label=base)
        ax.set(xscale="log", title=f"{toy.d}/{G} (mean of {seeds} seeds)", xlabel="rare-feature ratio (%)",
               ylabel="steps to MMCS 0.99")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="256,512,1024", help="ground-truth feature counts G (D = 128)")
    parser.add_argument("--caps", default="2500,4000,6000", help="most training steps per scenario")
    parser.add_argument("--ratio-scenarios", default="256",
                        help="scenarios of the rare-ratio sweep (the write-up: 256,512)")
    parser.add_argument("--resample-scenario", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=Toy().lr)
    parser.add_argument("--workers", type=int, default=4, help="processes (each single-threaded)")
    parser.add_argument("--quick", action="store_true", help="128/256 only, 2 seeds: a smoke test")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--cache", default=str(CACHE),
                        help="finished runs, reused by the next invocation (delete it after changing the code)")
    parser.add_argument("--no-cache", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.scenarios, args.caps, args.ratio_scenarios, args.seeds = "256", "3000", "256", 2
    toy = Toy(lr=args.lr)
    caps = dict(zip((int(g) for g in args.scenarios.split(",")), (int(c) for c in args.caps.split(","))))
    ratio_caps = {int(g): caps[int(g)] for g in args.ratio_scenarios.split(",") if g}
    cache = None if args.no_cache else Path(args.cache)
    rs_G, rs_steps, rs_at = args.resample_scenario, RESAMPLE_STEPS, RESAMPLE_AT
    print(f'# "Informed initialization of sparse dictionaries" on toy data: seeds 0..{args.seeds - 1}, '
          f"{args.workers} worker(s); ReLU SAE, L1 {toy.l1}, LR {toy.lr}, batch {toy.batch}, "
          f"{toy.mean_active:g} features active per row on average, Zipf exponent {toy.exponent}", flush=True)
    rs_jobs = resample_jobs(toy, rs_G, ("orthogonal", "data"), args.seeds, rs_steps, rs_at, DEAD_AFTER_BATCHES,
                            DEAD_AT_START)
    init_jobs = [Job(toy, G, init, s, cap) for G, cap in caps.items() for init in INITIALIZERS
                 for s in range(args.seeds)]
    ratio_jobs = [ratio_job(toy, G, init, s, cap, r) for G, cap in ratio_caps.items() for init in RARE_INITS
                  for r in RARE_RATIOS for s in range(args.seeds)]
    smallest = [j for j in init_jobs if j.n_features == min(caps)]
    # One pool for all (no idle worker between tables); the cheap 128/256 tables first.
    started = time.perf_counter()
    results = run_all(smallest + ratio_jobs + rs_jobs + init_jobs, args.workers, cache)
    for G, cap in caps.items():
        print(f"\n## {toy.d}/{G}: every initialisation (width {G}, at most {cap} steps)\n")
        print(init_table(results, toy, G, cap, args.seeds))
    for G, cap in ratio_caps.items():
        print(f"\n## {toy.d}/{G}: rare-feature ratio sweep (at most {cap} steps)\n")
        print(ratio_table(results, toy, G, cap, args.seeds))
    print(f"\n## {toy.d}/{rs_G}: resampling dead latents at steps {', '.join(map(str, rs_at))} "
          f"({100 * DEAD_AT_START:g}% of latents dead from step 0; dead = silent for {DEAD_AFTER_BATCHES} "
          f"batches); {rs_steps} steps, no early stop\n")
    print(resample_table(results, rs_jobs, rs_steps))
    print(f"\n{len(results)} runs, {(time.perf_counter() - started) / 60:.1f} min")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_mmcs(results, toy, caps, args.seeds, out / "informed_init_mmcs.png")
    if ratio_caps:
        plot_ratio(results, toy, ratio_caps, args.seeds, out / "informed_init_rare_ratio.png")
    print(f"\nplots: {out / 'informed_init_mmcs.png'}, {out / 'informed_init_rare_ratio.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
