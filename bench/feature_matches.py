"""Cross-dictionary feature matching against one plain matmul of the same multiply-adds.

`closest_features` (sae_assets/core/features/matches.py) matches `--features` random decoder rows
of width `--d-model` to as many of a second dictionary, `--block` rows at a time; the baseline,
measured in the same run, is one `torch.mm` of the (F, D) x (D, F) product, the same
F x F x D multiply-adds with nothing else (no normalization, no argmax, the whole (F, F)
output in memory). The two run back to back in each of `--repeats` rounds after a warm-up
(which goes first alternates); each time is the median over rounds, and `ratio_vs_matmul` the
median over rounds of our seconds / the matmul's (a ratio within a round stays steady on a
shared machine whose load comes and goes). The goal: a ratio of at most 1.5. Also printed:
the stored bytes a feature (write_matches' Parquet of the result).

    .venv/bin/python bench/feature_matches.py [--features 8192 --d-model 512 --block 4096 --repeats 5
                                               --device cpu]
"""

from __future__ import annotations

import argparse
import io
import os

import _common
import torch
from sae_assets.core.features.matches import closest_features, matches_table, write_matches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=int, default=8192, help="F: rows of each dictionary")
    p.add_argument("--d-model", type=int, default=512, help="D: decoder width")
    p.add_argument("--block", type=int, default=4096, help="closest_features' block of rows")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    F, D, device = args.features, args.d_model, args.device
    generator = torch.Generator().manual_seed(0)
    W_dec_AD = torch.randn(F, D, generator=generator).to(device)
    W_dec_BD = torch.randn(F, D, generator=generator).to(device)

    def synced(fn):
        def run():
            value = fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return value
        return run

    ours = synced(lambda: closest_features(W_dec_AD, W_dec_BD, block=args.block, device=device))
    matmul = synced(lambda: torch.mm(W_dec_AD, W_dec_BD.T))
    pair = _common.paired_rounds({"pair": (lambda: _common.timed(ours)[0], lambda: _common.timed(matmul)[0])},
                                 repeats=args.repeats)["pair"]
    seconds = {"closest_features": pair[0], "matmul": pair[1]}
    macs = F * F * D
    print(f"F={F:,} x F={F:,}, D={D}, block {args.block}, {device}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}; {macs / 1e9:.3g} GMAC")
    for name, values in seconds.items():
        print(f"{name}: {_common.spread(values)}, {macs / _common.median(values) / 1e9:.3g} GMAC/s")
    ids, cosines = closest_features(W_dec_AD, W_dec_BD, block=args.block, device=device)
    stored = io.BytesIO()
    write_matches(matches_table(ids, cosines), stored)
    print(f"stored: {len(stored.getvalue()) / F:.2f} bytes a feature (matches Parquet, zstd)")
    print(f"ratio_vs_matmul: {_common.median([a / b for a, b in zip(*pair)]):.3f}")


if __name__ == "__main__":
    main()
