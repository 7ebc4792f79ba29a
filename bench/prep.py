"""Benchmark: data_prep on a user's own data against the work it cannot avoid, in the same run.

    python -m bench.prep [--images 2000] [--repeat 5] [--out FILE]

Input: ~2,000 synthetic 640×480 JPEGs (COCO's size) and an open_clip table (`filepath<TAB>title`).

* Floor (the least prep must do, the plain way, one process): read each JPEG, write the same bytes in
  shards of the same size through the project's tar writer (plumbing.tars), sha256 each shard.
  Target: `data_prep csv` (one task) ≥ 0.8 of its images/s.
* Cores: `data_prep csv --tasks 2` (both tasks at once, then `merge`), and `--workers 2` in one
  process, against one task. Target ≥ 1.7× on a 2-core machine. The floor in two processes (each half
  the files) is the machine's own parallel-copy speed-up, reported beside it: a VM whose two cores do
  not double a plain copy cannot double prep. Each run's CPU seconds are reported too: two tasks that
  cost the CPU time of one are held back by the machine (other load), not by prep.
* Index: `data_prep index` of img2dataset-layout shards (the csv run's) against sha256 of the same
  files (one read of each shard: hashlib.file_digest, ~4 % faster here than plumbing's sha256_file).
  Target ≥ 0.9. Also on the same images at 256 px (img2dataset's default size): three tar members per
  ~40 KiB instead of per ~120, where index's Python work per member weighs three times as much; and
  on the 640×480 shards as webdataset's TarWriter writes them (img2dataset's writer: a PAX header,
  its mtime, before every member, so twice the headers). index reads and walks on one thread and
  hashes on a second (two cores: its CPU seconds beside sha256's say what the walk costs). A real set
  has thousands of shards, over which the command's fixed cost (~10 ms: planning, the part log, the
  manifest) is spread: here each set is indexed `--index-copies` times over (hard links, the same
  bytes under more names), so that it weighs about as it does there.
* Resize on write: `data_prep`'s own image step (data_prep.images.prepare_image) to half and a quarter
  of the source's short side, against plain PIL doing the same (full decode, BOX resize, the same JPEG
  encode), one core. Target at half ≥ 2× (JPEG draft: DCT scaling).
* Decode: what one loader core turns into CLIP input per second (core.shards.decode + the trainer's
  evaluation transform at 224 px), from the original JPEGs and from `--image-size 256` ones.

Every timed run forks from one process (same imports, same start-up) that holds what a data_prep
process holds and no torch (a fork of torch's ~500 MB is a cost no data_prep run pays: the decode
measurement, which needs it, runs in the parent), and runs take turns, best of `repeat` after an
untimed warm-up. Every run, the sha256 baseline included, has one core unless it says two. Other processes on the same cores skew every ratio, the parallel ones most:
the 1-minute load average (os.getloadavg) is printed beside each run and each ratio — read the ratios
of a run made on an idle machine (load below ~0.3). Writes bench/results/prep-<cpu>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import multiprocessing
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bench.common import Target, machine, slug, write_results
from core.manifest import load_manifest
from core.shards import decode, read_split
from data_prep.cli import main as prep_main
from data_prep.images import Resize, prepare_image
from plumbing.files import sha256_file
from plumbing.tars import write_tar

SIZE = (640, 480)


def make_input(root: Path, n: int) -> Path:
    """640×480 JPEGs with smooth content and some texture (~COCO's size), and their table."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : SIZE[1], 0 : SIZE[0]]
    rows = []
    for i in range(n):
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + i) % 256], -1).astype(
            np.float32
        )
        base += rng.normal(0, 12, base.shape)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(8):
            x, y = rng.integers(0, SIZE[0] - 60), rng.integers(0, SIZE[1] - 50)
            draw.ellipse((x, y, x + 60, y + 50), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        name = f"{i:06d}.jpg"
        image.save(images / name, format="JPEG", quality=90)
        rows.append(f"images/{name}\tpicture {i}: coloured ellipses on stripes\n")
    (root / "train.tsv").write_text("filepath\ttitle\n" + "".join(rows))
    return root / "train.tsv"


def floor(files: list[Path], out: Path, shard_size: int) -> int:
    """The same bytes, in shards of the same size, through the project's tar writer, each shard then
    hashed: what prep must do at the least."""
    out.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(files), shard_size)):
        shard = out / f"shard-{index:06d}.tar"
        write_tar(str(shard), [(p.name, p.read_bytes()) for p in files[start : start + shard_size]])
        sha256_file(shard)
    return len(files)


def file_sha256(path: Path) -> str:
    """sha256 of a file the fastest plain way: hashlib.file_digest (one read, into a reused buffer)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def as_tarwriter(shard: Path, out: Path) -> None:
    """`shard`'s members as webdataset's TarWriter (img2dataset's writer) writes them: Python's tarfile
    in PAX format with a float mtime, so a PAX header (its mtime record) before every member."""
    import tarfile

    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(shard) as source, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in source:
            data = source.extractfile(member)
            member.mtime = 1733500000.25
            tar.addfile(member, data)


def linked(where: Path, splits: list[str], copies: int) -> Path:
    """A folder holding each split's shards of `where` `copies` times over, as hard links."""
    out = where.with_name(f"{where.name}-x{copies}")
    for split in splits:
        (out / split).mkdir(parents=True)
        for shard in sorted((where / split).glob("*.tar")):
            for k in range(copies):
                os.link(shard, out / split / f"{k:03d}-{shard.name}")
    return out


def prep(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = prep_main([*argv, "--quiet"])
    if code != 0:
        raise SystemExit(f"data_prep {' '.join(argv)} failed")


def forked(*calls: Callable[[], object]) -> None:
    """Run the calls in forked processes at once and wait for all (what N tasks on one machine are)."""
    # Frozen, this process's objects are never walked by a child's garbage collector, so a child
    # copies only the pages it writes to (the gc module's docs: freeze before fork). This process holds
    # no torch (see `main`): what a data_prep process holds.
    gc.freeze()
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=call) for call in calls]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a forked run exited {p.exitcode}")


def samples_in(out: Path) -> int:
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(s["num_samples"] for s in manifest["splits"].values())


@dataclass(frozen=True)
class Rate:
    """A run's best items/s, its CPU seconds (this process and its children) and the 1-minute load
    average just after it (the machine's other work included)."""

    rate: float
    cpu: float
    load: float


def best_rates(runs: dict[str, Callable[[Path], int]], scratch: Path, repeat: int) -> dict[str, Rate]:
    """Best items/s of each run after an untimed warm-up round (page cache); the runs take turns so
    that page-cache writeback hits all alike."""
    found: dict[str, list[Rate]] = {name: [] for name in runs}
    for i in range(-1, repeat):
        for name, run in runs.items():
            target = scratch / f"{name}-{i}"
            cpu = _cpu()
            start = time.perf_counter()
            n = run(target)
            wall = time.perf_counter() - start
            if i >= 0:
                found[name].append(Rate(n / wall, _cpu() - cpu, os.getloadavg()[0]))
            shutil.rmtree(target, ignore_errors=True)
    return {name: max(r, key=lambda x: x.rate) for name, r in found.items()}


def _cpu() -> float:
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def plain_resize(data: bytes, short: int, resample: Image.Resampling | None = None) -> bytes:
    """Resizing with plain PIL, no DCT scaling: a full decode, `Image.resize` to the size prepare_image's
    keep_ratio gives (Pillow's default filter, bicubic, or `resample`), the same JPEG encode."""
    with Image.open(io.BytesIO(data)) as image:
        picture = image.convert("RGB")
    w, h = picture.size
    size = (round(w * short / h), short) if w >= h else (short, round(h * short / w))
    out = io.BytesIO()
    picture.resize(size, resample).save(out, format="JPEG", quality=95)
    return out.getvalue()


def resize_rates(files: list[Path], short: int, repeat: int) -> dict[str, Rate]:
    """Images/s of plain PIL (its default filter, and the BOX filter data_prep used before) and of
    data_prep's prepare_image resizing to `short` px, one core, turns taken, best of `repeat`."""
    datas = [p.read_bytes() for p in files]
    runs: dict[str, Callable[[bytes], object]] = {
        "plain": lambda d: plain_resize(d, short),
        "box": lambda d: plain_resize(d, short, Image.Resampling.BOX),
        "prep": lambda d: prepare_image(d, Resize(short, "keep_ratio")),
    }
    found: dict[str, list[Rate]] = {name: [] for name in runs}
    for i in range(-1, repeat):
        for name, one in runs.items():
            cpu, start = _cpu(), time.perf_counter()
            for data in datas:
                one(data)
            wall = time.perf_counter() - start
            if i >= 0:
                found[name].append(Rate(len(datas) / wall, _cpu() - cpu, os.getloadavg()[0]))
    return {name: max(r, key=lambda x: x.rate) for name, r in found.items()}


def decode_rate(manifest: Path, count: int) -> float:
    """Samples/s one core decodes and turns into CLIP input (the trainer's evaluation transform)."""
    from core.preprocess import ImageTransform  # here: it imports torch, which the timed runs must not hold

    transform = ImageTransform(224, (224, 224))
    raw = [s for s, _ in zip(read_split(load_manifest(manifest), "train"), range(count))]
    rng = random.Random(0)
    start = time.perf_counter()
    for sample in raw:
        transform(decode(sample)["image"], rng)
    return len(raw) / (time.perf_counter() - start)


def timed_runs(args: argparse.Namespace, root: Path) -> None:
    """Every timed run, in a process without torch; their rates go to ROOT/runs.json, the input and the
    shards stay in ROOT for the decode measurement."""
    if "torch" in sys.modules:
        raise SystemExit("bench.prep: the timed runs' process imported torch: their forks would copy it")
    table = make_input(root / "input", args.images)
    files = sorted((root / "input" / "images").glob("*.jpg"))
    mb = sum(p.stat().st_size for p in files) / 2**20
    csv = ["csv", "--source", str(table), "--shard-size", str(args.shard_size)]

    def one(out: Path) -> int:
        forked(lambda: prep(*csv, "--out", str(out)))
        return samples_in(out)

    def two(out: Path) -> int:
        forked(*(lambda k=k: prep(*csv, "--out", str(out), "--tasks", "2", "--task", str(k)) for k in (0, 1)))
        prep("merge", "--out", str(out))
        return samples_in(out)

    def workers2(out: Path) -> int:
        forked(lambda: prep(*csv, "--out", str(out), "--workers", "2"))
        return samples_in(out)

    def floor_one(out: Path) -> int:
        forked(lambda: floor(files, out, args.shard_size))
        return len(files)

    def floor_two(out: Path) -> int:
        half = len(files) // 2
        forked(
            lambda: floor(files[:half], out / "a", args.shard_size),
            lambda: floor(files[half:], out / "b", args.shard_size),
        )
        return len(files)

    shards = root / "img2dataset"  # the csv output's shards, as a folder of shards to index
    prep(*csv, "--out", str(shards))
    splits = [s for s in ("train", "dev", "test") if any((shards / s).glob("*.tar"))]

    small = root / "small"  # img2dataset's default size: 3 tar members per ~40 KiB, not per ~120
    prep(*csv, "--out", str(small), "--image-size", "256")
    pax = root / "pax"  # the same shards as webdataset's TarWriter (img2dataset's) writes them
    for split in splits:
        for shard in sorted((shards / split).glob("*.tar")):
            as_tarwriter(shard, pax / split / shard.name)
    shutil.copy(shards / "manifest.json", pax / "manifest.json")  # for samples_in

    copies = {where: linked(where, splits, args.index_copies) for where in (shards, small, pax)}

    def hashed(out: Path, where: Path = shards) -> int:
        forked(lambda: [file_sha256(p) for s in splits for p in sorted((copies[where] / s).glob("*.tar"))])
        return samples_in(where) * args.index_copies

    def index(out: Path, where: Path = shards) -> int:
        patterns = [w for s in splits for w in ("--shards", str(copies[where] / s), "--split", s)]
        forked(lambda: prep("index", *patterns, "--out", str(out)))
        return samples_in(out)

    rates = best_rates(
        {
            "floor": floor_one,
            "floor_two": floor_two,
            "one": one,
            "two": two,
            "workers2": workers2,
            "hash": hashed,
            "index": index,
            "hash_256": lambda out: hashed(out, small),
            "index_256": lambda out: index(out, small),
            "hash_pax": lambda out: hashed(out, pax),
            "index_pax": lambda out: index(out, pax),
        },
        root,
        args.repeat,
    )
    sample = files[: args.resize]
    half = SIZE[1] // 2
    resized = {
        f"resize_{n}_{name}": rate
        for n in (half, half // 2)
        for name, rate in resize_rates(sample, n, args.repeat).items()
    }
    rates.update(resized)
    runs = {"rates": {name: asdict(rate) for name, rate in rates.items()}, "mb": mb}
    (root / "runs.json").write_text(json.dumps(runs))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--shard-size", type=int, default=200, help="10 shards of 200: enough for 2 tasks to share"
    )
    parser.add_argument("--decode", type=int, default=300, help="images decoded per loader-core measurement")
    parser.add_argument("--resize", type=int, default=300, help="images resized per resize measurement")
    parser.add_argument("--index-copies", type=int, default=8, help="each set indexed this many times over")
    parser.add_argument("--out", default="", help="results file (default bench/results/prep-<cpu>.json)")
    parser.add_argument("--runs-in", default="", help=argparse.SUPPRESS)  # the timed runs' process
    args = parser.parse_args()
    if args.runs_in:
        timed_runs(args, Path(args.runs_in))
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # The timed runs fork from a process of their own, which holds what a data_prep process holds
        # and no torch: this one holds torch (bench/__init__.py, the decode measurement), and a fork of
        # its ~500 MB made each of --workers 2's pool processes cost CPU that a real run never pays.
        # bench/__init__.py set DS_ACCELERATOR in this environment, so the child does not import torch.
        sizes = {"--images": args.images, "--repeat": args.repeat, "--shard-size": args.shard_size}
        sizes["--resize"], sizes["--index-copies"] = args.resize, args.index_copies
        mine = [word for flag, n in sizes.items() for word in (flag, str(n))]
        subprocess.run([sys.executable, "-m", "bench.prep", *mine, "--runs-in", tmp], check=True)
        measured = json.loads((root / "runs.json").read_text())
        rates = {name: Rate(**rate) for name, rate in measured["rates"].items()}
        mb, half = measured["mb"], SIZE[1] // 2
        shards, small = root / "img2dataset", root / "small"
        decoded = {
            "original": decode_rate(shards / "manifest.json", args.decode),
            "256": decode_rate(small / "manifest.json", args.decode),
        }
        small_kb = (
            sum(
                s["bytes"]
                for s in json.loads((small / "manifest.json").read_text())["splits"]["train"]["shards"]
            )
            / 2**10
        )
        small_kb /= samples_in(small) or 1
    load = (load_before, os.getloadavg()[0])

    def ratio(name: str, a: str, b: str, bound: float) -> Target:
        """rates[a] / rates[b], with the load average each ran under."""
        return Target(
            name, rates[a].rate / rates[b].rate, bound, note=f"load {rates[a].load:.1f} / {rates[b].load:.1f}"
        )

    targets = [
        ratio("data_prep csv, 1 task / floor", "one", "floor", 0.8),
        ratio("data_prep csv, 2 tasks + merge / 1 task", "two", "one", 1.7),
        ratio("data_prep csv --workers 2 / 1 task", "workers2", "one", 1.7),
        ratio("data_prep index / sha256 of the shards", "index", "hash", 0.9),
        ratio("the same at 256 px (img2dataset's default)", "index_256", "hash_256", 0.9),
        ratio("the same as webdataset's TarWriter writes", "index_pax", "hash_pax", 0.9),
        ratio(
            f"resize to {half} px (half): prep / plain PIL",
            f"resize_{half}_prep",
            f"resize_{half}_plain",
            2.0,
        ),
    ]
    box = {n: rates[f"resize_{n}_prep"].rate / rates[f"resize_{n}_box"].rate for n in (half, half // 2)}
    rows = [
        ("floor: tar writer + sha256, 1 process", "floor"),
        ("floor: 2 processes, half the files each", "floor_two"),
        ("data_prep csv, 1 task", "one"),
        ("data_prep csv, 2 tasks at once + merge", "two"),
        ("data_prep --workers 2 (csv, one process)", "workers2"),
        ("sha256 of the shards", "hash"),
        ("data_prep index (the same shards, in place)", "index"),
        ("sha256 of shards of 256 px JPEGs", "hash_256"),
        ("data_prep index of those", "index_256"),
        ("sha256 of the 640×480 shards as TarWriter writes", "hash_pax"),
        ("data_prep index of those", "index_pax"),
        *[
            (f"resize to {n} px ({'half' if n == half else 'a quarter'}): {who}", f"resize_{n}_{key}")
            for n in (half, half // 2)
            for who, key in (
                ("plain PIL (default filter)", "plain"),
                ("plain PIL, BOX filter", "box"),
                ("data_prep (JPEG draft)", "prep"),
            )
        ],
    ]
    text = "\n".join(
        [
            f"input: {args.images} JPEGs {SIZE[0]}×{SIZE[1]}, {mb:.0f} MiB, shards of {args.shard_size}, best of {args.repeat}; "
            f"index and sha256 over {args.index_copies} copies of each set",
            f"{'run':52s} {'images/s':>10s} {'CPU s':>7s} {'load':>5s}",
            *[
                f"{label:52s} {rates[key].rate:10.0f} {rates[key].cpu:7.2f} {rates[key].load:5.1f}"
                for label, key in rows
            ],
            f"{'one loader core: decode + CLIP transform, 640×480':52s} {decoded['original']:10.0f}",
            f"{f'one loader core: the same at 256 px ({small_kb:.0f} KiB)':52s} {decoded['256']:10.0f}",
            f"the machine's own parallel-copy speed-up (floor, 2 processes / 1): {rates['floor_two'].rate / rates['floor'].rate:.3f}",
            f"CPU seconds, 2 tasks / 1 task: {rates['two'].cpu / rates['one'].cpu:.3f} (1.0: the same work, split)",
            "CPU seconds, index / sha256 (two threads / one): "
            + ", ".join(
                f"{rates[f'index{k}'].cpu / rates[f'hash{k}'].cpu:.3f}" for k in ("", "_256", "_pax")
            ),
            f"resize, data_prep / plain PIL with the BOX filter: {box[half]:.3f} at half, {box[half // 2]:.3f} at a quarter; "
            f"data_prep / plain PIL at a quarter: {rates[f'resize_{half // 2}_prep'].rate / rates[f'resize_{half // 2}_plain'].rate:.3f}",
            f"load average at the start and the end: {load[0]:.1f}, {load[1]:.1f} ({os.cpu_count()} cores)",
            *[t.line() for t in targets],
        ]
    )
    print(text)
    results: dict[str, object] = {k: v.rate for k, v in rates.items()}
    results |= {f"{k}_cpu_s": v.cpu for k, v in rates.items()} | {
        f"{k}_load": v.load for k, v in rates.items()
    }
    results |= {f"decode_{k}": v for k, v in decoded.items()}
    path = write_results(f"prep-{slug(machine()['cpu'])}", results, targets, text, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
