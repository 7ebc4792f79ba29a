"""Benchmark: data_prep flickr8k against copying the same JPEG bytes into a tar, in the same run.

    python -m bench.prep [--images 2000] [--repeat 3]

Input: ~2,000 synthetic ~500 px JPEGs in the extracted Flickr8k layout (Flicker8k_Dataset/,
Flickr8k.token.txt, split lists). Baseline: one process reads each file and adds it to a tarfile.
Targets (issue #2): ≥ 0.8 of the baseline's images/s at --workers 1, ≥ 1.6× speed-up at --workers 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_prep.cli import main as prep_main


def make_input(root: Path, n: int) -> Path:
    """~500×375 JPEGs with smooth content and some texture, the size of real Flickr8k photos."""
    images = root / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{1000000000 + i * 7919}_{i:010x}.jpg" for i in range(n)]
    yy, xx = np.mgrid[0:375, 0:500]
    for i, name in enumerate(names):
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + i) % 256], -1).astype(
            np.float32
        )
        base += rng.normal(0, 12, base.shape)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x, y = rng.integers(0, 450), rng.integers(0, 330)
            draw.ellipse((x, y, x + 50, y + 40), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        (images / name).write_bytes(out.getvalue())
    tokens = "".join(
        f"{name}#{k}\tcaption {k} of image {i} .\n" for i, name in enumerate(names) for k in range(5)
    )
    (root / "Flickr8k.token.txt").write_text(tokens)
    cut = [int(n * 0.75), int(n * 0.875)]
    for split, part in zip(("train", "dev", "test"), np.split(np.array(names), cut)):
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(part) + "\n")
    return images


def baseline(images: Path, out: Path) -> int:
    """The same bytes into one tar, in file order, in one process: the floor of what prep must do."""
    files = sorted(images.glob("*.jpg"))
    with tarfile.open(out, "w") as tar:
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return len(files)


def ours(images: Path, captions: Path, out: Path, workers: int, shard_size: int) -> int:
    argv = ["flickr8k", "--images", str(images), "--captions", str(captions), "--out", str(out)]
    argv += ["--workers", str(workers), "--shard-size", str(shard_size), "--quiet"]
    with contextlib.redirect_stdout(io.StringIO()):
        code = prep_main(argv)
    if code != 0:
        raise SystemExit("data_prep failed")
    manifest = json.loads((out / "manifest.json").read_text())
    return sum(s["num_samples"] for s in manifest["splits"].values())


def best_rates(runs: dict[str, Callable[[Path], int]], scratch: Path, repeat: int) -> dict[str, float]:
    """Best images/s of each run; the runs take turns so that page-cache writeback hits all alike."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(repeat):
        for name, run in runs.items():
            target = scratch / f"{name}-{i}"
            start = time.perf_counter()
            n = run(target)
            rates[name].append(n / (time.perf_counter() - start))
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return {name: max(r) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--shard-size", type=int, default=200, help="10 shards of 200: enough for 2 workers to share"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = make_input(root / "flickr", args.images)
        captions = root / "flickr" / "Flickr8k.token.txt"
        mb = sum(p.stat().st_size for p in images.glob("*.jpg")) / 2**20
        print(f"input: {args.images} JPEGs, {mb:.0f} MiB, best of {args.repeat}")
        rates = best_rates(
            {
                "base": lambda o: baseline(images, o),
                "one": lambda o: ours(images, captions, o, 1, args.shard_size),
                "two": lambda o: ours(images, captions, o, 2, args.shard_size),
            },
            root,
            args.repeat,
        )
        base, one, two = rates["base"], rates["one"], rates["two"]
    print(f"{'run':28s} {'images/s':>10s} {'ratio':>8s}")
    print(f"{'baseline tarfile copy':28s} {base:10.0f} {1:8.2f}")
    print(f"{'data_prep --workers 1':28s} {one:10.0f} {one / base:8.2f}   (target >= 0.80 of baseline)")
    print(
        f"{'data_prep --workers 2':28s} {two:10.0f} {two / base:8.2f}   (speed-up over 1 worker {two / one:.2f}x, target >= 1.60x)"
    )


if __name__ == "__main__":
    main()
