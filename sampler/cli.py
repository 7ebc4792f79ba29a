"""`python -m sampler --config configs/sample.yaml [key=value …]`: images from prompt files, in bulk.

python -m sampler --config configs/sample.yaml prompts=[configs/prompts/demo.txt] out_dir=samples/demo
torchrun --nproc-per-node 2 -m sampler --config configs/sample.yaml text_encoder=runs/demo-flickr8k/export
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from plumbing.config import load_config, to_yaml
from plumbing.errors import run_cli


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sampler", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="YAML SampleConfig (configs/sample.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. out_dir=samples/x steps=30 batch_size=8"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # accelerate imports DeepSpeed when it is installed, which then guesses its device aloud.
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    return run_cli("sampler", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    from sampler.config import SampleConfig

    cfg = load_config(SampleConfig, args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from sampler.run import sample

    return sample(cfg)
