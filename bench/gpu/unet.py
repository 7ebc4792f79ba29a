"""The drill's U-Net steps: the harness's training step against a bare diffusers-style loop on the
same parts (bench/train_diffusion.py, in-memory batches, no checkpoint), and the real entry point
(configs/flickr8k-unet.yaml) with its loader, checkpoint and export."""

from __future__ import annotations

import sys
from typing import Any

from bench.gpu.drill import Base, memory_record, scalars, steady, torchrun

# configs/flickr8k-unet.yaml's settings that shape the step, for both loops of bench/train_diffusion.py
UNET_SETTINGS = ("diffusion.gradient_checkpointing=true", "diffusion.ema_decay=0.9999")


class Unet(Base):
    def unet_step(self) -> dict[str, Any]:
        """bench/train_diffusion.py on the sampler's parts (built there first): samples/s of both."""
        s = self.size
        args = [
            sys.executable,
            "-m",
            "bench.train_diffusion",
            "--model",
            str(self.work / "sd"),
            "--preset",
            s.diffusion,
            "--batch",
            str(s.unet_batch),
            "--steps",
            "4" if self.tiny else "10",
            "--repeat",
            "1",
            "--set",
            f"diffusion.resolution={s.side}",
            *(() if self.tiny else UNET_SETTINGS),
        ]
        out = self.run_json("unet-step", args, 420)
        rate = out["results"]
        return {"harness": rate["harness"], "bare": rate["bare"], "ratio": rate["harness"] / rate["bare"]}

    def unet(self) -> dict[str, Any]:
        """The U-Net training run at the sampler's size: configs/flickr8k-unet.yaml on a random-init
        preset (bf16, ZeRO-2, gradient checkpointing, EMA), evaluation off; its checkpoint and export
        at the end (a ZeRO-2 checkpoint of SD v1's U-Net with Adam's moments is ~14 GB)."""
        s = self.size
        run_dir = self.work / "unet"
        args = [
            *torchrun(1),
            "--config",
            "configs/flickr8k-unet.yaml",
            f"diffusion.preset={s.diffusion}",
            "diffusion.model=''",
            "diffusion.text_encoder=''",
            "diffusion.eval_clip=''",
            f"data.manifest={self.manifest}",
            f"run.dir={run_dir}",
            f"train.batch_size={s.unet_batch}",
            f"train.max_steps={s.unet_steps}",
            "train.epochs=1000",
            f"data.workers={s.workers}",
            f"diffusion.resolution={s.side}",
            "run.log_every=5" if not self.tiny else "run.log_every=1",
            "eval.at_start=false",
            "eval.every_epochs=0",
            "checkpoint.at_epoch_end=false",
            "checkpoint.every_steps=0",
        ]
        if self.tiny:
            args += ["deepspeed.precision=fp32", "diffusion.gradient_checkpointing=false"]
        self.run("train-unet", args, 900)
        tb = scalars(run_dir / "tensorboard")
        return {
            "samples_per_s": steady(tb.get("perf/samples_per_s", {}), s.unet_steps),
            "data_wait_fraction": steady(tb.get("perf/data_wait_fraction", {}), s.unet_steps),
            "peak_memory_gib": max(tb.get("perf/peak_memory_mb", {0: 0.0}).values()) / 1024,
            "memory": memory_record(run_dir),
        }
