"""Fixture files in the official formats, written by the tests (tiny, but shaped like the real ones)."""

from __future__ import annotations

import csv
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.pickles import py2_pickle

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def cifar_batches(rows: int, seed: int = 0) -> dict[str, dict]:
    """The six batches as dicts with the official bytes keys, random pixels and labels."""
    rng = np.random.default_rng(seed)
    batches = {}
    for i, name in enumerate(BATCHES):
        label = b"testing batch 1 of 1" if name == "test_batch" else f"training batch {i + 1} of 5".encode()
        labels = [int(x) for x in rng.integers(0, 10, rows)]
        batches[name] = {
            b"batch_label": label,
            b"labels": labels,
            b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
            b"filenames": [f"{LABELS[y]}_s_{i * rows + j:06d}.png".encode() for j, y in enumerate(labels)],
        }
    return batches


def meta() -> dict:
    return {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in LABELS], b"num_vis": 3072}


def write_cifar_folder(root: Path, batches: dict[str, dict]) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(py2_pickle(meta()))
    for name, batch in batches.items():
        (folder / name).write_bytes(py2_pickle(batch))
    (folder / "readme.html").write_text("<html></html>")
    return folder


def write_cifar_tarball(path: Path, batches: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        members = [("batches.meta", py2_pickle(meta()))] + [(n, py2_pickle(b)) for n, b in batches.items()]
        for name, data in members:
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def jpeg(seed: int, size: tuple[int, int] = (50, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=85)
    return out.getvalue()


def flickr_names(n: int) -> list[str]:
    return [f"{1000000000 + 7919 * i}_{i:010x}.jpg" for i in range(n)]


class FlickrFixture:
    """A small Flickr8k with the real quirks: the bogus `.jpg.1` key, a split entry whose image is
    missing, a JPEG that does not decode, an image in no split, macOS `__MACOSX/` litter."""

    def __init__(self, n: int = 12) -> None:
        self.names = flickr_names(n)
        self.images = {name: jpeg(i) for i, name in enumerate(self.names)}
        self.corrupt = self.names[3]
        self.images[self.corrupt] = self.images[self.corrupt][:200]  # truncated mid-stream
        self.outside = self.names[-1]  # captioned, but in no split list
        self.missing = "2999999999_deadbeef00.jpg"  # listed in a split, no such image
        self.captions = {
            name: [f"caption {k} of {name[:10]}, with a comma ." for k in range(5)] for name in self.names
        }
        listed = self.names[:-1]
        self.splits = {
            "train": listed[: len(listed) - 4] + [self.missing],
            "dev": listed[-4:-2],
            "test": listed[-2:],
        }

    def token_text(self) -> str:
        lines = [f"{name}#{k}\t{c}" for name, caps in self.captions.items() for k, c in enumerate(caps)]
        lines.append("2258277193_586949ec62.jpg.1#0\tA bogus key that the official file carries .")
        return "\n".join(lines) + "\n"

    def split_files(self) -> dict[str, str]:
        names = {
            "train": "Flickr_8k.trainImages.txt",
            "dev": "Flickr_8k.devImages.txt",
            "test": "Flickr_8k.testImages.txt",
        }
        return {names[s]: "\n".join(v) + "\n" for s, v in self.splits.items()}

    def write_zips(self, root: Path) -> tuple[Path, Path]:
        images, text = root / "Flickr8k_Dataset.zip", root / "Flickr8k_text.zip"
        with zipfile.ZipFile(images, "w") as z:
            for name, data in self.images.items():
                z.writestr(f"Flicker8k_Dataset/{name}", data)
                z.writestr(f"__MACOSX/Flicker8k_Dataset/._{name}", b"\x00\x05\x16\x07junk")
        with zipfile.ZipFile(text, "w") as z:
            z.writestr("Flickr8k.token.txt", self.token_text())
            z.writestr("Flickr8k.lemma.token.txt", self.token_text())
            for name, body in self.split_files().items():
                z.writestr(name, body)
            z.writestr("readme.txt", "fixture")
        return images, text

    def write_folders(self, root: Path) -> tuple[Path, Path]:
        images, text = root / "Flicker8k_Dataset", root / "Flickr8k_text"
        images.mkdir(parents=True)
        text.mkdir()
        for name, data in self.images.items():
            (images / name).write_bytes(data)
        (text / "Flickr8k.token.txt").write_text(self.token_text())
        for name, body in self.split_files().items():
            (text / name).write_text(body)
        return images, text

    def write_kaggle(self, root: Path) -> tuple[Path, Path]:
        """Kaggle layout: Images/ + captions.txt, a CSV whose captions hold commas and quotes."""
        images = root / "Images"
        images.mkdir(parents=True)
        for name, data in self.images.items():
            (images / name).write_bytes(data)
        self.captions[self.names[0]][1] = 'A "quoted" dog, running , fast .'
        with open(root / "captions.txt", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            for name, caps in self.captions.items():
                for c in caps:
                    writer.writerow([name, c])
        return images, root / "captions.txt"
