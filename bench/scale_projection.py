"""A scale model of the feature pipeline: how each stage's bytes and CPU grow, projected to the target.

Runs every feature-pipeline stage on synthetic shards at a base size and at sizes that vary one
variable alone (tokens T, dictionary features F, hook width D), so each variable's exponent is
identifiable: feature_samples (`sample_activation_table` per shard x range), feature_examples
(`merge_feature_samples` over the shards + `select_shown_examples`), context_gather
(`gather_context_windows` per shard x range), context_windows (`assemble_context_windows`),
site_json (`feature_documents`), feature_map (`decoder_layout`: UMAP of the decoder directions, one
partition per dictionary), feature_site (the site writer, the map's page included) and feature_matches
(`closest_features`: each feature's closest in a second dictionary of the same width, exact, one
ordered pair of dictionaries; F^2 x D multiply-adds, about 5 bytes a feature). Each stage's CPU-seconds
(process time) and bytes (its outputs serialized as the assets write them) are fitted to
c * T^a * F^b * D^d in log space. The projection to the target (100M tokens, 1M features, d_model
4096) counts each stage's rows at scale (samples bounded by top_k / sample_k per feature and by the
shard's active entries, windows by features x examples x window) times the bytes per row measured
here, and its CPU from per-unit costs fitted here (encoder MACs, rows, window slots). Baseline:
the activation cache, tokens x d_model x 2 bytes (bf16), also measured here as Arrow files (float32).
Activations are Gaussian, the dictionary a ReLU whose biases make each feature fire on about
`--bench-l0` / F of tokens (so L0 stays fixed as F grows, as in a real sweep;
bench/feature_sampling.py's helpers); T grows by adding shards of
`--bench-shard-tokens`, F by adding ranges of `--bench-range-width`, as they would in a real run.

    .venv/bin/python bench/scale_projection.py [--quick] [--tokens 1e8 --features 1e6 --d-model 4096 --l0 64]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from importlib import resources as package_files
from pathlib import Path
from typing import NamedTuple

import _common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from feature_sampling import CONTEXT, HOOK, activations_table, dictionary

from resources.arrow_files import write_ipc_file
from sae_assets.core import schemas
from sae_assets.core.features import cofiring as feature_cofiring
from sae_assets.core.features import panels, site_data
from sae_assets.core.features import windows as feature_windows
from sae_assets.core.features.feature_map import PCA_DIMS, decoder_layout, layout_table, write_layout
from sae_assets.core.features.matches import closest_features, matches_table, write_matches
from sae_assets.core.features.merge import merge_feature_samples
from sae_assets.core.features.sampling import sample_activation_table
from sae_assets.core.partition_budget import MAX_PARTITIONS_PER_ASSET, plan_partitions, smallest_range_width
from sae_assets.defs import site_files
from sae_assets.defs.feature_assets import (COFIRING_FILE, MATCHES_FILE, SHOWN_FILE, WINDOWS_FILE,
                                            gathered_cofiring_file, gathered_windows_file, site_data_file,
                                            write_samples)
from sae_assets.defs.map_assets import LAYOUT_FILE

VOCAB, EOS = 4096, 0  # the bench's vocabulary; token 0 ends documents (1 token in 4096, ids are uniform)
STAGES = ("feature_samples", "feature_examples", "context_gather", "context_windows", "site_json", "feature_map",
          "feature_site", "feature_matches")


class Folder:
    """A partition's output folder for the asset writers: `path(name)`, `describe_table`, `extra`;
    also stands for its manifest (`files`, `extra`) and, through `read_bytes`, for the store."""

    def __init__(self, root: Path):
        self.root, self.extra, self.files = root, {}, {}
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        self.files[name] = self.root / name
        return self.files[name]

    def describe_table(self, name: str, rows: int, **_) -> None:
        pass

    def read_bytes(self, manifest: Folder, name: str) -> bytes:
        return manifest.files[name].read_bytes()

    def size(self, prefix: str = "") -> int:
        return sum(p.stat().st_size for n, p in self.files.items() if n.startswith(prefix))

    def footers(self, prefix: str = "") -> tuple[int, int]:
        """(Parquet files, their footer bytes: schema, metadata, column statistics), a fixed cost per file."""
        files = [p for n, p in self.files.items() if n.startswith(prefix) and n.endswith(".parquet")]
        return len(files), sum(pq.read_metadata(p).serialized_size + 12 for p in files)  # + length, 2 magics


def write_site_json(out: Folder, docs, samples) -> None:
    """What the site_json asset writes for a range: one JSON file per feature and the index rows."""
    rows = []
    for doc in docs:
        out.path(site_data_file(doc["feature"])).write_text(json.dumps(doc, ensure_ascii=False))
        rows.append(site_data.index_row(doc))
    out.path(site_files.INDEX_ROWS_FILE).write_text(json.dumps(rows, ensure_ascii=False))
    out.extra.update(lo=samples.lo, hi=samples.hi, n_tokens=samples.n_tokens, hist_edges=list(samples.hist_edges))


def write_feature_site(out: Folder, parts: list[Folder], layout) -> None:
    """The feature_site asset's writer over the site_json partitions and the feature map (adapt here
    when the site layout changes); the per-range lineage `write_site` adds reads store manifests a
    Folder does not have, and costs a few small reads per range."""
    from sae_assets.core.features.site_index import SiteRange

    def ranges():
        for part in parts:
            documents = ((int(name[len("feature-"):-len(".json")]), part.files[name].read_text())
                         for name in site_files.feature_files(part))
            yield SiteRange(json.loads(part.files[site_files.INDEX_ROWS_FILE].read_text()), documents,
                            part.extra["n_tokens"], part.extra["hist_edges"])

    site_files.write_site_files(out.path, ranges(), dictionary="bench", feature_map=layout)


class SizeRun:
    """Every stage once at (T tokens, F features, D wide) under `tmp`: `run()` gives {stage: measures}."""

    def __init__(self, T: int, F: int, D: int, args, tmp: Path):
        self.S, self.F, self.D, self.cfg, self.tmp = T // args.bench_shard_tokens, F, D, args.cfg, tmp
        shards = [activations_table(args.bench_shard_tokens, D, seed=100 + s) for s in range(self.S)]
        self.shards = [t.set_column(0, t.schema.field(0),  # shard s's global token indices
                                    pa.array(schemas.global_token_index(s, np.arange(t.num_rows))))
                       for s, t in enumerate(shards)]
        self.sae = dictionary(self.shards[0], D, F, min(0.5, args.bench_l0 / F))  # L0 fixed as F grows
        W = args.bench_range_width
        self.ranges = [(lo, min(lo + W, F)) for lo in range(0, F, W)]
        self.encoders = {lo: (lambda x, lo=lo, hi=hi: self.sae.encode_range(x, lo, hi)) for lo, hi in self.ranges}
        self.cofiring: dict = {}
        self.m = {name: {"cpu": 0.0, "bytes": {}, "rows": {}, "files": {}, "footer": {}}
                  for name in (*STAGES, "activations")}

    def record(self, stage: str, kind: str, out: Folder, rows: int, prefix: str = "") -> None:
        files, footer = out.footers(prefix)
        for key, value in (("bytes", out.size(prefix)), ("rows", rows), ("files", files), ("footer", footer)):
            self.m[stage][key][kind] = self.m[stage][key].get(kind, 0) + value

    @contextmanager
    def cpu(self, stage: str):
        started = time.process_time()
        yield
        self.m[stage]["cpu"] += time.process_time() - started

    def run(self) -> dict:
        for s, t in enumerate(self.shards):  # the reference: the activation cache as cached_activations writes it
            out = Folder(self.tmp / "activations" / str(s))
            write_ipc_file(out.path("activations.arrow"), t.schema, t.to_batches())
            self.record("activations", "activations", out, t.num_rows * self.D)
        samples = self.feature_samples()
        examples = {lo: self.feature_examples(lo, [samples[s, lo] for s in range(self.S)]) for lo, _ in self.ranges}
        gathers = self.context_gather(examples)
        site_parts = [self.context_windows_and_site_json(lo, hi, *examples[lo], [gathers[s, lo] for s in range(self.S)])
                      for lo, hi in self.ranges]
        layout = self.feature_map()
        out = Folder(self.tmp / "site")
        with self.cpu("feature_site"):
            write_feature_site(out, site_parts, layout)
        self.record("feature_site", "features", out, self.F)
        self.feature_matches()
        self.m["shown_rows"] = sum(shown.num_rows for _, shown in examples.values())
        self.m["context_gather"]["unique"] = sum(_unique_tokens(g) for g in gathers.values())
        return self.m

    def feature_map(self):
        """What the feature_map asset computes and writes for the dictionary."""
        out = Folder(self.tmp / "feature_map")
        with self.cpu("feature_map"):
            layout = decoder_layout(self.sae.W_dec.detach(), seed=0)
            write_layout(layout_table(layout), out.path(LAYOUT_FILE))
        self.record("feature_map", "features", out, self.F)
        return layout

    def feature_matches(self) -> None:
        """Each feature's closest in a second dictionary of the same width (random decoder rows:
        the match ids compress least), written as one ordered pair's matches."""
        other_FD = torch.randn(self.F, self.D, generator=torch.Generator().manual_seed(self.F * self.D))
        out = Folder(self.tmp / "feature_matches")
        with self.cpu("feature_matches"):
            ids, cosines = closest_features(self.sae.W_dec.detach(), other_FD)
            write_matches(matches_table(ids, cosines), out.path(MATCHES_FILE))
        self.record("feature_matches", "features", out, self.F)

    def feature_samples(self) -> dict:
        f, samples = self.cfg, {}
        for s, t in enumerate(self.shards):
            for lo, hi in self.ranges:
                out = Folder(self.tmp / f"samples-{s}-{lo}")
                with self.cpu("feature_samples"):
                    samples[s, lo] = sample_activation_table(
                        t, hook=HOOK, encode_range=self.encoders[lo], lo=lo, hi=hi, top_k=f["top_k"],
                        sample_k=f["sample_k"], seed=f["seed"], batch_size=f["batch_size"])
                    write_samples(out, samples[s, lo])
                for table in ("top", "sample", "stats"):
                    self.record("feature_samples", table, out, getattr(samples[s, lo], table).num_rows, table)
        return samples

    def feature_examples(self, lo: int, parts: list):
        f, out = self.cfg, Folder(self.tmp / f"examples-{lo}")
        with self.cpu("feature_examples"):
            merged = merge_feature_samples(parts)
            shown = feature_windows.select_shown_examples(merged, random_examples=f["random_examples"],
                                                          activation_levels=f["activation_levels"],
                                                          examples_per_level=f["examples_per_level"])
            write_samples(out, merged)
            pq.write_table(shown, out.path(SHOWN_FILE))
        for table in ("top", "sample", "stats"):
            self.record("feature_examples", table, out, getattr(merged, table).num_rows, table)
        self.record("feature_examples", "shown", out, shown.num_rows, "shown")
        return merged, shown

    def context_gather(self, examples: dict) -> dict:
        f, gathers = self.cfg, {}
        for s, t in enumerate(self.shards):
            out = Folder(self.tmp / f"gather-{s}")
            with self.cpu("context_gather"):
                for lo, _ in self.ranges:
                    gathers[s, lo] = feature_windows.gather_context_windows(
                        examples[lo][1], t, self.encoders[lo], shard=s, hook=HOOK, context_length=CONTEXT,
                        before=f["window_before"], after=f["window_after"], lo=lo, batch_size=f["batch_size"],
                        boundary_ids=(EOS,), where="bench")
                    pq.write_table(gathers[s, lo], out.path(gathered_windows_file(f"{lo}")))
                    self.cofiring[s, lo] = feature_cofiring.gather_cofiring(  # the asset's second table
                        examples[lo][1], t, self.encoders[lo], shard=s, hook=HOOK, batch_size=f["batch_size"], lo=lo,
                        where="bench")
                    pq.write_table(self.cofiring[s, lo], out.path(gathered_cofiring_file(f"{lo}")))
            self.record("context_gather", "slots", out, sum(_slots(gathers[s, lo]) for lo, _ in self.ranges))
        return gathers

    def context_windows_and_site_json(self, lo: int, hi: int, merged, shown, parts: list) -> Folder:
        f, out = self.cfg, Folder(self.tmp / f"windows-{lo}")
        with self.cpu("context_windows"):
            windows = feature_windows.assemble_context_windows(shown, parts, where="bench")
            pq.write_table(windows, out.path(WINDOWS_FILE))
            cofiring = feature_cofiring.assemble_cofiring(shown, [self.cofiring[s, lo] for s in range(self.S)],
                                                          where="bench")
            pq.write_table(cofiring, out.path(COFIRING_FILE))
        self.record("context_windows", "slots", out, _slots(windows))
        strings, W_U = [f"tok{i}" for i in range(VOCAB)], torch.randn(self.D, VOCAB)
        out = Folder(self.tmp / f"site_json-{lo}")
        with self.cpu("site_json"):
            directions = self.sae.decoder_directions(lo, hi)  # the panels, as site_json computes them
            docs = site_data.feature_documents(
                merged, shown, windows, strings, logits=panels.logit_effects(directions, W_U, f["logit_effects"]),
                neighbours=panels.nearest_features(self.sae.decoder_directions(), lo, hi),
                alignment=panels.neuron_alignment(directions),
                cofiring=feature_cofiring.cofiring_features(shown, cofiring, lo, hi),
                activation_levels=f["activation_levels"], dictionary="bench")
            write_site_json(out, docs, merged)
        self.record("site_json", "features", out, hi - lo)
        return out


def _slots(windows) -> int:
    return len(windows.column("activations").combine_chunks().flatten())


def _unique_tokens(windows) -> int:
    lengths = np.diff(windows.column("activations").combine_chunks().offsets.to_numpy())
    first = np.repeat(windows.column("first_token_index").to_numpy(), lengths)
    return len(np.unique(first + np.arange(len(first)) - np.repeat(np.r_[0, np.cumsum(lengths)[:-1]], lengths)))


# --- the model: what each stage's bytes and CPU are counted in ------------------------------------

def bench_counts(T: int, F: int, D: int, m: dict, args) -> dict:
    """The counts the cost model uses, as measured at one bench size."""
    rows = {stage: m[stage]["rows"] for stage in STAGES}
    return {"T": T, "F": F, "D": D, "W": args.bench_range_width, "S": T // args.bench_shard_tokens, "rows": rows,
            "slots": rows["context_windows"]["slots"], "unique": m["context_gather"]["unique"],
            "shown": m["shown_rows"], "samples_in": sum(rows["feature_samples"].values())}


def scale_counts(args) -> dict:
    """The same counts at the target, from the sizes and assumptions (upper bounds where marked)."""
    T, F, D, W, f = args.tokens, args.features, args.d_model, args.range_width, args.cfg
    S = math.ceil(T / args.shard_tokens)
    per_shard = args.shard_tokens * args.l0 / F  # a feature's mean active tokens in one shard (uniform density)
    overall = T * args.l0 / F
    shown = f["top_k"] + f["random_examples"] + f["activation_levels"] * f["examples_per_level"]  # at most
    slots = F * shown * (f["window_before"] + f["window_after"] + 1)  # at most: no overlap, no clipping
    fired = 1 - math.exp(-per_shard)  # chance a feature fires in a shard; stats are stored for those only
    samples = {"top": S * F * min(f["top_k"], per_shard), "sample": S * F * min(f["sample_k"], per_shard),
               "stats": S * F * fired}
    rows = {"feature_samples": samples,
            "feature_examples": {"top": F * min(f["top_k"], overall), "sample": F * min(f["sample_k"], overall),
                                 "stats": F, "shown": F * shown},
            "context_gather": {"slots": slots}, "context_windows": {"slots": slots},
            "site_json": {"features": F}, "feature_map": {"features": F}, "feature_site": {"features": F},
            "feature_matches": {"features": F}}
    cells, ranges = S * math.ceil(F / W), math.ceil(F / W)
    files = {"feature_samples": dict.fromkeys(samples, cells),  # one Parquet file per table and partition
             "feature_examples": dict.fromkeys(rows["feature_examples"], ranges),
             "context_gather": {"slots": cells}, "context_windows": {"slots": ranges}, "feature_map": {"features": 1},
             "feature_matches": {"features": 1}}
    return {"T": T, "F": F, "D": D, "W": W, "S": S, "rows": rows, "files": files, "slots": slots, "unique": slots,
            "shown": F * shown, "samples_in": sum(samples.values()), "V": args.vocab}


def cpu_terms(stage: str, c: dict) -> list[float]:
    """The work a stage's CPU time is a non-negative combination of: matmul MACs first, then rows, slots."""
    T, F, D, W = c["T"], c["F"], c["D"], c["W"]
    return {"feature_samples": [T * F * D, T * F],  # encoder matmul; per (token, feature) updates
            "feature_examples": [0, c["samples_in"], F],  # merge sorts every shard's rows; per-feature stats
            "context_gather": [c["unique"] * W * D, c["slots"], c["S"] * c["shown"]],  # encode, slots, scan
            "context_windows": [0, c["slots"], c["shown"]],
            "site_json": [F * D * (c.get("V", VOCAB) + F), c["slots"], F],  # logit effects and exact nearest
            # features (F x F x D: every pair of decoder rows), window tokens, documents
            # the projection on the top singular vectors (wider than PCA_DIMS), UMAP ~ F log F
            "feature_map": [map_projection_macs(F, D), F * math.log2(F)],
            "feature_site": [0, c["slots"], F],
            "feature_matches": [F * F * D, F]}[stage]  # every pair of rows of the two dictionaries; per feature


def map_projection_macs(F: int, D: int) -> float:
    """feature_map's matmul MACs: 5 passes of A^T (A Q) with Q (D, PCA_DIMS + 16), then A V (D, PCA_DIMS);
    none for rows no wider than PCA_DIMS. (Float64 in numpy: about twice the float32 rate's time.)"""
    return 0.0 if D <= PCA_DIMS else F * D * (5 * 2 * min(D, PCA_DIMS + 16) + PCA_DIMS)


def matmul_rate(d: int, w: int, batch: int = 1024) -> float:
    """MACs per CPU-second of one (batch, d) x (d, w) float32 matmul on one core, at the target's shape."""
    x, W_enc = torch.randn(batch, d), torch.randn(d, w)
    torch.relu(x @ W_enc)
    started, n = time.process_time(), 0
    while time.process_time() - started < 0.5:
        torch.relu(x @ W_enc)
        n += 1
    return n * batch * d * w / (time.process_time() - started)


def fit_nonnegative(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimizing the relative error of X @ c against y (active-set least squares)."""
    keep = list(range(X.shape[1]))
    while True:
        A = X[:, keep] / y[:, None]
        c, *_ = np.linalg.lstsq(A, np.ones(len(y)), rcond=None)
        if (c >= 0).all() or len(keep) == 1:
            out = np.zeros(X.shape[1])
            out[keep] = np.maximum(c, 0)
            return out
        keep.pop(int(np.argmin(c)))


def power_law(sizes: list[tuple[int, int, int]], values: list[float]) -> np.ndarray:
    """(a, b, d) of value = c * T^a * F^b * D^d, least squares in log space."""
    X = np.column_stack([np.ones(len(sizes)), np.log(np.asarray(sizes, dtype=np.float64))])
    coef, *_ = np.linalg.lstsq(X, np.log(np.maximum(values, 1e-12)), rcond=None)
    return coef[1:]


DESIGN_BOUNDS = {
    "feature_samples": ("features x K per shard (shards x features)", (1, 1, 0)),
    "feature_examples": ("features x K merged", (0, 1, 0)),
    **dict.fromkeys(("context_gather", "context_windows"), ("features x examples x window", (0, 1, 0))),
    **dict.fromkeys(("site_json", "feature_site"), ("features x (examples x window)", (0, 1, 0))),
    "feature_map": ("features (a few bytes each)", (0, 1, 0)),
    "feature_matches": ("features (a few bytes each)", (0, 1, 0)),
}
"""What DESIGN.md ("How things grow") lets each stage's bytes grow as, and those exponents of (T, F, D)."""


def grows_within(e: np.ndarray, tol: float) -> str | None:
    """Which allowed growth the exponents (a, b, d) stay within, or None."""
    if e[0] <= 1 + tol and e[1] <= tol and e[2] <= 1 + tol:
        return "tokens x d_model"
    if e[0] <= tol and e[1] <= 1 + tol and e[2] <= tol:
        return "features x examples x window"
    return None


# --- running, fitting, projecting ----------------------------------------------------------------

def feature_defaults() -> dict:
    """The features section of the packaged default config (sample_k 0 means 10 x top_k)."""
    text = (package_files.files("sae_assets") / "config" / "default.yaml").read_text()
    f = yaml.safe_load(text)["features"]
    return {**f, "sample_k": f["sample_k"] or 10 * f["top_k"]}


def parse_args() -> argparse.Namespace:
    f = feature_defaults()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="half-size base and one doubling per variable (< 60 s)")
    p.add_argument("--tokens", type=float, default=1e8, help="target tokens browsed")
    p.add_argument("--features", type=float, default=1e6, help="target dictionary width")
    p.add_argument("--d-model", type=int, default=4096, help="target hook width (activations cached as bf16)")
    p.add_argument("--l0", type=float, default=64, help="active features per token at the target")
    p.add_argument("--shard-tokens", type=int, default=2 ** 20, help="tokens per data shard at the target")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary of the target model (logit effects)")
    p.add_argument("--range-width", type=int, default=f["range_width"], help="features.range_width")
    for key in ("top_k", "sample_k", "random_examples", "activation_levels", "examples_per_level",
                "window_before", "window_after"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=f[key], help=f"features.{key}")
    p.add_argument("--bench-l0", type=float, default=5.0,
                   help="active features per bench token, the same at every F (a feature fires on L0 / F of tokens)")
    p.add_argument("--bench-shard-tokens", type=int, default=8192)
    p.add_argument("--bench-range-width", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="runs of each size; the least CPU counts")
    p.add_argument("--tolerance", type=float, default=0.15, help="measurement noise allowed in an exponent")
    args = p.parse_args()
    args.tokens, args.features = int(args.tokens), int(args.features)
    args.cfg = {**f, **{k: getattr(args, k) for k in f if hasattr(args, k)}}
    return args


def bench_sizes(args) -> list[tuple[int, int, int]]:
    """A base (T, F, D) and variations of each variable alone."""
    if args.quick:
        args.bench_shard_tokens, args.bench_range_width = args.bench_shard_tokens // 2, args.bench_range_width // 2
        base, steps = (4 * args.bench_shard_tokens, 2 * args.bench_range_width, 32), (2,)
    else:
        base, steps = (4 * args.bench_shard_tokens, 2 * args.bench_range_width, 64), (2, 4)
    sizes = [base]
    for axis in range(3):
        for k in steps:
            sizes.append(tuple(v * k if i == axis else v for i, v in enumerate(base)))
    return sizes


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return ""


def exps(e: np.ndarray) -> str:
    return f"T{e[0]:+.2f} F{e[1]:+.2f} D{e[2]:+.2f}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # CPU-seconds of one core; process time would count spinning threads too
    sizes = bench_sizes(args)
    f = args.cfg
    print(f"bench: shards of {args.bench_shard_tokens} tokens, ranges of {args.bench_range_width} features, "
          f"L0 ~{args.bench_l0:g} (density L0 / F), context {CONTEXT}, vocab {VOCAB}; load average {os.getloadavg()[0]:.2f}")
    print(f"features config: top_k {f['top_k']}, sample_k {f['sample_k']}, random_examples {f['random_examples']}, "
          f"activation_levels {f['activation_levels']} x examples_per_level {f['examples_per_level']}, "
          f"window {f['window_before']}+1+{f['window_after']}, range_width {f['range_width']}")
    measured, counts = [], []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: first calls pay for imports and allocator growth
        SizeRun(2 * args.bench_shard_tokens, args.bench_range_width, 16, args, Path(tmp)).run()
    rounds = []
    for _ in range(args.repeats):  # rounds over all sizes, so a burst of load hits one size of a round only
        round_ = []
        for T, F, D in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                round_.append(SizeRun(T, F, D, args, Path(tmp)).run())
        rounds.append(round_)
    for i, (T, F, D) in enumerate(sizes):
        m = rounds[0][i]
        for stage in STAGES:  # the least CPU of the rounds: the load of other processes only adds
            m[stage]["cpu"] = min(r[i][stage]["cpu"] for r in rounds)
        measured.append(m)
        counts.append(bench_counts(T, F, D, m, args))
        print(f"T={T:>6} F={F:>4} D={D:>4}: " + "  ".join(
            f"{s.split('_')[-1]} {m[s]['cpu']:.2f}s/{human(sum(m[s]['bytes'].values()))}" for s in STAGES))
    print(f"(bench took {time.perf_counter() - started:.0f} s)")
    project(args, sizes, measured, counts)


class StageFit(NamedTuple):
    """One stage's growth measured at the bench sizes and its projection to the target."""

    data_exponents: np.ndarray
    """(a, b, d) of its data bytes (Parquet footers left out) ~ T^a F^b D^d."""
    row_exponents: np.ndarray
    cpu_exponents: np.ndarray
    bytes_per_row: dict
    """{kind: median data bytes a row} (kinds: the tables, window slots or feature documents)."""
    cpu_fit_error: float
    """Largest relative error of the CPU model at the bench sizes."""
    projected_bytes: float
    footer_bytes: float
    cpu_hours: float


def fit_stage(stage: str, sizes, measured: list[dict], counts: list[dict], target: dict, rate: float) -> StageFit:
    ms = [m[stage] for m in measured]
    data = [sum(m["bytes"].values()) - sum(m["footer"].values()) for m in ms]
    cpu = np.array([m["cpu"] for m in ms])
    per_row = {kind: float(np.median([(m["bytes"][kind] - m["footer"][kind]) / max(m["rows"][kind], 1) for m in ms]))
               for kind in ms[0]["bytes"]}
    per_file = {kind: float(np.median([m["footer"][kind] / max(m["files"][kind], 1) for m in ms])) for kind in per_row}
    footers = sum(per_file[k] * target["files"].get(stage, {}).get(k, 0) for k in per_row)
    X = np.array([cpu_terms(stage, c) for c in counts], dtype=np.float64)
    used = np.flatnonzero(X.any(axis=0))
    coef = np.zeros(X.shape[1])
    coef[used] = fit_nonnegative(X[:, used], cpu)
    error = float(np.max(np.abs(X @ coef / cpu - 1)))
    coef[0] = 1 / rate  # matmul MACs at the target run at the rate measured at the target's shapes
    return StageFit(power_law(sizes, data), power_law(sizes, [sum(m["rows"].values()) for m in ms]),
                    power_law(sizes, cpu), per_row, error,
                    sum(per_row[k] * target["rows"][stage][k] for k in per_row) + footers, footers,
                    float(np.dot(coef, cpu_terms(stage, target))) / 3600)


def budget_plan(args):
    """The target's partition plan; with features.range_width over Dagster's budget, the smallest width within it."""
    plan = plan_partitions(shards=math.ceil(args.tokens / args.shard_tokens), dictionary_width=args.features,
                           range_width=args.range_width)
    if plan.max_per_asset <= MAX_PARTITIONS_PER_ASSET:
        return plan
    width = smallest_range_width(plan.shards, args.features) or args.features
    print(f"features.range_width {args.range_width} gives {plan.cells:,} shard x range cells (> "
          f"{MAX_PARTITIONS_PER_ASSET:,}): projected with range width {width:,}, the smallest within the budget")
    return plan_partitions(shards=plan.shards, dictionary_width=args.features, range_width=width)


def project(args, sizes, measured, counts) -> None:
    plan = budget_plan(args)
    args.range_width = plan.range_width
    target, rate = scale_counts(args), matmul_rate(args.d_model, plan.range_width)
    activations = args.tokens * args.d_model * 2  # bf16
    parts = {"feature_samples": (plan.cells, plan.cells), "feature_examples": (plan.ranges, plan.ranges),
             "context_gather": (plan.shards, 1), "context_windows": (plan.ranges, plan.ranges),
             "site_json": (plan.ranges, plan.ranges), "feature_map": (1, 1), "feature_site": (1, 1),
             "feature_matches": (1, 1)}
    print(f"\ntarget: {args.tokens:,} tokens x {args.features:,} features, d_model {args.d_model}, L0 {args.l0:g} "
          f"(density {args.l0 / args.features:.2g}), {plan.shards} shards of {args.shard_tokens:,} tokens, "
          f"{plan.ranges:,} ranges of {plan.range_width:,}, vocab {args.vocab:,}; a feature fires on "
          f"~{args.shard_tokens * args.l0 / args.features:.3g} tokens a shard (here: "
          f"{args.bench_shard_tokens * args.bench_l0 / (2 * args.bench_range_width):.3g} at the base size)")
    print(f"{'stage':<17}| {'data bytes exponents':<21}| {'cpu exponents':<21}| {'proj. bytes':>11} | "
          f"{'CPU-hours':>9} | {'cpu fit':>7} | {'partitions':>10} | {'runs':>6}")
    fits = {stage: fit_stage(stage, sizes, measured, counts, target, rate) for stage in STAGES}
    for stage, fit in fits.items():
        print(f"{stage:<17}| {exps(fit.data_exponents):<21}| {exps(fit.cpu_exponents):<21}| "
              f"{human(fit.projected_bytes):>11} | {fit.cpu_hours:>9.3g} | {100 * fit.cpu_fit_error:>6.0f}% | "
              f"{parts[stage][0]:>10,} | {parts[stage][1]:>6,}")
    per_value = np.median([m["activations"]["bytes"]["activations"] / m["activations"]["rows"]["activations"]
                           for m in measured])
    e_act = power_law(sizes, [m["activations"]["bytes"]["activations"] for m in measured])
    print(f"activation cache: {human(activations)} ({args.tokens:,} tokens x {args.d_model} x 2 bytes, bf16); "
          f"measured here {per_value:.2f} bytes a value (float32 Arrow), exponents {exps(e_act)}")
    print(f"CPU-hours on one core: matmul MACs (encoder, window encoding, logit effects) at {rate / 1e9:.2g} GMAC/s, "
          f"measured for (1024, {args.d_model}) x ({args.d_model}, {plan.range_width}); other terms fitted per stage "
          f"(cpu fit: largest error at the bench sizes)")
    print("runs: one per partition, except context_gather: one single-run backfill over all shards")
    samples_at = []
    for shard_tokens in (2 ** 17, 2 ** 20, 2 ** 23):  # the largest stage depends on the shard size
        counts_at = scale_counts(argparse.Namespace(**{**vars(args), "shard_tokens": shard_tokens}))
        fit = fit_stage("feature_samples", sizes, measured, counts, counts_at, rate)
        samples_at.append(f"{shard_tokens:,} tokens {fit.projected_bytes / activations:.3g}x")
    print(f"feature_samples vs the activation cache by shard size: {', '.join(samples_at)}")
    print_goal(args, measured, fits, activations, counts, target)


def active_entry_ratios(args, measured, counts, target) -> tuple[float, float]:
    """feature_samples' rows over the active entries T x L0 (each of its three tables keeps at most
    one row per active entry): the largest at the bench sizes, and at the target."""
    bench = max(sum(m["feature_samples"]["rows"].values()) / (c["T"] * args.bench_l0)
                for m, c in zip(measured, counts))
    return bench, sum(target["rows"]["feature_samples"].values()) / (target["T"] * args.l0)


def print_goal(args, measured, fits: dict, activations: float, counts, target) -> None:
    tol = args.tolerance
    bench_ratio, target_ratio = active_entry_ratios(args, measured, counts, target)
    print(f"\nGOAL: no stage's bytes grow faster than tokens x d_model or features x examples x window "
          f"(exponent noise {tol})")
    for stage, fit in fits.items():
        within = grows_within(fit.data_exponents, tol)
        bound, allowed = DESIGN_BOUNDS[stage]
        design = "within" if (fit.data_exponents <= np.asarray(allowed) + tol).all() else "BEYOND"
        if not within and stage == "feature_samples" and max(bench_ratio, target_ratio) <= 3:
            # Per shard it keeps at most top_k + sample_k rows and a stats row per feature that
            # fired, none of which can exceed the shard's active entries: rows <= 3 x T x L0.
            within = (f"tokens x L0 (rows {bench_ratio:.2f} x the active entries here, {target_ratio:.2f} at the "
                      f"target; L0 <= d_model), so within tokens x d_model, though its fitted F exponent is not 0 "
                      f"where a feature fires on more than top_k tokens a shard")
        if not within and grows_within(fit.row_exponents, tol):
            # Bytes = rows x bytes a row; a row's bytes are bounded (its uncompressed width), only
            # the compression of small files varies, so the rows decide how the stage grows.
            within = (f"{grows_within(fit.row_exponents, tol)} in rows (its bytes a row vary with compression "
                      f"across more, smaller files, up to the uncompressed row)")
        note = (f"ok, within {within}" if within else "GROWS FASTER than both") + f"; {design} DESIGN's {bound}"
        if design == "BEYOND" and (fit.row_exponents <= np.asarray(allowed) + tol).all():
            note += " in bytes, but its rows are within: the excess is bytes a row (compression, pages per file)"
        print(f"  {stage:<17} {exps(fit.data_exponents)}: {note}; at the target "
              f"{fit.projected_bytes / activations:.3g} x the activation cache")
        footers = f", Parquet footers {human(fit.footer_bytes)} at the target" if fit.footer_bytes else ""
        print(f"  {'':<17} rows {exps(fit.row_exponents)}; data bytes a row: "
              f"{', '.join(f'{k} {v:.3g}' for k, v in fit.bytes_per_row.items())}{footers}")
    largest = max(fit.projected_bytes for fit in fits.values())
    print(f"max_stage_bytes_vs_activations: {largest / activations:.4f}")


if __name__ == "__main__":
    main()
