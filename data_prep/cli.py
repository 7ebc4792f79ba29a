"""`python -m data_prep SOURCE …`: the data people have → WebDataset shards + manifest.json.

    python -m data_prep cifar10 --source cifar-10-python.tar.gz --out data/cifar10
    python -m data_prep flickr8k --images Flickr8k_Dataset.zip --captions Flickr8k_text.zip --out data/flickr8k
    python -m data_prep coco --root coco/ --out data/coco
    python -m data_prep csv --source train.tsv --out data/mine
    python -m data_prep folder --source my-imagefolder/ --out data/mine
    python -m data_prep parquet --source 'my-hf-dataset/data/*.parquet' --out data/mine
    python -m data_prep index --shards 'laion/{00000..00099}.tar' --out data/laion
    python -m data_prep index --shards 'https://host/laion/{00000..00099}.tar' --out data/laion
    python -m data_prep synthetic --out data/synthetic

Beyond one machine: `--tasks N --task K` (or a Slurm array task, see launch/prep.sbatch) writes the
shards the one-process plan gives task K; `python -m data_prep merge --out OUT` then writes the
manifest. Every option is also a config key (`--shard-size 500` is `shards.shard_size=500`);
`--config FILE` loads a YAML PrepConfig and trailing `key=value` overrides win over both.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_prep.cifar10 import read_cifar10
from data_prep.coco import read_coco
from data_prep.config import RESIZE_MODES, PrepConfig, ShardsConfig
from data_prep.flickr8k import index_images, read_captions, read_splits
from data_prep.folder import read_folder
from data_prep.images import KEEP, Resize
from data_prep.index import index_shards
from data_prep.parquet import read_parquet
from data_prep.samples import ImageText, hash_split, sample_key
from data_prep.shards import (
    Job,
    Outcome,
    SplitPlan,
    Writers,
    merge,
    plan_shards,
    rejection,
    summary,
    write_dataset,
)
from data_prep.synthetic import write_synthetic
from data_prep.table import read_table
from plumbing import __version__
from plumbing.config import load_config, parse_mixed, to_dict
from plumbing.dist import DistInfo
from plumbing.errors import UserError, run_cli
from plumbing.logs import setup_logging

log = logging.getLogger("data_prep")

# Config keys that name where the inputs are, not what shapes the bytes: left out of the fingerprint.
PATH_KEYS = ("source", "images", "captions", "splits", "root", "shards", "image_root")


COMMANDS = ("cifar10", "flickr8k", "coco", "csv", "folder", "parquet", "index", "synthetic", "merge")


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `command` (the first word given, one of COMMANDS), only that subcommand
    is built: building every parser and option is most of a run's start-up (bench.prep's index
    against sha256 counts it). Without one (`--help`, a typo), every subcommand is named for the help
    and the error."""
    top = argparse.ArgumentParser(
        prog="python -m data_prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("--version", action="version", version=f"data_prep {__version__}")
    sub = top.add_subparsers(dest="dataset", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser | None:
        if command in COMMANDS and command != name:
            return None
        return sub.add_parser(name, help=help)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--config", type=Path, help="YAML PrepConfig to start from")
        p.add_argument(
            "--shard-size", type=int, dest="shards.shard_size", help="samples per shard (default 1000)"
        )
        p.add_argument("--workers", type=int, dest="shards.workers", help="writer processes (default 1)")
        p.add_argument(
            "--tasks",
            type=int,
            dest="shards.tasks",
            help="independent tasks sharing the work (default: 1, or the Slurm array's)",
        )
        p.add_argument("--task", type=int, dest="shards.task", help="this task's number, 0..tasks-1")
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

    def image_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--image-size", type=int, dest="image.size", help="resize on write to N pixels (default: keep)"
        )
        p.add_argument(
            "--resize-mode",
            choices=RESIZE_MODES,
            dest="image.resize_mode",
            help="img2dataset's modes (default keep_ratio: the short side N)",
        )
        p.add_argument(
            "--resize-only-if-bigger",
            action="store_const",
            const=True,
            dest="image.resize_only_if_bigger",
            help="leave smaller images as they are",
        )

    if p := add("cifar10", help="CIFAR-10 python release → shards"):
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
        image_options(p)
        common(p)

    if p := add("flickr8k", help="Flickr8k (official zips, folders or Kaggle layout) → shards"):
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
        image_options(p)
        common(p)

    if p := add("coco", help="COCO captions (official folders or zips) → shards"):
        p.add_argument(
            "--root",
            required=True,
            dest="coco.root",
            help="folder with annotations/ (or annotations_trainval2017.zip) and train2017/, val2017/ (or their zips)",
        )
        p.add_argument(
            "--year", dest="coco.year", help="release year when the folder holds several (2014, 2017)"
        )
        image_options(p)
        common(p)

    if p := add("csv", help="a CSV/TSV/JSONL table of image paths and captions (open_clip's) → shards"):
        p.add_argument("--source", required=True, dest="csv.source", help="the .csv, .tsv or .jsonl file")
        p.add_argument("--image-key", dest="csv.image_key", help="image path column (default filepath)")
        p.add_argument("--caption-key", dest="csv.caption_key", help="caption column (default title)")
        p.add_argument(
            "--separator", dest="csv.separator", help="field separator (default a TAB: \\t or tab)"
        )
        p.add_argument(
            "--split-key", dest="csv.split_key", help="column naming each row's split (default: hash split)"
        )
        p.add_argument(
            "--image-root",
            dest="csv.image_root",
            help="where relative image paths start (default: the table's folder)",
        )
        image_options(p)
        common(p)

    if p := add("folder", help="an imagefolder (metadata.jsonl/.csv + images) → shards"):
        p.add_argument("--source", required=True, dest="folder.source", help="the folder")
        p.add_argument("--caption-key", dest="folder.caption_key", help="caption column (default text)")
        image_options(p)
        common(p)

    if p := add("parquet", help="Parquet files as Hugging Face datasets writes them → shards"):
        p.add_argument(
            "--source",
            required=True,
            dest="parquet.source",
            help="a .parquet file, a folder of them, or a glob",
        )
        p.add_argument(
            "--image-key",
            dest="parquet.image_key",
            help="image column (default image: datasets' Image feature)",
        )
        p.add_argument(
            "--caption-key",
            dest="parquet.caption_key",
            help="caption column, a string or a list (default: text, caption, captions or sentences)",
        )
        image_options(p)
        common(p)

    if p := add("index", help="existing WebDataset shards (img2dataset's), indexed in place"):
        p.add_argument(
            "--shards",
            action="append",
            required=True,
            dest="index.shards",
            help="brace pattern, glob, file or folder of .tar shards, http(s):// URLs, pipe: commands, s3:// or "
            "gs:// URLs; repeatable (one per split)",
        )
        p.add_argument(
            "--split",
            action="append",
            dest="index.split",
            help="what they are (default train); one per --shards",
        )
        common(p)

    if p := add("synthetic", help="write the learnable synthetic set in the official formats"):
        p.add_argument("--seed", type=int, dest="seed", help="seed (default 0)")
        common(p)

    if p := add("merge", help="write the manifest once every task's shards are there"):
        p.add_argument("--out", required=True, help="the output folder the tasks wrote into")
        p.add_argument(
            "--quiet", action="store_const", const=False, dest="progress", help="(no progress bar to hide)"
        )
    return top


def main(argv: list[str] | None = None) -> int:
    return run_cli("data_prep", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = parse_mixed(parser(words[0] if words else None), argv)
    if args["dataset"] == "merge":
        if args["overrides"]:
            raise UserError(f"merge takes only --out, not {' '.join(args['overrides'])}")
        setup_logging()
        out = Path(args["out"])
        print(summary(merge(out), out))
        return 0
    config_file, overrides = args.pop("config"), args.pop("overrides")
    flags = {k: v for k, v in args.items() if v is not None}
    if "index.shards" in flags:  # ${VARIABLE}s name credentials (core.secrets): not OmegaConf interpolations
        flags["index.shards"] = [s.replace("${", "\\${") for s in flags["index.shards"]]
    cfg = load_config(PrepConfig, config_file, overrides, flags)
    setup_logging()
    if cfg.dataset == "synthetic":
        return _synthetic(cfg)
    task, tasks = task_slot(cfg.shards)
    with Writers(cfg.shards.workers) as writers:
        prepared = SOURCES[cfg.dataset](cfg)
        if tasks > 1:
            log.info("task %d of %d", task, tasks)
        outcome = _write(cfg, writers, prepared, task, tasks)
    print(closing_line(outcome, cfg.out_dir))
    return 0


def task_slot(shards: ShardsConfig) -> tuple[int, int]:
    """(task, tasks) from --task/--tasks, else from the Slurm array this runs in (plumbing.dist reads
    SLURM_ARRAY_TASK_ID/COUNT/MIN), else (0, 1)."""
    if shards.tasks and shards.task >= 0:  # given: the environment is not read (a rerun of some tasks)
        return shards.task, shards.tasks
    info = DistInfo.from_env()
    if shards.tasks:
        if info.array_count == shards.tasks:
            return info.array_index, shards.tasks
        raise UserError(
            f"shards.tasks={shards.tasks} needs this task's number: --task K (0..{shards.tasks - 1}), "
            f"or run it as a Slurm array of {shards.tasks} tasks"
        )
    if shards.task >= 0:
        raise UserError(f"shards.task={shards.task} needs the number of tasks: --tasks N")
    return info.array_index, info.array_count


def closing_line(outcome: Outcome, out: Path) -> str:
    if outcome.manifest is not None:
        return summary(outcome.manifest, out)
    shards = outcome.shards
    done = f"shards {shards.start}–{shards.stop - 1}" if len(shards) else "no shards (more tasks than shards)"
    return (
        f"task {outcome.task} of {outcome.tasks}: {done} of {outcome.total} are in {out} "
        f"({outcome.written} written, {outcome.kept} kept); when every task is done: "
        f"python -m data_prep merge --out {out}"
    )


@dataclass
class Prepared:
    """What a source found: samples per split (or existing shards, for index), where they came from,
    and what else the manifest should say."""

    splits: dict[str, SplitPlan]
    sources: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    jobs: list[Job] | None = None


def _write(cfg: PrepConfig, writers: Writers, prepared: Prepared, task: int, tasks: int) -> Outcome:
    """Shard what a source found into cfg.out: the fingerprint covers what shapes the bytes, not where
    files are; the stored config leaves out how the run was run (workers, tasks, …), so that one
    process and N tasks write the same manifest."""
    section = to_dict(getattr(cfg, cfg.dataset))
    identity: dict[str, Any] = {
        "inputs": {k: v for k, v in section.items() if k not in PATH_KEYS},
        "seed": cfg.seed,
        "source_checksums": {
            k: {f: v[f] for f in ("bytes", "files", "md5", "sha256")} for k, v in prepared.sources.items()
        },
    }
    if cfg.image.size:  # only when it shapes the bytes: outputs made before it existed stay valid
        identity["image"] = to_dict(cfg.image)
    stored = to_dict(cfg)
    for key in ("workers", "overwrite", "tasks", "task"):
        stored["shards"].pop(key)
    stored.pop("progress")
    jobs = prepared.jobs
    if jobs is None:
        jobs = plan_shards(cfg.out_dir, cfg.dataset, prepared.splits, cfg.shards.shard_size)
    return write_dataset(
        cfg.out_dir,
        cfg.dataset,
        jobs,
        {split: plan.rejected for split, plan in prepared.splits.items()},
        shard_size=cfg.shards.shard_size,
        writers=writers,
        overwrite=cfg.shards.overwrite,
        identity=identity,
        extra={"sources": prepared.sources, "config": stored, **prepared.extra},
        task=task,
        tasks=tasks,
        show_progress=cfg.progress,
        unit="shard" if prepared.jobs is not None else "img",
    )


def resize_of(cfg: PrepConfig) -> Resize:
    i = cfg.image
    return Resize(i.size, i.resize_mode, i.resize_only_if_bigger, i.quality) if i.size else KEEP


# --------------------------------------------------------------------------- sources


def _cifar10(cfg: PrepConfig) -> Prepared:
    c = cfg.cifar10
    if not c.verify:
        log.warning("--no-verify: MD5s are not checked against the official CIFAR-10 release")
    source = read_cifar10(Path(c.source), c.verify, list(c.templates), cfg.seed, resize_of(cfg))
    splits = {name: SplitPlan(list(rows)) for name, rows in source.splits.items()}
    return Prepared(splits, {"cifar10": asdict(source.info)}, {"classes": source.label_names})


def _flickr8k(cfg: PrepConfig) -> Prepared:
    f = cfg.flickr8k
    # --resize N (the long side at most N) is img2dataset's keep_ratio_largest, only if bigger.
    resize = Resize(f.resize, "keep_ratio_largest", True) if f.resize else resize_of(cfg)
    images = index_images(Path(f.images))
    captions = read_captions(Path(f.captions))
    split_lists, split_source = captions.splits, captions.split_source
    if f.splits:
        split_lists, split_source = read_splits(Path(f.splits))
    rejected = list(images.rejected)
    for name in sorted(set(captions.by_image) - set(images.refs)):
        rejected.append(rejection(name, "no image", f"captioned in {captions.where} but no such image"))
    usable = sorted(set(images.refs) & set(captions.by_image))
    if not split_lists:
        log.info("no Flickr_8k.*Images.txt found: using the hash split (75/12.5/12.5 %, see docs/DATA.md)")
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
                    rejection(name, "missing file", f"listed in the {split} split but not among the images")
                )
            elif name not in captions.by_image:
                plan.rejected.append(rejection(name, "no caption", "no captions"))
            elif name in assigned or keys.get(key, name) != name:
                plan.rejected.append(
                    rejection(name, "duplicate", "already in another split or a clashing key")
                )
            else:
                assigned.add(name)
                keys[key] = name
                texts = list(captions.by_image[name])
                plan.samples.append(
                    ImageText(key, key, images.refs[name], tuple(texts), name, split, resize, f.full_decode)
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
    return Prepared(plans, sources, extra)


def _coco(cfg: PrepConfig) -> Prepared:
    source = read_coco(Path(cfg.coco.root), cfg.coco.year, resize_of(cfg))
    return Prepared(
        source.splits, source.sources, {"split_source": "the captions files", "rejected": source.rejected}
    )


def _csv(cfg: PrepConfig) -> Prepared:
    c = cfg.csv
    root = Path(c.image_root) if c.image_root else None
    table = read_table(
        Path(c.source), c.image_key, c.caption_key, c.delimiter, c.split_key, resize_of(cfg), root
    )
    if not c.split_key:
        log.info("no --split-key: using the hash split (75/12.5/12.5 % train/dev/test, see docs/DATA.md)")
    return Prepared(
        table.splits, table.sources, {"split_source": table.split_source, "rejected": table.rejected}
    )


def _folder(cfg: PrepConfig) -> Prepared:
    found = read_folder(Path(cfg.folder.source), cfg.folder.caption_key, resize_of(cfg))
    return Prepared(
        found.splits, found.sources, {"split_source": found.split_source, "rejected": found.rejected}
    )


def _parquet(cfg: PrepConfig) -> Prepared:
    p = cfg.parquet
    found = read_parquet(p.source, p.image_key, p.caption_key, resize_of(cfg))
    if found.split_source.startswith("hash"):
        log.info(
            "no split in the file names: using the hash split (75/12.5/12.5 % train/dev/test, see README)"
        )
    return Prepared(
        found.splits, found.sources, {"split_source": found.split_source, "rejected": found.rejected}
    )


def _index(cfg: PrepConfig) -> Prepared:
    found = index_shards(list(cfg.index.shards), list(cfg.index.split))
    splits = {split: SplitPlan([], rejected) for split, rejected in found.rejected.items()}
    return Prepared(splits, found.sources, {"indexed_in_place": True}, jobs=list(found.jobs))


SOURCES = {
    "cifar10": _cifar10,
    "flickr8k": _flickr8k,
    "coco": _coco,
    "csv": _csv,
    "folder": _folder,
    "parquet": _parquet,
    "index": _index,
}


def _synthetic(cfg: PrepConfig) -> int:
    settings = {"seed": cfg.seed, **to_dict(cfg.synthetic)}
    files = write_synthetic(cfg.out_dir, settings, cfg.shards.overwrite)
    print(f"synthetic data in the official formats → {cfg.out_dir}:")
    for name, path in files.items():
        print(f"  {name:9s} {path}")
    beside = cfg.out_dir.parent  # shards go beside the raw files, as launch/demo.sh puts them
    print(
        "next:\n"
        f"  python -m data_prep cifar10 --source {files['cifar10']} --no-verify --out {beside / 'cifar10'}\n"
        f"  python -m data_prep flickr8k --images {files['images']} --captions {files['captions']} --out {beside / 'flickr8k'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
