"""`python -m data_prep {cifar10,flickr8k,synthetic}`: official files → WebDataset shards + manifest.

    python -m data_prep cifar10 --source cifar-10-python.tar.gz --out data/cifar10
    python -m data_prep flickr8k --images Flickr8k_Dataset.zip --captions Flickr8k_text.zip --out data/flickr8k
    python -m data_prep synthetic --out data/synthetic

Every option is also a config key (`--shard-size 500` is `shards.shard_size=500`); `--config FILE`
loads a YAML PrepConfig and trailing `key=value` overrides win over both.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_prep.cifar10 import read_cifar10
from data_prep.config import PrepConfig
from data_prep.flickr8k import FlickrImage, hash_split, index_images, read_captions, read_splits, sample_key
from data_prep.shards import SplitPlan, Writers, summary, write_dataset
from data_prep.synthetic import write_synthetic
from plumbing import __version__
from plumbing.config import load_config, parse_mixed, to_dict
from plumbing.errors import run_cli
from plumbing.logs import setup_logging

log = logging.getLogger("data_prep")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m data_prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("--version", action="version", version=f"data_prep {__version__}")
    sub = top.add_subparsers(dest="dataset", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--config", type=Path, help="YAML PrepConfig to start from")
        p.add_argument(
            "--shard-size", type=int, dest="shards.shard_size", help="samples per shard (default 1000)"
        )
        p.add_argument("--workers", type=int, dest="shards.workers", help="writer processes (default 1)")
        p.add_argument(
            "--overwrite",
            action="store_const",
            const=True,
            dest="shards.overwrite",
            help="replace a different existing output",
        )
        p.add_argument("--quiet", action="store_const", const=False, dest="progress", help="no progress bar")
        p.add_argument(
            "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. shards.shard_size=500"
        )

    p = sub.add_parser("cifar10", help="CIFAR-10 python release → shards")
    p.add_argument(
        "--source",
        required=True,
        dest="cifar10.source",
        help="cifar-10-python.tar.gz or cifar-10-batches-py/",
    )
    p.add_argument(
        "--no-verify",
        action="store_const",
        const=False,
        dest="cifar10.verify",
        help="skip the official MD5 checks",
    )
    p.add_argument(
        "--template",
        action="append",
        dest="cifar10.templates",
        help='prompt template with {label}; repeatable (default "An image of a {label}.")',
    )
    common(p)

    p = sub.add_parser("flickr8k", help="Flickr8k (official zips, folders or Kaggle layout) → shards")
    p.add_argument(
        "--images",
        required=True,
        dest="flickr8k.images",
        help="Flickr8k_Dataset.zip, Flicker8k_Dataset/ or Images/",
    )
    p.add_argument(
        "--captions",
        required=True,
        dest="flickr8k.captions",
        help="Flickr8k_text.zip, its folder, Flickr8k.token.txt or captions.txt",
    )
    p.add_argument(
        "--splits",
        dest="flickr8k.splits",
        help="folder or zip with Flickr_8k.*Images.txt (default: beside the captions)",
    )
    p.add_argument(
        "--resize", type=int, dest="flickr8k.resize", help="re-encode with the long side at most N pixels"
    )
    p.add_argument(
        "--full-decode",
        action="store_const",
        const=True,
        dest="flickr8k.full_decode",
        help="decode every image (slower, stricter)",
    )
    common(p)

    p = sub.add_parser("synthetic", help="write the learnable synthetic set in the official formats")
    p.add_argument("--seed", type=int, dest="seed", help="seed (default 0)")
    common(p)
    return top


def main(argv: list[str] | None = None) -> int:
    return run_cli("data_prep", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    args = parse_mixed(parser(), argv)
    config_file, overrides = args.pop("config"), args.pop("overrides")
    flags = {k: v for k, v in args.items() if v is not None}
    cfg = load_config(PrepConfig, config_file, overrides, flags)
    setup_logging()
    if cfg.dataset == "synthetic":
        return _synthetic(cfg)
    with Writers(cfg.shards.workers) as writers:
        manifest = (_cifar10 if cfg.dataset == "cifar10" else _flickr8k)(cfg, writers)
    print(summary(manifest, cfg.out_dir))
    return 0


def _write(
    cfg: PrepConfig,
    writers: Writers,
    splits: dict[str, SplitPlan],
    sources: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Shard `splits` into cfg.out. The fingerprint covers what shapes the bytes, not where files are."""
    section = to_dict(getattr(cfg, cfg.dataset))
    inputs = {k: v for k, v in section.items() if k not in ("source", "images", "captions", "splits")}
    identity = {
        "inputs": inputs,
        "seed": cfg.seed,
        "source_checksums": {
            k: {f: v[f] for f in ("bytes", "files", "md5", "sha256")} for k, v in sources.items()
        },
    }
    return write_dataset(
        cfg.out_dir,
        cfg.dataset,
        splits,
        shard_size=cfg.shards.shard_size,
        writers=writers,
        overwrite=cfg.shards.overwrite,
        identity=identity,
        extra={"sources": sources, "config": to_dict(cfg), **extra},
        show_progress=cfg.progress,
    )


def _cifar10(cfg: PrepConfig, writers: Writers) -> dict[str, Any]:
    c = cfg.cifar10
    if not c.verify:
        log.warning("--no-verify: MD5s are not checked against the official CIFAR-10 release")
    source = read_cifar10(Path(c.source), c.verify, list(c.templates), cfg.seed)
    splits = {name: SplitPlan(list(rows)) for name, rows in source.splits.items()}
    return _write(cfg, writers, splits, {"cifar10": asdict(source.info)}, {"classes": source.label_names})


def _flickr8k(cfg: PrepConfig, writers: Writers) -> dict[str, Any]:
    f = cfg.flickr8k
    images = index_images(Path(f.images))
    captions = read_captions(Path(f.captions))
    split_lists, split_source = captions.splits, captions.split_source
    if f.splits:
        split_lists, split_source = read_splits(Path(f.splits))
    rejected = list(images.rejected)
    for name in sorted(set(captions.by_image) - set(images.refs)):
        rejected.append({"item": name, "reason": f"captioned in {captions.where} but no such image"})
    usable = sorted(set(images.refs) & set(captions.by_image))
    if not split_lists:
        log.info("no Flickr_8k.*Images.txt found: using the hash split (75/12.5/12.5 %%, see README)")
        split_lists, split_source = hash_split(usable), "hash of the image name"
    plans: dict[str, SplitPlan] = {}
    assigned: set[str] = set()
    keys: dict[str, str] = {}
    for split, names in split_lists.items():
        plan = SplitPlan([])
        for name in names:
            key = sample_key(name)
            if name not in images.refs:
                plan.rejected.append(
                    {"item": name, "reason": f"listed in the {split} split but not among the images"}
                )
            elif name not in captions.by_image:
                plan.rejected.append({"item": name, "reason": "no captions"})
            elif name in assigned or keys.get(key, name) != name:
                plan.rejected.append({"item": name, "reason": "already in another split or a clashing key"})
            else:
                assigned.add(name)
                keys[key] = name
                plan.samples.append(
                    FlickrImage(
                        key,
                        name,
                        split,
                        images.refs[name],
                        tuple(captions.by_image[name]),
                        f.resize,
                        f.full_decode,
                    )
                )
        plans[split] = plan
    unassigned = sorted(set(usable) - assigned)
    uncaptioned = sorted(set(images.refs) - set(captions.by_image))
    sources = {"images": asdict(images.info), "captions": asdict(captions.info)}
    extra = {
        "split_source": split_source,
        "rejected": rejected,
        "unassigned": {
            "count": len(unassigned),
            "reason": "captioned images in no split list",
            "items": unassigned,
        },
        "uncaptioned": {"count": len(uncaptioned), "items": uncaptioned},
    }
    return _write(cfg, writers, plans, sources, extra)


def _synthetic(cfg: PrepConfig) -> int:
    settings = {"seed": cfg.seed, **to_dict(cfg.synthetic)}
    files = write_synthetic(cfg.out_dir, settings, cfg.shards.overwrite)
    print(f"synthetic data in the official formats → {cfg.out_dir}:")
    for name, path in files.items():
        print(f"  {name:9s} {path}")
    out = cfg.out_dir
    print(
        "next:\n"
        f"  python -m data_prep cifar10 --source {files['cifar10']} --no-verify --out {out}/cifar10\n"
        f"  python -m data_prep flickr8k --images {files['images']} --captions {files['captions']} --out {out}/flickr8k"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
