"""Captioning and search with a trainer export: the command's hit rates equal the trainer's own
retrieval recall on the same model and data; caching, reruns, bad input."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from plumbing.tars import write_tar
from tests.helpers import PY, run, torchrun, trainer_args

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def trained(small_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny contrastive run on the small Flickr8k-format set, evaluated at its end (1 rank, the eval
    split read in order in batches of 16)."""
    run_dir = tmp_path_factory.mktemp("retrieval") / "run"
    overrides = [
        "train.epochs=4",
        "train.batch_size=16",
        "data.workers=1",
        "eval.every_epochs=4",
        "eval.batch_size=16",
        "eval.recall_at=[1,5]",
    ]
    run(
        [
            PY,
            "-m",
            "trainer",
            *trainer_args(small_data["flickr8k"], run_dir, *overrides, config="configs/demo-flickr8k.yaml"),
        ]
    )
    final = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert final["i2t_R@5"] > 0.1  # it learned something: the comparison below means something
    return {"export": run_dir / "export", "eval": run_dir / "eval.jsonl", "manifest": small_data["flickr8k"]}


def retrieval(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([PY, "-m", "retrieval", *args], check=check)


def test_caption_hit_rate_equals_the_trainers_image_to_text_recall(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    final = json.loads(trained["eval"].read_text().splitlines()[-1])
    out = tmp_path / "captions"
    m = str(trained["manifest"])
    retrieval(
        "caption",
        "--export",
        str(trained["export"]),
        "--manifest",
        m,
        "--bank",
        m,
        "bank_split=test",
        "--out",
        str(out),
        "batch_size=16",
        "top_k=5",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == summary["judged"] == 48
    assert summary["top1_hit_rate"] == pytest.approx(final["i2t_R@1"], abs=1e-6)
    assert summary["topk_hit_rate"] == pytest.approx(final["i2t_R@5"], abs=1e-6)
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert all(len(r["top"]) == 5 and r["top"][0]["score"] >= r["top"][-1]["score"] for r in records)
    assert list((out / "sheets").glob("captions-*.png"))


def test_search_hit_rate_equals_the_trainers_text_to_image_recall(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    final = json.loads(trained["eval"].read_text().splitlines()[-1])
    out = tmp_path / "search"
    m = str(trained["manifest"])
    retrieval(
        "search",
        "--export",
        str(trained["export"]),
        "--manifest",
        m,
        "bank_split=test",
        "--queries",
        m,
        "--out",
        str(out),
        "batch_size=16",
        "top_k=5",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["judged"] == 48 * 5
    assert summary["top1_hit_rate"] == pytest.approx(final["t2i_R@1"], abs=1e-6)
    assert summary["topk_hit_rate"] == pytest.approx(final["t2i_R@5"], abs=1e-6)
    assert len(list((out / "sheets").glob("*.png"))) == 8


def test_files_bank_cache_rerun_and_unreadable_images(trained: dict[str, Path], tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (80, 60), colour).save(photos / f"{i}-{colour}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a picture")
    pictures = []  # and a WebDataset shard of two more, read as a folder of its samples
    for key, colour in (("k1", "red"), ("k2", "green")):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
        pictures += [(f"{key}.png", buffer.getvalue()), (f"{key}.txt", b"ignored")]
    write_tar(str(photos / "shard.tar"), pictures)
    bank = tmp_path / "bank.txt"
    bank.write_text("# my captions\na red picture .\na blue picture .\na green picture .\n")
    out = tmp_path / "out"
    first = retrieval(
        "caption",
        "--export",
        str(trained["export"]),
        "--images",
        str(photos),
        "--bank",
        str(bank),
        "--out",
        str(out),
        "top_k=2",
    )
    assert "embeddings cached in" in first.stderr
    cache = list((tmp_path / ".retrieval-cache").glob("bank-*.safetensors"))
    assert len(cache) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 6 and summary["skipped"] == [str(photos / "broken.jpg")]
    records = {
        json.loads(line)["image"]: json.loads(line)
        for line in (out / "captions.jsonl").read_text().splitlines()
    }
    assert (
        records[str(photos / "broken.jpg")]["skipped"] and len(records[str(photos / "0-red.jpg")]["top"]) == 2
    )
    again = retrieval(
        "caption",
        "--export",
        str(trained["export"]),
        "--images",
        str(photos),
        "--bank",
        str(bank),
        "--out",
        str(out),
        "top_k=2",
    )
    assert (
        "embeddings from the cache" in again.stderr
        and "6 already captioned; this process captions 0" in again.stderr
    )
    assert (out / "captions.jsonl").read_text().count("\n") == 6


def test_clear_errors(trained: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    photo = tmp_path / "p.jpg"
    Image.new("RGB", (32, 32)).save(photo)
    cases = [
        (
            ["caption", "--export", str(trained["export"]), "--images", str(photo), "--bank", str(empty)],
            "hold no texts (an empty bank)",
        ),
        (
            ["caption", "--export", str(tmp_path), "--images", str(photo), "--bank", str(empty)],
            "not a trainer export (no finetuner.json",
        ),
        (
            [
                "caption",
                "--export",
                str(trained["export"]),
                "--images",
                str(tmp_path / "none"),
                "--bank",
                str(empty),
            ],
            "no such file, folder or glob",
        ),
        (
            [
                "search",
                "--export",
                str(trained["export"]),
                "--images",
                str(photo),
                "--queries",
                str(tmp_path / "q.txt"),
            ],
            "q.txt: no such file",
        ),
    ]
    for args, needle in cases:
        proc = retrieval(*args, "--out", str(tmp_path / "o"), check=False)
        assert proc.returncode == 2 and needle in proc.stderr.strip().splitlines()[-1], proc.stderr[-800:]


def test_two_ranks_split_the_images_and_agree_with_one(trained: dict[str, Path], tmp_path: Path) -> None:
    m = str(trained["manifest"])
    common = [
        "--export",
        str(trained["export"]),
        "--manifest",
        m,
        "--bank",
        m,
        "bank_split=test",
        "batch_size=8",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    retrieval("caption", *common, "--out", str(one))
    torchrun(2, ["caption", *common, "--out", str(two)], module="retrieval")
    assert sorted(p.name for p in (two / "parts").iterdir()) == ["a0000-r0000.jsonl", "a0000-r0001.jsonl"]
    assert (one / "captions.jsonl").read_text() == (two / "captions.jsonl").read_text()


def test_a_run_killed_mid_way_on_two_ranks_then_rerun_has_one_record_per_image(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """Both ranks SIGKILLed while they write their parts (a torn last line is likely), then the same
    command again: every image captioned exactly once, none lost, none doubled."""
    import os
    import signal
    import time

    from tests.helpers import env, launcher

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(400):
        Image.new("RGB", (48, 48), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(
            photos / f"{i:04d}.jpg"
        )
    bank = tmp_path / "bank.txt"
    bank.write_text("a red picture .\na blue picture .\na green picture .\n")
    out = tmp_path / "out"
    args = [
        *launcher(2, "retrieval"),
        "caption",
        "--export",
        str(trained["export"]),
        "--images",
        str(photos),
        "--bank",
        str(bank),
        "--out",
        str(out),
        "batch_size=1",
    ]
    proc = subprocess.Popen(
        args, env=env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline, written = time.monotonic() + 300, 0
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list((out / "parts").glob("*.jsonl")) if (out / "parts").is_dir() else []
        written = sum(p.read_bytes().count(b"\n") for p in parts)
        if written >= 40:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 40 <= written < 400, f"the run was not killed mid-way ({written} records)"
    assert not (out / "captions.jsonl").exists()
    run(args)
    lines = (out / "captions.jsonl").read_text().splitlines()
    images = [json.loads(line)["image"] for line in lines]
    assert sorted(images) == sorted(str(p) for p in photos.glob("*.jpg"))  # each exactly once
    parts = [line for p in (out / "parts").glob("*.jsonl") for line in p.read_text().splitlines()]
    ids = [json.loads(line)["image"] for line in parts if line.endswith("}")]
    assert len(ids) == len(set(ids)) == 400  # no image captioned twice, across the kill
