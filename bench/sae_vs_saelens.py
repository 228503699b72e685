"""SAE training throughput of `sae_assets.core.sae.train_sae` against SAELens on the same activations.

Per architecture (relu, topk, jumprelu, batchtopk, matryoshka, gated; `--archs`), both train
on one fixed activation tensor (`--rows` rows of width `--d`, "random but structured": toy data
with G = 4 x D sparse ground-truth directions, Zipf firing, plus a constant offset like a
residual stream's) for the same number of steps, batch, width, LR, warm-up/decay and sparsity,
on the CPU with the same torch thread count; only the training loop is timed on each side,
step by step (every optimizer step of ours is `training._one_step`, every one of SAELens is
`SAETrainer.step`, each wrapped in a timer), and a run's rate is batch / its median step time,
which a burst of load from other processes on a shared machine moves far less than the whole
loop's time (also printed):

- ours: `build_sae` (untimed) then `train_sae` without checkpoints or resampling (SAELens has
  none); a step is loss, backward, decoder constraints, clipping, Adam, dead-feature tracker,
  LR schedule and a curve row every 50 steps (whole loop: `TrainOutcome.tokens_per_second`).
  TopK, BatchTopK and Matryoshka train through their kept latents only (sparse decoder and
  encoder backward, `sae_assets.core.sae.base`);
- SAELens: its training class of the same architecture, built untimed: `StandardTrainingSAE`
  (ReLU, L1 weighted by decoder norms, no b_dec on the input, as ours), `TopKTrainingSAE` and
  `BatchTopKTrainingSAE` (AuxK; SAELens' default `rescale_acts_by_decoder_norm`; dense
  activations unless `--saelens-sparse`), `MatryoshkaBatchTopKTrainingSAE` (our prefixes as
  `matryoshka_widths`), `JumpReLUTrainingSAE` (the step L0 loss with its straight-through
  gradient to the pre-activations too, `jumprelu_ste_to_input`, threshold 0.1 and bandwidth 0.1,
  as ours) and `GatedTrainingSAE`; then `SAETrainer.fit()` (its own training
  step: `training_forward_pass`, backward, clipping at 1, Adam, LR and sparsity warm-up
  schedulers, dead-neuron counters; no wandb, no checkpoints, tqdm disabled) over the same
  batches, pre-multiplied by our input scale so the numbers trained on are the same
  (`normalize_activations: none`).

Matched on both sides: LR 1e-3 with linear warm-up over min(50, steps/4) steps and linear decay
over the last 20 %, sparsity warm-up over the first 5 % (ReLU, Gated, JumpReLU), Adam (0.9,
0.999), gradient clipping at 1, b_dec started at the data mean, a feature dead after
`--dead-after-steps` silent steps (both count per batch), AuxK over d/2 dead latents (SAELens'
fixed heuristic; our default aux_k is 256) with coefficient 1/32; ReLU and Gated L1 coefficient
`--l1` 1 (5, the config default, kills every ReLU feature of this toy data within 60 steps in
both libraries), JumpReLU L0 coefficient `--l0` 0.01, k = `--k` 32 for the TopK family. Held-out
FVU and L0 of both are printed as a check that both learn alike. (With k = 32 of 1024 every
TopK latent fires somewhere in each 1024-row batch of this data, so no latent is ever dead and
AuxK adds no work on either side.)

SAELens is not a dependency of the project (it needs TransformerLens < 4): it lives in its own
virtual environment, made on first use under ~/.cache/sae_assets_bench/saelens-venv (`python
-m venv`, `pip install torch==2.13.0` first, then `pip install sae-lens` constrained to that
torch; about 4 minutes) and reused afterwards; tests/test_saelens_compat.py uses the same venv
and worker. A long-lived worker process in that venv receives one JSON command per line, so
the runs of the two libraries are interleaved and only one runs at a time: each round runs,
per architecture, ours and SAELens back to back (which goes first alternates), and the ratio
is taken within the pair, because on a shared machine load comes and goes over minutes.
Without network (or if the install fails) the script prints why and
`sae_train_vs_saelens: unavailable`.

Cross-check: the last SAE we trained of each architecture is written with `save_sae` and loaded
by SAELens' `SAE.load_from_disk`; encode, decode(encode) and decode(our features) on held-out
rows are compared (max abs differences printed; ideal: float32 rounding).
`--load-check-only` does that for a random SAE of every architecture instead, without training.

Headline: geometric mean over the architectures of the median over rounds of (our tokens/s) /
(SAELens tokens/s), both from median step times. Defaults (200k rows, width 1024, 60 steps per
run, so runs read the first 60 batches; 1 warm-up + 5 rounds) take several minutes on 2 cores.
The issue's goal settings: `--width 16384 --k 32 --archs topk` (>= 2x), `--archs relu,jumprelu`
(>= 1.2x); `--steps 0` trains one full pass.

    .venv/bin/python bench/sae_vs_saelens.py [--steps 60] [--repeats 5] [--threads N] [--archs relu,topk]
        [--width 1024] [--k 32] [--saelens-sparse] [--load-check-only]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import _common
import numpy as np
import torch

from sae_assets.core.config import DictionaryPoint, SaeConfig
from sae_assets.core.sae import BatchTopKSae, JumpReLUSae, build_sae, make_sae, save_sae, train_sae, training
from sae_assets.core.sae.toy import make_toy_data, toy_batch

DEFAULT_VENV = Path.home() / ".cache" / "sae_assets_bench" / "saelens-venv"
TORCH_PIN = "torch==2.13.0"
ARCHS = ("relu", "topk", "jumprelu", "batchtopk", "matryoshka", "gated")
"""Our architectures; SAELens 6 has a training class for each (Matryoshka: MatryoshkaBatchTopK)."""
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")

WORKER = textwrap.dedent('''
    """SAELens side of bench/sae_vs_saelens.py: one JSON command per stdin line, one JSON reply per line."""
    import json, math, os, sys, time, warnings
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    import sae_lens
    from sae_lens import SAE, SAETrainer, LoggingConfig, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the reply stream

    def reply(obj):
        out.write(json.dumps(obj) + "\\n")
        out.flush()

    data = None

    def training_sae(cmd, d):
        """SAELens' training SAE of the architecture, configured as ours (see the module docstring)."""
        arch, common = cmd["arch"], dict(d_in=d, d_sae=cmd["width"], normalize_activations="none")
        topk = dict(k=cmd["k"], aux_loss_coefficient=cmd["aux_coefficient"], apply_b_dec_to_input=True,
                    decoder_init_norm=1.0, use_sparse_activations=cmd["saelens_sparse"])
        if arch == "relu":
            return StandardTrainingSAE(StandardTrainingSAEConfig(
                apply_b_dec_to_input=False, l1_coefficient=cmd["sparsity"],
                l1_warm_up_steps=cmd["l1_warmup_steps"], decoder_init_norm=0.1, **common))
        if arch == "gated":
            return GatedTrainingSAE(GatedTrainingSAEConfig(
                apply_b_dec_to_input=True, l1_coefficient=cmd["sparsity"],
                l1_warm_up_steps=cmd["l1_warmup_steps"], decoder_init_norm=0.1, **common))
        if arch == "jumprelu":
            return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
                apply_b_dec_to_input=False, l0_coefficient=cmd["sparsity"], l0_warm_up_steps=cmd["l1_warmup_steps"],
                jumprelu_init_threshold=0.1, jumprelu_bandwidth=0.1, jumprelu_ste_to_input=True,
                decoder_init_norm=1.0, **common))
        if arch == "topk":
            return TopKTrainingSAE(TopKTrainingSAEConfig(**topk, **common))
        if arch == "batchtopk":
            return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**topk, **common))
        if arch == "matryoshka":
            return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
                matryoshka_widths=cmd["prefixes"], **topk, **common))
        raise ValueError(f"no SAELens training class for {arch!r}")

    def train(cmd):
        x = data * cmd["scale"]  # the numbers our SAE sees after its input scaling
        B, steps = cmd["batch"], cmd["steps"]
        n_batches = x.shape[0] // B
        torch.manual_seed(cmd["seed"])
        sae = training_sae(cmd, x.shape[1])
        with torch.no_grad():  # start b_dec at the data mean, as build_sae does
            sae.b_dec.copy_(x[: 8 * B].mean(0))
        trainer_cfg = SAETrainerConfig(
            total_training_samples=steps * B, train_batch_size_samples=B, lr=cmd["lr"], lr_end=cmd["lr"],
            lr_warm_up_steps=cmd["lr_warmup_steps"], lr_decay_steps=cmd["lr_decay_steps"],
            adam_beta1=0.9, adam_beta2=0.999, device="cpu", dead_feature_window=cmd["dead_window_steps"],
            feature_sampling_window=10**9, n_checkpoints=0, save_final_checkpoint=False,
            logger=LoggingConfig(log_to_wandb=False))
        provider = (x[(s % n_batches) * B:(s % n_batches + 1) * B] for s in range(10**12))
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider)
        step_seconds = []
        step = trainer.step  # fit() calls self.step once per optimizer step: time each one

        def timed_step(batch):
            begun = time.perf_counter()
            try:
                return step(batch)
            finally:
                step_seconds.append(time.perf_counter() - begun)

        trainer.step = timed_step
        started = time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - started
        with torch.no_grad():
            held = x[-cmd["eval_rows"]:]
            recon = sae.decode(sae.encode(held))
            fvu = float((recon - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
            l0 = float((sae.encode(held) != 0).float().sum(-1).mean())
        return {"seconds": seconds, "tokens": steps * B, "fvu": fvu, "l0": l0, "step_seconds": step_seconds}

    def crosscheck(cmd):
        """Load a saved SAE; write encode(x), decode(encode(x)) and decode(f) for given x and f."""
        sae = SAE.load_from_disk(cmd["path"], device="cpu")
        x = torch.from_numpy(np.load(cmd["inputs"]))
        f_in = torch.from_numpy(np.load(cmd["features_in"]))
        with torch.no_grad():
            f = sae.encode(x)
            np.save(cmd["out_features"], f.numpy())
            np.save(cmd["out_recon"], sae.decode(f).numpy())
            np.save(cmd["out_decoded"], sae.decode(f_in).numpy())
        return {"class": type(sae).__name__, "architecture": sae.cfg.architecture()}

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "init":
                torch.set_num_threads(cmd["threads"])
                data = torch.from_numpy(np.load(cmd["data"])) if cmd.get("data") else None
                reply({"ok": True, "sae_lens": sae_lens.__version__, "torch": torch.__version__,
                       "threads": torch.get_num_threads()})
            elif cmd["op"] == "train":
                reply({"ok": True, **train(cmd)})
            elif cmd["op"] == "crosscheck":
                reply({"ok": True, **crosscheck(cmd)})
            elif cmd["op"] == "quit":
                reply({"ok": True})
                break
        except Exception as exc:  # reported to the parent, which decides
            import traceback
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
''')


def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> bool:
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(cmd)}\n")
        handle.flush()
        try:
            done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, env=env)
            return done.returncode == 0
        except subprocess.TimeoutExpired:
            handle.write(f"timed out after {timeout} s\n")
            return False


def ensure_saelens_venv(venv: Path) -> tuple[Path | None, str]:
    """The venv's python with sae_lens importable (creating the venv if needed), or None and why."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import sae_lens, torch; print(sae_lens.__version__, torch.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python, "reused"
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "install.log"
    print(f"creating the SAELens venv at {venv} (log: {log}) ...", flush=True)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    constraints = venv.parent / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    if not python.exists() and not _run([sys.executable, "-m", "venv", str(venv)], log, 300):
        return None, f"python -m venv failed (see {log})"
    pip = [str(python), "-m", "pip", "install", "-c", str(constraints)]
    if not _run(pip + [TORCH_PIN], log, 1200, env):
        return None, f"pip install {TORCH_PIN} failed, probably no network (see {log})"
    if not _run(pip + ["sae-lens"], log, 1800, env):
        return None, f"pip install sae-lens failed, probably no network (see {log})"
    if subprocess.run(probe, capture_output=True).returncode != 0:
        return None, f"sae_lens still does not import in {venv} (see {log})"
    return python, "created"


class Worker:
    """The SAELens process: JSON lines in, JSON lines out."""

    def __init__(self, python: Path, script: Path, threads: int) -> None:
        env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([str(python), str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the SAELens worker exited (code {self.proc.wait()})")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"SAELens worker: {answer.get('error')}\n{answer.get('trace', '')}")
        return answer

    def close(self) -> None:
        try:
            self.call(op="quit")
        except Exception:  # noqa: BLE001 (it may be gone already)
            pass
        self.proc.wait(timeout=30)


def start_worker(python: Path, tmp: Path, threads: int) -> Worker:
    """The SAELens worker process, its script written under `tmp`."""
    script = tmp / "saelens_worker.py"
    script.write_text(WORKER)
    return Worker(python, script, threads)


def load_check(worker: Worker, tmp: Path, archs, *, d: int = 32, width: int = 96, k: int = 6,
               rows: int = 256, seed: int = 0, d_out: int | None = None) -> dict[str, dict]:
    """`compare_with_saelens` for a random SAE of each architecture on random inputs (N(0, 1) plus
    an offset, so that every architecture has active features); with `d_out`, transcoders."""
    g = torch.Generator().manual_seed(seed + 1)
    x_ND = torch.randn(rows, d, generator=g) + 0.5 * torch.randn(d, generator=g)
    tag = "random-transcoder" if d_out else "random"
    return {arch: compare_with_saelens(worker, randomized_sae(arch, d, width, k=k, seed=seed, d_out=d_out),
                                       tmp / f"{tag}-{arch}", x_ND, tmp)
            for arch in archs}


def print_check(arch: str, r: dict) -> None:
    print(f"  {arch} -> {r['class']} ('{r['architecture']}'): max |features diff| {r['features']:.3e} (features up to "
          f"{r['feature_scale']:.3g}, {r['active']:.1f} active per row), max |reconstruction diff| "
          f"{r['reconstruction']:.3e}, max |decode(our f) diff| {r['decode']:.3e} (inputs up to "
          f"{r['input_scale']:.3g}), same active set {100 * r['same_support']:.3f} %; "
          f"{'all' if r['close'] else 'NOT all'} within rtol = atol = 1e-5")


def make_activations(rows: int, d: int, seed: int) -> np.ndarray:
    """(rows, d) float32: toy sparse-feature data (G = 4d directions) plus a constant offset."""
    data = make_toy_data(4 * d, d, seed=seed, mean_active=8.0)
    generator = torch.Generator().manual_seed(seed)
    x = torch.cat([toy_batch(data, 8192, generator) for _ in range(math.ceil(rows / 8192))])[:rows]
    offset = torch.randn(d, generator=generator)
    x = x + 2.0 * offset / offset.norm() * x.norm(dim=-1).mean()
    return x.numpy().astype(np.float32)


def sae_config(args: argparse.Namespace, point: DictionaryPoint) -> SaeConfig:
    """The library defaults, with LR warm-up, dead window and AuxK size fitted to the run (both sides)."""
    return SaeConfig(sweep=(point,), train_tokens=args.steps * args.batch, batch_size=args.batch,
                     learning_rate=args.lr, lr_warmup_steps=min(50, args.steps // 4), lr_decay_fraction=0.2,
                     l1_warmup_fraction=0.05, resample=False, checkpoint_every=10**9,
                     dead_after_tokens=args.dead_after_steps * args.batch, aux_k=args.d // 2)


def point_for(args: argparse.Namespace, arch: str) -> DictionaryPoint:
    sparsity = float(args.k) if arch in TOPK_FAMILY else args.l0 if arch == "jumprelu" else args.l1
    return DictionaryPoint(arch, args.width, sparsity)


@torch.no_grad()
def randomized_sae(arch: str, d: int, width: int, *, k: int = 4, seed: int = 0, input_scale: float = 2.5,
                   d_out: int | None = None):
    """An SAE of `arch` with every parameter and threshold random and input scale `input_scale`
    (so folding it into the exported weights is exercised), for checks of the saved layout;
    with `d_out` a transcoder to that width, its output scale 0.4."""
    point = DictionaryPoint(arch, width, float(k) if arch in TOPK_FAMILY else 0.5)
    sae = make_sae(point, d, SaeConfig(sweep=(point,)), d_out)
    g = torch.Generator().manual_seed(seed)
    for param in sae.parameters():
        param.copy_(torch.randn(param.shape, generator=g) * (d ** -0.5 if param.ndim == 2 else 0.3))
    if isinstance(sae, JumpReLUSae):
        sae.log_threshold.copy_(torch.log(0.05 + 0.5 * torch.rand(width, generator=g)))
    if isinstance(sae, BatchTopKSae):
        sae.threshold.fill_(0.3)
        sae.threshold_batches.fill_(1)
    sae.input_scale.fill_(input_scale)
    if sae.transcoder:
        sae.output_scale.fill_(0.4)
    return sae


def compare_with_saelens(worker: "Worker", sae, directory: Path, x_ND: torch.Tensor, tmp: Path) -> dict:
    """Save `sae` with save_sae, load it with SAELens' SAE.load_from_disk in the worker, and compare
    encode(x), decode(encode(x)) and decode(our f) on both sides; max abs differences and more."""
    tag = directory.name
    save_sae(sae, directory, hook_name="blocks.1.hook_resid_post",
             hook_name_out="blocks.1.hook_mlp_out" if sae.transcoder else None)
    sae = sae.cpu()
    with torch.no_grad():
        f_ND = sae.encode(x_ND)
        recon_ND = sae.decode(f_ND)
    paths = {name: tmp / f"{tag}-{name}.npy" for name in ("x", "f_in", "f", "recon", "decoded")}
    np.save(paths["x"], x_ND.numpy())
    np.save(paths["f_in"], f_ND.numpy())
    r = worker.call(op="crosscheck", path=str(directory), inputs=str(paths["x"]), features_in=str(paths["f_in"]),
                    out_features=str(paths["f"]), out_recon=str(paths["recon"]), out_decoded=str(paths["decoded"]))
    f_lens, recon_lens, decoded_lens = (torch.from_numpy(np.load(paths[n])) for n in ("f", "recon", "decoded"))
    close = all(torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
                for ours, theirs in ((f_ND, f_lens), (recon_ND, recon_lens), (recon_ND, decoded_lens)))
    return {"class": r["class"], "architecture": r["architecture"], "close": close,
            "features": float((f_ND - f_lens).abs().max()), "feature_scale": float(f_ND.abs().max()),
            "reconstruction": float((recon_ND - recon_lens).abs().max()),
            "decode": float((recon_ND - decoded_lens).abs().max()), "input_scale": float(x_ND.abs().max()),
            "same_support": float(((f_ND != 0) == (f_lens != 0)).float().mean()),
            "active": float((f_ND != 0).float().sum(-1).mean())}


def input_scale(args, arch: str, sample_ND: torch.Tensor) -> float:
    """The input scale build_sae gives our SAE (SAELens is fed data pre-multiplied by it)."""
    point = point_for(args, arch)
    return make_sae(point, sample_ND.shape[1], sae_config(args, point)).set_input_scale_from(sample_ND)


def train_ours(args, arch: str, x_ND: torch.Tensor, eval_rows: int) -> dict:
    point = point_for(args, arch)
    cfg = sae_config(args, point)
    train_ND = x_ND[:-eval_rows]
    n_batches = train_ND.shape[0] // args.batch

    def batches(start: int):
        for s in range(start, 10**12):
            i = s % n_batches
            yield train_ND[i * args.batch:(i + 1) * args.batch]

    torch.manual_seed(0)
    sae = build_sae(point, x_ND.shape[1], cfg, train_ND[: 8 * args.batch])
    step_seconds: list[float] = []
    original = training._one_step  # train_sae looks it up at call time: time each step

    def timed_step(*a, **kw):
        begun = time.perf_counter()
        try:
            return original(*a, **kw)
        finally:
            step_seconds.append(time.perf_counter() - begun)

    training._one_step = timed_step
    try:
        outcome = train_sae(sae, batches, cfg, point)
    finally:
        training._one_step = original
    with torch.no_grad():
        held = x_ND[-eval_rows:]
        recon, f = sae(held)
        fvu = float((recon - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    return {"tokens_per_second": outcome.tokens_per_second, "step_seconds": step_seconds, "fvu": fvu,
            "l0": float((f != 0).float().sum(-1).mean()),
            "sae": sae}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=60, help="steps per run (0 = one pass over the training rows)")
    parser.add_argument("--dead-after-steps", type=int, default=20,
                        help="a feature silent this many steps is dead (AuxK uses it; both sides)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--l1", type=float, default=1.0,
                        help="ReLU L1 coefficient (both libraries); the config default 5 kills every feature of this "
                             "toy data within 60 steps (in both), which times the same but shows nothing learnt")
    parser.add_argument("--l0", type=float, default=0.01, help="JumpReLU L0 coefficient (both libraries)")
    parser.add_argument("--k", type=int, default=32, help="k of TopK, BatchTopK and Matryoshka")
    parser.add_argument("--archs", default=",".join(ARCHS), help=f"comma-separated, of {', '.join(ARCHS)}")
    parser.add_argument("--saelens-sparse", action="store_true",
                        help="SAELens' TopK family with use_sparse_activations=True (torch.sparse decoder; default off "
                             "as in SAELens)")
    parser.add_argument("--load-check-only", action="store_true",
                        help="only the load cross-check of every architecture (random SAEs), no training")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0 = torch's default)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    archs = [a for a in args.archs.split(",") if a]
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        parser.error(f"--archs: unknown {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    eval_rows = 4096
    if not args.steps:
        args.steps = (args.rows - eval_rows) // args.batch

    python, how = ensure_saelens_venv(args.venv)
    if python is None:
        print(f"SAELens is unavailable: {how}")
        print("sae_train_vs_saelens: unavailable")
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench-saelens-"))
    worker = None
    try:
        worker = start_worker(python, tmp, threads)
        if args.load_check_only:
            info = worker.call(op="init", threads=threads)
            print(f"SAELens {info['sae_lens']}: random SAEs saved by save_sae, loaded by SAE.load_from_disk")
            for arch, r in load_check(worker, tmp, archs).items():
                print_check(arch, r)
            return 0
        x_ND = torch.from_numpy(make_activations(args.rows, args.d, seed=0))
        np.save(tmp / "acts.npy", x_ND[:-eval_rows].numpy())  # the worker trains on the same rows as we do
        info = worker.call(op="init", data=str(tmp / "acts.npy"), threads=threads)
        print(f"SAELens {info['sae_lens']} (torch {info['torch']}) in {args.venv} [{how}]; ours: torch "
              f"{torch.__version__}; threads {threads} / {info['threads']}")
        print(f"activations: {args.rows} x {args.d} (toy, {4 * args.d} directions + offset); width {args.width}, "
              f"batch {args.batch}, {args.steps} steps per run, lr {args.lr}, relu/gated l1 {args.l1}, jumprelu l0 "
              f"{args.l0}, k {args.k}{' (SAELens sparse activations)' if args.saelens_sparse else ''}; "
              f"{args.warmup} warm-up + {args.repeats} rounds, interleaved")

        scales = {arch: input_scale(args, arch, x_ND[: 8 * args.batch]) for arch in archs}
        last_ours: dict[str, object] = {}
        quality: dict[str, dict] = {}

        def ours(arch: str):
            def run() -> float:
                r = train_ours(args, arch, x_ND, eval_rows)
                last_ours[arch] = r["sae"]
                quality[f"ours-{arch}"] = r
                loop_rates[f"ours-{arch}"].append(r["tokens_per_second"])
                return args.batch / _common.median(r["step_seconds"])
            return run

        def theirs(arch: str):
            def run() -> float:
                cfg = sae_config(args, point_for(args, arch))
                point = point_for(args, arch)
                r = worker.call(op="train", arch=arch, scale=scales[arch], batch=args.batch, steps=args.steps,
                                width=args.width, sparsity=point.sparsity, k=args.k, lr=args.lr, seed=0,
                                prefixes=list(point.matryoshka_prefixes or ()), saelens_sparse=args.saelens_sparse,
                                l1_warmup_steps=int(cfg.l1_warmup_fraction * args.steps),
                                lr_warmup_steps=cfg.lr_warmup_steps,
                                lr_decay_steps=int(cfg.lr_decay_fraction * args.steps),
                                dead_window_steps=max(1, cfg.dead_after_tokens // args.batch),
                                aux_coefficient=cfg.aux_coefficient, eval_rows=eval_rows)
                quality[f"saelens-{arch}"] = r
                loop_rates[f"saelens-{arch}"].append(r["tokens"] / r["seconds"])
                return args.batch / _common.median(r["step_seconds"])
            return run

        loop_rates = {f"{side}-{arch}": [] for arch in archs for side in ("ours", "saelens")}
        pairs = {arch: (ours(arch), theirs(arch)) for arch in archs}
        rates = _common.paired_rounds(pairs, args.repeats, args.warmup)

        print(f"\n{'run':<18} {'tok/s (median step)':>20} {'min':>8} {'max':>8} {'tok/s (whole loop)':>19}   "
              f"final FVU / L0 (held-out rows)")
        for arch in archs:
            for side, values in zip(("ours", "saelens"), rates[arch]):
                name = f"{side}-{arch}"
                q, loop = quality[name], loop_rates[name][args.warmup:]
                print(f"{name:<18} {_common.median(values):20.0f} {min(values):8.0f} {max(values):8.0f} "
                      f"{_common.median(loop):19.0f}   {q['fvu']:.4f} / {q['l0']:.1f}")
        ratios = {}
        for arch in archs:
            per_round = [o / t for o, t in zip(*rates[arch])]
            ratios[arch] = _common.median(per_round)
            loop = [o / t for o, t in zip(loop_rates[f"ours-{arch}"], loop_rates[f"saelens-{arch}"])][args.warmup:]
            print(f"{arch}: ours / SAELens, median of per-round ratios = {ratios[arch]:.3f} (rounds: "
                  f"{', '.join(f'{r:.3f}' for r in per_round)}); whole-loop tokens/s: median ratio "
                  f"{_common.median(loop):.3f} (rounds: {', '.join(f'{r:.3f}' for r in loop)})")

        print("\ncross-check: our saved SAE loaded by SAELens' SAE.load_from_disk, held-out rows")
        for arch in archs:
            print_check(arch, compare_with_saelens(worker, last_ours[arch], tmp / f"ours-{arch}", x_ND[-eval_rows:],
                                                   tmp))

        headline = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios))
        print(f"\nheadline: geometric mean over {', '.join(archs)} of the median per-round ours/SAELens tokens/s ratio")
        print(f"sae_train_vs_saelens: {headline:.3f}")
    finally:
        if worker is not None:
            worker.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
