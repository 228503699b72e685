"""Feature-sampling throughput against the bare encoder matmul, and site generation time.

Subject: `features.sample_activation_table`, the code path of the feature_samples asset, over
an Arrow table of N cached activations (D wide) for one feature range of W features of a ReLU
dictionary: batch slicing, float conversion, `encode_range` (unrectified, as the asset calls it:
the sampler reads only entries > 0) and the exact top-K / bottom-k
sample / count, sum, max and histogram updates. Baseline: the bare encoder over the same
batches of the same tokens, relu(x @ W_enc[:, lo:hi] + b_enc[lo:hi]), nothing kept. Both
process N x W (token, feature) pairs; the ratio is subject throughput / baseline throughput,
the median over interleaved rounds of the per-round ratio (goals: >= 0.7 at --d-in 128 and
>= 0.85 at --d-in 512). Round 0 warms up (the sampler's compiled kernel loads or compiles there).

The encoder biases are set so each feature fires on about `--density` of tokens (2% default,
about the L0/F of the demo dictionaries), since the sampler's work grows with active entries.

Then site generation for the same range: both passes of the context windows, the per-feature JSON
documents and the browser's script files, written to a temporary directory; printed as
seconds per 1000 features.

    .venv/bin/python bench/feature_sampling.py [--tokens 262144] [--d-in 128] [--width 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import pyarrow as pa
import torch

from sae_assets.core import schemas
from sae_assets.core.features import windows as feature_windows
from sae_assets.core.features import site_data
from sae_assets.core.features.sampling import sample_activation_table
from sae_assets.core.features.merge import merge_feature_samples
from sae_assets.core.sae.relu import ReluSae

HOOK = "blocks.0.hook_resid_post"
CONTEXT = 128


def activations_table(n: int, d: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return pa.table({"token_index": schemas.global_token_index(0, np.arange(n)),
                     "token_id": rng.integers(0, 4096, n).astype(np.int32),
                     HOOK: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d)},
                    schema=schemas.activation_schema({HOOK: d}, "float32"))


def dictionary(table: pa.Table, d: int, width: int, density: float) -> ReluSae:
    torch.manual_seed(0)
    sae = ReluSae(d, width, l1_coefficient=1.0)
    x = torch.from_numpy(np.asarray(table.column(HOOK).combine_chunks().flatten()).reshape(-1, d)[:20000].copy())
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, width) / d ** 0.5)
        pre = x @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre, 1 - density, dim=0))  # each feature fires on ~density of tokens
        sae.W_dec.copy_(torch.randn(width, d) / d ** 0.5)
    return sae


def bare_encoder(table: pa.Table, sae: ReluSae, lo: int, hi: int, batch: int) -> float:
    W, b = sae.W_enc[:, lo:hi].detach(), sae.b_enc[lo:hi].detach()
    x_ND = np.asarray(table.column(HOOK).combine_chunks().flatten()).reshape(table.num_rows, -1)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, table.num_rows, batch):
            torch.relu(torch.from_numpy(x_ND[start:start + batch].copy()) @ W + b)
    return time.perf_counter() - started


def sampling(table: pa.Table, sae: ReluSae, lo: int, hi: int, batch: int, top_k: int):
    started = time.perf_counter()
    samples = sample_activation_table(table, hook=HOOK, encode_range=lambda x: sae.encode_range(x, lo, hi, rectify=False),
                                      lo=lo, hi=hi, top_k=top_k, sample_k=10 * top_k, seed=0, batch_size=batch)
    return time.perf_counter() - started, samples


def site_generation(table, sae, samples, lo, hi, directory: Path) -> float:
    """Seconds for both passes of the windows, the JSON documents and the script files of one range."""
    from sae_assets.defs.site_files import script_json

    merged = merge_feature_samples([samples])
    shown = feature_windows.select_shown_examples(merged, random_examples=8, activation_levels=10, examples_per_level=2)
    strings = [f"tok{i}" for i in range(4096)]
    started = time.perf_counter()
    gathered = feature_windows.gather_context_windows(shown, table, lambda x: sae.encode_range(x, lo, hi), shard=0,
                                                      hook=HOOK, context_length=CONTEXT, before=24, after=8, lo=lo,
                                                      batch_size=4096, where="bench")
    windows = feature_windows.assemble_context_windows(shown, [gathered], where="bench")
    logits = site_data.logit_effects(sae.W_dec[lo:hi].detach(), torch.randn(sae.d_in, 4096), 10)
    for doc in site_data.feature_documents(merged, shown, windows, strings, logits=logits, activation_levels=10,
                                           dictionary="bench"):
        (directory / f"feature-{doc['feature']:06d}.json").write_text(json.dumps(doc, ensure_ascii=False))
        (directory / f"feature-{doc['feature']:06d}.js").write_text(f"SAE_SITE.feature({script_json(doc)});\n")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--d-in", type=int, default=128)
    parser.add_argument("--width", type=int, default=256, help="features in the range (features.range_width)")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step (features.batch_size)")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    table = activations_table(args.tokens, args.d_in, seed=1)
    sae = dictionary(table, args.d_in, args.width, args.density)
    lo, hi = 0, args.width
    print(f"{args.tokens} tokens x {args.width} features (d_in {args.d_in}, batch {args.batch}, top_k {args.top_k}, "
          f"density ~{args.density}); load average {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    ratios, subject_s, baseline_s = [], [], []
    samples = None
    for r in range(args.repeats + 1):  # round 0 warms up
        order = [0, 1] if r % 2 else [1, 0]
        seconds = {}
        for which in order:
            if which == 0:
                seconds[0], samples = sampling(table, sae, lo, hi, args.batch, args.top_k)
            else:
                seconds[1] = bare_encoder(table, sae, lo, hi, args.batch)
        if r:
            subject_s.append(seconds[0])
            baseline_s.append(seconds[1])
            ratios.append(seconds[1] / seconds[0])
    pairs = args.tokens * args.width
    density = samples.stats.column("count").to_numpy().sum() / pairs
    print(f"measured density {density:.4f}; features with a full top-K: "
          f"{int((samples.stats.column('count').to_numpy() >= args.top_k).sum())}/{args.width}")
    print(f"sampling      {np.median(subject_s):.3f} s  {pairs / np.median(subject_s) / 1e6:8.1f} M token-features/s")
    print(f"bare encoder  {np.median(baseline_s):.3f} s  {pairs / np.median(baseline_s) / 1e6:8.1f} M token-features/s")
    with tempfile.TemporaryDirectory() as tmp:
        site_seconds = min(site_generation(table, sae, samples, lo, hi, Path(tmp)) for _ in range(3))
    print(f"site generation: {site_seconds:.3f} s for {args.width} features = "
          f"{1000 * site_seconds / args.width:.2f} s per 1000 features")
    print(f"sampling_vs_encoder: {float(np.median(ratios)):.3f}")


if __name__ == "__main__":
    main()
