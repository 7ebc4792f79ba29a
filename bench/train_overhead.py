"""Benchmark: the trainer's step against a bare PyTorch loop, and the data pipeline against the trainer.

    python -m bench.train_overhead [--steps 40] [--repeat 3]

1. Step time, 1 rank, same tiny CLIPFineTuner, batch, AdamW, LR schedule, gradient clipping and the
   same in-memory batches: a bare loop (forward, loss, backward, clip, step) against the trainer's
   own micro-step (DeepSpeed engine, the cross-rank finiteness/signal check, bookkeeping) under
   ZeRO-0 and ZeRO-2. Target (issue #3): ratio ≤ 1.05.
2. The data pipeline alone (manifest-planned WebDataset epoch with decoding and preprocessing, the
   demo's loader workers) against what the trainer consumes per second. Target: ≥ 2×.
Runs interleave and the best of `--repeat` counts, so that load from elsewhere hits all alike.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from plumbing.config import load_config
from plumbing.dist import DistInfo, init_process_group
from plumbing.logs import setup_logging
from trainer.config import TrainConfig
from trainer.engine import BatchSizes, build_engine, lr_lambda, param_groups
from trainer.objectives import contrastive_loss
from trainer.tiny import build_tiny_clip

BATCH = 64


def batches(n: int, tokenizer: Any, image_size: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    texts = [f"a red circle number {i}" for i in range(BATCH)]
    tokens = tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    return [
        {"pixel_values": torch.randn(BATCH, 3, image_size, image_size, generator=g), **tokens}
        for _ in range(n)
    ]


class BareLoop:
    """The same training step written plainly: forward, loss, backward, clip, AdamW, schedule."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        self.model, self.cfg = model, cfg
        self.opt = torch.optim.AdamW(
            param_groups(model, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg.optim.warmup_steps, 1000, 0.0))

    def micro_step(self, batch: dict[str, torch.Tensor]) -> None:
        image, text, scale = self.model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        loss = contrastive_loss(image.float(), text.float(), scale.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


class TrainerStep:
    """The trainer's own Loop.micro_step on an engine, without the data, checkpoint and eval parts."""

    def __init__(self, engine: Any, cfg: TrainConfig) -> None:
        from trainer.train import Loop, StopSignals

        self.engine, self.cfg, self.device, self.dtype = engine, cfg, "cpu", torch.float32
        self.state = type("State", (), {"step": 0, "micro_in_epoch": 0, "epoch": 0})()
        self.signals, self.class_prompts = StopSignals(), None
        self.micro_step = Loop.micro_step.__get__(self)
        self.loss = Loop.loss.__get__(self)


def interleaved(runners: dict[str, Any], data: list[dict[str, torch.Tensor]], warm: int) -> dict[str, float]:
    """Median step time of each runner, taking turns step by step so that any load from elsewhere
    falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i, batch in enumerate(data):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.micro_step(batch)
            if i >= warm:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=2, help="loader workers for the pipeline part (one per core here)"
    )
    parser.add_argument(
        "--manifest", default="", help="shards for the loader part (default: make small synthetic ones)"
    )
    args = parser.parse_args()
    setup_logging()
    init_process_group(DistInfo.from_env())
    from trainer.model import build_finetuner, load_processors

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = args.manifest or str(_synthetic(root))
        cfg = load_config(
            TrainConfig,
            Path("configs/demo-flickr8k.yaml"),
            [f"run.dir={root}/run", f"data.manifest={manifest}", f"train.batch_size={BATCH}"],
        )
        build_tiny_clip(root / "clip", cfg.model.tiny)
        tokenizer, processor = load_processors(str(root / "clip"))
        cfg.data.workers = args.workers
        rate = loader_rate(cfg, tokenizer, processor)  # first, in a process that has no engine yet
        data = batches(args.steps, tokenizer, cfg.model.tiny.image_size)
        warm = 5

        def fresh() -> torch.nn.Module:
            torch.manual_seed(0)
            return build_finetuner(cfg.model, str(root / "clip"))

        runners: dict[str, Any] = {"bare": BareLoop(fresh(), cfg)}
        for stage in (0, 2):
            cfg.deepspeed.zero_stage = stage
            engine = build_engine(
                fresh(), cfg.model, cfg.deepspeed, cfg.optim, BatchSizes(BATCH, 1, 1), 1000, False
            )
            runners[f"zero{stage}"] = TrainerStep(engine, cfg)
        results: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeat):
            for name, median in interleaved(runners, data, warm).items():
                results[name].append(median)
        best = {k: min(v) for k, v in results.items()}
        print(
            f"step time, 1 rank, tiny CLIP, batch {BATCH} (median of {args.steps - warm} steps, best of {args.repeat})"
        )
        print(f"  {'bare PyTorch loop':24s} {best['bare'] * 1000:7.1f} ms   1.00")
        for stage in (0, 2):
            ratio = best[f"zero{stage}"] / best["bare"]
            print(
                f"  {f'trainer, ZeRO-{stage}':24s} {best[f'zero{stage}'] * 1000:7.1f} ms   {ratio:.3f}   (target <= 1.05)"
            )
        consumed = BATCH / best["zero2"]
        print(
            f"data pipeline (demo-flickr8k shards and preprocessing, 1 rank, {args.workers} loader workers)"
        )
        print(f"  {'trainer consumes':24s} {consumed:7.0f} samples/s")
        print(f"  {'loader delivers':24s} {rate:7.0f} samples/s   {rate / consumed:.2f}x   (target >= 2)")


def _synthetic(root: Path) -> Path:
    """The demo's Flickr8k-format set (3,000 training images of 160×120), shards of 500."""
    from data_prep.cli import main as prep

    raw, out = root / "raw", root / "flickr8k"
    small_cifar = ["synthetic.cifar_per_batch=10", "synthetic.cifar_test=10"]
    for argv in (
        ["synthetic", "--out", str(raw), "--quiet", *small_cifar],
        [
            "flickr8k",
            "--images",
            str(raw / "Flickr8k_Dataset.zip"),
            "--captions",
            str(raw / "Flickr8k_text.zip"),
            "--out",
            str(out),
            "--shard-size",
            "500",
            "--quiet",
        ],
    ):
        with contextlib.redirect_stdout(io.StringIO()):
            if prep(argv) != 0:
                raise SystemExit("data_prep failed")
    return out / "manifest.json"


def loader_rate(cfg: TrainConfig, tokenizer: Any, processor: Any) -> float:
    from data_prep.manifest import load_manifest
    from trainer.data import Collate, TrainData

    manifest = load_manifest(Path(cfg.data.manifest))
    collate = Collate(tokenizer, 32, True, processor)
    data = TrainData(cfg.data, manifest, 0, 1, BATCH, 1, 0, collate, processor, False)
    best = 0.0
    for epoch in range(3):
        start, n = time.perf_counter(), 0
        for batch in data.epoch(epoch, 0):
            n += len(batch["keys"])
        best = max(best, n / (time.perf_counter() - start))
    return best


if __name__ == "__main__":
    main()
