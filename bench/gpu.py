"""The GPU drill: the commands users run, on one GPU, at real model sizes, random-init from configs
(no network), in ONE call of at most 8 minutes; it writes bench/results/gpu-<device>-<date>.json and
prints a table.

    python -m bench.gpu                 # one H100/H200 (see bench/gpu_wheels.sh for a bare machine)
    python -m bench.gpu --tiny          # the same code on tiny models, on the CPU (the test suite runs it)

Each step is a real entry point in a subprocess, printed before it runs ($ …). A lent GPU comes for
minutes, rarely, so a failed step never stops the drill: every later step runs, a step that needs an
earlier one's output is marked "not run" (naming what it needed), and the drill ends with a table of
every step's outcome and the first lines of each failure's log, exiting non-zero if any step failed.
`--steps a,b` reruns only the named steps (and what they need); `--budget S` marks the steps that
would start after S seconds "not run", and stops a step still running a minute later, rather than
outlive the machine's lease (results file and table are written either way).

1. data: `python -m data_prep synthetic` and `python -m data_prep flickr8k`: Flickr8k-format shards
   of 256×256 JPEGs (decoded and cropped to 224 px by the loader, as real photos would be).
2. trainer: `torchrun --nproc-per-node 1 -m trainer` on configs/flickr8k.yaml with a random-init CLIP
   ViT-B/32 (`model.preset=vit-b-32`), bf16, under ZeRO-2 and ZeRO-3: a few hundred steps and a
   checkpoint, then `resume=auto` for a few more, then the export loaded with
   `transformers.CLIPModel.from_pretrained`. Reported from the run's own TensorBoard: samples/s,
   model FLOP utilisation against the card's dense bf16 peak, peak memory beside the ZeRO paper's
   model-state estimate ((2+2+K)·Ψ/N bytes, K=12 for Adam, N=1 GPU), and the data-wait fraction.
   2b. universal resume (`universal-zero2`, after `resume-zero2`): the ZeRO-2 run's last checkpoint
   resumed in a new run folder through DeepSpeed's universal checkpoint format, forced on one GPU with
   `deepspeed.overrides.checkpoint.load_universal=true`, with `train.grad_accum=2` (another layout: the
   interrupted epoch's rest read as a leg of its own, the global batch doubled and said so), a few
   steps, then the export. What one GPU proves: the conversion (`ds_to_universal`) and the universal
   load under CUDA and NCCL at world size 1 — the re-partitioning code, the Adam moments and step
   counters placed on the GPU for torch's fused AdamW, training on from them. What it cannot: the same
   checkpoint loaded by another number of ranks over NCCL needs two GPUs (the CPU tests run 2 → 1 and
   1 → 2 ranks over gloo: tests/test_resume_world.py).
3. text-to-image training: `torchrun --nproc-per-node 1 -m trainer` on configs/flickr8k-unet.yaml with
   random-init Stable Diffusion v1 parts (`diffusion.preset=sd-v1`: U-Net, VAE, ViT-L/14 text tower),
   512 px, bf16, ZeRO-2, gradient checkpointing, EMA: samples/s, peak memory, data-wait fraction.
4. sampler: `python -m sampler` on those parts, 512×512, 25 steps, fp16, batch 8 and batch 1, against
   diffusers' StableDiffusionPipeline on the same folder and settings in this process: images/s, ratio.
5. retrieval: `python -m retrieval caption` of the test split with the ViT-B/32 export: images/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import Target, flickr8k_prep, machine, slug, write_results

# Dense bf16 peak, TFLOP/s (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    """How big the drill runs: the real one on a GPU, or tiny on a CPU."""

    clip: str  # model.preset
    image: int  # side of the synthetic JPEGs
    train: int  # Flickr8k-format training images
    test: int
    batch: int  # per GPU
    steps: int  # optimizer steps before the checkpoint
    more: int  # steps after resume=auto
    workers: int
    diffusion: str  # the sampler's preset
    side: int  # sampler image side
    sample_steps: int
    prompts: int
    unet_batch: int  # the U-Net's training batch per GPU
    unet_steps: int


GPU = Size("vit-b-32", 256, 4096, 1024, 256, 60, 10, 8, "sd-v1", 512, 25, 16, 8, 30)
TINY = Size("tiny", 96, 64, 32, 16, 4, 2, 1, "tiny", 64, 2, 8, 4, 3)


class StepFailed(Exception):
    """A step that did not do its job; `detail` is what the table shows (the log's first lines)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass
class Outcome:
    step: str
    status: str  # "ok", "failed" or "not run"
    seconds: float = 0.0
    detail: str = ""


class Drill:
    def __init__(self, work: Path, size: Size, tiny: bool, budget: float = float("inf")) -> None:
        self.work, self.size, self.tiny, self.budget = work, size, tiny, budget
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self.outcomes: dict[str, Outcome] = {}
        self.started = time.perf_counter()
        self.manifest = work / "flickr8k" / "manifest.json"

    def attempt(self, step: str, action: Any, needs: tuple[str, ...] = ()) -> Any:
        """Run one step and record its outcome; never raises. A step whose `needs` did not all succeed,
        or that would start after the time budget, is "not run" and says why."""
        missing = [n for n in needs if n not in self.outcomes or self.outcomes[n].status != "ok"]
        elapsed = time.perf_counter() - self.started
        if missing:
            why = f"needs {', '.join(missing)}, which did not succeed"
            self.outcomes[step] = Outcome(step, "not run", detail=why)
        elif elapsed > self.budget:
            self.outcomes[step] = Outcome(step, "not run", detail=f"time budget of {self.budget:.0f} s spent")
        else:
            start = time.perf_counter()
            try:
                value = action()
            except StepFailed as err:
                self.outcomes[step] = Outcome(step, "failed", time.perf_counter() - start, err.detail)
            except Exception as err:  # a failure in the drill's own checks is a failed step, not the end
                detail = "".join(traceback.format_exception(err)[-6:])
                self.outcomes[step] = Outcome(step, "failed", time.perf_counter() - start, detail)
            else:
                self.outcomes[step] = Outcome(step, "ok", time.perf_counter() - start)
                return value
        outcome = self.outcomes[step]
        print(f"  {step}: {outcome.status.upper()}: {outcome.detail.splitlines()[0]}", flush=True)
        return None

    def run(self, step: str, args: list[str], timeout: float) -> str:
        """One real entry point, as a user runs it; its output goes to <work>/logs/<step>.log."""
        print(f"$ {' '.join(_short(a) for a in args)}", flush=True)
        log = self.work / "logs" / f"{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        timeout = min(timeout, max(10.0, self.budget + 60 - (start - self.started)))
        try:
            proc = subprocess.run(
                args, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as err:
            text = _text(err.stdout) + "\n" + _text(err.stderr)
            log.write_text(text)
            raise StepFailed(f"ran past {timeout:.0f} s\n{_failure_lines(text)}") from None
        text = proc.stdout + "\n" + proc.stderr
        log.write_text(text)
        if proc.returncode != 0:
            raise StepFailed(f"exit code {proc.returncode}\n{_failure_lines(text)}")
        print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
        return text

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

    # ------------------------------------------------------------------ 2. trainer

    def trainer_args(self, run_dir: Path, stage: int, steps: int) -> list[str]:
        s = self.size
        args = [
            *_torchrun(1),
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
            "run.log_every=10" if not self.tiny else "run.log_every=1",
            "eval.at_start=false",
            "eval.every_epochs=0",
            "checkpoint.at_epoch_end=false",
            "optim.warmup_steps=20",
        ]
        if self.tiny:  # the demo's tiny CLIP in fp32 (bf16 is slower than fp32 on CPUs)
            args += ["deepspeed.precision=fp32", "model.tiny.image_size=64", "model.tiny.patch_size=8"]
        return args

    def train(self, stage: int) -> None:
        self.run(
            f"train-zero{stage}", self.trainer_args(self.work / f"zero{stage}", stage, self.size.steps), 900
        )

    def resume(self, stage: int) -> None:
        s = self.size
        args = [*self.trainer_args(self.work / f"zero{stage}", stage, s.steps + s.more), "resume=auto"]
        resumed = self.run(f"resume-zero{stage}", args, 600)
        if f"step-{s.steps:08d}" not in resumed or "resumed from" not in resumed:
            raise StepFailed(f"did not resume from step {s.steps}\n{_failure_lines(resumed)}")

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
                raise StepFailed(f"the log lacks {needle!r}\n{_failure_lines(log)}")
        losses = _scalars(run_dir / "tensorboard").get("train/loss", {})
        after = [v for step, v in losses.items() if step > s.steps + s.more]
        if len(after) < s.more // 2 or not all(v == v and abs(v) < float("inf") for v in after):
            raise StepFailed(f"after the universal resume the losses are {after}")
        from transformers import CLIPModel

        CLIPModel.from_pretrained(run_dir / "export")
        return {"from_step": s.steps + s.more, "to_step": until, "losses_after": after}

    def export(self, stage: int) -> dict[str, Any]:
        """The export loads in plain transformers; the run's numbers from its own TensorBoard."""
        run_dir, s = self.work / f"zero{stage}", self.size
        print(f"$ transformers.CLIPModel.from_pretrained({_short(str(run_dir / 'export'))})", flush=True)
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(run_dir / "export")
        params = sum(p.numel() for p in clip.parameters())
        scalars = _scalars(run_dir / "tensorboard")
        return {
            "samples_per_s": _steady(scalars.get("perf/samples_per_s", {}), s.steps),
            "data_wait_fraction": _steady(scalars.get("perf/data_wait_fraction", {}), s.steps),
            "peak_memory_gib": max(scalars.get("perf/peak_memory_mb", {0: 0.0}).values()) / 1024,
            "parameters": params,
            "model_states_gib": 16 * params / 2**30,  # ZeRO paper §3: (2 + 2 + 12)·Ψ bytes on one GPU
            "flops_per_sample": train_flops_per_sample(s.clip, run_dir / "base-model", self.manifest),
            "exported_step": json.loads((run_dir / "export" / "export.json").read_text())["step"],
        }

    # ------------------------------------------------------------------ 3. text to image

    def unet(self) -> dict[str, Any]:
        """The U-Net training step at the sampler's size: configs/flickr8k-unet.yaml on a random-init
        preset (bf16, ZeRO-2, gradient checkpointing, EMA), evaluation off."""
        s = self.size
        run_dir = self.work / "unet"
        args = [
            *_torchrun(1),
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
        scalars = _scalars(run_dir / "tensorboard")
        return {
            "samples_per_s": _steady(scalars.get("perf/samples_per_s", {}), s.unet_steps),
            "data_wait_fraction": _steady(scalars.get("perf/data_wait_fraction", {}), s.unet_steps),
            "peak_memory_gib": max(scalars.get("perf/peak_memory_mb", {0: 0.0}).values()) / 1024,
        }

    def sample(self, batch: int) -> dict[str, float]:
        """`python -m sampler` against diffusers' pipeline on the same folder: the preset the U-Net step
        built, or (if that step failed before building it) one the sampler builds there itself."""
        s = self.size
        model = self.work / "unet" / "base-model"
        prompts = self.work / f"prompts-{batch}.txt"
        count = s.prompts if batch == 8 else max(2, s.prompts // 4)
        prompts.write_text("".join(f"a red circle number {i} on a grey background\n" for i in range(count)))
        folder = self.work / f"samples-b{batch}"
        self.run(
            f"sample-batch{batch}",
            [
                sys.executable,
                "-m",
                "sampler",
                "--config",
                "configs/sample.yaml",
                f"model={model}",
                f"preset={s.diffusion}",
                f"prompts=[{prompts}]",
                f"out_dir={folder}",
                f"batch_size={batch}",
                f"steps={s.sample_steps}",
                f"height={s.side}",
                f"width={s.side}",
                "guidance_scale=7.5",
                "scheduler=ddim",
                "contact_sheet=0",
                "tensorboard=false",
            ],
            900,
        )
        job = json.loads((folder / "summary.json").read_text())["images_per_s"]
        ours = steady_rate(folder / "manifest.jsonl", batch)
        theirs = diffusers_rate(model, batch, s)
        if torch_cuda():
            import torch

            torch.cuda.empty_cache()
        return {"ours": ours, "ours_whole_job": job, "diffusers": theirs, "ratio": ours / theirs}

    # ------------------------------------------------------------------ 4. retrieval

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

    # ------------------------------------------------------------------ the order

    def all(self, only: set[str] | None = None) -> dict[str, Any]:
        """Every step in order, each recorded; `only`: these steps, and what they need."""
        results: dict[str, Any] = {"trainer": {}, "sampler": {}}

        def step(name: str, action: Any, needs: tuple[str, ...] = ()) -> Any:
            if only is not None and name not in only:
                return None
            return self.attempt(name, action, needs)

        step("data-synthetic", lambda: self.data(0))
        step("data-flickr8k", lambda: self.data(1), ("data-synthetic",))
        for stage in (2, 3):
            step(f"train-zero{stage}", lambda st=stage: self.train(st), ("data-flickr8k",))
            step(f"resume-zero{stage}", lambda st=stage: self.resume(st), (f"train-zero{stage}",))
            r = step(f"export-zero{stage}", lambda st=stage: self.export(st), (f"resume-zero{stage}",))
            if r is not None:
                results["trainer"][f"zero{stage}"] = r
            if stage == 2:
                results["universal"] = step("universal-zero2", self.universal, ("resume-zero2",))
        results["unet"] = step("train-unet", self.unet, ("data-flickr8k",))
        for batch in (8, 1):
            r = step(f"sample-batch{batch}", lambda b=batch: self.sample(b))
            if r is not None:
                results["sampler"][f"batch{batch}"] = r
        exported = [f"export-zero{st}" for st in (2, 3) if self._ok(f"export-zero{st}")]
        source = exported[0] if exported else "export-zero2"
        export = self.work / source.removeprefix("export-") / "export"
        results["retrieval"] = step(
            "retrieval-caption", lambda: self.retrieval(export), ("data-flickr8k", source)
        )
        return results

    def _ok(self, step: str) -> bool:
        return step in self.outcomes and self.outcomes[step].status == "ok"


STEPS = (
    "data-synthetic data-flickr8k train-zero2 resume-zero2 export-zero2 universal-zero2 train-zero3 "
    "resume-zero3 export-zero3 train-unet sample-batch8 sample-batch1 retrieval-caption"
).split()
NEEDS = {  # what --steps adds for a step to have its inputs
    "data-flickr8k": ["data-synthetic"],
    "train-zero2": ["data-flickr8k"],
    "resume-zero2": ["train-zero2"],
    "export-zero2": ["resume-zero2"],
    "universal-zero2": ["resume-zero2"],
    "train-zero3": ["data-flickr8k"],
    "resume-zero3": ["train-zero3"],
    "export-zero3": ["resume-zero3"],
    "train-unet": ["data-flickr8k"],
    "retrieval-caption": ["export-zero2"],
}


def with_needs(steps: list[str]) -> set[str]:
    """The named steps and, transitively, the steps whose output they read."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise SystemExit(
            f"bench.gpu: --steps: unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}"
        )
    out: set[str] = set()
    todo = list(steps)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += NEEDS.get(name, [])
    return out


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "trainer",
    ]


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _failure_lines(text: str, count: int = 12) -> str:
    """The lines of a log that say what went wrong: from the first error-looking line, else its end."""
    lines = [line for line in text.splitlines() if line.strip()]
    markers = ("Traceback", "Error", "error:", "FAILED", "Killed", "CUDA", "NCCL")
    first = next((i for i, line in enumerate(lines) if any(m in line for m in markers)), None)
    chosen = lines[first : first + count] if first is not None else lines[-count:]
    if lines and lines[-1] not in chosen:  # a traceback's last line is its message
        chosen += ["…", *lines[-3:]]
    return "\n".join(chosen)


def _short(arg: str) -> str:
    return arg.replace(str(ROOT) + "/", "").replace(sys.executable, "python")


def _scalars(tb: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _steady(values: dict[int, float], last: int) -> float:
    """The median over the logged steps of the first run, leaving out the first log window (warm-up)."""
    steady = [v for step, v in sorted(values.items()) if step <= last][1:] or list(values.values())
    return statistics.median(steady) if steady else float("nan")


def train_flops_per_sample(preset: str, base_model: Path, manifest: Path) -> float:
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


def steady_rate(manifest: Path, batch: int) -> float:
    """Images/s of the sampler's batches after its first (the first pays CUDA's warm-up: kernel
    selection, cuBLAS handles), from each image's pipeline seconds in the run's manifest.jsonl: the
    rate a bulk job runs at, as diffusers' is timed after a warm-up call. The whole job's rate is
    reported beside it (on the H200 run of 2026-12-04, 16 images: 1.52 against 4.78 for diffusers)."""
    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    later = records[batch:] or records
    return len(later) / sum(r["seconds"] for r in later)


def diffusers_rate(model: Path, batch: int, size: Size) -> float:
    """diffusers' StableDiffusionPipeline on the same folder and settings: images/s (after a warm-up)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    print(
        f"$ diffusers.StableDiffusionPipeline.from_pretrained({_short(str(model))}), batch {batch}",
        flush=True,
    )
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        model, dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of a red circle number {i} on a grey background" for i in range(batch)]

    def once() -> float:
        start = time.perf_counter()
        pipe(
            prompts,
            num_inference_steps=size.sample_steps,
            guidance_scale=7.5,
            height=size.side,
            width=size.side,
            output_type="pil",
        )
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    return batch / min(once() for _ in range(2))


def table(results: dict[str, Any], outcomes: list[Outcome], peak: float) -> tuple[str, list[Target]]:
    lines = [f"device: {results['device']}; dense bf16 peak {peak:g} TFLOP/s"]
    if results["trainer"]:
        lines.append(
            f"{'trainer (contrastive, bf16, 1 GPU)':36s} {'samples/s':>10s} {'MFU':>7s} {'peak GiB':>9s} {'states GiB':>10s} {'data-wait':>9s}"
        )
    for stage, r in results["trainer"].items():
        lines.append(
            f"  {results['clip']} {stage:27s} {r['samples_per_s']:10.1f} {r['mfu']:7.1%} {r['peak_memory_gib']:9.2f} "
            f"{r['model_states_gib']:10.2f} {r['data_wait_fraction']:9.0%}"
        )
    u = results.get("unet")
    if u:
        lines.append(
            f"U-Net training step ({results['sampler_size']}, bf16, ZeRO-2, 1 GPU): {u['samples_per_s']:.1f} samples/s, "
            f"peak {u['peak_memory_gib']:.1f} GiB, data-wait {u['data_wait_fraction']:.0%}"
        )
    smp = results["sampler"]
    targets = [
        Target(f"sampler / StableDiffusionPipeline, batch {b[5:]}", r["ratio"], 0.97) for b, r in smp.items()
    ]
    if smp:
        lines.append(
            f"sampler ({results['sampler_size']}, {results['sampler_steps']} steps), images/s: ours vs diffusers"
        )
    for b, r in smp.items():
        lines.append(
            f"  batch {b[5:]}: {r['ours']:.2f} vs {r['diffusers']:.2f} (whole job, warm-up included: {r['ours_whole_job']:.2f})"
        )
    lines += [t.line() for t in targets]
    uni = results.get("universal")
    if uni:
        lines.append(
            f"universal resume (ZeRO-2, 1 GPU, grad_accum 1 → 2): converted and loaded at step {uni['from_step']}, "
            f"trained to step {uni['to_step']}, the export loads"
        )
    ret = results.get("retrieval")
    if ret:
        lines.append(
            f"retrieval caption ({ret['export']} export): {ret['images_per_s']:.1f} images/s over {ret['images']} images"
        )
    lines.append(f"{'step':20s} {'outcome':8s} {'seconds':>8s}")
    for o in outcomes:
        lines.append(
            f"  {o.step:18s} {o.status:8s} {o.seconds:8.1f}"
            + (f"  {o.detail.splitlines()[0]}" if o.detail else "")
        )
    for o in outcomes:
        if o.status == "failed":
            lines.append(f"--- {o.step} failed:")
            lines += ["    " + line for line in o.detail.splitlines()[:16]]
    return "\n".join(lines), targets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models on the CPU: the same steps, for the tests"
    )
    parser.add_argument(
        "--out", default="", help="results file or folder (default bench/results/gpu-<device>-<date>.json)"
    )
    parser.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    parser.add_argument("--logs", default="", help="also keep every step's log in this .tar.gz")
    parser.add_argument(
        "--steps",
        default="",
        help=f"comma-separated steps to run (with what they need); all: {','.join(STEPS)}",
    )
    parser.add_argument(
        "--budget", type=float, default=float("inf"), help="seconds after which no further step starts"
    )
    args = parser.parse_args()
    only = with_needs([s for s in args.steps.split(",") if s]) if args.steps else None
    import torch

    from plumbing.logs import quiet_hf_progress

    quiet_hf_progress()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no CUDA device; on a CPU run `python -m bench.gpu --tiny`")
    size = TINY if args.tiny else GPU
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else machine()["cpu"]
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device), float("nan"))
    with tempfile.TemporaryDirectory(dir=args.work or None) as tmp:
        drill = Drill(Path(tmp), size, args.tiny, args.budget)
        results = drill.all(only)
        for r in results["trainer"].values():
            r["mfu"] = (
                r["samples_per_s"] * r["flops_per_sample"] / (peak * 1e12) if peak == peak else float("nan")
            )
        results.update(
            device=device,
            clip=size.clip,
            sampler_size=f"{size.side}×{size.side}",
            sampler_steps=size.sample_steps,
            seconds=time.perf_counter() - drill.started,
            steps={
                o.step: {"status": o.status, "seconds": o.seconds, "detail": o.detail}
                for o in drill.outcomes.values()
            },
        )
        if args.logs and (drill.work / "logs").is_dir():
            with tarfile.open(args.logs, "w:gz") as tar:
                tar.add(drill.work / "logs", arcname="logs")
    outcomes = list(drill.outcomes.values())
    text, targets = table(results, outcomes, peak)
    print(text)
    date = datetime.date.today().isoformat()
    name = f"gpu-{slug(device)}-{date}" if not args.tiny else f"gpu-tiny-{date}"
    out = args.out or ("" if not args.tiny else tempfile.gettempdir())
    path = write_results(
        name, results, targets, text, str(Path(out) / f"{name}.json") if Path(out).is_dir() else out
    )
    print(f"wrote {path}")
    failed = [o.step for o in outcomes if o.status == "failed"]
    if failed:
        raise SystemExit(f"bench.gpu: {len(failed)} of {len(outcomes)} steps failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
