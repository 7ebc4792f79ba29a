"""Benchmark: the trainer's step as its loop runs it, against a bare PyTorch loop; and how long a real
run waits for its data.

    python -m bench.train_overhead [--steps 40] [--repeat 3] [--out FILE]

1. Step time, 1 rank, the same in-memory batches: a bare loop (forward, loss, backward, clip, torch's
   fused AdamW, LR schedule: the same work done the plain way, the clip with foreach) against the
   trainer's own `Loop.epoch` over those batches — the micro-step with its guard (trainer/guard.py),
   the monitor (TensorBoard every 10 steps), the counters; checkpoints and evaluation off — under
   ZeRO-0, 1 and 2. Runners take turns; the best epoch of `--repeat` counts, the spread of the
   per-round ratios is printed beside it. Two models:
   - the demo's tiny CLIP at batch 64 (arithmetic and host work both matter). Target: ≤ 1.05;
   - the host's share alone: ViT-B/32's structure (12 + 12 layers, 403 parameter tensors, 50 image
     tokens of 224 px / 32, captions of the real length) at width 64 and batch 2, where the
     arithmetic a GPU would do is negligible and what is left is Python, dispatch and per-tensor
     bookkeeping — what decides whether a GPU's queue stays full. Target: ≤ 1.10.
2. The data pipeline, from a real run: `python -m trainer` (1 rank, the demo's loader workers) on the
   demo-size synthetic Flickr8k shards; its own perf/data_wait_fraction (the share of step time spent
   waiting for the loader). Target: ≤ 0.05 (the loader keeps up).
Writes bench/results/train_overhead-<cpu>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import Target, flickr8k_prep, machine, slug, write_results
from bench.harness import QUIET, TrainerLoop
from plumbing.config import load_config
from plumbing.dist import DistInfo, init_process_group
from plumbing.logs import setup_logging
from trainer.config import TrainConfig
from trainer.engine import adamw, lr_lambda, param_groups
from trainer.run import RunFolder
from trainer.tasks import make_task
from trainer.tasks.clip.objective import contrastive_loss

ROOT = Path(__file__).resolve().parents[1]
STAGES = (0, 1, 2)


@dataclass(frozen=True)
class Model:
    """A model the step is timed on: the tiny preset shaped by `tiny` (model.tiny.* overrides)."""

    name: str
    batch: int
    tiny: tuple[str, ...]
    bound: float

    @property
    def image(self) -> int:
        return int(next(t for t in self.tiny if t.startswith("image_size=")).split("=")[1])


MODELS = (
    Model(
        "tiny CLIP",
        64,
        ("image_size=64", "patch_size=8", "width=64", "text_width=32", "layers=2", "heads=4"),
        1.05,
    ),
    Model(
        "ViT-B/32 host share",
        2,
        (
            "image_size=224",
            "patch_size=32",
            "width=64",
            "text_width=64",
            "layers=12",
            "heads=8",
            "projection_dim=512",
            "max_length=77",
        ),
        1.10,
    ),
)


def batches(task: Any, n: int, batch: int, image_size: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    texts = [f"A red circle on the left on a black background number {i} ." for i in range(batch)]
    tokens = task.collate.tokenize(texts)
    return [
        {
            "pixel_values": torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g).byte(),
            "keys": [str(i) for i in range(batch)],
            "skipped": 0,
            **tokens,
        }
        for _ in range(n)
    ]


class BareLoop:
    """The same training step written plainly: normalise, forward, loss, backward, clip, AdamW, schedule."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, steps: int, normalise: Any) -> None:
        self.model, self.clip, self.normalise = model, cfg.optim.grad_clip, normalise
        o = cfg.optim
        self.opt = adamw(param_groups(model, o.weight_decay), o)  # the trainer's own optimizer
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(o.warmup_steps, steps, 0.0))

    def epoch(self, data: list[dict[str, Any]]) -> None:
        for batch in data:
            image, text, scale = self.model(
                self.normalise(batch["pixel_values"]), batch["input_ids"], batch["attention_mask"]
            )
            loss = contrastive_loss(image.float(), text.float(), scale.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)


def step_times(
    cfg: TrainConfig, run: RunFolder, data: list[dict[str, Any]], repeat: int, warm: int, batch: int
) -> dict[str, list[float]]:
    """Seconds per step of each runner, one per round (runners take turns in every round), the first
    `warm` batches of each epoch run but not timed."""
    runners: dict[str, Any] = {}
    for stage in STAGES:
        cfg.deepspeed.zero_stage = stage
        runners[f"zero{stage}"] = TrainerLoop(cfg, run, f"zero{stage}-{batch}", batch)
    torch.manual_seed(0)
    task = runners["zero0"].task
    runners["bare"] = BareLoop(task.build(), cfg, len(data), task.collate.normalise)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeat):
        for name, runner in runners.items():
            runner.epoch(data[:warm])
            start = time.perf_counter()
            runner.epoch(data[warm:])
            times[name].append((time.perf_counter() - start) / (len(data) - warm))
    return times


def ratios(times: dict[str, list[float]], stage: int) -> tuple[float, float, float]:
    """Best over best, and the lowest and highest of the per-round ratios."""
    rounds = [t / b for t, b in zip(times[f"zero{stage}"], times["bare"], strict=True)]
    return min(times[f"zero{stage}"]) / min(times["bare"]), min(rounds), max(rounds)


def data_wait(manifest: Path, run_dir: Path, steps: int, workers: int) -> float:
    """A real 1-rank run of the demo's Flickr8k config: its own median perf/data_wait_fraction."""
    args = [
        sys.executable,
        "-m",
        "trainer",
        "--config",
        str(ROOT / "configs/demo-flickr8k.yaml"),
        f"data.manifest={manifest}",
        f"run.dir={run_dir}",
        f"train.max_steps={steps}",
        "run.log_every=5",
        f"data.workers={workers}",
        "eval.at_start=false",
        "eval.every_epochs=0",
        "run.verify_export=false",
    ]
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True, text=True)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    waits = [e.value for e in acc.Scalars("perf/data_wait_fraction")][1:]  # past the first window's start-up
    return statistics.median(waits)


def synthetic(root: Path) -> Path:
    """The demo's Flickr8k-format set (3,000 training images of 160×120), through the real commands."""
    from data_prep.cli import main as prep

    out = root / "flickr8k"
    for argv in flickr8k_prep(root / "raw", out, shard_size=500):
        with contextlib.redirect_stdout(io.StringIO()):
            if prep(argv) != 0:
                raise SystemExit("data_prep failed")
    return out / "manifest.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="loader workers of the real run (the demo's)")
    parser.add_argument("--run-steps", type=int, default=60, help="optimizer steps of the real run")
    parser.add_argument("--manifest", default="", help="shards for the real run (default: make the demo's)")
    parser.add_argument(
        "--out", default="", help="results file (default bench/results/train_overhead-<cpu>.json)"
    )
    args = parser.parse_args()
    setup_logging()
    init_process_group(DistInfo.from_env({}))
    warm = min(5, args.steps // 2)
    measured: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = Path(args.manifest) if args.manifest else synthetic(root)
        for index, model in enumerate(MODELS):
            overrides = [
                f"run.dir={root}/run{index}",
                f"data.manifest={manifest}",
                f"train.batch_size={model.batch}",
                *QUIET,
                *(f"model.tiny.{t}" for t in model.tiny),
            ]
            cfg = load_config(TrainConfig, ROOT / "configs/demo-flickr8k.yaml", overrides)
            run = RunFolder(Path(cfg.run.dir))
            task = make_task(cfg, run, DistInfo.from_env({}), "cpu")
            data = batches(task, args.steps, model.batch, model.image)
            measured[model.name] = step_times(cfg, run, data, args.repeat, warm, model.batch)
        wait = data_wait(manifest, root / "real", args.run_steps, args.workers)
    targets, lines = [], []
    for model in MODELS:
        times = measured[model.name]
        lines.append(
            f"step time, 1 rank, {model.name} ({', '.join(model.tiny)}), batch {model.batch} "
            f"({args.steps - warm} timed steps, "
            f"best of {args.repeat}; ratio: best / best, per-round range)"
        )
        lines.append(f"  {'bare PyTorch loop':24s} {min(times['bare']) * 1000:7.1f} ms")
        for stage in STAGES:
            best, low, high = ratios(times, stage)
            lines.append(
                f"  {f'trainer loop, ZeRO-{stage}':24s} {min(times[f'zero{stage}']) * 1000:7.1f} ms"
                f"   {best:.3f} ({low:.3f}–{high:.3f})"
            )
            targets.append(Target(f"{model.name}: ZeRO-{stage} / bare", best, model.bound, at_least=False))
    targets.append(
        Target(f"real run's data-wait fraction ({args.workers} worker)", wait, 0.05, at_least=False)
    )
    text = "\n".join(
        [
            *lines,
            f"data: a real 1-rank run, {args.run_steps} steps: median data-wait fraction {wait:.3f}",
            *[t.line() for t in targets],
        ]
    )
    print(text)
    results = {"step_s": measured, "data_wait_fraction": wait}
    name = f"train_overhead-{slug(machine()['cpu'])}"
    print(f"wrote {write_results(name, results, targets, text, args.out)}")


if __name__ == "__main__":
    main()
