"""Benchmark: does the contrastive step's mix of collectives ever hang? Two CPU ranks run the trainer's own
loop at full speed until a rank's watchdog fires or the rounds are done.

    python -m bench.hang_stress [--rounds 12000] [--mode collectives|loaders] [--batch 8] [--out FILE]

A round is one micro-step of `trainer.loop.Loop` with the demo's Flickr8k config (tiny CLIP, contrastive,
ZeRO-0 as configs/demo-flickr8k.yaml, `--stage` for another): the forward's two `gather_with_grad`
all-gathers, the finiteness/stop all-reduce, the backward's two all-reduces, DeepSpeed's gradient
all-reduce, and every `run.log_every` steps the counters' all-reduce. `--mode loaders` also serves each
epoch of `--epoch` batches through the trainer's own DataLoader (`trainer.data.loader`: one worker,
forked per epoch as in the demo), the other suspect: a fork while another thread holds a lock.

Each rank runs the trainer's watchdog (`--stall` seconds): a round that does not end writes every
rank's stacks and the collective it waits in to stderr and ends the run (exit 124). The demo's Flickr8k
stage runs about 1,150 micro-steps per rank (50 epochs of 23); the target is ten times that without a
hang. Writes bench/results/hang_stress-<mode>-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from bench.common import Target, machine, slug, write_results

ROOT = Path(__file__).resolve().parents[1]
DEMO_MICRO_STEPS = 50 * 23  # configs/demo-flickr8k.yaml: 50 epochs of 3,000 / (2 ranks × 64) steps


class Served(IterableDataset):
    """Ready batches, served by the loader's worker process."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        super().__init__()
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)


class Source:
    """The loop's data: the same batches every epoch, in memory or through a freshly forked loader."""

    def __init__(self, batches: list[dict[str, Any]], loaders: bool) -> None:
        self.batches, self.loaders = batches, loaders

    def epoch(self, epoch: int, start: int) -> Any:
        from trainer.data import batches_of, loader

        if self.loaders:
            return batches_of(loader(Served(self.batches[start:]), 1, False))
        return (b for b in self.batches[start:])


def count_shm_all_reduce() -> list[int]:
    """Count calls of DeepSpeed's CPU shared-memory all-reduce (its only door is the backend's
    `inference_all_reduce`, deepspeed/comm/torch.py; its callers are AutoTP's layers,
    module_inject/layers.py). The op is built at init but joins ranks only when LOCAL_SIZE equals the
    world size (ops/csrc/cpu/comm/shm_interface.cpp), which DeepSpeed's own launcher sets and torchrun
    does not."""
    import deepspeed.comm.comm as ds_comm

    calls = [0]
    backend = ds_comm.cdb
    inner = backend.inference_all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return inner(*args, **kwargs)

    backend.inference_all_reduce = counted
    return calls


def worker(args: argparse.Namespace) -> None:
    """One rank: the trainer's loop on in-memory batches, counting rounds into `--progress`."""
    from plumbing.config import load_config
    from plumbing.dist import DistInfo, init_process_group
    from plumbing.logs import setup_logging
    from plumbing.watchdog import Watchdog, WatchdogConfig
    from trainer.checkpoint import Checkpointer, TrainState
    from trainer.config import TrainConfig
    from trainer.data import Layout
    from trainer.engine import BatchSizes, build_engine
    from trainer.evaluate import Evaluator
    from trainer.loop import Loop, Parts
    from trainer.monitor import Monitor
    from trainer.plan import Plan
    from trainer.run import RunFolder
    from trainer.tasks import make_task

    info = DistInfo.from_env()
    setup_logging(info.rank)
    init_process_group(info)
    run_dir = Path(args.scratch)
    cfg = load_config(
        TrainConfig,
        ROOT / "configs/demo-flickr8k.yaml",
        [
            f"run.dir={run_dir}",
            "data.manifest=unused",
            f"train.batch_size={args.batch}",
            f"deepspeed.zero_stage={args.stage}",
            "run.log_every=10",
            "checkpoint.at_epoch_end=false",
            "checkpoint.every_steps=0",
            "eval.at_start=false",
            "eval.every_epochs=0",
        ],
    )
    run = RunFolder(run_dir)
    task = make_task(cfg, run, info, "cpu")
    torch.manual_seed(0)
    engine = build_engine(
        task.build(), cfg.deepspeed, cfg.optim, BatchSizes(args.batch, 1, info.world_size), 10**8, "cpu"
    )
    shm_calls = count_shm_all_reduce()
    g = torch.Generator().manual_seed(info.rank)
    tokens = task.collate.tokenize([f"a red circle on the left number {i} ." for i in range(args.batch)])
    size = cfg.model.tiny.image_size
    batches = [
        {
            "pixel_values": torch.randint(0, 256, (args.batch, 3, size, size), generator=g).byte(),
            "keys": [str(i) for i in range(args.batch)],
            "skipped": 0,
            **tokens,
        }
        for _ in range(args.epoch)
    ]
    layout = Layout(info.world_size, 1, args.batch, args.epoch * args.batch)
    plan = Plan(layout, 1, 10**6, args.epoch, 10**8, 10**8, args.epoch * args.batch)
    monitor = Monitor(run_dir / f"rank{info.rank}", info.is_main, "cpu", 10, plan.total, 0)
    monitor.bar.disable = True
    watchdog = Watchdog(WatchdogConfig(step_s=args.stall, step_factor=1000), info.rank)
    parts = Parts(
        task,
        Source(batches, args.mode == "loaders"),  # type: ignore[arg-type]
        engine,
        Checkpointer(cfg.checkpoint, run_dir / "checkpoints", info),
        Evaluator(cfg.eval, task, list),
        monitor,
        watchdog,
    )
    loop = Loop(cfg, plan, parts, TrainState.of(layout), info.rank)
    progress = Path(args.progress)
    started, rounds = time.perf_counter(), 0
    while rounds < args.rounds:
        loop.state.micro_in_epoch = 0
        loop.epoch()
        rounds += args.epoch
        if info.is_main:
            rate = rounds / (time.perf_counter() - started)
            progress.write_text(
                json.dumps({"rounds": rounds, "per_s": rate, "shm_all_reduce_calls": shm_calls[0]})
            )
    watchdog.close()
    os._exit(0)  # skip the teardown: the measurement is over


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10 * DEMO_MICRO_STEPS + 500)
    parser.add_argument("--mode", choices=["collectives", "loaders"], default="collectives")
    parser.add_argument(
        "--batch", type=int, default=8, help="micro-batch per rank (small: more rounds a second)"
    )
    parser.add_argument(
        "--epoch", type=int, default=8, help="rounds per epoch (per loader, in --mode loaders)"
    )
    parser.add_argument("--stage", type=int, default=0, help="ZeRO stage (the demo's Flickr8k config: 0)")
    parser.add_argument(
        "--stall", type=float, default=60.0, help="seconds without a round that count as a hang"
    )
    parser.add_argument(
        "--out", default="", help="results file (default bench/results/hang_stress-<mode>-<cpu>.json)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    parser.add_argument("--progress", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        progress = Path(tmp) / "progress.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "bench.hang_stress", "--worker", "--scratch", f"{tmp}/run", "--progress", str(progress),
            *sys.argv[1:],
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        started = time.time()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.time() - started
        done = json.loads(progress.read_text()) if progress.exists() else {"rounds": 0, "per_s": 0.0}
    shm = done.get("shm_all_reduce_calls", 0)
    hung = "hung: rank" in proc.stderr
    reports = [line for line in proc.stderr.splitlines() if "[watchdog r" in line]
    if proc.returncode != 0 and not hung:
        sys.exit(f"the stress run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    rounds = done["rounds"]
    targets = [
        Target(
            f"rounds without a hang / 10 × a demo stage's ({DEMO_MICRO_STEPS})",
            rounds / (10 * DEMO_MICRO_STEPS),
            1.0,
        )
    ]
    text = "\n".join(
        [
            f"hang stress, mode {args.mode}, 2 CPU ranks, batch {args.batch}, ZeRO-{args.stage}, epochs of {args.epoch} rounds",
            f"  rounds {rounds} in {seconds:.0f} s ({done['per_s']:.1f} a second); {'HUNG' if hung else 'no hang'}",
            f"  DeepSpeed's shared-memory all-reduce called {shm} times (every gradient all-reduce went through gloo)",
            *[f"  {line}" for line in reports[:3]],
            *[t.line() for t in targets],
        ]
    )
    print(text)
    results = {
        "rounds": rounds,
        "seconds": round(seconds, 1),
        "hung": hung,
        "reports": reports[:400],
        "mode": args.mode,
        "shm_all_reduce_calls": shm,
    }
    name = f"hang_stress-{args.mode}-{slug(machine()['cpu'])}"
    print(f"wrote {write_results(name, results, targets, text, args.out)}")


if __name__ == "__main__":
    main()
