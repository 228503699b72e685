"""The attribution tables: from all captured shifts to parameters, units, tokens and ablations.

`build_tables` takes the concatenated parameter_shifts tables, the capture's tensor layout,
every training sequence (stable id + tokens), the training split's token frequencies and
the trained model, and returns the five tables attribution_tables publishes:
parameter_counts, units, notable_tokens (heuristic.py), ablation_flips and ablation_summary
(ablation.py) for the `ablation_units` most-attributed units of `ablation_kind` that have a
notable token, each against a random control unit over the same windows.
Tests: tests/test_attribution_core.py, tests/test_attribution_assets.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from sae_assets.core import schemas
from sae_assets.core.attribution import ablation, activation_baseline, heuristic, significance, tables
from sae_assets.core.attribution.tensors import TensorLayout
from sae_assets.core.config import AttributionConfig
from sae_assets.core.progress import QUIET, ProgressLog


class AttributionTables(NamedTuple):
    parameter_counts: pa.Table
    units: pa.Table
    notable_tokens: pa.Table
    ablation_flips: pa.Table
    ablation_summary: pa.Table


class Corpus(NamedTuple):
    datum_ids: np.ndarray
    """(D,) int64 stable ids (first token index) of the rows of tokens."""
    tokens: np.ndarray
    """(D, T) token ids of every training sequence."""
    train_freq: np.ndarray
    """(V,) token frequencies over the training split."""
    token_text: Sequence[str]
    """(V,) readable token strings."""


def training_corpus(tokens_ST: np.ndarray, first_S: np.ndarray, is_train_S: np.ndarray,
                    token_text: Sequence[str]) -> Corpus:
    """The training sequences (the data attributed to) with their ids, and the unigram token
    frequencies over them, against which the heuristic measures a unit's notable tokens."""
    counts_V = np.bincount(tokens_ST[is_train_S].reshape(-1).astype(np.int64), minlength=len(token_text))
    return Corpus(first_S[is_train_S], tokens_ST[is_train_S], counts_V / max(counts_V.sum(), 1), token_text)


def build_tables(shifts: pl.DataFrame, layout: TensorLayout, corpus: Corpus, model: torch.nn.Module,
                 cfg: AttributionConfig, *, batch_size: int = 32,
                 progress_log: ProgressLog | None = None) -> AttributionTables:
    """The five tables; a progress log follows the ablations, one step per unit."""
    units = tables.with_units(shifts, layout)
    data = tables.unit_data(units)
    notable = heuristic.unit_notable_tokens(
        data, corpus.datum_ids, corpus.tokens, corpus.train_freq, corpus.token_text,
        min_count=cfg.heuristic_min_count, top_relative=cfg.heuristic_top_relative,
        top_count=cfg.heuristic_top_count)
    unit_table = tables.unit_attribution(units)
    flips, summary = ablate_units(model, chosen_units(unit_table, notable, cfg), data, notable, corpus, cfg,
                                  batch_size=batch_size, progress_log=progress_log)
    return AttributionTables(tables.parameter_counts(units), unit_table, notable, flips, summary)


def chosen_units(unit_table: pa.Table, notable: pa.Table, cfg: AttributionConfig) -> list[tuple[str, int, int]]:
    """The most-attributed units of cfg.ablation_kind with a notable token (units are by data desc)."""
    with_tokens = set(zip(*(notable.column(c).to_pylist() for c in tables.UNIT)))
    ranked = zip(*(unit_table.column(c).to_pylist() for c in tables.UNIT))
    return [u for u in ranked if u[0] == cfg.ablation_kind and u in with_tokens][:cfg.ablation_units]


def _windows(data: pl.DataFrame, unit: tuple[str, int, int], limit: int) -> np.ndarray:
    """The unit's attributed datum ids, most often attributed first (ties: smaller id)."""
    mine = data.filter((pl.col("unit_kind") == unit[0]) & (pl.col("layer") == unit[1]) & (pl.col("unit") == unit[2]))
    return mine.sort(["multiplicity", "datum_id"], descending=[True, False])["datum_id"].head(limit).to_numpy()


def _units_in_layer(model: torch.nn.Module, kind: str) -> int:
    return model.cfg.d_mlp if kind == "mlp_neuron" else model.cfg.n_heads


def ablate_units(model: torch.nn.Module, units: list[tuple[str, int, int]], data: pl.DataFrame, notable: pa.Table,
                 corpus: Corpus, cfg: AttributionConfig, *, batch_size: int,
                 progress_log: ProgressLog | None = None) -> tuple[pa.Table, pa.Table]:
    """Flip tables and summary rows: each unit, then its control, over the unit's windows.

    A progress log gets one step per unit; its tokens are every window token run through the
    model (the clean pass included)."""
    vocab, row_of = len(corpus.train_freq), {int(d): i for i, d in enumerate(corpus.datum_ids)}
    notable_of = {u: set() for u in units}
    for kind, layer, unit, token in zip(*(notable.column(c).to_pylist() for c in [*tables.UNIT, "token_id"])):
        notable_of.get((kind, layer, unit), set()).add(token)
    windows = {key: [row_of[int(d)] for d in _windows(data, key, cfg.ablation_windows)] for key in units}
    sampled = activation_baseline.sample_sequences(len(corpus.tokens), cfg.activation_sequences, cfg.seed)
    ranks = activation_baseline.activation_ranks(model, corpus.tokens[sampled], units, notable_of,
                                                 batch_size=batch_size)
    report = progress_log or QUIET
    report.start(len(windows))
    union = sorted({row for rows in windows.values() for row in rows})  # clean predictions once per window
    clean_all = ablation.predictions(model, torch.from_numpy(corpus.tokens[union].astype(np.int64)), batch_size)
    position = {row: i for i, row in enumerate(union)}
    flip_rows, summary_rows = [], []
    tokens = int(clean_all.numel())
    for step, ((key, window_rows), rank) in enumerate(zip(windows.items(), ranks), start=1):
        tokens_WT = torch.from_numpy(corpus.tokens[window_rows].astype(np.int64))
        clean = clean_all[[position[row] for row in window_rows]].numpy()
        control = ablation.control_unit(_units_in_layer(model, key[0]), key[1], key[2], cfg.seed)
        arms = {}
        for arm, ablated_unit in (("attributed", key[2]), ("control", control)):
            with ablation.zero_ablated(model, key[0], key[1], ablated_unit):
                changed = ablation.predictions(model, tokens_WT, batch_size).numpy()
            arms[arm] = (*ablation.flip_counts(clean, changed, vocab), float((changed != clean).mean()))
            flip_rows += ablation.flip_rows(arm, (key[0], key[1], ablated_unit), key[2], *arms[arm][:2],
                                            notable_of[key], corpus.token_text)
        summary_rows.append((*key, control, len(window_rows), int(clean.size), arms["attributed"][2],
                             arms["control"][2], len(notable_of[key]),
                             ablation.notable_proportion(*arms["attributed"][:2], notable_of[key]),
                             ablation.notable_proportion(*arms["control"][:2], notable_of[key]),
                             rank, _units_in_layer(model, key[0])))
        tokens += 2 * int(clean.size)  # the two ablated arms
        report.update(step, tokens=tokens)
    report.close()
    return _table(flip_rows, schemas.ablation_flip_schema()), _table(summary_rows, schemas.ablation_summary_schema())


def _table(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    columns = list(zip(*rows)) if rows else [[] for _ in schema.names]
    return pa.Table.from_arrays([pa.array(list(c), type=f.type) for c, f in zip(columns, schema)], schema=schema)


def empty_tables() -> AttributionTables:
    """The five tables with no rows (nothing was captured)."""
    return AttributionTables(*(_table([], schema) for schema in (
        schemas.parameter_count_schema(), schemas.unit_attribution_schema(), schemas.notable_token_schema(),
        schemas.ablation_flip_schema(), schemas.ablation_summary_schema())))


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.mean(present)), 6) if present else None


def summary(built: AttributionTables, *, seed: int = 0) -> dict[str, int | float | str | None]:
    """Headline facts: sizes, notable-token flip proportions of attributed vs control units, the
    one-sided paired test of the two, and how the ablated neurons rank by activations alone."""
    rows = built.ablation_summary.to_pylist()
    pairs = [(r["notable_flip_proportion"], r["control_notable_flip_proportion"]) for r in rows]
    test = significance.paired_sign_flip_test([a for a, _ in pairs], [b for _, b in pairs], seed=seed)
    percentiles = [r["activation_rank"] / r["layer_units"] for r in rows if r["activation_rank"] is not None]
    return {
        "parameters_in_topk": built.parameter_counts.num_rows, "units_attributed": built.units.num_rows,
        "units_with_notable_tokens": len(set(zip(*(built.notable_tokens.column(c).to_pylist() for c in tables.UNIT)))),
        "ablated_units": len(rows),
        "notable_flip_proportion_mean": _mean([a for a, _ in pairs]),
        "control_notable_flip_proportion_mean": _mean([b for _, b in pairs]),
        "units_beating_control": sum(1 for a, b in pairs if a is not None and (b is None or a > b)),
        "paired_test_pairs": test.pairs, "paired_test_mean_difference": test.mean_difference,
        "paired_test_p_value": test.p_value, "paired_test_method": test.method,
        # Rank / layer units: near 0 means activations alone single the neuron out, near 0.5 chance.
        "activation_rank_percentile_median": round(float(np.median(percentiles)), 4) if percentiles else None,
    }


def summary_markdown(built: AttributionTables) -> str:
    """The ablation summary as a Markdown table, notable tokens spelled out."""
    tokens: dict[tuple, list[str]] = {}
    for row in built.notable_tokens.to_pylist():
        tokens.setdefault((row["unit_kind"], row["layer"], row["unit"]), []).append(repr(row["token"]))
    lines = ["| unit | notable tokens | flips on notable: unit / control | flip rate: unit / control | "
             "activation rank |", "|---|---|---|---|---|"]
    show = lambda v: "–" if v is None else f"{v:.1%}"  # noqa: E731
    rank_text = lambda r: "–" if r["activation_rank"] is None else f"{r['activation_rank']} of {r['layer_units']}"  # noqa: E731
    for r in built.ablation_summary.to_pylist():
        key = (r["unit_kind"], r["layer"], r["unit"])
        lines.append(f"| L{r['layer']} {r['unit_kind']} {r['unit']} (control {r['control_unit']}) | "
                     f"{' '.join(tokens.get(key, []))} | {show(r['notable_flip_proportion'])} / "
                     f"{show(r['control_notable_flip_proportion'])} | {show(r['flip_rate'])} / "
                     f"{show(r['control_flip_rate'])} | {rank_text(r)} |")
    return "\n".join(lines) if built.ablation_summary.num_rows else "No unit was ablated."
