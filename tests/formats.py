"""Fixture files in the official formats, written by the tests (tiny, but shaped like the real ones)."""

from __future__ import annotations

import csv
import io
import json
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


# --------------------------------------------------------------------------- data users bring


def picture(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG") -> bytes:
    """A small photo-like image in `fmt` (JPEG, PNG, WEBP, GIF, BMP)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


class CocoFixture:
    """COCO captions 2017 as the official release ships it (annotations/captions_{train,val}2017.json,
    train2017/, val2017/, or the three zips), with its quirks: 5–7 captions per image, captions with
    stray spaces and newlines, and the faults users meet: an empty caption, an image the JSON lists
    but the folder lacks, captions of an image id the JSON does not list, a truncated JPEG."""

    def __init__(self, train: int = 6, val: int = 3) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.captions: dict[str, dict[str, list[str]]] = {}  # split → file name → cleaned captions
        self.json: dict[str, dict] = {}
        self.missing: dict[str, str] = {}  # split → the image its JSON lists but its folder lacks
        ann_id = 1000
        for split, n, base in (("train", train, 100), ("val", val, 900)):
            images, annotations, files, expected = [], [], {}, {}
            for i in range(n):
                image_id = base + 7 * i
                name = f"{image_id:012d}.jpg"
                images.append({"id": image_id, "file_name": name, "width": 64, "height": 48, "license": 1})
                files[name] = picture(image_id)
                texts = [f"A photo number {i} of the {split} set, take {k}." for k in range(5 + i % 3)]
                expected[name] = texts
                for k, text in enumerate(texts):
                    raw = f"  {text}\n" if k == 1 else text  # COCO's stray spaces and newlines
                    annotations.append({"id": ann_id, "image_id": image_id, "caption": raw})
                    ann_id += 1
            # an empty caption among an image's others, then the faults
            annotations.append({"id": ann_id, "image_id": images[0]["id"], "caption": " \n"})
            annotations.append({"id": ann_id + 1, "image_id": 999999, "caption": "An image nobody listed."})
            ann_id += 2
            self.missing[split] = f"{base + 5000:012d}.jpg"
            images.append({"id": base + 5000, "file_name": self.missing[split], "width": 64, "height": 48})
            annotations.append({"id": ann_id, "image_id": base + 5000, "caption": "Its file is gone."})
            ann_id += 1
            self.json[split] = {
                "info": {"description": "COCO 2017 Dataset", "year": 2017},
                "licenses": [{"id": 1, "name": "Attribution License"}],
                "images": images,
                "annotations": annotations,
            }
            self.files[split], self.captions[split] = files, expected
        self.corrupt = sorted(self.files["train"])[2]
        self.files["train"][self.corrupt] = self.files["train"][self.corrupt][:300]

    def write_folders(self, root: Path) -> Path:
        (root / "annotations").mkdir(parents=True)
        for split in ("train", "val"):
            (root / "annotations" / f"captions_{split}2017.json").write_text(json.dumps(self.json[split]))
            (root / f"{split}2017").mkdir()
            for name, data in self.files[split].items():
                (root / f"{split}2017" / name).write_bytes(data)
        return root

    def write_zips(self, root: Path) -> Path:
        root.mkdir(parents=True)
        with zipfile.ZipFile(root / "annotations_trainval2017.zip", "w") as z:
            for split in ("train", "val"):
                z.writestr(f"annotations/captions_{split}2017.json", json.dumps(self.json[split]))
                z.writestr(
                    f"annotations/instances_{split}2017.json", json.dumps({"images": [], "annotations": []})
                )
        for split in ("train", "val"):
            with zipfile.ZipFile(root / f"{split}2017.zip", "w") as z:
                for name, data in self.files[split].items():
                    z.writestr(f"{split}2017/{name}", data)
        return root


class TableFixture:
    """An open_clip CSV (tab-separated, columns filepath and title) over images in several formats,
    one row per (image, caption), paths relative to the table (`../` included) and absolute, and the
    faults users meet: a missing file, an empty caption, a truncated JPEG, a text file named .jpg."""

    def __init__(self, root: Path, n: int = 12) -> None:
        images, lists = root / "images", root / "lists"
        images.mkdir(parents=True)
        lists.mkdir()
        formats = ["JPEG", "JPEG", "PNG", "WEBP", "GIF"]
        self.expected: dict[str, list[str]] = {}  # image path relative to lists/ → captions
        rows: list[tuple[str, str]] = []
        for i in range(n):
            fmt = formats[i % len(formats)]
            name = f"img {i:03d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
            (images / name).write_bytes(picture(i, (40 + i, 30 + 2 * i), fmt))
            path = f"../images/{name}" if i % 4 else str((images / name).resolve())
            captions = [f"picture {i}, first caption", f'picture {i} said "twice"'][: 1 + i % 2]
            rows += [(path, c) for c in captions]
            self.expected[f"../images/{name}"] = captions
        (images / "broken.jpg").write_bytes(picture(99)[:200])
        (images / "notes.jpg").write_text("not an image at all\n")
        rows += [("../images/gone.jpg", "a missing file"), ("../images/img 001.jpg", "  ")]
        rows += [("../images/broken.jpg", "a truncated JPEG"), ("../images/notes.jpg", "a text file")]
        self.path = lists / "train.tsv"
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f, delimiter="\t")
            writer.writerow(["filepath", "title"])
            writer.writerows(rows)
        self.rows = rows


def write_imagefolder(root: Path) -> dict[str, dict[str, list[str]]]:
    """Hugging Face's imagefolder with split folders (train/, validation/) each holding a
    metadata.jsonl (file_name + text), an image in a class sub-folder, a PNG; and the faults: an image
    no row names, a row whose image is missing, a file_name that leaves the folder. Returns split →
    image path (relative to root) → captions."""
    expected: dict[str, dict[str, list[str]]] = {}
    for split, n in (("train", 6), ("validation", 3)):
        folder = root / split
        (folder / "cats").mkdir(parents=True)
        rows, expected[split] = [], {}
        for i in range(n):
            name = f"cats/{i:02d}.png" if i == 1 else f"{i:02d}.jpg"
            (folder / name).write_bytes(picture(10 * i + n, fmt="PNG" if i == 1 else "JPEG"))
            text = f"{split} picture {i}"
            rows.append({"file_name": name, "text": text, "extra": i})
            expected[split][f"{split}/{name}"] = [text]
        (folder / "unlisted.jpg").write_bytes(picture(77))
        rows.append({"file_name": "missing.jpg", "text": "gone"})
        rows.append({"file_name": "../../outside.jpg", "text": "escapes"})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return expected


def write_img2dataset(root: Path, shards: int = 2, per_shard: int = 5) -> dict[str, str]:
    """img2dataset's `output_format=webdataset` output: `00000.tar`, … of samples keyed
    `{shard:05d}{offset:04d}` with `.jpg`, `.txt` and `.json` (written by webdataset's TarWriter, as
    img2dataset's writer does), beside each a `.parquet` stand-in and `_stats.json`. Returns key →
    caption."""
    import webdataset as wds

    root.mkdir(parents=True)
    captions = {}
    for shard in range(shards):
        with open(root / f"{shard:05d}.tar", "wb") as f:
            writer = wds.TarWriter(f)
            for offset in range(per_shard):
                key = f"{shard:05d}{offset:04d}"
                caption = f"laion-style caption {shard}-{offset}"
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 64,
                    "height": 48,
                    "original_width": 640,
                    "original_height": 480,
                    "exif": "{}",
                    "sha256": "0" * 64,
                }
                writer.write(
                    {
                        "__key__": key,
                        "jpg": picture(shard * 100 + offset),
                        "txt": caption,
                        "json": json.dumps(meta, indent=4),
                    }
                )
                captions[key] = caption
            writer.close()
        (root / f"{shard:05d}.parquet").write_bytes(b"PAR1 stand-in PAR1")
        stats = {"count": per_shard, "successes": per_shard, "failed_to_download": 0, "failed_to_resize": 0}
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats))
    return captions


def write_readme_examples(work: Path) -> None:
    """The files the "Your own data" commands of the README and docs/DATA.md name, in `work`
    (tests/test_docs.py runs every `python -m data_prep` line they show there): coco/, train.tsv with
    its pictures, my-imagefolder/, laion/ (img2dataset shards; the test also serves them at
    http://127.0.0.1:8765/), my-hf-dataset/ (Hugging Face datasets' Parquet files)."""
    CocoFixture().write_folders(work / "coco")
    pictures = work / "pictures"
    pictures.mkdir()
    rows = []
    for i in range(8):
        (pictures / f"{i:03d}.jpg").write_bytes(picture(i))
        rows.append(f"pictures/{i:03d}.jpg\tpicture number {i}\n")
    (work / "train.tsv").write_text("filepath\ttitle\n" + "".join(rows))
    write_imagefolder(work / "my-imagefolder")
    write_img2dataset(work / "laion")
    write_hf_parquet(work / "my-hf-dataset")


def write_hf_parquet(root: Path) -> dict[str, dict[str, list[str]]]:
    """A Hugging Face dataset as `datasets` writes it to Parquet (push_to_hub, to_parquet): files named
    `data/<split>-00000-of-0000N.parquet`, an Image feature stored as a struct {bytes, path} with the
    features in the schema's `huggingface` metadata, a `text` column, row groups of a few rows. With
    the faults users meet: a row whose image is a path beside the file (kept), a path that is not
    there, a URL only, no image at all, truncated JPEG bytes, an empty caption. Returns split →
    `file:row` → captions of the rows that must come out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema(
        [("image", image), ("text", pa.string())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    data = root / "data"
    (data / "pics").mkdir(parents=True)
    (data / "pics" / "beside.png").write_bytes(picture(500, fmt="PNG"))
    expected: dict[str, dict[str, list[str]]] = {"train": {}, "validation": {}}
    files = {
        "train-00000-of-00002.parquet": 8,
        "train-00001-of-00002.parquet": 5,
        "validation-00000-of-00001.parquet": 4,
    }
    for name, n in files.items():
        split = name.split("-")[0]
        rows = []
        for i in range(n):
            text = f"{split} {name[-20:-8]} row {i}: a picture"
            rows.append(
                {"image": {"bytes": picture(100 * len(rows) + i + n), "path": f"{i}.jpg"}, "text": text}
            )
            expected[split][f"data/{name}:{i}"] = [text]
        if name.startswith("train-00000"):
            faults = {
                1: ({"bytes": None, "path": "pics/beside.png"}, None),  # read from beside the file
                2: ({"bytes": None, "path": "pics/gone.jpg"}, "missing file"),
                3: ({"bytes": None, "path": "https://example.com/3.jpg"}, "url only"),
                4: (None, "bad row"),
                5: ({"bytes": picture(7)[:150], "path": "5.jpg"}, "unreadable image"),
            }
            for i, (value, kind) in faults.items():
                rows[i]["image"] = value
                if kind:
                    del expected[split][f"data/{name}:{i}"]
            rows[6]["text"] = "   "  # an empty caption
            del expected[split][f"data/{name}:6"]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), data / name, row_group_size=3)
    return expected
