"""The drill's table, targets and results file, and its command line."""

from __future__ import annotations

import argparse
import datetime
import math
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Target, machine, slug, write_results
from bench.gpu.drill import GPU, PEAK_TFLOPS, ROOT, TINY, Outcome
from bench.gpu.sampler import details
from bench.gpu.steps import STEPS, Drill, with_needs


def targets(results: dict[str, Any]) -> list[Target]:
    """The issue's targets, from what ran (a step that did not run has no target line)."""
    out = []
    z2, peer = results["trainer"].get("zero2"), results.get("openclip")
    if z2 and peer:
        out.append(
            Target(
                "CLIP samples/s / open_clip's (same GPU, batch)",
                z2["samples_per_s"] / peer["samples_per_s"],
                1.2,
            )
        )
    step = results.get("clip_step")
    if step:
        mfu = step["batches"].get("256", {}).get("mfu", math.nan)
        if mfu == mfu:
            out.append(Target("ViT-B/32 MFU at batch 256 (step alone)", mfu, 0.15))
    waits = {
        "cpu": z2 and z2["data_wait_in_epoch"],
        "gpu": (results.get("decode_gpu") or {}).get("data_wait_in_epoch"),
    }
    waits = {k: v for k, v in waits.items() if v is not None and v == v}
    if waits:
        best = min(waits, key=lambda k: waits[k])
        out.append(Target(f"data-wait within epochs, data.decode={best}", waits[best], 0.05, at_least=False))
    out += [
        Target(f"sampler / StableDiffusionPipeline, batch {b[5:]}", r["ratio"], 0.97)
        for b, r in results["sampler"].items()
    ]
    if results.get("unet_step"):
        out.append(Target("U-Net step / bare diffusers-style loop", results["unet_step"]["ratio"], 0.95))
    return out


def table(results: dict[str, Any], outcomes: list[Outcome], peak: float) -> tuple[str, list[Target]]:
    lines = [f"device: {results['device']}; dense bf16 peak {peak:g} TFLOP/s"]
    if results["trainer"]:
        lines.append(
            f"{'trainer (contrastive, bf16, 1 GPU)':36s} {'samples/s':>10s} {'MFU':>7s} {'peak GiB':>9s} "
            f"{'states GiB':>10s} {'data-wait':>9s} {'in epoch':>9s} {'memory':>8s}"
        )
    for stage, r in results["trainer"].items():
        lines.append(
            f"  {results['clip']} {stage:27s} {r['samples_per_s']:10.1f} {r['mfu']:7.1%} {r['peak_memory_gib']:9.2f} "
            f"{r['model_states_gib']:10.2f} {r['data_wait_fraction']:9.0%} {r['data_wait_in_epoch']:9.0%} "
            f"{'table' if r.get('memory') else '-':>8s}"
        )
    dev = results.get("decode_gpu")
    if dev:
        lines.append(
            f"  {results['clip']} zero2, data.decode=gpu         {dev['samples_per_s']:10.1f} {'':7s} {'':9s} {'':10s} "
            f"{dev['data_wait_fraction']:9.0%} {dev['data_wait_in_epoch']:9.0%}"
        )
    peer = results.get("openclip")
    if peer:
        lines.append(f"  open_clip 3.3.0's trainer, same shards and batch   {peer['samples_per_s']:10.1f}")
    step = results.get("clip_step")
    if step:
        lines.append("CLIP step alone (in-memory batches, ZeRO-2): batch, samples/s, MFU")
        for batch, r in step["batches"].items():
            lines.append(f"  {batch:>5s} {r['samples_per_s']:10.1f} {r['mfu']:7.1%}")
        bare, zero0 = step["bare"], step["zero0"]
        lines.append(
            f"  harness under ZeRO-0, batch {zero0['batch']}: {zero0['samples_per_s']:.1f} samples/s"
        )
        lines.append(
            f"  bare loop (autocast, fused AdamW), batch {bare['batch']}: {bare['samples_per_s']:.1f} samples/s"
        )
        for name, p in (("harness", step["profile"]), ("bare loop", bare["profile"])):
            busy = p["gpu_busy_fraction"]
            lines.append(
                f"  profile, {name}: {p['wall_ms_per_step']:.1f} ms/step, GPU busy {busy:.0%}, host CPU "
                f"{p['host_cpu_ms_per_step']:.1f} ms/step, {p['syncs_per_step']:.1f} host waits/step"
            )
        lines += [f"    {k['ms_per_step']:7.2f} ms  {k['name']}" for k in step["profile"]["top_kernels"][:5]]
    u, us = results.get("unet"), results.get("unet_step")
    if us:
        lines.append(
            f"U-Net training step ({results['sampler_size']}, ZeRO-2): harness {us['harness']:.1f} samples/s, "
            f"bare loop {us['bare']:.1f}"
        )
    if u:
        lines.append(
            f"U-Net run (bf16, ZeRO-2, 1 GPU, with its loader): {u['samples_per_s']:.1f} samples/s, "
            f"peak {u['peak_memory_gib']:.1f} GiB, data-wait {u['data_wait_fraction']:.0%}"
        )
    if results["sampler"]:
        lines.append(
            f"sampler ({results['sampler_size']}, {results['sampler_steps']} steps), images/s: ours vs diffusers"
        )
        lines += details(results["sampler"])
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
    lines += memory_tables(results)
    goals = targets(results)
    lines += [t.line() for t in goals]
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
    return "\n".join(lines), goals


def main() -> None:
    from bench.gpu import __doc__ as doc

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    parser.add_argument(
        "--openclip-site",
        default=str(ROOT / ".peer-site"),
        help="a folder holding open_clip 3.3.0 and its trainer's imports (pip install --target; bench/gpu_wheels.sh)",
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
        results = drill.all(only, peak, Path(args.openclip_site))
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
    text, goals = table(results, outcomes, peak)
    print(text)
    date = datetime.date.today().isoformat()
    name = f"gpu-{slug(device)}-{date}" if not args.tiny else f"gpu-tiny-{date}"
    out = args.out or ("" if not args.tiny else tempfile.gettempdir())
    path = write_results(
        name, results, goals, text, str(Path(out) / f"{name}.json") if Path(out).is_dir() else out
    )
    print(f"wrote {path}")
    failed = [o.step for o in outcomes if o.status == "failed"]
    if failed:
        raise SystemExit(f"bench.gpu: {len(failed)} of {len(outcomes)} steps failed: {', '.join(failed)}")


def memory_tables(results: dict[str, Any]) -> list[str]:
    """Each run's per-phase memory (the trainer's memory.json) beside the plan it made before launch."""
    from trainer.memory.recorder import table as memory_table

    runs = [(f"CLIP {stage}", r.get("memory")) for stage, r in results["trainer"].items()]
    runs.append(("U-Net run", (results.get("unet") or {}).get("memory")))
    lines: list[str] = []
    for name, payload in runs:
        if payload:
            lines.append(f"{name}:")
            lines += [f"  {line}" for line in memory_table(payload).splitlines()]
    return lines
