"""Benchmark: the harness's U-Net training step against a bare PyTorch loop doing the same work.

    python -m bench.train_diffusion [--steps 20] [--repeat 3] [--batch 32] [--model DIR [--preset P]]
                                    [--set diffusion.gradient_checkpointing=true ...] [--out FILE]

Both train the same U-Net (the tiny preset, or `--model` for any diffusers folder, e.g. a random-init
`sd-v1` preset on a GPU, built there first with `--preset sd-v1`), with the same frozen VAE and text
encoder, batch, precision (fp32 on CPU, bf16 on CUDA), settings (`--set`: the task's config keys, e.g.
configs/flickr8k-unet.yaml's gradient checkpointing and EMA, which the bare loop then does too) and
in-memory batches, 1 rank. The bare loop is diffusers' examples/text_to_image inner loop: VAE latents,
noise, timesteps, add_noise, text states, U-Net, MSE, backward, clip, AdamW, LR schedule (and the EMA
update). The harness is `trainer.loop.Loop` with the denoising task under ZeRO-2 (its micro-step,
guard, monitor and counters; no checkpoints or evaluation). Target: ≥ 0.95 of the bare loop's
samples/s. Also printed: the share of the bare step spent in the VAE encode.
Writes bench/results/train_diffusion-<device>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import Target, machine, slug, write_results
from bench.harness import QUIET, TrainerLoop
from core.presets import TinyConfig, TinyDiffusionConfig, build_diffusion, is_built
from plumbing.config import load_config
from plumbing.dist import DistInfo, init_process_group
from plumbing.logs import setup_logging
from trainer.config import TrainConfig
from trainer.engine import adamw, lr_lambda, param_groups
from trainer.run import RunFolder
from trainer.tasks.diffusion.data import to_unit_range
from trainer.tasks.diffusion.ema import Ema
from trainer.tasks.diffusion.objective import denoising_loss

ROOT = Path(__file__).resolve().parents[1]


class BareLoop:
    """diffusers' examples/text_to_image inner loop, written plainly on the same parts."""

    def __init__(self, task: Any, cfg: TrainConfig, device: str, dtype: torch.dtype) -> None:
        self.task, self.device, self.dtype = task, device, dtype
        module = task.build().to(device, dtype)
        self.unet, self.text = module.unet, module.text_encoder
        self.vae = task.vae.to(device, dtype)
        o = cfg.optim
        self.opt = adamw(param_groups(self.unet, o.weight_decay), o)  # the trainer's own optimizer
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(o.warmup_steps, 10**6, 0.0))
        self.clip, self.vae_seconds = o.grad_clip, 0.0
        decay = cfg.diffusion.ema_decay
        self.ema = Ema(self.unet, decay, 0) if decay else None  # the task's own EMA, as it updates it

    def epoch(self, data: list[dict[str, Any]]) -> None:
        for i, batch in enumerate(data):
            g = torch.Generator(self.device).manual_seed(i)
            start = time.perf_counter()
            with torch.no_grad():
                pixels = to_unit_range(batch["pixel_values"].to(self.device), self.dtype)
                posterior = self.vae.encode(pixels).latent_dist
                latents = posterior.sample(generator=g).float() * self.vae.config.scaling_factor
                hidden = self.text(batch["input_ids"].to(self.device))[0]
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.vae_seconds += time.perf_counter() - start

            def predict(noisy: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor = hidden) -> torch.Tensor:
                return self.unet(noisy.to(self.dtype), t, encoder_hidden_states=hidden).sample

            loss = denoising_loss(self.task.noise, latents, predict, g, self.task.prediction)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.clip, foreach=True)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()


def batches(task: Any, n: int, batch: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    ids = task.collate.tokenize(
        [f"A red circle on the left on a black background number {i} ." for i in range(batch)]
    )
    return [
        {
            "pixel_values": torch.randint(0, 256, (batch, 3, task.side, task.side), generator=g).byte(),
            "input_ids": ids,
            "keys": [str(i) for i in range(batch)],
            "skipped": 0,
        }
        for _ in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--model", default="", help="a diffusers folder (default: the tiny preset, built here)"
    )
    parser.add_argument("--preset", default="", help="build this preset into --model first, unless it is")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for both loops (key=value)")
    parser.add_argument(
        "--out", default="", help="results file (default bench/results/train_diffusion-<device>.json)"
    )
    args = parser.parse_args()
    setup_logging()
    device = init_process_group(DistInfo.from_env({}))
    precision = "bf16" if device.startswith("cuda") else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = Path(args.model) if args.model else root / "tiny"
        preset = args.preset or ("" if args.model else "tiny")
        if preset and not is_built(model, preset, TinyDiffusionConfig(), TinyConfig()):
            build_diffusion(model, preset, TinyDiffusionConfig(), TinyConfig())
        overrides = [
            f"run.dir={root}/run",
            "data.manifest=none",
            "train.objective=denoising",
            f"diffusion.model={model}",
            f"deepspeed.precision={precision}",
            "deepspeed.zero_stage=2",
            "optim.lr=1e-4",
            *QUIET,
            *args.set,
        ]
        cfg = load_config(TrainConfig, None, overrides)
        harness = TrainerLoop(cfg, RunFolder(root / "run"), "harness", args.batch, device)
        data = batches(harness.task, args.steps, args.batch)
        bare = BareLoop(harness.task, cfg, device, dtype)
        warm = min(3, args.steps // 2)
        best = {"bare": float("inf"), "harness": float("inf")}
        for _ in range(args.repeat):
            for name, runner in (("bare", bare), ("harness", harness)):
                runner.epoch(data[:warm])
                bare.vae_seconds = 0.0
                start = time.perf_counter()
                runner.epoch(data[warm:])
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - start) / (args.steps - warm)
                if name == "bare" and seconds < best["bare"]:
                    vae_share = bare.vae_seconds / (args.steps - warm) / seconds
                best[name] = min(best[name], seconds)
    rate = {name: args.batch / s for name, s in best.items()}
    targets = [Target("harness / bare loop, samples/s", rate["harness"] / rate["bare"], 0.95)]
    text = "\n".join(
        [
            f"U-Net training step, 1 rank, {precision}, batch {args.batch}, {harness.task.side}px "
            f"({args.steps - warm} timed steps, best of {args.repeat})",
            f"  {'bare loop (diffusers example)':32s} {rate['bare']:8.1f} samples/s",
            f"  {'harness, ZeRO-2':32s} {rate['harness']:8.1f} samples/s",
            f"  VAE encode (and text states): {vae_share:.1%} of the bare step",
            *[t.line() for t in targets],
        ]
    )
    print(text)
    name = f"train_diffusion-{slug(machine().get('gpu', machine()['cpu']))}"
    print(f"wrote {write_results(name, {**rate, 'vae_share': vae_share}, targets, text, args.out)}")


if __name__ == "__main__":
    main()
