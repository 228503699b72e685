"""Cost of capturing per-datum parameter shifts: a training step with capture / one without.

Two copies of the embedded model (the configured shape: by default 2 layers, d_model 128,
4 heads, d_mlp 512, vocab 4096, context 128, batch 16), built from the same seed, each with
the pipeline's AdamW (`lm_train.make_optimizer`), train side by side on the same seeded
random batches with the same learning-rate schedule and clipping (`lm_train.train_step`).
One has a `ShiftCapture` (the configured tracked tensors and top_k; completed step ranges of
`--range-steps` steps are written to Parquet in a temp dir, as language_model writes them).
Each round times one step of each, back to back, which goes first alternating; warm-up
rounds are dropped. Since capture only reads, the two models must stay bit-identical; the
script checks that at the end.

Printed: median step times, the per-round ratios, the ratio of total times (it includes the
range flushes, which a median skips), the time inside capture, the machine's load average,
and bytes stored per datum (each sequence at each step): the raw capture files and the
published parameter_shifts table, both zstd Parquet. Headline (last line): the median over
rounds of (step with capture) / (step without).

    .venv/bin/python bench/capture_overhead.py [--rounds 16] [--warmup 3] [--top-k N] [--threads N] [--config run.yaml]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common


def build(cfg):
    from sae_assets.core.model import lm
    from sae_assets.core.model import training as lm_train

    model = lm.build_embedded_model(cfg.model, vocab_size=cfg.tokenizer.vocab_size,
                                    context_length=cfg.tokenizer.context_length)
    model.train()
    return model, lm_train.make_optimizer(model, cfg.model)


def stored_bytes(captured, layout, top_k: int, tmp: Path) -> tuple[int, int]:
    """(raw capture bytes, published parameter_shifts bytes) of the captured ranges, zstd Parquet."""
    import pyarrow.parquet as pq

    from sae_assets.core.attribution.tables import publish_shifts

    raw = published = 0
    for i, piece in enumerate(captured):
        pq.write_table(piece.shifts, tmp / f"raw-{i}.parquet", compression="zstd")
        pq.write_table(piece.steps, tmp / f"steps-{i}.parquet", compression="zstd")
        pq.write_table(publish_shifts(piece.shifts, layout, top_k), tmp / f"pub-{i}.parquet", compression="zstd")
        raw += (tmp / f"raw-{i}.parquet").stat().st_size + (tmp / f"steps-{i}.parquet").stat().st_size
        published += (tmp / f"pub-{i}.parquet").stat().st_size
    return raw, published


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=16, help="timed rounds (one step of each model per round)")
    parser.add_argument("--warmup", type=int, default=3, help="rounds run first and not timed")
    parser.add_argument("--range-steps", type=int, default=4, help="steps per captured range (flushes timed)")
    parser.add_argument("--top-k", type=int, default=0, help="attribution.top_k (0 = the config's)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument("--config", help="a run config YAML laid over the packaged defaults")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    try:
        import numpy as np
        import torch

        from sae_assets.core.attribution.capture import ShiftCapture
        from sae_assets.core.attribution.records import step_ranges
        from sae_assets.core.config import load_config
        from sae_assets.core.model.training import lr_at_step, train_step

        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = load_config(args.config)
        top_k = args.top_k or cfg.attribution.top_k
        steps = args.warmup + args.rounds
        batch, ctx = cfg.model.batch_size, cfg.tokenizer.context_length
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg.tokenizer.vocab_size, (batch, ctx), generator=generator) for _ in range(steps)]
        (plain, plain_opt), (watched, watched_opt) = build(cfg), build(cfg)
        captured = []
        capture = ShiftCapture(watched, datum_ids=np.arange(steps * batch) * ctx, top_k=top_k,
                               ranges=step_ranges(steps, args.range_steps), sink=captured.append,
                               kinds=cfg.attribution.tensors)
        print(f"model {cfg.model.n_layers}L d{cfg.model.d_model} d_mlp {cfg.model.d_mlp} vocab {cfg.tokenizer.vocab_size} "
              f"ctx {ctx} batch {batch}; tracked {list(cfg.attribution.tensors)}: {capture.layout.total} parameters; "
              f"top_k {top_k}; torch threads {torch.get_num_threads()}")

        def step_of(model, optimizer, step, with_capture):
            lr = lr_at_step(step - 1, peak_lr=cfg.model.learning_rate, warmup_steps=cfg.model.warmup_steps,
                            total_steps=steps)
            started = time.perf_counter()
            if with_capture:
                capture.begin_step(step, torch.arange((step - 1) * batch, step * batch))
            train_step(model, optimizer, batches[step - 1], lr=lr, max_grad_norm=cfg.model.max_grad_norm, step=step,
                       capture=capture if with_capture else None)
            return time.perf_counter() - started

        base, subject = [], []
        for step in range(1, steps + 1):
            if step % 2:
                a, b = step_of(plain, plain_opt, step, False), step_of(watched, watched_opt, step, True)
            else:
                b = step_of(watched, watched_opt, step, True)
                a = step_of(plain, plain_opt, step, False)
            if step > args.warmup:
                base.append(a)
                subject.append(b)
        capture.close()
        capture.remove()
        identical = all(torch.equal(x, y) for x, y in zip(plain.state_dict().values(), watched.state_dict().values()))
        ratios = [s / b for s, b in zip(subject, base)]
        raw, published = stored_bytes(captured, capture.layout, top_k, tmp)
        data = steps * batch
        print(f"median step: without capture {1000 * _common.median(base):.1f} ms, "
              f"with capture {1000 * _common.median(subject):.1f} ms ({args.rounds} rounds)")
        print(f"per-round ratios: {' '.join(f'{r:.2f}' for r in ratios)}")
        print(f"ratio of total times (range flushes included): {sum(subject) / sum(base):.3f}")
        print(f"time inside capture: {capture.seconds:.2f} s over {steps} steps "
              f"({1000 * capture.seconds / steps:.1f} ms/step); weights identical with and without capture: {identical}")
        print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
        print(f"bytes stored per datum (one sequence at one step, {top_k} shifts): raw capture {raw / data:.0f}, "
              f"published parameter_shifts {published / data:.0f}, total {(raw + published) / data:.0f}")
        print(f"capture_overhead: {_common.median(ratios):.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
