"""Does training-data attribution beat chance? The experiment behind `make experiments`' first table.

Materializes `attribution_tables` and what it is built from (corpus, tokenizer, token shards,
the language model trained with capture, parameter shifts) under
`sae_assets/config/experiments.yaml` laid over the embedded default: about five epochs of
training and 32 ablated neurons, each against a random control neuron of its layer over the
same attributed windows ("Gradient capture / training-data attribution from outlier parameter
shifts"). Prints, per ablated neuron, the notable-token flip proportion under the neuron and
under its control, and the neuron's rank among its layer by activation selectivity on its
notable tokens; then the one-sided paired sign-flip test. Writes a scatter plot (attributed
against control, one point per neuron) as PNG. The last line is
`attribution_vs_control_p_value: <p>`.

Artifacts and the Dagster instance live under `--workdir` (default
.data/experiments/attribution), so a second run reuses what is fresh.

    .venv/bin/python bench/attribution_experiment.py [--config sae_assets/config/experiments.yaml]
        [--plot bench/results/attribution.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common

DEFAULT_CONFIG = _common.REPO_ROOT / "sae_assets" / "config" / "experiments.yaml"


def plot(rows: list[dict], p_value, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(r["notable_flip_proportion"], r["control_notable_flip_proportion"]) for r in rows
             if r["notable_flip_proportion"] is not None and r["control_notable_flip_proportion"] is not None]
    fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
    if pairs:
        xs, ys = zip(*pairs)
        top = max(max(xs), max(ys), 1e-3) * 1.1
        ax.scatter(ys, xs, s=18, color="#c2410c")
        ax.plot([0, top], [0, top], color="#777", lw=1, ls="--", label="no better than chance")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
    ax.set_xlabel("control neuron: flips on the notable tokens")
    ax.set_ylabel("attributed neuron: flips on the notable tokens")
    ax.set_title(f"{len(pairs)} ablated neurons, one-sided p = {p_value:.3g}" if p_value is not None
                 else "no pairs", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--workdir", default=str(_common.REPO_ROOT / ".data" / "experiments" / "attribution"))
    parser.add_argument("--plot", default=str(_common.REPO_ROOT / "bench" / "results" / "attribution.png"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _common.isolate_env(workdir)
    import dagster as dg
    import pyarrow.parquet as pq

    from resources import ArtifactStorage
    from sae_assets.core.config import load_config
    from sae_assets.demo import materialize_upstream_of

    config_path = _common.write_config(workdir, {}, args.config, name="experiment.yaml")
    cfg = load_config(config_path)
    started = time.perf_counter()
    with dg.DagsterInstance.get() as instance:
        materialize_upstream_of(instance, config_path, "attribution_tables")
    store = ArtifactStorage.from_config(cfg.storage).store()
    manifest = store.require("attribution_tables", None)
    rows = pq.read_table(store.fetch(manifest, "ablation_summary.parquet")).to_pylist()
    lm = store.require("language_model", None).extra
    epochs = cfg.model.train_tokens / (lm["train_sequences"] * cfg.tokenizer.context_length)
    facts = manifest.extra
    print(f"config {args.config}: model.train_tokens {cfg.model.train_tokens}, "
          f"{cfg.attribution.ablation_units} units x {cfg.attribution.ablation_windows} windows; "
          f"{epochs:.1f} epochs of {lm['train_sequences']} training sequences, val_loss {lm['val_loss']} "
          f"(unigram entropy {lm['unigram_entropy']}); {time.perf_counter() - started:.0f} s")
    show = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    print("| neuron (layer.unit) | control | flips on notable: attributed | control | activation rank |")
    print("|---|---|---|---|---|")
    for r in rows:
        rank = "-" if r["activation_rank"] is None else f"{r['activation_rank']} of {r['layer_units']}"
        print(f"| {r['layer']}.{r['unit']} | {r['layer']}.{r['control_unit']} | {show(r['notable_flip_proportion'])} "
              f"| {show(r['control_notable_flip_proportion'])} | {rank} |")
    for key in ("ablated_units", "notable_flip_proportion_mean", "control_notable_flip_proportion_mean",
                "units_beating_control", "paired_test_pairs", "paired_test_mean_difference", "paired_test_method",
                "activation_rank_percentile_median"):
        print(f"{key}: {facts.get(key)}")
    plot(rows, facts.get("paired_test_p_value"), Path(args.plot))
    print(f"plot: {args.plot}")
    print(f"attribution_vs_control_p_value: {facts.get('paired_test_p_value')}")


if __name__ == "__main__":
    main()
