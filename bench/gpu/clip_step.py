"""The CLIP training step on one device, measured where it decides: the harness's own loop (ZeRO-2,
the config's precision) over in-memory batches of each batch size of a sweep, beside the harness under
ZeRO-0 and a bare loop at the middle one (fp32 weights, bf16 autocast on CUDA, torch's fused AdamW, clip
with foreach: open_clip's way of training, the best plain way), and a torch.profiler summary of a few
steady steps of the harness and of the bare loop.

    python -m bench.gpu.clip_step --model DIR --manifest FILE --batches 64,256,512 --out FILE [--tiny]

Batches hold random uint8 pixels and the shards' own test captions (their real length): no loader, so
the numbers are the step's alone (the real run's data-wait is measured by the drill's trainer steps).
Reported per batch: samples/s, model FLOP utilisation against the card's dense bf16 peak; for the
profiled steps: the GPU's busy fraction (kernel time over wall time), the top kernels, the host's CPU
time per step (time.thread_time of the training thread), and the host waits per step (CUDA
synchronisations: cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize calls).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def batches(task: Any, captions: list[str], batch: int, count: int, pin: bool) -> list[dict[str, Any]]:
    """`count` batches of random uint8 pictures at the task's crop and the shards' captions."""
    g = torch.Generator().manual_seed(batch)
    h, w = task.prep.evaluation.crop
    out = []
    for i in range(count):
        texts = [captions[(i * batch + j) % len(captions)] for j in range(batch)]
        b = {
            "pixel_values": torch.randint(0, 256, (batch, 3, h, w), generator=g).byte(),
            "keys": [str(j) for j in range(batch)],
            "skipped": 0,
            **task.collate.tokenize(texts),
        }
        out.append({k: v.pin_memory() if pin and isinstance(v, torch.Tensor) else v for k, v in b.items()})
    return out


class BareLoop:
    """open_clip's training step written plainly on the same model: fp32 weights under bf16 autocast
    (on CUDA), the contrastive loss, clip, fused AdamW."""

    def __init__(self, task: Any, cfg: Any, device: str) -> None:
        from trainer.engine import adamw, param_groups

        torch.manual_seed(0)
        self.model = task.build().to(device)
        self.task, self.device, self.clip = task, device, cfg.optim.grad_clip
        self.opt = adamw(param_groups(self.model, cfg.optim.weight_decay), cfg.optim)
        self.cuda = device.startswith("cuda")

    def epoch(self, data: list[dict[str, Any]]) -> None:
        from trainer.tasks.clip.objective import contrastive_loss

        for batch in data:
            pixels = self.task.collate.normalise(batch["pixel_values"].to(self.device, non_blocking=True))
            ids = batch["input_ids"].to(self.device, non_blocking=True)
            mask = batch["attention_mask"].to(self.device, non_blocking=True)
            with torch.autocast("cuda", torch.bfloat16, enabled=self.cuda):
                image, text, scale = self.model(pixels, ids, mask)
                loss = contrastive_loss(image.float(), text.float(), scale.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def timed(
    epoch: Callable[[list[dict[str, Any]]], None], data: list[dict[str, Any]], warm: int, cuda: bool
) -> float:
    """Seconds per step over `data[warm:]`, the device drained before and after."""
    epoch(data[:warm])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    epoch(data[warm:])
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(data) - warm)


def profile(
    epoch: Callable[[list[dict[str, Any]]], None], data: list[dict[str, Any]], cuda: bool
) -> dict[str, Any]:
    """torch.profiler over `data` (after a warm-up pass outside it): GPU busy fraction, top kernels,
    host CPU time and synchronisations per step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    epoch(data[:2])
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    if cuda:
        torch.cuda.synchronize()
    host = time.thread_time()
    start = time.perf_counter()
    with profiler(activities=activities) as prof:
        epoch(data)
        if cuda:
            torch.cuda.synchronize()
    wall, host = time.perf_counter() - start, time.thread_time() - host
    events = prof.key_averages()
    steps = len(data)
    kernels = [
        e for e in events if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)
    ]
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 / wall if cuda else float("nan")
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:8]
    syncs = sum(e.count for e in events if e.key in SYNCS)
    return {
        "steps": steps,
        "wall_ms_per_step": 1000 * wall / steps,
        "host_cpu_ms_per_step": 1000 * host / steps,
        "gpu_busy_fraction": busy,
        "syncs_per_step": syncs / steps,
        "top_kernels": [
            {
                "name": e.key[:90],
                "ms_per_step": e.self_device_time_total / 1000 / steps,
                "calls_per_step": e.count / steps,
            }
            for e in top
        ],
        "top_host_ops": [
            {"name": e.key[:90], "ms_per_step": e.self_cpu_time_total / 1000 / steps}
            for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a CLIP folder (the drill's base-model)")
    parser.add_argument("--manifest", required=True, help="shards whose test captions the batches use")
    parser.add_argument("--batches", default="64,256,512")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per batch size")
    parser.add_argument("--tiny", action="store_true", help="fp32 on the CPU")
    parser.add_argument("--flops", type=float, default=float("nan"), help="training FLOP per sample")
    parser.add_argument("--peak", type=float, default=float("nan"), help="the device's dense bf16 TFLOP/s")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from bench.harness import QUIET, TrainerLoop
    from core.manifest import load_manifest
    from core.shards import captions_of, read_split
    from plumbing.config import load_config
    from plumbing.dist import DistInfo, init_process_group
    from plumbing.logs import quiet_hf_progress, setup_logging
    from trainer.config import TrainConfig
    from trainer.run import RunFolder

    setup_logging()
    quiet_hf_progress()
    device = init_process_group(DistInfo.from_env({}))
    cuda = device.startswith("cuda")
    sizes = [int(b) for b in args.batches.split(",")]
    captions = [
        c
        for s, _ in zip(read_split(load_manifest(Path(args.manifest)), "test"), range(256))
        for c in captions_of(s)
    ]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "batches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"run.dir={tmp}",
            f"data.manifest={args.manifest}",
            f"model.name={args.model}",
            "model.preset=''",
            "deepspeed.zero_stage=2",
            f"deepspeed.precision={'fp32' if args.tiny or not cuda else 'bf16'}",
            "run.log_every=10",
            *QUIET,
        ]
        cfg = load_config(TrainConfig, ROOT / "configs/flickr8k.yaml", overrides)
        middle = sizes[len(sizes) // 2]
        harness = TrainerLoop(cfg, RunFolder(Path(tmp)), "zero2", max(sizes), device)
        warm = 5
        for batch in sizes:
            data = batches(harness.task, captions, batch, warm + args.steps, cuda)
            seconds = timed(harness.epoch, data, warm, cuda)
            rate = batch / seconds
            out["batches"][str(batch)] = {
                "samples_per_s": rate,
                "mfu": rate * args.flops / (args.peak * 1e12),
            }
            print(f"batch {batch}: {rate:.1f} samples/s", flush=True)
            if batch == middle:
                out["profile"] = profile(harness.epoch, data[:5], cuda)
        cfg.deepspeed.zero_stage = 0  # one GPU partitions nothing: what ZeRO-2's bookkeeping costs
        zero0 = TrainerLoop(cfg, RunFolder(Path(tmp)), "zero0", middle, device)
        data = batches(zero0.task, captions, middle, warm + args.steps, cuda)
        out["zero0"] = {"batch": middle, "samples_per_s": middle / timed(zero0.epoch, data, warm, cuda)}
        bare = BareLoop(harness.task, cfg, device)
        data = batches(bare.task, captions, middle, warm + args.steps, cuda)
        out["bare"] = {"batch": middle, "samples_per_s": middle / timed(bare.epoch, data, warm, cuda)}
        out["bare"]["profile"] = profile(bare.epoch, data[:5], cuda)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
