"""Toy-data check of "Informed initialization of sparse dictionaries": how fast each SAE initialisation recovers known ground-truth features.

Toy data (`sae_assets.core.sae.toy`): G ground-truth unit directions in D = 128 dimensions
(scenarios 128/256, 128/512, 128/1024), Zipf-like firing probabilities, uniform(0, 1)
coefficients. For every initialisation method and seed, a ReLU SAE of width G (the Anthropic
2024 recipe of `sae_assets.core.sae.relu`, trained step by step with the library's
`train_step`, constant LR, no resampling) is trained on fresh batches while the MMCS (mean
over ground-truth features of the max cosine similarity with any decoder row) is measured
after every step; a run stops at MMCS 0.99 (`--full` trains on). Printed per method: MMCS at
step 0, the steps to reach MMCS 0.95 / 0.98 / 0.99 (mean over the seeds that reached it, with
how many did), and the MMCS where the runs stopped; then the comparison with the published
result (steps to 0.99 of the rare-feature methods against orthogonal and raw-data init). Defaults (128/256, 3 seeds, 2000 steps) take a few
minutes on 2 CPU cores; `--scenarios 256,512,1024 --steps 4000` for the full picture.

    .venv/bin/python bench/toy_init.py [--scenarios 256,512] [--seeds 3] [--steps 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common  # noqa: F401  (puts the repository root on sys.path)
import torch

from sae_assets.core.config import DictionaryPoint, SaeConfig
from sae_assets.core.sae import INITIALIZERS, StepInfo, build_sae
from sae_assets.core.sae.toy import make_toy_data, mmcs, toy_batches
from sae_assets.core.sae.training import make_optimizer, train_step

THRESHOLDS = (0.95, 0.98, 0.99)
SAMPLE_ROWS = 4096
"""Rows of toy data the data-informed initialisations see (drawn apart from training batches)."""


def run_one(args: argparse.Namespace, n_features: int, init: str, seed: int) -> list[float]:
    """MMCS after 0, 1, ..., steps training steps (stops early once past the top threshold)."""
    data = make_toy_data(n_features, args.d, seed=seed, mean_active=args.mean_active, exponent=args.exponent)
    batches = toy_batches(data, args.batch, seed=seed)
    sample_ND = torch.cat([next(batches(10**9 + i)) for i in range(SAMPLE_ROWS // args.batch)])
    point = DictionaryPoint("relu", n_features, args.l1)
    cfg = SaeConfig(sweep=(point,), train_tokens=args.batch * args.steps, batch_size=args.batch, init=init,
                    seed=seed, learning_rate=args.lr)
    sae = build_sae(point, args.d, cfg, sample_ND)
    optimizer = make_optimizer(sae, args.lr)
    history = [mmcs(sae.W_dec, data.features_GD)]
    for step, x_BD in zip(range(args.steps), batches(0)):
        train_step(sae, optimizer, x_BD, StepInfo(step, args.steps), args.lr)
        history.append(mmcs(sae.W_dec, data.features_GD))
        if history[-1] >= max(THRESHOLDS) and not args.full:
            break
    return history


def first_reach(history: list[float], threshold: float) -> int | None:
    return next((step for step, value in enumerate(history) if value >= threshold), None)


def summarise(histories: list[list[float]]) -> dict[str, object]:
    reached = {t: [s for h in histories if (s := first_reach(h, t)) is not None] for t in THRESHOLDS}
    return {"start": [h[0] for h in histories], "final": [h[-1] for h in histories], "reached": reached,
            "n": len(histories)}


def fmt_steps(steps: list[int], n: int) -> str:
    return "not reached" if not steps else f"{statistics.mean(steps):6.0f} ({len(steps)}/{n})"


def print_table(n_features: int, args: argparse.Namespace, results: dict[str, dict], seconds: float) -> None:
    print(f"\n== {args.d}/{n_features}: ReLU SAE width {n_features}, L1 {args.l1}, LR {args.lr}, batch {args.batch}, "
          f"<= {args.steps} steps, seeds 0..{args.seeds - 1} ({seconds:.0f} s)")
    header = f"{'init':<13} {'MMCS@0':>13}" + "".join(f" {'steps to ' + str(t):>16}" for t in THRESHOLDS)
    print(header + f" {'MMCS at stop':>13}")
    for init, r in results.items():
        start = f"{statistics.mean(r['start']):.3f}+-{statistics.pstdev(r['start']):.3f}"
        cells = "".join(f" {fmt_steps(r['reached'][t], r['n']):>16}" for t in THRESHOLDS)
        print(f"{init:<13} {start:>13}{cells} {statistics.mean(r['final']):>13.4f}")


def censored_mean(r: dict, threshold: float, limit: int) -> tuple[float, int]:
    """Mean steps to `threshold` counting a seed that never got there as `limit`; and how many didn't."""
    steps = r["reached"][threshold]
    missing = r["n"] - len(steps)
    return statistics.mean(steps + [limit] * missing), missing


def compare(all_results: dict[int, dict[str, dict]], d: int, limit: int) -> None:
    print('\n== Comparison with the published result ("Informed initialization of sparse dictionaries")')
    print("published: data-based init starts at MMCS ~0.65, orthogonal < 0.3; rare-feature collection "
          "(centroid subtraction / outlier detection) reaches 0.99 up to ~10% sooner.")
    for n_features, results in all_results.items():
        start = {k: statistics.mean(results[k]["start"]) for k in results}
        data_like = [k for k in ("data", "svd", "kmeans_rare", "outlier_rare") if k in start]
        line = f"here {d}/{n_features}: MMCS@0 " + ", ".join(f"{k} {start[k]:.2f}" for k in data_like)
        if "orthogonal" in start:
            line += f"; orthogonal {start['orthogonal']:.2f}"
        print(line)
        for base in ("orthogonal", "data"):
            for rare in ("kmeans_rare", "outlier_rare"):
                if base not in results or rare not in results:
                    continue
                (b, b_miss), (r, r_miss) = (censored_mean(results[k], 0.99, limit) for k in (base, rare))
                note = (f" (seeds not reaching 0.99 counted as {limit} steps: {rare} {r_miss}, {base} {b_miss})"
                        if b_miss or r_miss else "")
                print(f"  0.99: {rare} {r:.0f} steps vs {base} {b:.0f}: {100 * (b - r) / b:+.1f}% sooner{note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="256", help="comma-separated ground-truth feature counts (G)")
    parser.add_argument("--d", type=int, default=128, help="dimension the features are compressed into")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000, help="most training steps per run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--l1", type=float, default=0.7, help="L1 coefficient (inputs scaled to norm sqrt(D))")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mean-active", type=float, default=5.0, help="mean firing features per row")
    parser.add_argument("--exponent", type=float, default=0.5, help="Zipf exponent of firing probabilities")
    parser.add_argument("--inits", default=",".join(INITIALIZERS), help="comma-separated methods")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these shapes)")
    parser.add_argument("--full", action="store_true", help="train all steps even after MMCS 0.99")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    all_results: dict[int, dict[str, dict]] = {}
    for n_features in (int(s) for s in args.scenarios.split(",")):
        started = time.perf_counter()
        all_results[n_features] = {
            init: summarise([run_one(args, n_features, init, seed) for seed in range(args.seeds)])
            for init in args.inits.split(",")
        }
        print_table(n_features, args, all_results[n_features], time.perf_counter() - started)
    compare(all_results, args.d, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
