"""Achieved FLOP/s of SAE training steps as a fraction of this machine's matmul FLOP/s.

What is counted: the five dense matmuls of one step, each B x D x F multiply-adds (2 FLOPs):
forward encoder x @ W_enc and decoder f @ W_dec; backward decoder grad_f = g @ W_dec^T and
grad_W_dec = f^T @ g; backward encoder grad_W_enc = x^T @ grad_pre (the input needs no
gradient, so there is no sixth). Total 10·B·D·F FLOPs per step, the same for ReLU and TopK
(TopK's decoder is counted dense, as the library computes it). Not counted: element-wise work
(activations, losses, the L1 norm weighting, decoder-norm constraints, Adam, clipping), the
top-k selection, and AuxK's extra matmul when features are dead. So the fraction is the share
of the step's time a perfect implementation would spend in its matmuls; 1.0 is the ceiling.

Measured in the same run, interleaved: each round runs, per (architecture, width), the training
and the matmul baseline back to back (which goes first alternates); the fraction is the
median over rounds of the ratio within each pair:

- subject: `train_sae` (the library loop: loss, backward, constraints, clipping, Adam,
  dead-feature tracker; no resampling, no checkpoints) for `--steps` steps on random-but-
  structured activations (toy sparse data plus an offset); its `tokens_per_second` (steps
  only) gives steps/s, times 10·B·D·F gives FLOP/s;
- baseline: the five matmuls of the same shapes and layouts (`torch.matmul`, transposed views
  as autograd passes them), `--steps` times; 10·B·D·F / time per set = matmul FLOP/s.

For ReLU and TopK at widths 1024 and 4096 (batch 1024, d_in 128 by default); defaults take
1-3 minutes on 2 cores. Headline: the geometric mean of the four fractions.

    .venv/bin/python bench/sae_flops.py [--widths 1024,4096] [--steps 12] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import _common
import torch

from sae_assets.core.config import DictionaryPoint, SaeConfig
from sae_assets.core.sae import build_sae, train_sae
from sae_assets.core.sae.toy import make_toy_data, toy_batch


def make_activations(rows: int, d: int, seed: int = 0) -> torch.Tensor:
    data = make_toy_data(4 * d, d, seed=seed, mean_active=8.0)
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat([toy_batch(data, 4096, generator) for _ in range(math.ceil(rows / 4096))])[:rows]
    offset = torch.randn(d, generator=generator)
    return x + 2.0 * offset / offset.norm() * x.norm(dim=-1).mean()


def step_flops(B: int, D: int, F: int) -> float:
    return 10.0 * B * D * F


def train_rate(x_ND: torch.Tensor, arch: str, width: int, sparsity: float, batch: int, steps: int) -> float:
    """Steps per second of train_sae over `steps` steps (set-up excluded)."""
    point = DictionaryPoint(arch, width, sparsity)
    cfg = SaeConfig(sweep=(point,), train_tokens=steps * batch, batch_size=batch, resample=False,
                    checkpoint_every=10**9, lr_warmup_steps=0)
    n_batches = x_ND.shape[0] // batch

    def batches(start: int):
        for s in range(start, 10**12):
            i = s % n_batches
            yield x_ND[i * batch:(i + 1) * batch]

    sae = build_sae(point, x_ND.shape[1], cfg, x_ND[: 4 * batch])
    outcome = train_sae(sae, batches, cfg, point, log_every=10**9)
    return outcome.tokens_per_second / batch


def matmul_rate(B: int, D: int, F: int, repeats: int) -> float:
    """Sets per second of the step's five matmuls at its shapes and layouts."""
    g = torch.Generator().manual_seed(1)
    x_BD, W_enc_DF = torch.randn(B, D, generator=g), torch.randn(D, F, generator=g)
    f_BF, W_dec_FD = torch.randn(B, F, generator=g).relu(), torch.randn(F, D, generator=g)
    g_BD, gpre_BF = torch.randn(B, D, generator=g), torch.randn(B, F, generator=g)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(x_BD, W_enc_DF)          # forward encoder
        torch.matmul(f_BF, W_dec_FD)          # forward decoder
        torch.matmul(g_BD, W_dec_FD.T)        # grad wrt f
        torch.matmul(f_BF.T, g_BD)            # grad wrt W_dec
        torch.matmul(x_BD.T, gpre_BF)         # grad wrt W_enc
    return repeats / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="1024,4096")
    parser.add_argument("--archs", default="relu,topk")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--l1", type=float, default=5.0)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="training steps (and matmul sets) per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",") if w]
    archs = [a for a in args.archs.split(",") if a]
    B, D = args.batch, args.d
    x_ND = make_activations(max(16, args.steps) * B, D)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {B}, d_in {D}, widths {widths}, "
          f"{args.steps} steps per measurement, {args.warmup} warm-up + {args.repeats} rounds, interleaved")
    print("counted per step: 5 matmuls x B·D·F multiply-adds = 10·B·D·F FLOPs (fwd enc, fwd dec, "
          "bwd dec input+weight, bwd enc weight)")

    pairs = {}
    for F in widths:
        for arch in archs:
            sparsity = args.l1 if arch in ("relu", "gated", "jumprelu") else float(args.k)
            pairs[f"{arch}-w{F}"] = (lambda arch=arch, F=F, s=sparsity: train_rate(x_ND, arch, F, s, B, args.steps),
                                     lambda F=F: matmul_rate(B, D, F, args.steps))
    rates = _common.paired_rounds(pairs, args.repeats, args.warmup)

    print(f"\n{'run':<12} {'ms/step':>9} {'GFLOP/s':>9} {'matmul ms':>10} {'matmul GFLOP/s':>15} {'fraction':>9}   "
          f"per round")
    fractions = []
    for F in widths:
        flops = step_flops(B, D, F)
        for arch in archs:
            steps, mm = rates[f"{arch}-w{F}"]
            per_round = [s / m for s, m in zip(steps, mm)]
            fraction = _common.median(per_round)
            fractions.append(fraction)
            print(f"{arch + '-w' + str(F):<12} {1e3 / _common.median(steps):9.1f} "
                  f"{flops * _common.median(steps) / 1e9:9.2f} {1e3 / _common.median(mm):10.1f} "
                  f"{flops * _common.median(mm) / 1e9:15.2f} {fraction:9.3f}   "
                  f"{', '.join(f'{r:.3f}' for r in per_round)}")
    headline = math.exp(sum(math.log(f) for f in fractions) / len(fractions))
    print(f"\nheadline: geometric mean over {len(fractions)} (architecture, width) of step FLOP/s / matmul FLOP/s")
    print(f"sae_flops_fraction: {headline:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
