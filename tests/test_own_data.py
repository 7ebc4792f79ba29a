"""The data users bring (COCO, an open_clip CSV, an imagefolder, img2dataset shards) → shards + manifest,
on one process or as N tasks + merge, read back the way every stage reads them."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from core.manifest import load_manifest, verify_shards
from core.shards import captions_of, image_bytes, read_split
from data_prep.cli import main, task_slot
from data_prep.config import ShardsConfig
from data_prep.images import Resize, prepare_image
from plumbing.errors import UserError
from tests.formats import CocoFixture, TableFixture, picture, write_imagefolder, write_img2dataset
from tests.helpers import PY, run, trainer_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every fixture format, written once."""
    root = tmp_path_factory.mktemp("own")
    coco = CocoFixture()
    return {
        "coco": coco,
        "coco_folders": coco.write_folders(root / "coco"),
        "coco_zips": coco.write_zips(root / "coco-zips"),
        "table": TableFixture(root / "table"),
        "folder": root / "hf",
        "folder_expected": write_imagefolder(root / "hf"),
        "i2d": root / "i2d",
        "i2d_captions": write_img2dataset(root / "i2d"),
    }


def prep(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([*argv, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("data_prep: error: "), err
    return lines[0]


def samples(out: Path, split: str) -> list[dict]:
    return list(read_split(load_manifest(out), split))


def tree(out: Path) -> dict[str, bytes]:
    """Every file under `out`, hidden ones included: what a user would copy."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- COCO


def test_coco_official_folders_and_zips_give_the_same_shards(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coco: CocoFixture = files["coco"]
    a, b = tmp_path / "a", tmp_path / "b"
    code, out, _ = prep(
        ["coco", "--root", str(files["coco_folders"]), "--out", str(a), "--shard-size", "3"], capsys
    )
    assert code == 0, out
    assert "8 samples (train 5 samples in 2 shards, val 3 samples in 1 shards)" in out
    assert "7 skipped: 2 empty caption, 2 missing file, 2 unknown image, 1 unreadable image" in out
    assert (
        prep(["coco", "--root", str(files["coco_zips"]), "--out", str(b), "--shard-size", "3"], capsys)[0]
        == 0
    )
    shards = {k: v for k, v in tree(a).items() if k.endswith(".tar")}
    assert shards == {k: v for k, v in tree(b).items() if k.endswith(".tar")}
    for split in ("train", "val"):
        got = samples(a, split)
        names = [json.loads(s["json"])["image"] for s in got]
        wanted = sorted(n for n in coco.captions[split] if n != coco.corrupt)
        assert names == wanted  # image-id order, the truncated JPEG left out
        for s, name in zip(got, names):
            assert s["jpg"] == coco.files[split][name]  # the original bytes
            assert captions_of(s) == coco.captions[split][name]  # every caption, cleaned, in id order
            assert s["txt"].decode() == coco.captions[split][name][0]
    manifest = json.loads((a / "manifest.json").read_text())
    rejected = {r["item"]: r["kind"] for r in manifest["splits"]["train"]["rejected"]}
    assert rejected[f"train2017/{coco.corrupt}"] == "unreadable image"
    assert rejected[f"train2017/{coco.missing['train']}"] == "missing file"


@pytest.mark.parametrize("case", ["instances", "no-captions", "bad-json"])
def test_coco_files_that_are_not_coco_are_one_line(
    case: str, files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "coco"
    shutil.copytree(files["coco_folders"], root)
    captions = root / "annotations" / "captions_train2017.json"
    if case == "instances":  # instances_*.json has images and annotations, but no captions
        captions.write_text(
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.jpg"}],
                    "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1]}],
                }
            )
        )
        needle = "not COCO's captions schema"
    elif case == "no-captions":
        shutil.rmtree(root / "annotations")
        needle = "no captions_train2017.json or captions_val2017.json"
    else:
        captions.write_text(captions.read_text()[:100])
        needle = "not valid JSON"
    code, _, err = prep(["coco", "--root", str(root), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and needle in one_error(err)


# --------------------------------------------------------------------------- CSV / TSV / JSONL


def test_csv_as_open_clip_reads_it(files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """open_clip's defaults (TAB, filepath, title); relative (../) and absolute paths; several rows of
    one image become one sample; JPEG/PNG/WebP kept as they are, GIF written as PNG; bad rows counted."""
    table: TableFixture = files["table"]
    out = tmp_path / "out"
    code, stdout, _ = prep(["csv", "--source", str(table.path), "--out", str(out)], capsys)
    assert code == 0
    assert (
        "12 samples" in stdout
        and "4 skipped: 1 empty caption, 1 missing file, 1 not an image, 1 unreadable image" in stdout
    )
    got = {
        json.loads(s["json"])["image"]: s for split in ("train", "dev", "test") for s in samples(out, split)
    }
    assert set(got) == set(table.expected)
    for image, s in got.items():
        assert captions_of(s) == table.expected[image]
        original = (table.path.parent / image).read_bytes()
        ext = image.rsplit(".", 1)[1]
        if ext == "gif":
            assert (
                "png" in s
                and Image.open(io.BytesIO(s["png"])).convert("RGB").tobytes()
                == Image.open(io.BytesIO(original)).convert("RGB").tobytes()
            )
        else:
            assert s[{"jpg": "jpg", "png": "png", "webp": "webp"}[ext]] == original
        assert "/" not in s["__key__"] and "." not in s["__key__"]  # member names stay inside any extraction
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split_source"] == "hash of the image path"
    assert [r["kind"] for r in manifest["rejected"]] == ["empty caption"]


def test_csv_jsonl_and_commas_with_a_split_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "pics"
    images.mkdir()
    for i in range(5):
        (images / f"{i}.jpg").write_bytes(picture(i))
    rows = [
        {"image": "pics/0.jpg", "caption": "zero", "part": "train"},
        {"image": "pics/1.jpg", "caption": ["one", "uno"], "part": "train"},
        {"image": "pics/2.jpg", "caption": "two", "part": "val"},
        {"image": "pics/2.jpg", "caption": "deux", "part": "train"},  # the same image in another split
        {"image": "pics/3.jpg", "caption": "three", "part": "../../escape"},  # not a split name
        {"image": "https://example.com/4.jpg", "caption": "a URL", "part": "train"},
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    commas = tmp_path / "rows.csv"
    commas.write_text(
        "image,caption,part\n"
        + "".join(
            f'{r["image"]},"{r["caption"] if isinstance(r["caption"], str) else r["caption"][0]}",{r["part"]}\n'
            for r in rows
        )
    )
    keys = ["--image-key", "image", "--caption-key", "caption", "--split-key", "part"]
    for source, extra in ((jsonl, []), (commas, ["--separator", ","])):
        out = tmp_path / f"out-{source.suffix[1:]}"
        assert prep(["csv", "--source", str(source), "--out", str(out), *keys, *extra], capsys)[0] == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert {s: v["num_samples"] for s, v in manifest["splits"].items()} == {"train": 2, "val": 1}
        kinds = sorted(r["kind"] for r in manifest["rejected"])
        assert kinds == sorted(
            ["split conflict", "bad split name", "bad row"] + (["bad row"] if source == jsonl else [])
        )
        assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train", "val"]
    assert not (tmp_path.parent / "escape").exists()
    one = [
        s for s in samples(tmp_path / "out-jsonl", "train") if json.loads(s["json"])["image"] == "pics/1.jpg"
    ]
    assert captions_of(one[0]) == ["one", "uno"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--image-key", "path"], "no column 'path' (--image-key); the header has 'filepath', 'title'"),
        (["--separator", ","], "the header looks TAB-separated: add --separator \\t"),
        (["--separator", ";;"], "csv.separator: expected one character"),
        (["--image-root", "/nonexistent/images"], "/nonexistent/images: no such folder (--image-root"),
    ],
)
def test_csv_bad_options_are_one_line(
    args: list[str], needle: str, files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = prep(
        ["csv", "--source", str(files["table"].path), "--out", str(tmp_path / "o"), *args], capsys
    )
    assert code == 2 and needle in one_error(err)
    assert not (tmp_path / "o" / "manifest.json").exists()


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_splits_and_faults(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, _ = prep(["folder", "--source", str(files["folder"]), "--out", str(out)], capsys)
    assert code == 0
    assert "9 samples (train 6 samples in 1 shards, validation 3 samples in 1 shards)" in stdout
    assert "6 skipped: 2 missing file, 2 no caption, 2 unsafe path" in stdout
    for split, expected in files["folder_expected"].items():
        got = {json.loads(s["json"])["image"]: captions_of(s) for s in samples(out, split)}
        assert got == expected
    assert not (files["folder"].parent / "outside.jpg").exists()


# --------------------------------------------------------------------------- existing WebDataset shards


def test_img2dataset_shards_are_indexed_in_place(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    i2d: Path = files["i2d"]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in i2d.iterdir()}
    out = tmp_path / "out"
    argv = ["index", "--shards", f"{i2d}/{{00000..00001}}.tar", "--out", str(out)]
    code, stdout, _ = prep(argv, capsys)
    assert code == 0 and "10 samples (train 10 samples in 2 shards)" in stdout
    assert {
        p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in i2d.iterdir()
    } == before  # never rewritten
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "manifest.json",
        "train",
        "train/sizes.json",
    ]
    assert json.loads((out / "train" / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 5}
    manifest = load_manifest(out)
    verify_shards(manifest, "train")  # every recorded size and sha256 is the file's
    for shard in manifest.split("train").shards:
        assert Path(shard.path) == i2d / shard.name
        assert hashlib.sha256((i2d / shard.name).read_bytes()).hexdigest() == shard.sha256
    got = {s["__key__"]: (captions_of(s), image_bytes(s) is not None) for s in read_split(manifest, "train")}
    assert got == {k: ([c], True) for k, c in files["i2d_captions"].items()}
    # the folder as the pattern, two splits, and a truncated copy: left out and listed
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "00002.tar").write_bytes((i2d / "00000.tar").read_bytes()[:3000])
    argv = [
        "index",
        "--shards",
        str(i2d),
        "--split",
        "train",
        "--shards",
        str(broken),
        "--split",
        "val",
        "--out",
        str(tmp_path / "two"),
    ]
    code, stdout, _ = prep(argv, capsys)
    assert code == 0 and "val 0 samples in 0 shards" in stdout and "1 skipped: 1 unreadable shard" in stdout


def test_index_counts_json_members_of_any_shape_without_failing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's shards may hold any JSON in a sample's json member: a list, a string, "captions" that
    are not strings. Each is read as the trainer reads it (core.shards.caption_list): the txt is the
    caption, and a sample with neither is listed, never a traceback."""
    import tarfile

    members = {
        "000000001": (b"[1, 2]", b"a red circle"),
        "000000002": (b'"just a string"', b"a blue square"),
        "000000003": (b'{"captions": "one caption"}', None),
        "000000004": (b'{"captions": [1, 2]}', None),
        "000000005": (b"7", None),
        "000000006": (b'{"captions": ["a", "b"]}', None),
    }
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, (meta, txt) in members.items():
            for suffix, data in (("jpg", picture(0)), ("json", meta), ("txt", txt)):
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    code, stdout, _ = prep(["index", "--shards", str(shards), "--out", str(out)], capsys)
    assert code == 0 and "6 samples" in stdout
    manifest = load_manifest(out)
    listed = {r["item"].split(":")[1]: r["kind"] for r in manifest.split("train").rejected}
    assert listed == {"000000004": "no caption", "000000005": "no caption"}
    got = {s["__key__"]: captions_of(s) for s in read_split(manifest, "train")}
    assert got == {
        "000000001": ["a red circle"],
        "000000002": ["a blue square"],
        "000000003": ["one caption"],
        "000000004": [],
        "000000005": [],
        "000000006": ["a", "b"],
    }


@pytest.mark.parametrize(
    ("pattern", "extra", "needle"),
    [
        ("{i2d}/nothing-*.tar", [], "matches no shard"),
        ("{i2d}/{{00000..00004}}.tar", [], "3 of the 5 files it names do not exist (first: "),
        ("{i2d}/{{00000..00001.tar", [], "--shards"),
        ("{i2d}", ["image.size=64"], "image.size: expected 0: indexed shards are never rewritten"),
    ],
)
def test_index_bad_patterns_are_one_line(
    pattern: str,
    extra: list[str],
    needle: str,
    files: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["index", "--shards", pattern.format(i2d=files["i2d"]), "--out", str(tmp_path / "o"), *extra]
    code, _, err = prep(argv, capsys)
    assert code == 2 and needle in one_error(err)


# --------------------------------------------------------------------------- resize on write


def size_of(ext_data: tuple[str, bytes]) -> tuple[int, int]:
    return Image.open(io.BytesIO(ext_data[1])).size


def test_resize_modes_follow_img2dataset() -> None:
    wide = picture(1, (80, 40))
    assert size_of(prepare_image(wide, Resize(32, "keep_ratio"))) == (64, 32)  # short side N
    assert size_of(prepare_image(wide, Resize(32, "keep_ratio_largest"))) == (32, 16)  # long side N
    assert size_of(prepare_image(wide, Resize(32, "center_crop"))) == (32, 32)
    ext, data = prepare_image(wide, Resize(32, "border"))
    bordered = Image.open(io.BytesIO(data)).convert("RGB")
    assert ext == "jpg" and bordered.size == (32, 32)
    assert (
        min(bordered.getpixel((16, 1))) > 240 and min(bordered.getpixel((16, 30))) > 240
    )  # white above and below
    assert prepare_image(wide, Resize(100, "keep_ratio", only_if_bigger=True)) == ("jpg", wide)  # left alone
    assert size_of(prepare_image(wide, Resize(100, "keep_ratio"))) == (
        200,
        100,
    )  # img2dataset upscales by default
    clear = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    buffer = io.BytesIO()
    clear.save(buffer, format="PNG")
    ext, data = prepare_image(buffer.getvalue(), Resize(10, "keep_ratio"))
    assert ext == "jpg" and min(Image.open(io.BytesIO(data)).getpixel((5, 5))) > 240  # matted onto white


def test_resize_to_half_or_less_decodes_at_a_reduced_scale_and_looks_the_same() -> None:
    """JPEG draft (DCT scaling) at half the source: the exact size img2dataset's keep_ratio gives, and
    the pixels of a full decode averaged down with the BOX filter, within a few levels."""
    import numpy as np

    yy, xx = np.mgrid[0:240, 0:320]
    pixels = np.stack([xx * 255 // 319, yy * 255 // 239, (xx + yy) * 255 // 558], -1).astype(np.uint8)
    pixels[60:180, 100:220] = (200, 40, 40)  # a flat shape with sharp edges
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    for n in (120, 60, 37):  # half, a quarter, less
        ext, data = prepare_image(buffer.getvalue(), Resize(n, "keep_ratio"))
        got = Image.open(io.BytesIO(data)).convert("RGB")
        size = (round(320 * n / 240), n)
        plain = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize(size, Image.Resampling.BOX)
        diff = np.abs(np.asarray(got, float) - np.asarray(plain, float))
        assert ext == "jpg" and got.size == size and diff.mean() < 4, (n, diff.mean())


def test_resize_on_write_from_the_command_line(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = [
        "csv",
        "--source",
        str(files["table"].path),
        "--out",
        str(out),
        "--image-size",
        "24",
        "--resize-mode",
        "center_crop",
    ]
    assert prep(argv, capsys)[0] == 0
    got = [s for split in ("train", "dev", "test") for s in samples(out, split)]
    assert len(got) == 12 and all(Image.open(io.BytesIO(s["jpg"])).size == (24, 24) for s in got)
    assert json.loads((out / "manifest.json").read_text())["image"]["size"] == 24


# --------------------------------------------------------------------------- N tasks + merge


def test_two_tasks_and_a_merge_equal_one_process(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["csv", "--source", str(files["table"].path), "--shard-size", "3"]
    out = tmp_path / "out"
    assert prep([*argv, "--out", str(out)], capsys)[0] == 0
    reference = tree(out)
    shutil.rmtree(out)
    code, stdout, _ = prep([*argv, "--out", str(out), "--tasks", "2", "--task", "1"], capsys)
    assert (
        code == 0
        and stdout.startswith("task 1 of 2: shards 2–5 of 6")  # half the samples: the last shards are short
        and not (out / "manifest.json").exists()
    )
    code, _, err = prep(["merge", "--out", str(out)], capsys)
    assert code == 2 and "tasks 0 of 2 have not finished: 2 of 6 shards are not there yet" in one_error(err)

    # task 0 killed mid-way: one shard done, its record's next line torn, a temporary left behind
    assert prep([*argv, "--out", str(out), "--tasks", "2", "--task", "0"], capsys)[0] == 0
    record = out / ".parts" / "task-00000-of-00002.jsonl"
    lines = record.read_text().splitlines(keepends=True)
    record.write_text(lines[0] + lines[1][:40])
    for line in lines[1:]:
        entry = json.loads(line)
        (out / entry["split"] / entry["name"]).unlink()
    (out / "train" / f".{json.loads(lines[1])['name']}.tmp-999999").write_bytes(b"half a shard")
    kept = {p: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")}
    code, stdout, _ = prep([*argv, "--out", str(out), "--tasks", "2", "--task", "0"], capsys)
    assert code == 0 and "(1 written, 1 kept)" in stdout
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # what was complete is not rewritten
    names = [json.loads(line)["name"] for line in record.read_text().splitlines()]
    assert len(names) == len(set(names)) == 2  # each of its shards recorded once

    code, stdout, _ = prep(["merge", "--out", str(out)], capsys)
    assert code == 0 and "12 samples" in stdout
    assert tree(out) == reference  # byte for byte, manifest and sizes.json included; .parts/ gone


def test_the_task_comes_from_the_slurm_array(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("SLURM")]:
        monkeypatch.delenv(name)
    assert task_slot(ShardsConfig()) == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")  # sbatch --array=4-6
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert task_slot(ShardsConfig()) == (2, 3)
    assert task_slot(ShardsConfig(tasks=8, task=5)) == (5, 8)  # a rerun of some tasks names them
    with pytest.raises(UserError, match="needs this task's number"):
        task_slot(ShardsConfig(tasks=8))


# --------------------------------------------------------------------------- nothing written outside --out


def test_a_split_folder_that_leads_elsewhere_is_refused(
    files: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    (out / "train").symlink_to(elsewhere)
    code, _, err = prep(["csv", "--source", str(files["table"].path), "--out", str(out)], capsys)
    assert code == 2 and "escapes" in one_error(err)
    assert not list(elsewhere.iterdir())


# --------------------------------------------------------------------------- the trainer reads them


@pytest.mark.system
def test_the_trainer_fine_tunes_on_a_csv_and_on_indexed_img2dataset_shards(
    files: dict, tmp_path: Path
) -> None:
    csv_out, i2d_out = tmp_path / "csv", tmp_path / "i2d"
    assert (
        main(
            [
                "csv",
                "--source",
                str(files["table"].path),
                "--out",
                str(csv_out),
                "--quiet",
                "--image-size",
                "64",
            ]
        )
        == 0
    )
    assert main(["index", "--shards", str(files["i2d"]), "--out", str(i2d_out), "--quiet"]) == 0
    for manifest, eval_split in ((csv_out, "test"), (i2d_out, "train")):
        run_dir = tmp_path / f"run-{manifest.name}"
        args = trainer_args(manifest / "manifest.json", run_dir, config="configs/demo-flickr8k.yaml")
        extra = [
            "train.batch_size=4",
            "train.epochs=1",
            "data.workers=1",
            f"data.eval_split={eval_split}",
            "eval.every_epochs=1",
        ]
        proc = run([PY, "-m", "trainer", *args, *extra], timeout=600)
        assert "step 2 loss" in proc.stderr and "eval after epoch 1" in proc.stderr, proc.stderr[-2000:]
        assert (run_dir / "export" / "heads.safetensors").is_file()


# --------------------------------------------------------------------------- Slurm


def test_prep_sbatch_dry_run_prints_the_array_task_and_the_merge() -> None:
    proc = run(
        ["bash", "launch/prep.sbatch"], DRY_RUN="1", PREP="csv --source my.tsv", OUT="data/mine", PYTHON=PY
    )
    assert (
        f"would run: {PY} -m data_prep csv --source my.tsv --out data/mine --workers 1 --quiet" in proc.stdout
    )
    assert (
        "--dependency=afterany:" in proc.stdout
        and f"would run (merge job): {PY} -m data_prep merge --out data/mine" in proc.stdout
    )


@pytest.mark.slurm
def test_prep_sbatch_array_and_its_merge_equal_one_process(files: dict, tmp_path: Path) -> None:
    from tests.test_launch import SLURM_CONF, slurm_ready, wait_for

    if slurm_ready():
        pytest.skip(slurm_ready())
    source = files["table"].path
    reference = tmp_path / "reference"
    assert (
        main(["csv", "--source", str(source), "--out", str(reference), "--shard-size", "3", "--quiet"]) == 0
    )
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    proc = run(
        [
            "sbatch",
            "--parsable",
            "--array=0-1",
            "--cpus-per-task=4",
            f"--output={logs}/%x-%A_%a.out",
            "launch/prep.sbatch",
        ],
        SLURM_CONF=SLURM_CONF,
        PREP=f"csv --source {source} --shard-size 3",
        OUT=str(out),
        LOGS=str(logs),
        WORKERS="1",
    )
    array = proc.stdout.strip().split(";")[0]
    nodes = set()
    for task in (0, 1):
        info = wait_for(f"{array}_{task}", timeout=180)
        assert info["JobState"] == "COMPLETED", (logs / f"clip-prep-{array}_{task}.out").read_text()[-2000:]
        nodes.add(info["NodeList"])
    assert nodes == {"node1", "node2"}  # 4 CPUs each: one task per node
    first = (logs / f"clip-prep-{array}_0.out").read_text()
    merge_job = first.split("merge job ")[1].split()[0]
    info = wait_for(merge_job, timeout=180)
    assert info["JobState"] == "COMPLETED", (logs / f"clip-prep-merge-{merge_job}.out").read_text()[-2000:]
    ref = tree(reference)
    got = tree(out)
    ref["manifest.json"] = ref["manifest.json"].replace(
        str(reference).encode(), str(out).encode()
    )  # config.out
    assert got == ref
    assert "12 samples" in (logs / f"clip-prep-merge-{merge_job}.out").read_text()


def test_the_header_walk_counts_what_webdataset_reads(files: dict, tmp_path: Path) -> None:
    """Indexing walks plain tars by their headers; every sample and member it finds is what the
    trainer's reader (webdataset's tar_file_expander + group_by_keys) yields, on the formats tar writers
    produce; anything else goes to webdataset's reader itself."""
    import gzip
    import tarfile

    from data_prep.index import _NotPlain, _walk_plain, _walk_webdataset
    from plumbing.tars import end_of_archive, tar_member

    odd = tmp_path / "odd.tar"
    with tarfile.open(odd, "w", format=tarfile.GNU_FORMAT) as tar:  # GNU long names, a folder, metadata
        for name, data in [
            ("a" * 120 + ".jpg", b"x"),
            ("a" * 120 + ".TXT", b"long"),
            ("dir/", None),
            ("__meta__", b"skip me"),
            ("noext", b"ignored"),
            ("dir/b.jpg", b"y"),
            ("dir/b.json", json.dumps({"captions": ["b"]}).encode()),
            ("café.png", b"z"),
        ]:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pax = tmp_path / "pax.tar"  # data_prep's own writer: PAX headers for long and non-ASCII names
    body = b"".join(
        p
        for name, data in [("k" * 150 + ".jpg", b"1"), ("k" * 150 + ".txt", b"t"), ("ü.webp", b"2")]
        for p in tar_member(name, data)
    )
    pax.write_bytes(body + end_of_archive(len(body)))
    shards = [*sorted(files["i2d"].glob("*.tar")), odd, pax]
    for shard in shards:
        with open(shard, "rb") as f:
            plain = _walk_plain(f)
            f.seek(0)
            exact = _walk_webdataset(f, str(shard))
        assert [k for k, _ in plain[0]] == [k for k, _ in exact[0]] and plain[1:] == exact[1:], shard
        for (_, mine), (_, theirs) in zip(plain[0], exact[0]):
            assert set(mine) == set(theirs) and all(
                mine[k] == theirs[k] for k in ("txt", "json") if k in mine
            )
    zipped = tmp_path / "zipped.tar.gz"
    zipped.write_bytes(gzip.compress(pax.read_bytes()))
    with open(zipped, "rb") as f, pytest.raises(_NotPlain):
        _walk_plain(f)


@pytest.mark.parametrize("chunk", [512, 1536, 4096])
def test_the_header_walk_reads_across_chunk_borders_with_its_hashing_thread(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk reads a shard in chunks, hashed on a second thread while it walks them: with chunks of
    a few blocks, headers, PAX records and members (captions of up to several chunks) cross every
    border. Its samples, size and sha256 are webdataset's and hashlib's, from a file and from a stream
    with only read() and short reads (a remote shard); a shard cut short inside a member is handed
    over; no thread outlives a walk."""
    import hashlib
    import tarfile
    import threading

    from data_prep import index

    monkeypatch.setattr(index, "_CHUNK", chunk)
    monkeypatch.setattr(index, "_SPARE", [])
    rng = random.Random(chunk)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(30):
            caption = ("word " * rng.choice([1, 10, 3000])).encode()
            for name, data in [
                (f"{i:04d}.jpg", rng.randbytes(rng.randint(0, 5000))),
                (f"{i:04d}.txt", caption),
                (f"{i:04d}.json", b'{"captions": ["a"]}'),
            ]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), (1733500000.25 if i % 2 else 0)
                tar.addfile(info, io.BytesIO(data))
    good = out.getvalue()

    class Stream:  # core.remote's streams: read() only, and short reads
        def __init__(self, data: bytes) -> None:
            self.f = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self.f.read(min(n, 700) if n > 0 else n)

    before = threading.active_count()
    exact = index._walk_webdataset(io.BytesIO(good), "x.tar")
    assert exact[1:] == (hashlib.sha256(good).hexdigest(), len(good))
    for f in (io.BytesIO(good), Stream(good)):
        plain = index._walk_plain(f)
        assert [(k, m) for k, m in plain[0]] == [
            (k, {x: v for x, v in m.items() if x in ("txt", "json")} | {"jpg": b""}) for k, m in exact[0]
        ]
        assert plain[1:] == exact[1:]
    member = next(m for m in tarfile.open(fileobj=io.BytesIO(good)) if m.size > 100)
    with pytest.raises(index._NotPlain, match="truncated"):
        index._walk_plain(io.BytesIO(good[: member.offset_data + 50]))
    assert threading.active_count() == before


@pytest.mark.timeout(20)  # the walk waited forever for a chunk its hashing thread never finished
def test_a_failure_on_the_hashing_thread_ends_the_walk_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import tarfile
    import threading

    from data_prep import index

    class Broken:
        def __init__(self) -> None:
            self.calls = 0

        def update(self, data: object) -> None:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("the hash broke")

    monkeypatch.setattr(index, "_CHUNK", 512)
    monkeypatch.setattr(index, "_SPARE", [])
    monkeypatch.setattr(index.hashlib, "sha256", Broken)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for i in range(20):
            info = tarfile.TarInfo(f"{i:04d}.jpg")
            info.size = 3000
            tar.addfile(info, io.BytesIO(bytes(3000)))
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="the hash broke"):
        index._walk_plain(io.BytesIO(out.getvalue()))
    assert threading.active_count() == before


@pytest.mark.timeout(10)  # the walk read that record forever
def test_a_pax_record_of_length_zero_is_handed_over_not_read_forever() -> None:
    """A PAX header whose record says it is 0 bytes long: tarfile calls it an invalid header; the
    header walk read that record again and again, forever (an index run that never ends)."""
    import tarfile

    from data_prep.index import _NotPlain, _walk_plain

    records = b"0 path=x.jpg\n"
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(records)
    block = header.tobuf(tarfile.USTAR_FORMAT)
    member = tarfile.TarInfo("0001.jpg")
    member.size = 1
    data = block + records.ljust(512, b"\0") + member.tobuf(tarfile.USTAR_FORMAT) + b"1".ljust(512, b"\0")
    with pytest.raises(_NotPlain):
        _walk_plain(io.BytesIO(data + bytes(1024)))


@pytest.mark.parametrize(("seed", "writer"), [(0, "plumbing"), (1, "plumbing"), (2, "pax"), (3, "pax")])
def test_the_header_walk_on_damaged_headers_reads_what_webdataset_reads_or_hands_over(
    seed: int, writer: str
) -> None:
    """A header byte changed (its checksum made right again, so tarfile reads on), or the file cut
    short: the walk finds exactly webdataset's samples, or leaves the shard to webdataset's reader.
    The numeric fields the walk does not need (mode, uid, gid, mtime, device numbers) are left out:
    one that does not parse ends tarfile's reading there, and the walk reads on."""
    import tarfile

    from data_prep.index import _NotPlain, _walk_plain, _walk_webdataset
    from plumbing.tars import end_of_archive, tar_member

    rng = random.Random(seed)
    members = [
        (name, data)
        for i in range(4)
        for name, data in [(f"{i:04d}.jpg", rng.randbytes(rng.randint(0, 3000))), (f"{i:04d}.txt", b"cap")]
    ]
    if writer == "plumbing":
        body = b"".join(part for name, data in members for part in tar_member(name, data))
        good = body + end_of_archive(len(body))
    else:  # webdataset's TarWriter (img2dataset's): a PAX header before each member, its float mtime
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1733500000.25
                tar.addfile(info, io.BytesIO(data))
        good = out.getvalue()
    unread = {*range(100, 124), *range(136, 148), *range(329, 345)}
    offsets = [0, 3, 99, 124, 126, 134, 135, 156, 257, 345, *(r for r in range(512) if r not in unread)]
    for _ in range(150):
        data = bytearray(good)
        block = rng.randrange(0, len(data), 512)
        data[block + rng.choice(offsets)] = rng.choice(
            [0, 0x20, 0x2E, 0x2F, 0x30, 0x37, 0x4C, 0x78, rng.randrange(256)]
        )
        header = data[block : block + 512]
        header[148:156] = b" " * 8
        # the checksum made right again, as tar writers write it (tarfile, GNU tar, others), or left wrong
        form = rng.choice([b"%06o\0 ", b"%07o\0", b"%06o  ", b" %05o\0 ", b"%06o\0 "])
        total = sum(header) + (rng.choice([1, -1, 65521]) if rng.random() < 0.2 else 0)
        data[block + 148 : block + 156] = (form % total)[:8].ljust(8, b"\0")
        if rng.random() < 0.2:
            data = data[: rng.randrange(len(data))]
        try:
            plain = _walk_plain(io.BytesIO(bytes(data)))
        except _NotPlain:
            continue
        exact = _walk_webdataset(io.BytesIO(bytes(data)), "damaged.tar")
        assert [(k, sorted(m), m.get("txt")) for k, m in plain[0]] == [
            (k, sorted(m), m.get("txt")) for k, m in exact[0]
        ]
        assert plain[1:] == exact[1:]
