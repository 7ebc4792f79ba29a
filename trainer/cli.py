"""`python -m trainer --config FILE [key=value …]`: one training run (single process, torchrun or srun).

    python -m trainer --config configs/demo-cifar10.yaml run.dir=runs/try train.max_steps=20
    torchrun --nproc-per-node 2 -m trainer --config configs/flickr8k.yaml deepspeed.zero_stage=3

`--check` loads and validates everything a run needs (config, manifest, shards, the epoch plan)
and prints the memory plan per rank (trainer/memory/), without training: launch scripts run it once
before starting many processes, and their DRY_RUN runs it with `--dry-run` (data that does not exist
yet is then reported instead of refused). A plan that does not fit is refused in one line.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

from plumbing.config import load_config, to_yaml
from plumbing.errors import UserError, run_cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, help="YAML TrainConfig (configs/*.yaml)")
    p.add_argument("--check", action="store_true", help="validate config, data and plan, then exit")
    p.add_argument(
        "--world-size", type=int, default=1, help="with --check: the number of ranks the run will have"
    )
    p.add_argument(
        "--ranks-per-node",
        type=int,
        default=0,
        help="with --check: ranks sharing each node's RAM (default: all of --world-size on one node)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --check: a manifest that does not exist yet is reported, not an error (launchers' DRY_RUN)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. run.dir=runs/x train.max_steps=100"
    )
    return p


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Rust tokenizers warn (and may deadlock) when the loader forks workers after they ran threads.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # diffusers imports accelerate, which imports DeepSpeed, which guesses its device aloud unless told.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    # DeepSpeed 0.19 still calls torch.distributed's old collective names: one warning per call.
    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use .*", category=FutureWarning)
    return run_cli("trainer", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    from trainer.config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if args.check:
        from trainer.plan import check

        text, refusal = check(cfg, args.world_size, args.dry_run, args.ranks_per_node)
        print(text)
        if refusal:
            raise UserError(refusal)
        return 0
    from trainer.train import train

    return train(cfg)
