"""Benchmark: does the contrastive step's mix of collectives ever hang? Two CPU ranks run the trainer's own
loop at full speed until a rank's watchdog fires or the rounds are done.

    python -m bench.hang_stress [--rounds 12000] [--mode collectives|loaders] [--loader-start forkserver|fork] [--out FILE]
    python -m bench.hang_stress --mode demo --runs 5 [--append]

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

`--mode demo` runs the demo's Flickr8k CLIP stage itself, `--runs` times, with the command `make demo`
runs for it (launch/demo.sh: launch/torchrun.sh, configs/demo-flickr8k.yaml, 2 processes, restarts
on), each in a fresh run folder, seeds 0, 1, 2, … (`--seed` for the first), on the demo's shards
(`--data`, made as launch/demo.sh makes them when missing). A hang ends as the watchdog's exit 124
with `hung:` lines (and, restarts on, as a restarted attempt): each run's exit status, seconds,
`hung:` lines and attempts are recorded; `--append` adds the runs to the results file's earlier ones
(the runs go in batches: each is minutes on 2 cores). The target: 20 runs, none hung.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset

from bench.common import Target, machine, slug, write_results

ROOT = Path(__file__).resolve().parents[1]
DEMO_MICRO_STEPS = 50 * 23  # configs/demo-flickr8k.yaml: 50 epochs of 3,000 / (2 ranks × 64) steps
DEMO_RUNS = 20  # issue 30: ≥ 20 runs of the demo's Flickr8k stage finish, none hung


class Served(IterableDataset):
    """Ready batches, served by the loader's worker process."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        super().__init__()
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)


class Source:
    """The loop's data: the same batches every epoch, in memory or through a fresh loader worker per
    epoch, started as the trainer starts them (from the rank's fork server, trainer.data.loader_server)
    or, `--loader-start fork`, forked from the rank itself as before that server (the suspect)."""

    def __init__(self, batches: list[dict[str, Any]], loaders: bool, start: str) -> None:
        from trainer.data import loader_server

        self.batches, self.loaders = batches, loaders
        # bench.hang_stress's Served, not __main__'s: a worker from the server unpickles it by name
        self.served = import_module("bench.hang_stress").Served
        self.server = loader_server(1, self.served([])) if loaders and start == "forkserver" else None

    def epoch(self, epoch: int, start: int) -> Any:
        from trainer.data import batches_of, loader

        if self.loaders:
            return batches_of(loader(self.served(self.batches[start:]), 1, False, self.server))
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
        Source(batches, args.mode == "loaders", args.loader_start),  # type: ignore[arg-type]
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


def watch_native(run: subprocess.Popen[str], progress: Path, stale_s: float) -> list[str]:
    """Wait for the stress run; when its progress stalls for `stale_s` (before the watchdogs fire),
    dump every process of it, natively too (py-spy dump --native: the C frames and the lock a thread
    waits on, which a Python stack does not show), once."""
    import psutil

    dumps: list[str] = []
    while run.poll() is None:
        time.sleep(1.0)
        if dumps or not progress.exists() or time.time() - progress.stat().st_mtime < stale_s:
            continue
        spy = Path(sys.executable).with_name("py-spy")
        for child in psutil.Process(run.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error, subprocess.SubprocessError, OSError):
                command = " ".join(child.cmdline())[:80]
                dump = subprocess.run(
                    [str(spy), "dump", "--native", "--pid", str(child.pid)],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                dumps += [
                    f"== {child.pid} {command}",
                    *dump.stdout.splitlines(),
                    *dump.stderr.splitlines()[-3:],
                ]
        dumps = dumps or ["(no process to dump)"]
    return dumps


def demo_data(data: Path) -> Path:
    """The demo's Flickr8k shards, made as launch/demo.sh's stage 1 makes them when not there yet."""
    manifest = data / "flickr8k" / "manifest.json"
    if not manifest.is_file():
        py = [sys.executable, "-m", "data_prep"]
        subprocess.run([*py, "synthetic", "--out", str(data / "raw")], cwd=ROOT, check=True)
        subprocess.run(
            [*py, "flickr8k", "--images", str(data / "raw/Flickr8k_Dataset.zip"),
             "--captions", str(data / "raw/Flickr8k_text.zip"), "--out", str(data / "flickr8k"),
             "--workers", "2", "--image-size", "64"],
            cwd=ROOT, check=True,
        )  # fmt: skip
    return manifest


def demo_run(manifest: Path, run_dir: Path, seed: int) -> dict[str, Any]:
    """One run of the demo's Flickr8k stage, as launch/demo.sh runs it: exit status, seconds, hangs."""
    from trainer.attempts import attempts, newest_launch
    from trainer.run import RunFolder

    env = {**os.environ, "CONFIG": "configs/demo-flickr8k.yaml", "NPROC": "2", "PYTHON": sys.executable}
    command = [
        "launch/torchrun.sh", f"data.manifest={manifest}", f"run.dir={run_dir}",
        f"run.seed={seed}", f"model.tiny.seed={seed}",
    ]  # fmt: skip
    started = time.time()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.time() - started
    output = proc.stdout + proc.stderr
    folder = RunFolder(run_dir).attempts
    tries = attempts(folder, newest_launch(folder))
    lines = output.splitlines()
    hung = [i for i, line in enumerate(lines) if "] hung: rank" in line]
    return {
        "seed": seed,
        "code": proc.returncode,
        "seconds": round(seconds, 1),
        "hung_lines": [lines[i] for i in hung][:8],
        "attempts": [a.outcome for a in tries],
        "last_line": lines[-1] if lines else "",
        # a hang's reports: every rank's stacks, and its loader workers' (faulthandler), to find the cause
        "report": lines[hung[0] : hung[0] + 600] if hung else [],
    }


def demo(args: argparse.Namespace) -> None:
    """`--runs` runs of the demo's Flickr8k stage, each recorded (and the file rewritten) as it ends."""
    name = f"hang_stress-demo-{slug(machine()['cpu'])}"
    path = Path(args.out) if args.out else ROOT / "bench" / "results" / f"{name}.json"
    runs: list[dict[str, Any]] = []
    if args.append and path.is_file():
        runs = json.loads(path.read_text())["results"]["runs"]
    manifest = demo_data(Path(args.data))
    first = args.seed if args.seed >= 0 else len(runs)
    started = time.time()
    for i in range(args.runs):
        if i and args.budget and time.time() - started + runs[-1]["seconds"] > args.budget:
            print(f"stopped after {i} runs: another would end past --budget {args.budget:.0f} s")
            break
        with tempfile.TemporaryDirectory() as tmp:
            run = demo_run(manifest, Path(tmp) / "demo-flickr8k", first + i)
        runs.append(run)
        hangs = sum(1 for r in runs if r["code"] == 124 or r["hung_lines"] or "hung" in r["attempts"])
        failed = sum(1 for r in runs if r["code"] != 0)
        seconds = [r["seconds"] for r in runs]
        targets = [
            Target(f"runs of the demo's Flickr8k stage / {DEMO_RUNS}", len(runs) / DEMO_RUNS, 1.0),
            Target("runs that hung (exit 124, a hung: line or a hung attempt)", hangs, 0, at_least=False),
        ]
        text = "\n".join(
            [
                "hang stress, mode demo: the demo's Flickr8k CLIP stage as launch/demo.sh runs it (2 CPU ranks)",
                f"  {len(runs)} runs: {hangs} hung, {failed} ended non-zero; "
                f"{min(seconds):.0f}–{max(seconds):.0f} s a run (median {sorted(seconds)[len(seconds) // 2]:.0f})",
                f"  last: seed {run['seed']}, exit {run['code']}, {run['seconds']:.0f} s, "
                f"attempts {', '.join(run['attempts']) or 'none recorded'}",
                *[t.line() for t in targets],
            ]
        )
        print(text, flush=True)
        results = {"runs_done": len(runs), "hung": hangs, "failed": failed, "runs": runs}
        write_results(name, results, targets, text, str(path))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10 * DEMO_MICRO_STEPS + 500)
    parser.add_argument("--mode", choices=["collectives", "loaders", "demo"], default="collectives")
    parser.add_argument("--runs", type=int, default=5, help="--mode demo: runs of the Flickr8k stage")
    parser.add_argument(
        "--seed", type=int, default=-1, help="--mode demo: the first run's seed (default: runs so far)"
    )
    parser.add_argument("--data", default="data/demo", help="--mode demo: the demo's DATA folder")
    parser.add_argument("--append", action="store_true", help="--mode demo: add to the results file's runs")
    parser.add_argument(
        "--budget", type=float, default=0, help="--mode demo: start no run that would end past these seconds"
    )
    parser.add_argument(
        "--batch", type=int, default=8, help="micro-batch per rank (small: more rounds a second)"
    )
    parser.add_argument(
        "--epoch", type=int, default=8, help="rounds per epoch (per loader, in --mode loaders)"
    )
    parser.add_argument(
        "--loader-start",
        choices=["forkserver", "fork"],
        default="forkserver",
        help="--mode loaders: start each worker from the rank's fork server (the trainer's way) or fork the rank",
    )
    parser.add_argument("--ranks", type=int, default=2, help="ranks (1: one core, no collective)")
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
    if args.mode == "demo":
        demo(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        progress = Path(tmp) / "progress.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
            "-m", "bench.hang_stress", "--worker", "--scratch", f"{tmp}/run", "--progress", str(progress),
            *sys.argv[1:],
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        started = time.time()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
            native = watch_native(run, progress, args.stall / 2)
            out.seek(0), err.seek(0)
            proc = subprocess.CompletedProcess(command, run.returncode, out.read(), err.read())
        seconds = time.time() - started
        done = json.loads(progress.read_text()) if progress.exists() else {"rounds": 0, "per_s": 0.0}
    shm = done.get("shm_all_reduce_calls", 0)
    hung = "hung: rank" in proc.stderr
    reports = [line for line in proc.stderr.splitlines() if "[watchdog r" in line]
    lines = proc.stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if "] hung: rank" in line), len(lines))
    # what the ranks and their loader workers wrote from the first report on (a worker's stacks come
    # from faulthandler, without the watchdog's prefix): where the rank that did not answer was
    after_hang = lines[first : first + 800]
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
            f"hang stress, mode {args.mode}, {args.ranks} CPU rank(s), batch {args.batch}, ZeRO-{args.stage}, epochs of {args.epoch} rounds",
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
        "stderr_after_hang": after_hang,
        "native_stacks": native,
        "mode": args.mode,
        "start": args.loader_start if args.mode == "loaders" else None,
        "shm_all_reduce_calls": shm,
    }
    name = f"hang_stress-{args.mode}-{slug(machine()['cpu'])}"
    print(f"wrote {write_results(name, results, targets, text, args.out)}")


if __name__ == "__main__":
    main()
