"""Parquet datasets as Hugging Face `datasets` writes them → shards: the Image feature's bytes or a path
beside the file, splits from the file names, bad rows skipped and counted, read a row group at a time,
N tasks + merge equal to one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import data_prep.parquet
from core.manifest import load_manifest
from core.shards import captions_of, image_bytes, read_split
from data_prep.cli import main
from data_prep.parquet import split_of
from tests.formats import picture, write_hf_parquet


def prep(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([*argv, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_hugging_face_parquet_dataset_becomes_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    expected = write_hf_parquet(tmp_path / "hf")
    reads: list[tuple[int, int, tuple[str, ...]]] = []  # (file handle, row group, columns)
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile,
        "read_row_group",
        lambda self, i, columns=None, **kw: (
            reads.append((id(self), i, tuple(columns or ()))) or real(self, i, columns=columns, **kw)
        ),
    )
    out = tmp_path / "out"
    code, stdout, _ = prep(
        ["parquet", "--source", str(tmp_path / "hf"), "--out", str(out), "--shard-size", "4"], capsys
    )
    assert code == 0
    assert "12 samples (train 8 samples in 3 shards, validation 4 samples in 1 shards)" in stdout
    assert "5 skipped: 1 bad row, 1 empty caption, 1 missing file, 1 unreadable image, 1 url only" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split_source"] == "file names (datasets' split naming)"
    rejected = {r["item"]: r for r in manifest["splits"]["train"]["rejected"] + manifest["rejected"]}
    assert rejected["data/train-00000-of-00002.parquet:3"]["kind"] == "url only"
    assert "img2dataset --url_list" in rejected["data/train-00000-of-00002.parquet:3"]["reason"]
    for split, rows in expected.items():
        got = list(read_split(load_manifest(out), split))
        assert {json.loads(s["json"])["image"]: captions_of(s) for s in got} == rows
    beside = next(s for s in read_split(load_manifest(out), "train") if s["__key__"].endswith("_000001"))
    assert image_bytes(beside) == (tmp_path / "hf" / "data" / "pics" / "beside.png").read_bytes()
    # Read by row group: planning reads captions only; writing reads each image row group once.
    images = [(name, i) for name, i, cols in reads if cols == ("image",)]
    assert len(images) == len(set(images)) == 3 + 2 + 2  # files of 8, 5 and 4 rows in groups of 3
    assert all(cols == ("text",) for name, i, cols in reads if cols != ("image",))


def test_list_captions_tasks_and_the_hash_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"image": picture(i), "sentences": [f"picture {i}", f"image {i}"]} for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pictures.parquet", row_group_size=5)
    argv = ["parquet", "--source", str(tmp_path / "*.parquet"), "--shard-size", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert prep([*argv, "--out", str(one)], capsys)[0] == 0
    for task in ("1", "0"):
        assert prep([*argv, "--out", str(two), "--tasks", "2", "--task", task], capsys)[0] == 0
    assert prep(["merge", "--out", str(two)], capsys)[0] == 0
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for name in files:
        if name.suffix == ".tar":
            assert (one / name).read_bytes() == (two / name).read_bytes()
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["split_source"] == "hash of file:row" and set(manifest["splits"]) == {
        "train",
        "dev",
        "test",
    }
    got = [captions_of(s) for split in manifest["splits"] for s in read_split(load_manifest(one), split)]
    assert sorted(got) == sorted([f"picture {i}", f"image {i}"] for i in range(12))


@pytest.mark.parametrize(
    ("columns", "extra", "needle"),
    [
        ({"url": "https://example.com/a.jpg", "caption": "a"}, [], "img2dataset --url_list"),
        ({"image": b"x", "title": "a"}, [], "no caption column (one of text, caption, captions, sentences)"),
        (
            {"image": b"x", "title": "a"},
            ["--caption-key", "alt"],
            "no 'alt' (--caption-key); it has 'image', 'title'",
        ),
        ({"picture": b"x", "text": "a"}, [], "no column 'image' (--image-key)"),
        ({"image": 3, "text": "a"}, [], "column 'image' is int64, expected datasets' Image"),
    ],
)
def test_files_that_are_not_image_datasets_are_one_line(
    columns: dict, extra: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([columns]), tmp_path / "train-00000-of-00001.parquet")
    code, _, err = prep(["parquet", "--source", str(tmp_path), "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_splits_are_named_as_datasets_names_them() -> None:
    assert split_of("data/train-00000-of-00004.parquet") == "train"
    assert split_of("data/validation-00001-of-00002.parquet") == "validation"
    assert split_of("data/restval-00000-of-00001.parquet") == "restval"
    assert split_of("default/test/0000.parquet") == "test"  # the Hub's parquet-converter layout
    assert split_of("my_valid_file.parquet") == "validation"
    assert split_of("dev.parquet") == "validation"
    assert split_of("contest.parquet") is None and split_of("pictures.parquet") is None
    assert data_prep.parquet.CAPTION_KEYS[0] == "text"  # diffusers' examples
