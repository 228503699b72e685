"""Activation-caching throughput against a bare forward pass of the same model on the same batches.

The embedded default model shape (2 layers, d_model 128, 4 heads, d_mlp 512, vocab 4096,
context 128), freshly built and untrained, on random tokens. Per repetition, every variant
goes over the same (S, 128) token array `--batch-size` sequences at a time, in rotating
order, so load from other processes lands on all of them:

- `forward`:     `model(tokens)` under inference_mode, the full logits (the headline baseline);
- `stop_layer`:  `model.run_with_cache(..., names_filter=[hook], stop_at_layer=...)`, no storage
                 (`activations.stop_layer`, as cache_activations calls it);
- `early_exit`:  shown for reference: `model.run_with_hooks` with a hook at the hook point that
                 keeps the tensor and raises TransformerLens's StopAtLayerException, i.e. a
                 forward that really ends at the hook (TL 4's stop_at_layer only stops *before*
                 a block, so for a hook in the last block it runs ln_final and the unembed);
- `cache <dt>`:  `activations.cache_activations` (with ActivationStats, as the asset runs it)
                 streamed into `resources.arrow_files.write_ipc_file` in a temp dir, for
                 dtype float32, float16 and bfloat16.

Tokens/s are medians over repetitions; ratios are medians over repetitions of the ratio
within each repetition (pairing runs made under the same load). Runs on `--device` (default
cpu) and, when CUDA is available and not already chosen, on cuda too. Headline: cache
float32 / forward on --device.

    .venv/bin/python bench/cache_throughput.py [--device cpu|cuda] [--sequences 128] [--repeats 10]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import _common

HOOK = "blocks.1.hook_resid_post"
DTYPES = ("float32", "float16", "bfloat16")


def build_model(device: str):
    from sae_assets.core.model import lm
    from sae_assets.core.config import ModelConfig

    cfg = ModelConfig(n_layers=2, d_model=128, n_heads=4, d_mlp=512, seed=0, device=device)
    model = lm.build_embedded_model(cfg, vocab_size=4096, context_length=128)
    model.eval()
    return model


def variants(model, tokens_ST, first_S, *, device: str, batch_size: int, tmp: Path) -> dict:
    """name -> callable doing one full pass over tokens_ST; each returns when the work is done."""
    import numpy as np
    import torch

    from resources.arrow_files import write_ipc_file
    from sae_assets.core import schemas
    from sae_assets.core.activations import caching as activations

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    stop = int(HOOK.split('.')[1]) + 1  # TransformerLens' stop_at_layer: stops before that block only
    width = activations.hook_widths(model, [HOOK], tokens_ST.shape[1], device=device)

    def batches():
        for start in range(0, len(tokens_ST), batch_size):
            yield torch.from_numpy(tokens_ST[start:start + batch_size].astype(np.int64)).to(device)

    def forward() -> None:
        with torch.inference_mode():
            for batch_BT in batches():
                model(batch_BT)  # (B, T, V) logits
        sync()

    def stop_layer() -> None:
        with torch.inference_mode():
            for batch_BT in batches():
                model.run_with_cache(batch_BT, names_filter=[HOOK], stop_at_layer=stop, return_cache_object=False)
        sync()

    def early_exit() -> None:
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        def grab(tensor, hook):
            kept.append(tensor)
            raise StopAtLayerException(tensor)

        with torch.inference_mode():
            for batch_BT in batches():
                kept: list = []
                model.run_with_hooks(batch_BT, fwd_hooks=[(HOOK, grab)])
        sync()

    def cache(dtype: str):
        def run() -> None:
            path = tmp / f"activations-{dtype}.arrow"
            stats = activations.ActivationStats()
            stream = activations.cache_activations(model, tokens_ST, first_S, hook_points=[HOOK], dtype=dtype,
                                                   batch_size=batch_size, device=device, stats=stats)
            write_ipc_file(path, schemas.activation_schema(width, dtype), stream)
            path.unlink()
        return run

    found = {"forward": forward, "stop_layer": stop_layer}
    try:
        from transformer_lens.model_bridge.exceptions import StopAtLayerException  # noqa: F401
        found["early_exit"] = early_exit
    except ImportError:  # another TransformerLens: the reference row is left out
        pass
    return {**found, **{f"cache {d}": cache(d) for d in DTYPES}}


def measure(device: str, args, tmp: Path) -> dict[str, list[float]]:
    """Seconds per pass of each variant on `device`, per repetition; prints the table."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    tokens_ST = rng.integers(0, 4096, size=(args.sequences, 128), dtype=np.int32)
    first_S = np.arange(args.sequences, dtype=np.int64) * 128
    model = build_model(device)
    subjects = variants(model, tokens_ST, first_S, device=device, batch_size=args.batch_size, tmp=tmp)
    seconds = _common.interleave(subjects, repeats=args.repeats, warmup=1)
    n_tokens = tokens_ST.size
    threads = f", torch threads {torch.get_num_threads()}" if device == "cpu" else ""
    print(f"\n[{device}{threads}] {args.sequences} sequences x 128 = {n_tokens} tokens, batch {args.batch_size}, "
          f"hook {HOOK}, {args.repeats} interleaved repetitions")
    print(f"  {'variant':<16} {'tokens/s':>10}  {'vs forward':>10}  {'vs stop_layer':>13}   seconds per pass")
    for name, values in seconds.items():
        print(f"  {name:<16} {n_tokens / statistics.median(values):10.0f}  "
              f"{_common.paired_ratio(values, seconds['forward']):10.3f}  "
              f"{_common.paired_ratio(values, seconds['stop_layer']):13.3f}   {_common.spread(values)}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="device of the headline figure (cpu, cuda, cuda:0)")
    parser.add_argument("--sequences", type=int, default=128, help="sequences of 128 tokens per pass")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per forward (activations.batch_size)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        devices = [args.device]
        if torch.cuda.is_available() and not args.device.startswith("cuda"):
            devices.append("cuda")
        results = {device: measure(device, args, tmp) for device in devices}
        print("\nthroughput ratios: median of per-repetition ratios (in brackets: ratio of the fastest passes)")
        for device, seconds in results.items():
            for dtype in DTYPES:
                name = f"cache {dtype}"
                print(f"[{device}] {name:<16} / forward "
                      f"{_common.paired_ratio(seconds[name], seconds['forward']):.3f} "
                      f"[{min(seconds['forward']) / min(seconds[name]):.3f}]   / stop_layer forward "
                      f"{_common.paired_ratio(seconds[name], seconds['stop_layer']):.3f} "
                      f"[{min(seconds['stop_layer']) / min(seconds[name]):.3f}]")
        head = results[args.device]
        print(f"cache_vs_forward: {_common.paired_ratio(head['cache float32'], head['forward']):.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
