"""The drill's CLIP steps: the data, the trainer as users run it (ZeRO-2 and ZeRO-3, resume, universal
resume, export), the step measured alone (batch sweep, profile, bare loop), open_clip's own trainer
on the same shards, and retrieval with the export."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.common import flickr8k_prep
from bench.gpu.drill import (
    ROOT,
    Base,
    StepFailed,
    failure_lines,
    memory_record,
    scalars,
    short,
    steady,
    torchrun,
)
from bench.peer_openclip import WORKER, Shape, shard_pattern
from bench.peer_openclip import scalars as timed_scalars

# open_clip 3.3.0 and what its trainer imports that this project's environment lacks (its training
# extra's webdataset<=0.2.86 shadows ours in its own runs only). bench/gpu_wheels.sh carries them.
OPENCLIP = (
    "open_clip_torch==3.3.0",
    "webdataset==0.2.86",
    "ftfy==6.3.1",
    "wcwidth==0.9.5",
    "pandas==3.1.1",
    "python-dateutil==2.9.0.post0",
    "six==1.17.0",
    "tzdata==2025.2",
)


class Clip(Base):
    # ------------------------------------------------------------------ 1. data

    def data_commands(self) -> list[list[str]]:
        s = self.size
        sizes = [f"synthetic.flickr_{k}={v}" for k, v in (("train", s.train), ("dev", 16), ("test", s.test))]
        sides = [f"synthetic.flickr_width={s.image}", f"synthetic.flickr_height={s.image}"]
        return flickr8k_prep(
            self.work / "raw",
            self.manifest.parent,
            *sizes,
            *sides,
            shard_size=max(s.train // 16, 8),
            workers=max(1, s.workers),
        )

    def data(self, index: int) -> None:
        step = ("data-synthetic", "data-flickr8k")[index]
        self.run(step, [sys.executable, "-m", "data_prep", *self.data_commands()[index]], 600)

    # ------------------------------------------------------------------ 2. the trainer

    def trainer_args(self, run_dir: Path, stage: int, steps: int) -> list[str]:
        """configs/flickr8k.yaml on the drill's shards, with open_clip's augmentation (a random resized
        crop of 0.9–1 of the picture: its default) so that both trainers do the same loader work."""
        s = self.size
        args = [
            *torchrun(1),
            "--config",
            "configs/flickr8k.yaml",
            f"model.preset={s.clip}",
            f"data.manifest={self.manifest}",
            f"run.dir={run_dir}",
            f"deepspeed.zero_stage={stage}",
            f"train.batch_size={s.batch}",
            f"train.max_steps={steps}",
            "train.epochs=1000",
            f"data.workers={s.workers}",
            "data.shuffle_buffer=500",
            "data.random_crop=true",
            "data.crop_scale_min=0.9",
            "run.log_every=10" if not self.tiny else "run.log_every=1",
            "eval.at_start=false",
            "eval.every_epochs=0",
            "checkpoint.at_epoch_end=false",
            "optim.warmup_steps=20",
        ]
        if self.tiny:  # the demo's tiny CLIP in fp32 (bf16 is slower than fp32 on CPUs)
            args += ["deepspeed.precision=fp32", "model.tiny.image_size=64", "model.tiny.patch_size=8"]
        return args

    def train(self, stage: int, steps: int = 0) -> None:
        run_dir = self.work / f"zero{stage}"
        self.run(f"train-zero{stage}", self.trainer_args(run_dir, stage, steps or self.size.steps), 900)

    def resume(self, stage: int) -> None:
        s = self.size
        args = [*self.trainer_args(self.work / f"zero{stage}", stage, s.steps + s.more), "resume=auto"]
        resumed = self.run(f"resume-zero{stage}", args, 600)
        if f"step-{s.steps:08d}" not in resumed or "resumed from" not in resumed:
            raise StepFailed(f"did not resume from step {s.steps}\n{failure_lines(resumed)}")

    def universal(self) -> dict[str, Any]:
        """The ZeRO-2 run's newest checkpoint resumed through DeepSpeed's universal format (forced: one
        GPU cannot change the number of ranks) with grad_accum 2, in a run folder of its own."""
        s = self.size
        source = self.work / "zero2" / "checkpoints" / f"step-{s.steps + s.more:08d}"
        run_dir, until = self.work / "zero2-universal", s.steps + s.more + s.more
        args = [
            *self.trainer_args(run_dir, 2, until),
            f"resume={source}",
            "train.grad_accum=2",
            "deepspeed.overrides.checkpoint.load_universal=true",
        ]
        log = self.run("universal-zero2", args, 600)
        for needle in (
            "converted ",
            "through DeepSpeed's universal checkpoint",
            "global batch ",
            "export verified",
        ):
            if needle not in log:
                raise StepFailed(f"the log lacks {needle!r}\n{failure_lines(log)}")
        losses = scalars(run_dir / "tensorboard").get("train/loss", {})
        after = [v for step, v in losses.items() if step > s.steps + s.more]
        if len(after) < s.more // 2 or not all(v == v and abs(v) < float("inf") for v in after):
            raise StepFailed(f"after the universal resume the losses are {after}")
        from transformers import CLIPModel

        CLIPModel.from_pretrained(run_dir / "export")
        return {"from_step": s.steps + s.more, "to_step": until, "losses_after": after}

    def export(self, stage: int) -> dict[str, Any]:
        """The export loads in plain transformers; the run's numbers from its own TensorBoard (the first
        run's steps: a resume's first window pays its start-up again)."""
        run_dir, s = self.work / f"zero{stage}", self.size
        print(f"$ transformers.CLIPModel.from_pretrained({short(str(run_dir / 'export'))})", flush=True)
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(run_dir / "export")
        params = sum(p.numel() for p in clip.parameters())
        tb = scalars(run_dir / "tensorboard")
        return {
            "samples_per_s": steady(tb.get("perf/samples_per_s", {}), s.steps),
            "data_wait_fraction": steady(tb.get("perf/data_wait_fraction", {}), s.steps),
            "data_wait_in_epoch": self.in_epoch(tb.get("perf/data_wait_fraction", {}), s.steps),
            "peak_memory_gib": max(tb.get("perf/peak_memory_mb", {0: 0.0}).values()) / 1024,
            "parameters": params,
            "model_states_gib": 16 * params / 2**30,  # ZeRO paper §3: (2 + 2 + 12)·Ψ bytes on one GPU
            "flops_per_sample": self.flops(stage),
            "exported_step": json.loads((run_dir / "export" / "export.json").read_text())["step"],
            "memory": memory_record(run_dir),  # the trainer's per-phase peaks beside its plan (issue 31)
        }

    def decode_on_device(self) -> dict[str, Any]:
        """The ZeRO-2 run again with data.decode=gpu (nvJPEG in the training process, the workers only
        reading headers): samples/s and the data-wait fraction beside the workers' decoding."""
        run_dir, steps = self.work / "zero2-decode-gpu", max(2, self.size.steps // 2)
        self.run("train-decode-gpu", [*self.trainer_args(run_dir, 2, steps), "data.decode=gpu"], 900)
        tb = scalars(run_dir / "tensorboard")
        return {
            "samples_per_s": steady(tb.get("perf/samples_per_s", {}), steps),
            "data_wait_fraction": steady(tb.get("perf/data_wait_fraction", {}), steps),
            "data_wait_in_epoch": self.in_epoch(tb.get("perf/data_wait_fraction", {}), steps),
        }

    def in_epoch(self, waits: dict[int, float], last: int) -> float:
        """The data-wait of the log windows that hold no epoch start: this drill's epochs are short (16
        steps of 256 on one GPU), and each starts fresh loader workers that must each make a first
        batch; a data set of hundreds of steps an epoch pays that rarely."""
        s, every = self.size, 1 if self.tiny else 10
        per_epoch = max(1, s.train // (max(1, s.workers) * s.batch)) * max(1, s.workers)
        starts = {e * per_epoch + 1 for e in range(last // per_epoch + 1)}
        kept = [
            v
            for step, v in waits.items()
            if step <= last and not starts & set(range(step - every + 1, step + 1))
        ]
        return statistics.median(kept) if kept else float("nan")

    def flops(self, stage: int = 2) -> float:
        return train_flops_per_sample(self.work / f"zero{stage}" / "base-model", self.manifest)

    # ------------------------------------------------------------------ 3. the step alone

    def clip_step(self, peak: float) -> dict[str, Any]:
        """bench/gpu/clip_step.py on the ZeRO-2 run's model: the batch sweep, the profile, the bare loop."""
        args = [
            sys.executable,
            "-m",
            "bench.gpu.clip_step",
            "--model",
            str(self.work / "zero2" / "base-model"),
            "--manifest",
            str(self.manifest),
            "--batches",
            ",".join(map(str, self.size.sweep)),
            "--flops",
            str(self.flops()),
            "--peak",
            str(peak),
            *(["--tiny", "--steps", "3"] if self.tiny else ["--steps", "10"]),
        ]
        return self.run_json("clip-step", args, 300)

    # ------------------------------------------------------------------ 4. open_clip

    def openclip(self, site: Path) -> dict[str, Any]:
        """open_clip 3.3.0's own trainer (its `main`, through bench/peer_openclip.py's launcher) on the
        same shards, batch, precision and augmentation, its `--dataset-resampled` loader with as many
        workers: its steady samples/s from its TensorBoard events' wall times."""
        if not (site / "open_clip").is_dir():
            raise StepFailed(
                f"open_clip is not installed in {site}: bash bench/gpu_wheels.sh carries it to a GPU "
                f"machine; here: pip install --target {site} {' '.join(OPENCLIP)}"
            )
        s, run_dir = self.size, self.work / "openclip"
        pattern, _ = shard_pattern(self.manifest)
        steps = s.steps if self.tiny else 40  # its start-up is the long part; steady from step 10
        options = [
            f"--train-data={pattern}",
            "--dataset-type=webdataset",
            "--dataset-resampled",
            f"--train-num-samples={steps * s.batch}",
            f"--batch-size={s.batch}",
            f"--workers={s.workers}",
            "--lr=1e-5",
            "--wd=0.2",
            "--warmup=20",
            "--grad-clip-norm=1.0",
            "--epochs=1",
            f"--log-every-n-steps={1 if self.tiny else 10}",
            "--report-to=tensorboard",
            f"--logs={self.work}",
            "--name=openclip",
            "--seed=0",
        ]
        if self.tiny:
            folder = self.work / "openclip-model"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "open_clip_config.json").write_text(json.dumps(Shape().openclip()))
            options += [f"--model=local-dir:{folder}", "--precision=fp32", "--device=cpu"]
        else:
            options += ["--model=ViT-B-32", "--precision=amp_bf16"]
        spec = self.work / "openclip-args.json"
        spec.write_text(json.dumps(options, indent=1))
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=1",
            str(ROOT / "bench" / "peer_openclip.py"),
            WORKER,
            str(spec),
        ]
        env = {**self.env, "PYTHONPATH": os.pathsep.join([str(site), self.env["PYTHONPATH"]])}
        if self.tiny:
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        self.run("openclip", launcher, 600, env)
        try:
            events = timed_scalars(run_dir / "tensorboard", "train/samples_per_second")
        except SystemExit as err:  # its message names the folder and the tags it found
            raise StepFailed(str(err)) from None
        steady_events = events[1:] if len(events) > 2 else events
        first, last = steady_events[0], steady_events[-1]
        rate = (last[0] - first[0]) * s.batch / (last[1] - first[1]) if last[0] > first[0] else float("nan")
        return {
            "samples_per_s": rate,
            "logged_samples_per_s": statistics.median(v for _, _, v in steady_events),
            "steps": events[-1][0] + 1,
        }

    # ------------------------------------------------------------------ 5. retrieval

    def retrieval(self, export: Path) -> dict[str, Any]:
        out = self.work / "captions"
        self.run(
            "retrieval-caption",
            [
                sys.executable,
                "-m",
                "retrieval",
                "caption",
                "--export",
                str(export),
                "--manifest",
                str(self.manifest),
                "--split",
                "test",
                "--bank",
                str(self.manifest),
                "--out",
                str(out),
                "batch_size=256",
                "contact_sheets=0",
            ],
            600,
        )
        summary = json.loads((out / "summary.json").read_text())
        return {
            "images_per_s": summary["images_per_s"],
            "images": summary["records"],
            "export": export.parent.name,
        }


def train_flops_per_sample(base_model: Path, manifest: Path) -> float:
    """6 × (non-embedding parameters) × tokens + attention (12 × layers × width × tokens²) per tower
    (PaLM appendix B), with the text tower's tokens as the run really had them (captions are padded
    to the batch's longest, not to 77)."""
    from transformers import CLIPConfig, CLIPTokenizer

    from core.manifest import load_manifest
    from core.shards import captions_of, read_split

    config = CLIPConfig.from_pretrained(base_model)
    tokenizer = CLIPTokenizer.from_pretrained(base_model)
    captions = [
        c
        for sample, _ in zip(read_split(load_manifest(manifest), "test"), range(64))
        for c in captions_of(sample)
    ]
    text_tokens = statistics.mean(len(ids) for ids in tokenizer(captions, truncation=True)["input_ids"])
    v, t = config.vision_config, config.text_config
    total = 0.0
    for tower, tokens in ((v, (v.image_size // v.patch_size) ** 2 + 1), (t, text_tokens)):
        d, layers, ff = tower.hidden_size, tower.num_hidden_layers, tower.intermediate_size
        total += 6 * layers * (4 * d * d + 2 * d * ff) * tokens + 12 * layers * d * tokens * tokens
    return total
