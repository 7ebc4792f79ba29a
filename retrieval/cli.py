"""`python -m retrieval {caption,search}`: the fine-tuned CLIP at work, offline and in bulk.

    python -m retrieval caption --export runs/demo-flickr8k/export --images photos/ --bank captions.txt --out captions/photos
    python -m retrieval caption --export runs/demo-flickr8k/export --manifest data/demo/flickr8k/manifest.json \\
        --bank data/demo/flickr8k/manifest.json bank_split=train --out captions/test
    python -m retrieval search --export runs/demo-flickr8k/export --queries queries.txt --images photos/ --out search/photos

Every option is also a config key (`--top-k 3` is `top_k=3`); key=value overrides win. Options that
take several values (--images, --queries) take every word up to the next option: put overrides
before them or after a single-value option.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from plumbing.config import load_config, parse_mixed, to_yaml
from plumbing.errors import run_cli


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m retrieval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="mode", required=True)
    for mode, what in (
        ("caption", "images → their top-k captions from a bank"),
        ("search", "text queries → their top-k images"),
    ):
        p = sub.add_parser(mode, help=what)
        p.add_argument("--export", required=True, help="a trainer export (runs/<name>/export)")
        p.add_argument("--images", nargs="+", help="image files, folders or globs")
        p.add_argument("--manifest", help="or a data_prep manifest.json (images of its --split)")
        p.add_argument("--split", help="split of --manifest (default test)")
        if mode == "caption":
            p.add_argument(
                "--bank",
                required=True,
                help="captions: .txt, .jsonl, or a data_prep manifest.json (bank_split=…)",
            )
        else:
            p.add_argument("--queries", nargs="+", required=True, help="query files: .txt or .jsonl")
        p.add_argument("--top-k", type=int, dest="top_k", help="results per item (default 5)")
        p.add_argument("--out", required=True, dest="out_dir", help="output folder")
        p.add_argument("--config", type=Path, help="YAML RetrievalConfig to start from")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", metavar="key=value")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parse_mixed(parser(), argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config_file, overrides, show = args.pop("config"), args.pop("overrides"), args.pop("print_config")
    flags = {k: v for k, v in args.items() if v is not None}
    return run_cli("retrieval", lambda: _main(config_file, overrides, flags, show))


def _main(config_file: Path | None, overrides: list[str], flags: dict[str, object], show: bool) -> int:
    from retrieval.config import RetrievalConfig

    cfg = load_config(RetrievalConfig, config_file, overrides, flags)
    if show:
        print(to_yaml(cfg), end="")
        return 0
    from retrieval.run import retrieve

    return retrieve(cfg)
