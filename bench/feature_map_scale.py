"""The feature map's layout at growing dictionary widths: CPU-seconds, their growth, bytes a feature.

`decoder_layout` (sae_assets/core/features/feature_map.py) on random decoder directions of
`--d-model` dimensions (wider than PCA_DIMS: the projection runs too) at F doubling from
`--start` to `--stop` features, in the regime UMAP uses at scale (nearest-neighbour descent
from 4096 points, 200 epochs from 10,000); bench/scale_projection.py times it at its small bench
sizes (exact neighbours, 500 epochs) beside the other stages. UMAP's CPU is fitted to c F^b and
extrapolated from the largest size measured; the projection's (passes over the (F, D) rows) is
scaled linearly in F and D to `--features` x `--target-d-model`. Bytes: the stored
layout (Parquet: feature, x, y) and the page's dictionary-map.js, both measured.
Single-threaded by design: a seeded UMAP runs on one core.

    .venv/bin/python bench/feature_map_scale.py [--start 16384 --stop 131072 --d-model 256 --features 1e6
                                                 --target-d-model 4096]
"""

from __future__ import annotations

import argparse
import io
import os
import time

import _common  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
from sae_assets.core.features import feature_map
from sae_assets.core.features.site_index import script_json
from sae_assets.core.features.feature_map import write_layout


def measure(F: int, D: int) -> tuple[float, float, int, int]:
    """(CPU-seconds of the whole layout, of its projection alone, layout.parquet bytes,
    dictionary-map.js bytes) at F random features of width D."""
    rng = np.random.default_rng(F)
    W = rng.standard_normal((F, D)).astype(np.float32)
    density = np.where(rng.random(F) < 0.1, 0.0, 10 ** rng.uniform(-7, -1, F))
    started = time.process_time()
    layout = feature_map.decoder_layout(W, seed=0)
    seconds = time.process_time() - started
    started = time.process_time()
    feature_map.project(W, feature_map.top_directions(W, feature_map.PCA_DIMS, seed=0))
    projection = time.process_time() - started
    stored = io.BytesIO()
    write_layout(feature_map.layout_table(layout), stored)
    page = f"SAE_MAP.data({script_json(feature_map.map_document(layout, density, dictionary='bench', n_tokens=1))});\n"
    return seconds, projection, len(stored.getvalue()), len(page.encode())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=int, default=16384)
    p.add_argument("--stop", type=int, default=131072)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--features", type=float, default=1e6, help="target dictionary width")
    p.add_argument("--target-d-model", type=int, default=4096, help="target decoder width")
    args = p.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; warming up (numba compiles UMAP and NN-descent once)")
    measure(8192, args.d_model)
    sizes, rows = [], []
    F = args.start
    while F <= args.stop:
        seconds, projection, stored, page = measure(F, args.d_model)
        sizes.append(F)
        rows.append((seconds, projection, stored, page))
        print(f"F={F:>8,} D={args.d_model}: {seconds:7.1f} CPU-s ({1e3 * seconds / F:.2f} ms a feature; projection "
              f"{projection:.1f} s), layout.parquet {stored / F:.2f} B a feature, dictionary-map.js {page / F:.2f} B "
              f"a feature", flush=True)
        F *= 2
    umap = np.array([r[0] - r[1] for r in rows])
    b = np.polyfit(np.log(sizes), np.log(umap), 1)[0] if len(sizes) > 1 else 1.0
    target, F, D = int(args.features), sizes[-1], args.d_model
    umap_target = umap[-1] * (target / F) ** b
    projection_target = rows[-1][1] * (target / F) * (args.target_d_model / D)  # passes over (F, D): linear in both
    print(f"UMAP CPU ~ F^{b:.2f} over {sizes[0]:,}..{F:,} features")
    print(f"at {target:,} features of d_model {args.target_d_model}: UMAP ~{umap_target / 3600:.2g} CPU-hours, the "
          f"projection ~{projection_target / 3600:.2g} CPU-hours on one core; layout.parquet "
          f"~{rows[-1][2] / F * target / 1e6:.3g} MB, dictionary-map.js ~{rows[-1][3] / F * target / 1e6:.3g} MB")


if __name__ == "__main__":
    main()
