"""Benchmark: where each rank's memory goes, phase by phase, at real model shapes under ZeRO 0, 2
and 3 on 2 CPU ranks, with the memory plan made before launch beside it.

    python -m bench.memory --rows vit-b-32:0,vit-b-32:2,vit-b-32:3 [--out FILE]
    python -m bench.memory --rows vit-l-14:0,vit-l-14:2,vit-l-14:3
    python -m bench.memory --rows sd-v1:0,sd-v1:2,sd-v1:3

A row is a model shape and a ZeRO stage, fp32. vit-b-32 (151 M parameters: batch 8, 4 steps) and
vit-l-14 (428 M: batch 2, 2 steps) are the contrastive CLIP task on random-init OpenAI shapes;
sd-v1 is Stable Diffusion v1's U-Net (860 M) with its ViT-L/14 text encoder (frozen) and VAE (frozen,
beside the engine), 64-px images, gradient checkpointing, no EMA, batch 2, 2 steps. For each row:

1. the plan: `python -m trainer --check --world-size 2` (what every launcher's pre-flight prints);
   a plan that does not fit this machine is not run (the row says so, with the plan's one line);
2. the run: the real trainer under torchrun, 2 ranks, a checkpoint, the export and its check; its
   own per-phase record (<run>/memory.json: each rank's peak resident set per phase, what the engine
   holds) and, from outside, a poller of each rank's resident set (psutil, every 0.2 s).

Targets: at vit-l-14, the ZeRO-3 peak per rank ≤ 0.8 × ZeRO-0's and ZeRO-2's between them (rows
measured in the same invocation); every measured row's export and checkpoint phases ≤ 1.1 × its
training peak, and its plan within 1.25× of the measured peak either way; sd-v1 under ZeRO-0
refused by the plan on a 24 GiB machine, in a line that names the ZeRO stage that would fit. Split
a campaign into one invocation per shape (each fits the shared machine's 15-minute lock): rows of
earlier invocations are kept in the results file, each with its date, and every target is judged
on the rows there.
Writes bench/results/memory-<cpu>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.common import RESULTS, Target, flickr8k_prep, machine, slug, write_results

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
TRAINING = ("forward", "backward", "step")


@dataclass(frozen=True)
class Shape:
    config: str
    overrides: tuple[str, ...]
    batch: int
    steps: int


CLIP = ("eval.at_start=false", "eval.every_epochs=0")
SHAPES = {
    "tiny": Shape("configs/flickr8k.yaml", ("model.preset=tiny", *CLIP), 8, 2),
    "vit-b-32": Shape("configs/flickr8k.yaml", ("model.preset=vit-b-32", *CLIP), 8, 4),
    "vit-l-14": Shape("configs/flickr8k.yaml", ("model.preset=vit-l-14", *CLIP), 2, 2),
    "sd-v1": Shape(
        "configs/flickr8k-unet.yaml",
        (
            "diffusion.model=''",
            "diffusion.preset=sd-v1",
            "diffusion.text_encoder=''",
            "diffusion.eval_clip=''",
            "diffusion.resolution=64",
            "diffusion.ema_decay=0",
            "eval.at_start=false",
            "eval.every_epochs=0",
        ),
        2,
        2,
    ),
}


def trainer_args(shape: Shape, stage: int, manifest: Path, run_dir: Path) -> list[str]:
    return [
        "--config",
        str(ROOT / shape.config),
        *shape.overrides,
        f"data.manifest={manifest}",
        f"run.dir={run_dir}",
        f"deepspeed.zero_stage={stage}",
        "deepspeed.precision=fp32",
        f"train.batch_size={shape.batch}",
        f"train.max_steps={shape.steps}",
        "data.workers=1",
        "data.shuffle_buffer=8",
        "run.log_every=1",
        "checkpoint.every_steps=0",
        "checkpoint.keep_last=1",
    ]


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def planned(shape: Shape, stage: int, manifest: Path, run_dir: Path) -> tuple[bool, str]:
    """(fits, what --check printed and refused)."""
    args = [sys.executable, "-m", "trainer", "--check", "--world-size", "2"]
    proc = subprocess.run(
        [*args, *trainer_args(shape, stage, manifest, run_dir)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    if proc.returncode not in (0, 2):
        raise SystemExit(f"--check failed:\n{proc.stderr[-3000:]}")
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


class Poller:
    """From outside, every 0.2 s: each rank's peak resident set (the processes torchrun starts), and
    the own memory (USS: the pages a forked process does not share) of each of their helper processes:
    the loader workers, the fork server they start from, multiprocessing's resource tracker."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peaks: dict[int, int] = {}
        self.workers: dict[int, int] = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self) -> None:
        while not self.done.is_set():
            for rank in self._children(self.root):
                self._max(self.peaks, rank, lambda p: p.memory_info().rss)
                for helper in self._children(rank, recursive=True):
                    self._max(self.workers, helper, lambda p: p.memory_full_info().uss)
            time.sleep(0.2)

    @staticmethod
    def _children(p: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
        try:
            return p.children(recursive=recursive)
        except psutil.Error:
            return []

    @staticmethod
    def _max(peaks: dict[int, int], p: psutil.Process, read: Any) -> None:
        try:
            peaks[p.pid] = max(peaks.get(p.pid, 0), read(p))
        except psutil.Error:
            pass

    def stop(self) -> tuple[list[int], list[int]]:
        self.done.set()
        self.thread.join()
        return sorted(self.peaks.values(), reverse=True), sorted(self.workers.values(), reverse=True)


def measured(shape: Shape, stage: int, manifest: Path, run_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    cmd += ["trainer", *trainer_args(shape, stage, manifest, run_dir)]
    started = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=ROOT)
        poller = Poller(proc.pid)
        code = proc.wait()
        polled, workers = poller.stop()
    if code != 0:  # e.g. a rank killed by the kernel's OOM killer on a machine shared with other jobs
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
        print(f"the trainer exited {code}:\n{tail}", flush=True)
        peak = max(polled, default=0) / MiB
        return {
            "failed": f"the trainer exited {code}; the highest rank's resident set reached {peak:.0f} MiB"
        }
    record = json.loads((run_dir / "memory.json").read_text())
    return {
        "seconds": time.perf_counter() - started,
        "poller_peaks": polled,
        "worker_uss_peaks": workers,
        "record": record,
    }


def row_summary(record: dict[str, Any]) -> dict[str, float]:
    """The highest rank's peak in training, checkpoint, export (MiB), and the plan's total."""
    ranks = record["ranks"]

    def peak(names: tuple[str, ...]) -> float:
        return max(r["phases"].get(n, {}).get("peak", 0) for r in ranks for n in names) / MiB

    plan = record.get("plan") or {}
    return {
        "training": peak(TRAINING),
        "checkpoint": peak(("checkpoint",)),
        "export": peak(("export",)),
        "all": peak(tuple(record["phases"])),
        "plan": plan.get("total", 0) / MiB,
    }


def phase_table(name: str, record: dict[str, Any]) -> list[str]:
    """Each phase: every rank's peak, and what rank 0's engine held after it (MiB)."""
    ranks = record["ranks"]
    plan = record.get("plan") or {}
    head = "".join(f"{'rank ' + str(r['rank']):>9s}" for r in ranks)
    lines = [
        f"{name}: {plan.get('setting', '')}; peak resident set per phase, MiB",
        f"  {'phase':11s}{head}   held by rank 0 (weights/grads/optimizer/deepspeed)   plan",
    ]
    planned_phases = {"build": "build", "initialize": "initialize", "export": "export", "backward": "train"}
    for phase in record["phases"]:
        peaks = "".join(f"{r['phases'].get(phase, {}).get('peak', 0) / MiB:9.0f}" for r in ranks)
        held = ranks[0]["phases"].get(phase, {}).get("held") or {}
        kinds = "/".join(
            f"{held.get(k, 0) / MiB:.0f}" for k in ("parameters", "gradients", "optimizer", "deepspeed")
        )
        plan_cell = plan.get("phases", {}).get(planned_phases.get(phase, ""), 0) / MiB
        shown = f"{plan_cell:6.0f}" if plan_cell else ""
        lines.append(f"  {phase:11s}{peaks}   {kinds if held else '':49s} {shown}")
    rows = plan.get("rows", {})
    lines.append("  plan's rows (MiB): " + ", ".join(f"{k} {v / MiB:.0f}" for k, v in rows.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="vit-b-32:0,vit-b-32:2,vit-b-32:3", help="shape:stage,…")
    parser.add_argument("--out", default="", help="results file (default bench/results/memory-<cpu>.json)")
    args = parser.parse_args()
    wanted = [(r.split(":")[0], int(r.split(":")[1])) for r in args.rows.split(",")]
    unknown = [s for s, _ in wanted if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape {unknown[0]}: one of {', '.join(SHAPES)}")
    out = Path(args.out) if args.out else RESULTS / f"memory-{slug(machine()['cpu'])}.json"
    rows = json.loads(out.read_text())["results"]["rows"] if out.is_file() else {}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    tables: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = data(Path(tmp))
        for shape_name, stage in wanted:
            name, shape = f"{shape_name}:{stage}", SHAPES[shape_name]
            run_dir = Path(tmp) / f"{shape_name}-zero{stage}"
            fits, check = planned(shape, stage, manifest, run_dir)
            print(f"$ {name}: {check.splitlines()[-1]}", flush=True)
            if not fits:
                rows[name] = {"date": now, "refused": check.splitlines()[-1]}
                continue
            result = measured(shape, stage, manifest, run_dir)
            if "failed" in result:
                rows[name] = {"date": now, **result}
                continue
            rows[name] = {"date": now, **result, "summary": row_summary(result["record"])}
            table = phase_table(name, result["record"])
            tables += table
            print("\n".join(table), flush=True)
    text, targets = summary(rows)
    print(text)
    text = "\n".join([*tables, text])
    print(f"wrote {write_results(out.stem, {'rows': rows}, targets, text, str(out))}")


def data(root: Path) -> Path:
    """Flickr8k-format shards of 256×256 JPEGs (cropped to 224 by the loader, as real photos are)."""
    sizes = ["synthetic.flickr_train=64", "synthetic.flickr_dev=16", "synthetic.flickr_test=16"]
    sides = ["synthetic.flickr_width=256", "synthetic.flickr_height=256"]
    out = root / "flickr8k"
    for argv in flickr8k_prep(root / "raw", out, *sizes, *sides, shard_size=16):
        subprocess.run(
            [sys.executable, "-m", "data_prep", *argv], check=True, env=env(), cwd=ROOT, capture_output=True
        )
    return out / "manifest.json"


def summary(rows: dict[str, dict[str, Any]]) -> tuple[str, list[Target]]:
    """Every row's peaks against its plan; the targets over what the rows hold."""
    lines = [
        f"{'row':13s} {'date':20s} {'plan MiB':>9s} {'measured':>9s} {'plan/meas':>9s} "
        f"{'train':>7s} {'ckpt':>7s} {'export':>7s} {'poller':>7s} {'helpers':>7s}"
    ]
    targets: list[Target] = []
    for name in sorted(rows, key=lambda n: (n.split(":")[0], int(n.split(":")[1]))):
        row = rows[name]
        if "refused" in row:
            lines.append(f"{name:13s} {row['date'][:19]:20s} refused by the plan: {row['refused']}")
            continue
        if "failed" in row:
            lines.append(f"{name:13s} {row['date'][:19]:20s} not measured: {row['failed']}")
            targets.append(Target(f"{name} measured", 0.0, 1.0, note=row["failed"]))
            continue
        s = row["summary"]
        polled = max(row["poller_peaks"]) / MiB
        helpers = max(row.get("worker_uss_peaks") or [math.nan]) / MiB  # this row's largest, not the file's
        lines.append(
            f"{name:13s} {row['date'][:19]:20s} {s['plan']:9.0f} {s['all']:9.0f} {s['plan'] / s['all']:9.2f} "
            f"{s['training']:7.0f} {s['checkpoint']:7.0f} {s['export']:7.0f} {polled:7.0f} {helpers:7.0f}"
        )
        targets.append(Target(f"{name} plan / measured peak", s["plan"] / s["all"], 1.25, at_least=False))
        targets.append(Target(f"{name} plan / measured peak (from below)", s["plan"] / s["all"], 0.8))
        worst = max(s["checkpoint"], s["export"]) / s["training"]
        targets.append(Target(f"{name} checkpoint, export / training peak", worst, 1.1, at_least=False))
    lines.append("helpers: the largest own memory (USS) of a row's loader workers and their fork server, MiB")
    big = {stage: rows.get(f"vit-l-14:{stage}", {}).get("summary") for stage in (0, 2, 3)}
    together = len({rows[f"vit-l-14:{s}"]["date"] for s in (0, 2, 3) if big[s]}) == 1
    if all(big.values()) and together:  # the baseline measured in the same invocation
        z0, z2, z3 = (big[s]["training"] for s in (0, 2, 3))  # type: ignore[index]
        targets.append(Target("vit-l-14 ZeRO-3 / ZeRO-0 training peak", z3 / z0, 0.8, at_least=False))
        targets.append(Target("vit-l-14 ZeRO-2 / ZeRO-0 (below it)", z2 / z0, 1.0, at_least=False))
        targets.append(Target("vit-l-14 ZeRO-2 / ZeRO-3 (above it)", z2 / z3, 1.0))
    elif any(big.values()):  # judged only against a baseline of the same invocation
        note = "ZeRO 0, 2 and 3 not all measured in one invocation"
        targets.append(Target("vit-l-14 ZeRO-3 / ZeRO-0 training peak", math.nan, 0.8, False, note))
    refused = rows.get("sd-v1:0", {}).get("refused")
    if refused is not None:  # the verdict: refused here, naming the stage that fits
        named = re.search(r"deepspeed\.zero_stage=\d would fit", refused) is not None
        targets.append(Target("sd-v1 ZeRO-0 refused, naming the stage that fits", float(named), 1.0))
    return "\n".join([*lines, *[t.line() for t in targets]]), targets


if __name__ == "__main__":
    main()
