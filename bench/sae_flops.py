"""Achieved FLOP/s of SAE training steps as a fraction of what the step's counted work runs at.

What is counted, per architecture, is the work a step needs (multiply-adds x 2 FLOPs), with
N = k x B kept entries for the sparse decoders:

- every architecture's encoder forward x @ W_enc, 2 B·D·F (every latent must be scored);
- relu, jumprelu, gated: the encoder backward grad_W_enc = x^T @ grad_pre, 2 B·D·F (the input
  needs no gradient; b_dec's through the centred input is -W_enc (sum_B grad_pre), D·F, not
  counted), and the dense decoder, forward f @ W_dec, backward grad_f = g @ W_dec^T and
  grad_W_dec = f^T @ g, 3 x 2 B·F·D; gated adds its gate reconstruction ReLU(pi_gate) @ W_dec*
  (frozen decoder: forward and grad to the gate only), 2 x 2 B·F·D;
- topk, batchtopk: only the N kept entries are attached (`base.pre_entries`), so the encoder
  backward is a sparse (F, B) @ (B, D) product, 2 N·D; the sparse decoder
  (`base.sparse_decode`, an embedding_bag): forward, gradient to the kept values and to the
  used W_dec rows, 3 x 2 N·D;
- matryoshka: that, plus its prefix reconstructions (one more embedding_bag over the same
  entries, bagged by row and level), another 3 x 2 N·D.

Totals: relu, jumprelu 10·B·D·F; gated 14·B·D·F; topk, batchtopk 2·B·D·F + 8·N·D;
matryoshka 2·B·D·F + 14·N·D. Not counted: element-wise work (activations, losses, the L1
norm weighting, decoder-norm constraints, Adam, clipping), the top-k selection, and AuxK's
sparse decode (6·aux_k·B·D) when latents are dead (none are in these short runs). The
fraction is the share of the step's time a perfect implementation would spend in that work;
1.0 is the ceiling.

Measured in the same run, interleaved: each round runs, per (architecture, width), the training
and the baseline back to back (which goes first alternates); the fraction is the median over
rounds of the ratio within each pair:

- subject: `train_sae` (the library loop: loss, backward, constraints, clipping, Adam,
  dead-feature tracker; no resampling, no checkpoints) for `--steps` steps on random-but-
  structured activations (toy sparse data plus an offset); its `tokens_per_second` (steps
  only) gives steps/s, times the counted FLOPs gives FLOP/s;
- baseline: the counted work alone at the same shapes and layouts, `--steps` times: the
  matmuls with `torch.matmul` (transposed views as autograd passes them) and, for the sparse
  ones, k random latents per row through the primitives the library uses (`torch.sparse.mm`
  for the encoder backward, `embedding_bag` forward + backward for the decoder); counted
  FLOPs / time per set = the baseline's FLOP/s.

For relu, topk, jumprelu, batchtopk, matryoshka, gated at widths 1024 and 4096 (batch 1024,
d_in 128, k 32 by default); defaults take a few minutes on 2 cores. Headline: the geometric
mean of the fractions. A second table prints the counted FLOPs of each architecture relative
to the dense 10·B·D·F, the saving of the sparse decoder.

    .venv/bin/python bench/sae_flops.py [--widths 1024,4096] [--archs relu,topk] [--steps 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import _common
import torch
from torch.nn import functional as nnf

from sae_assets.core.config import DictionaryPoint, SaeConfig
from sae_assets.core.sae import build_sae, train_sae
from sae_assets.core.sae.toy import make_toy_data, toy_batch

ARCHS = ("relu", "topk", "jumprelu", "batchtopk", "matryoshka", "gated")
SPARSE_DECODER = ("topk", "batchtopk", "matryoshka")


def make_activations(rows: int, d: int, seed: int = 0) -> torch.Tensor:
    data = make_toy_data(4 * d, d, seed=seed, mean_active=8.0)
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat([toy_batch(data, 4096, generator) for _ in range(math.ceil(rows / 4096))])[:rows]
    offset = torch.randn(d, generator=generator)
    return x + 2.0 * offset / offset.norm() * x.norm(dim=-1).mean()


def step_flops(arch: str, B: int, D: int, F: int, k: int) -> float:
    """FLOPs one training step of `arch` needs (see the module docstring)."""
    N = k * B
    if arch in SPARSE_DECODER:
        return 2.0 * B * D * F + 2.0 * N * D + 6.0 * N * D * (2 if arch == "matryoshka" else 1)
    return 4.0 * B * D * F + 6.0 * B * D * F + (4.0 * B * D * F if arch == "gated" else 0.0)


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


def counted_work(arch: str, B: int, D: int, F: int, k: int) -> Callable[[], None]:
    """One set of the step's counted work at its shapes, on random tensors made here."""
    g = torch.Generator().manual_seed(1)
    x_BD, W_enc_DF = torch.randn(B, D, generator=g), torch.randn(D, F, generator=g)
    gpre_BF, W_dec_FD = torch.randn(B, F, generator=g), torch.randn(F, D, generator=g)
    f_BF, g_BD = torch.randn(B, F, generator=g).relu(), torch.randn(B, D, generator=g)
    features_N = torch.randint(0, F, (B * k,), generator=g)
    offsets_B = torch.arange(0, B * k, k)
    rows_N = torch.arange(B).repeat_interleave(k)
    grad_FB = torch.sparse_coo_tensor(torch.stack([features_N, rows_N]), torch.randn(B * k, generator=g), (F, B),
                                      check_invariants=False)
    values_N = torch.rand(B * k, generator=g).requires_grad_()
    W_bag_FD = W_dec_FD.clone().requires_grad_()
    bags = 2 if arch == "matryoshka" else 1

    def work() -> None:
        torch.matmul(x_BD, W_enc_DF)              # forward encoder
        if arch in SPARSE_DECODER:
            torch.sparse.mm(grad_FB, x_BD)        # grad wrt W_enc from the kept entries
            for _ in range(bags):                 # sparse decode: forward, grad to values and W_dec rows
                out_BD = nnf.embedding_bag(features_N, W_bag_FD, offsets_B, mode="sum", per_sample_weights=values_N)
                torch.autograd.grad(out_BD, [values_N, W_bag_FD], g_BD)
            return
        torch.matmul(x_BD.T, gpre_BF)             # grad wrt W_enc
        torch.matmul(f_BF, W_dec_FD)              # forward decoder
        torch.matmul(g_BD, W_dec_FD.T)            # grad wrt f
        torch.matmul(f_BF.T, g_BD)                # grad wrt W_dec
        if arch == "gated":                       # gate reconstruction: forward, grad wrt the gate
            torch.matmul(f_BF, W_dec_FD)
            torch.matmul(g_BD, W_dec_FD.T)

    return work


def work_rate(work: Callable[[], None], repeats: int) -> float:
    """Sets per second of `work`."""
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return repeats / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="1024,4096")
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, of {', '.join(ARCHS)}")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--l1", type=float, default=5.0, help="ReLU and Gated L1 coefficient")
    parser.add_argument("--l0", type=float, default=0.01, help="JumpReLU L0 coefficient")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="training steps (and baseline sets) per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",") if w]
    archs = [a for a in args.archs.split(",") if a]
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        parser.error(f"--archs: unknown {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    B, D, k = args.batch, args.d, args.k
    x_ND = make_activations(max(16, args.steps) * B, D)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {B}, d_in {D}, k {k}, widths {widths}, "
          f"{args.steps} steps per measurement, {args.warmup} warm-up + {args.repeats} rounds, interleaved")
    print("counted per step (N = k·B): relu, jumprelu 10·B·D·F; gated 14·B·D·F; topk, batchtopk 2·B·D·F + "
          "8·N·D; matryoshka 2·B·D·F + 14·N·D")

    pairs = {}
    for F in widths:
        for arch in archs:
            sparsity = {"relu": args.l1, "gated": args.l1, "jumprelu": args.l0}.get(arch, float(k))
            work = counted_work(arch, B, D, F, k)
            pairs[f"{arch}-w{F}"] = (lambda arch=arch, F=F, s=sparsity: train_rate(x_ND, arch, F, s, B, args.steps),
                                     lambda work=work: work_rate(work, args.steps))
    rates = _common.paired_rounds(pairs, args.repeats, args.warmup)

    print(f"\n{'run':<16} {'ms/step':>9} {'GFLOP/s':>9} {'work ms':>9} {'work GFLOP/s':>13} {'fraction':>9}   "
          f"per round")
    fractions = []
    for F in widths:
        for arch in archs:
            flops = step_flops(arch, B, D, F, k)
            steps, base = rates[f"{arch}-w{F}"]
            per_round = [s / m for s, m in zip(steps, base)]
            fraction = _common.median(per_round)
            fractions.append(fraction)
            print(f"{arch + '-w' + str(F):<16} {1e3 / _common.median(steps):9.1f} "
                  f"{flops * _common.median(steps) / 1e9:9.2f} {1e3 / _common.median(base):9.1f} "
                  f"{flops * _common.median(base) / 1e9:13.2f} {fraction:9.3f}   "
                  f"{', '.join(f'{r:.3f}' for r in per_round)}")
    print(f"\ncounted FLOPs per step relative to a dense decoder's 10·B·D·F (B {B}, D {D}, k {k}):")
    for F in widths:
        print(f"  width {F}: " + ", ".join(f"{arch} {step_flops(arch, B, D, F, k) / (10.0 * B * D * F):.3f}"
                                          for arch in archs))
    headline = math.exp(sum(math.log(f) for f in fractions) / len(fractions))
    print(f"\nheadline: geometric mean over {len(fractions)} (architecture, width) of step FLOP/s / "
          "counted-work FLOP/s")
    print(f"sae_flops_fraction: {headline:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
