"""data_prep on fixture files in the official formats: read back with webdataset and compared."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_prep.cli import main
from tests.formats import (
    BATCHES,
    LABELS,
    FlickrFixture,
    cifar_batches,
    write_cifar_folder,
    write_cifar_tarball,
)

ROOT = Path(__file__).resolve().parents[1]


def read_split(out: Path, split: str) -> list[dict]:
    sizes = json.loads((out / split / "sizes.json").read_text())
    urls = [str(out / split / name) for name in sorted(sizes)]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


def one_error(err: str) -> str:
    """The command's refusal: exactly one line, `data_prep: error: ...`."""
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("data_prep: error: "), err
    return lines[0]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- CIFAR-10


@pytest.fixture
def cifar(tmp_path: Path) -> tuple[dict, Path]:
    batches = cifar_batches(rows=30)
    return batches, write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", batches)


def test_fixture_pickles_have_the_official_structure(tmp_path: Path) -> None:
    """The fixtures hold what the real files hold: three numpy globals, pixels as one BINSTRING,
    loadable the way torchvision loads them (latin1)."""
    folder = write_cifar_folder(tmp_path, cifar_batches(rows=4))
    data = (folder / "test_batch").read_bytes()
    globals_, binstrings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            globals_.add(arg)
        if op.name == "BINSTRING":
            binstrings.append(len(arg))
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert 4 * 3072 in binstrings
    entry = pickle.loads(data, encoding="latin1")
    assert entry["data"].shape == (4, 3072) and len(entry["labels"]) == 4
    assert not [
        op for op, _, _ in pickletools.genops((folder / "batches.meta").read_bytes()) if op.name == "GLOBAL"
    ]


def test_cifar_tarball_to_shards(
    cifar: tuple[dict, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batches, tarball = cifar
    out = tmp_path / "out"
    code, stdout, _ = run(
        ["cifar10", "--source", str(tarball), "--no-verify", "--out", str(out), "--shard-size", "40"], capsys
    )
    assert code == 0 and "train 150 samples in 4 shards, test 30 samples in 1 shards" in stdout
    samples = read_split(out, "train") + read_split(out, "test")
    assert len(samples) == 180
    for s in samples:
        meta = json.loads(s["json"])
        batch = batches[meta["batch"]]
        row = batch[b"data"][meta["row"]]
        expected = row.reshape(3, 32, 32).transpose(1, 2, 0)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(s["png"]))), expected)
        assert int(s["cls"]) == batch[b"labels"][meta["row"]] == meta["label"]
        assert s["txt"].decode() == f"An image of a {LABELS[meta['label']]}."
        assert meta["filename"] == batch[b"filenames"][meta["row"]].decode()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == LABELS
    assert manifest["splits"]["train"]["num_samples"] == 150
    shard = manifest["splits"]["train"]["shards"][0]
    assert hashlib.sha256((out / "train" / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert manifest["config"]["cifar10"]["verify"] is False
    assert manifest["sources"]["cifar10"]["md5"] == hashlib.md5(tarball.read_bytes()).hexdigest()


def test_cifar_folder_and_templates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_cifar_folder(tmp_path / "src", cifar_batches(rows=5))
    out = tmp_path / "out"
    argv = ["cifar10", "--source", str(folder.parent), "--no-verify", "--out", str(out)]
    code, _, _ = run([*argv, "--template", "a photo of a {label}", "--template", "{label}, blurry"], capsys)
    assert code == 0
    for s in read_split(out, "test"):
        meta = json.loads(s["json"])
        assert meta["prompts"] == [f"a photo of a {meta['label_name']}", f"{meta['label_name']}, blurry"]
        assert s["txt"].decode() in meta["prompts"]


def test_cifar_md5_mismatch_is_one_line(
    cifar: tuple[dict, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tarball = cifar
    code, _, err = run(["cifar10", "--source", str(tarball), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    err = one_error(err)
    assert "c58f30108f718f92721af3b95e74349a" in err and "--no-verify" in err


def test_hostile_pickle_is_refused_and_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_cifar_folder(tmp_path / "src", cifar_batches(rows=3))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    code, _, err = run(
        ["cifar10", "--source", str(folder), "--no-verify", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and not marker.exists()
    err = one_error(err)
    assert "data_batch_2" in err and "refusing global posix.system" in err


def test_truncated_batch_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_cifar_folder(tmp_path / "src", cifar_batches(rows=3))
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[: len(data) // 2])
    code, _, err = run(
        ["cifar10", "--source", str(folder), "--no-verify", "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2
    err = one_error(err)
    assert "test_batch" in err and "40351d587109b95175f43aff81a1287e" in err and "truncated" in err


def test_output_is_identical_for_1_and_2_workers(
    cifar: tuple[dict, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tarball = cifar
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        assert (
            run(
                [
                    "cifar10",
                    "--source",
                    str(tarball),
                    "--no-verify",
                    "--out",
                    str(out),
                    "--shard-size",
                    "16",
                    "--workers",
                    workers,
                ],
                capsys,
            )[0]
            == 0
        )
        outs.append(tree_bytes(out))
    assert outs[0] == outs[1] and len(outs[0]) == 12


def test_rerun_keeps_complete_output_and_refuses_a_different_one(
    cifar: tuple[dict, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, tarball = cifar
    out = tmp_path / "out"
    argv = ["cifar10", "--source", str(tarball), "--no-verify", "--out", str(out), "--shard-size", "50"]
    assert run(argv, capsys)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")}
    time.sleep(0.01)
    assert run(argv, capsys)[0] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == before  # kept, not rewritten
    code, _, err = run([*argv[:-1], "30"], capsys)
    assert code == 2 and "--overwrite" in one_error(err)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tar")} == before  # nothing touched
    assert run([*argv[:-1], "30", "--overwrite"], capsys)[0] == 0
    assert len(list((out / "train").glob("*.tar"))) == 5


def test_killed_run_then_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    batches = cifar_batches(rows=1500)
    tarball = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", batches)
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "cifar10",
        "--source",
        str(tarball),
        "--no-verify",
        "--shard-size",
        "100",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = tmp_path / "reference"
    subprocess.run([*cmd, "--out", str(reference)], check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 60
    record = out / ".parts" / "task-00000-of-00001.jsonl"  # one line per finished shard
    while not (record.exists() and record.stat().st_size) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    finals = sorted(out.rglob("*.tar"))
    assert 0 < len(finals) < 90
    ref = tree_bytes(reference)
    for path in finals:  # every file under a final name is complete and correct
        assert path.read_bytes() == ref[path.relative_to(out).as_posix()]

    subprocess.run([*cmd, "--out", str(out)], check=True, env=env, capture_output=True)
    assert tree_bytes(out) == ref
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert (
        json.loads((out / "manifest.json").read_text())["splits"]
        == json.loads((reference / "manifest.json").read_text())["splits"]
    )


# --------------------------------------------------------------------------- Flickr8k


def check_flickr(out: Path, fx: FlickrFixture) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    seen = {}
    for split in ("train", "dev", "test"):
        for s in read_split(out, split):
            meta = json.loads(s["json"])
            assert s["jpg"] == fx.images[meta["image"]]  # the original bytes, not re-encoded
            assert meta["captions"] == fx.captions[meta["image"]]
            assert s["txt"].decode() == fx.captions[meta["image"]][0]
            assert meta["split"] == split
            seen[meta["image"]] = split
    expected = {n: s for s, names in fx.splits.items() for n in names if n not in (fx.missing, fx.corrupt)}
    assert seen == expected
    rejected = {r["item"]: r["reason"] for s in manifest["splits"].values() for r in s["rejected"]}
    assert "not among the images" in rejected[fx.missing]
    assert "does not decode" in rejected[fx.corrupt.rsplit(".", 1)[0]]
    assert any(r["item"] == "2258277193_586949ec62.jpg.1" for r in manifest["rejected"])
    assert manifest["unassigned"]["items"] == [fx.outside]
    return manifest


def test_flickr8k_official_zips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fx = FlickrFixture()
    images, text = fx.write_zips(tmp_path)
    out = tmp_path / "out"
    code, stdout, _ = run(
        ["flickr8k", "--images", str(images), "--captions", str(text), "--out", str(out)], capsys
    )
    assert code == 0 and "train 6 samples" in stdout
    # the bogus .jpg.1 key, the split entry without an image, the truncated JPEG: counted by kind
    assert "3 skipped: 1 missing file, 1 no image, 1 unreadable image" in stdout
    manifest = check_flickr(out, fx)
    assert manifest["split_source"] == str(text)


def test_flickr8k_extracted_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fx = FlickrFixture()
    images, text = fx.write_folders(tmp_path)
    out = tmp_path / "out"
    token = text / "Flickr8k.token.txt"
    assert (
        run(
            [
                "flickr8k",
                "--images",
                str(images),
                "--captions",
                str(token),
                "--out",
                str(out),
                "--workers",
                "2",
            ],
            capsys,
        )[0]
        == 0
    )
    check_flickr(out, fx)


def test_flickr8k_kaggle_layout_with_split_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fx = FlickrFixture()
    images, captions = fx.write_kaggle(tmp_path / "kaggle")
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, body in fx.split_files().items():
        (splits / name).write_text(body)
    out = tmp_path / "out"
    argv = [
        "flickr8k",
        "--images",
        str(images),
        "--captions",
        str(captions),
        "--splits",
        str(splits),
        "--out",
        str(out),
    ]
    assert run(argv, capsys)[0] == 0
    first = [s for s in read_split(out, "train") if json.loads(s["json"])["image"] == fx.names[0]][0]
    assert json.loads(first["json"])["captions"][1] == 'A "quoted" dog, running , fast .'


def test_flickr8k_without_split_lists_uses_the_hash_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = FlickrFixture(n=40)
    images = tmp_path / "Images"
    images.mkdir()
    for name, data in fx.images.items():
        (images / name).write_bytes(data)
    (tmp_path / "captions.txt").write_text(
        "image,caption\n" + "".join(f"{n},{c}\n" for n in fx.names for c in ("x", "y"))
    )
    out = tmp_path / "out"
    code, _, err = run(
        [
            "flickr8k",
            "--images",
            str(images),
            "--captions",
            str(tmp_path / "captions.txt"),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0
    assert "(75/12.5/12.5 %, see docs/DATA.md)" in err  # one percent sign, not "%%"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["split_source"] == "hash of the image name"
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == 39  # all but the corrupt one
    again = tmp_path / "again"
    assert (
        run(
            [
                "flickr8k",
                "--images",
                str(images),
                "--captions",
                str(tmp_path / "captions.txt"),
                "--out",
                str(again),
            ],
            capsys,
        )[0]
        == 0
    )
    assert tree_bytes(out) == tree_bytes(again)


def test_zip_member_escaping_the_target_is_not_extracted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = FlickrFixture()
    images, text = fx.write_zips(tmp_path)
    with zipfile.ZipFile(images, "a") as z:
        z.writestr("../escaped.jpg", fx.images[fx.names[0]])
        z.writestr("/abs/escaped2.jpg", fx.images[fx.names[0]])
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    code = main(["flickr8k", "--images", str(images), "--captions", str(text), "--out", str(out)])
    assert code == 0
    assert not list(tmp_path.rglob("escaped*.jpg"))
    rejected = {r["item"]: r["reason"] for r in json.loads((out / "manifest.json").read_text())["rejected"]}
    assert "unsafe member name" in rejected["../escaped.jpg"]


def test_flickr8k_bad_token_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = FlickrFixture()
    images, text = fx.write_folders(tmp_path)
    token = text / "Flickr8k.token.txt"
    lines = token.read_text().splitlines()
    lines[6] = "no tab and no hash here"
    token.write_text("\n".join(lines))
    code, _, err = run(
        ["flickr8k", "--images", str(images), "--captions", str(token), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and f"{token}:7:" in one_error(err)


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["shards.nope=1"], "unknown key 'shards.nope'"),
        (["shards.shard_size=abc"], "shards.shard_size"),
        (["shards.workers=0"], "shards.workers: expected an int >= 1"),
        (["cifar10.templates=[no label here]"], "cifar10.templates"),
        (["justakey"], "expected key.sub=value"),
    ],
)
def test_bad_config_is_one_line(
    extra: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["cifar10", "--source", str(tmp_path), "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and needle in one_error(err)


def test_bad_config_file_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "prep.yaml"
    cfg.write_text("shards:\n  shard_sise: 10\n")
    code, _, err = run(
        ["cifar10", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(cfg)], capsys
    )
    err = one_error(err)
    assert code == 2 and str(cfg) in err and "shards.shard_sise" in err


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_official_shaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = [
        "synthetic.cifar_per_batch=20",
        "synthetic.cifar_test=20",
        "synthetic.flickr_train=10",
        "synthetic.flickr_dev=3",
        "synthetic.flickr_test=3",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    code, stdout, _ = run(["synthetic", "--out", str(a), *small], capsys)
    assert code == 0 and f"--out {tmp_path / 'flickr8k'}" in stdout  # beside the raw files, as the demo does
    assert run(["synthetic", "--out", str(b), *small], capsys)[0] == 0
    for name in ("cifar-10-python.tar.gz", "Flickr8k_Dataset.zip", "Flickr8k_text.zip"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    # and the real readers take them: the CIFAR batches through the official structure, Flickr through the zips
    out = tmp_path / "shards"
    assert (
        run(
            [
                "cifar10",
                "--source",
                str(a / "cifar-10-python.tar.gz"),
                "--no-verify",
                "--out",
                str(out / "c"),
            ],
            capsys,
        )[0]
        == 0
    )
    labels = [int(s["cls"]) for s in read_split(out / "c", "train")]
    assert len(labels) == 100 and len(set(labels)) > 5
    assert (
        run(
            [
                "flickr8k",
                "--images",
                str(a / "Flickr8k_Dataset.zip"),
                "--captions",
                str(a / "Flickr8k_text.zip"),
                "--out",
                str(out / "f"),
            ],
            capsys,
        )[0]
        == 0
    )
    manifest = json.loads((out / "f" / "manifest.json").read_text())
    assert {s: v["num_samples"] for s, v in manifest["splits"].items()} == {"train": 10, "dev": 3, "test": 3}
    captions = json.loads(read_split(out / "f", "test")[0]["json"])["captions"]
    assert len(captions) == 5 and all(c.endswith(" .") for c in captions)
    assert sorted(BATCHES) == sorted(f"data_batch_{i}" for i in range(1, 6)) + ["test_batch"]


def test_the_command_line_built_for_one_command_reads_it_as_the_whole_one_does() -> None:
    from data_prep.cli import COMMANDS, parser
    from plumbing.config import parse_mixed

    assert "{" + ",".join(COMMANDS) + "}" in parser().format_usage()  # every subcommand, named
    tails = {"merge": ["--out", "o"], "synthetic": ["--out", "o", "--seed", "3"]}
    tails["index"] = ["--shards", "a/{0..3}.tar", "--split", "train", "--out", "o", "--workers", "2"]
    for command in COMMANDS:
        argv = [command, *tails.get(command, ["--source", "s", "--out", "o", "shards.shard_size=5"])]
        if command == "flickr8k":
            argv = [command, "--images", "i", "--captions", "c", "--out", "o", "--image-size", "64"]
        elif command == "coco":
            argv = [command, "--root", "r", "--out", "o"]
        assert parse_mixed(parser(command), argv) == parse_mixed(parser(), argv), command
    with pytest.raises(SystemExit):  # an unknown command: the whole line, to name the choices
        parse_mixed(parser("cvs"), ["cvs", "--out", "o"])
