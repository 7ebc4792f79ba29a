"""Shards where they live: indexed and trained from http(s) URLs, `pipe:` commands and fsspec URLs,
against a real HTTP server (tests/http_server.py) that drops a connection mid-shard, answers 503 or
ignores Range; credentials never land in the manifest or the log."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import core.remote
from core.manifest import load_manifest, verify_shards
from core.secrets import redact, secret_problem
from core.shards import read_split, split_shards
from data_prep.cli import main
from plumbing.errors import UserError
from tests.helpers import PY, run, scalars, trainer_args
from tests.http_server import ShardServer
from trainer.data import Layout, TrainEpoch

TRAIN = "cifar10-train-{000000..000007}.tar"
TEST = "cifar10-test-{000000..000001}.tar"


@pytest.fixture()
def served(small_data: dict[str, Path], tmp_path: Path) -> Path:
    """The demo's shards (CIFAR-10: 8 train, 2 test; Flickr8k: 4 train, 1 dev, 2 test), copied into a
    folder to serve."""
    folder = tmp_path / "served"
    folder.mkdir()
    for dataset in ("cifar10", "flickr8k"):
        for shard in small_data[dataset].parent.glob("*/*.tar"):
            shutil.copy(shard, folder / shard.name)
    return folder


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core.remote, "DELAY", 0.01)


def index(out: Path, *patterns: tuple[str, str]) -> int:
    argv = [w for pattern, split in patterns for w in ("--shards", pattern, "--split", split)]
    return main(["index", *argv, "--out", str(out), "--quiet"])


def keys_only(sample: dict[str, Any], _seed: int, _train: bool) -> dict[str, Any]:
    return {"key": sample["key"]}


def key_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"keys": [i["key"] for i in items]}


def epoch_keys(shards: list, start: int = 0) -> list[list[str]]:
    """Micro-batches `start`.. of epoch 1 as the trainer's loader makes them (1 rank, 1 worker)."""
    layout = Layout.over(sum(n for _, n, _ in shards), 1, 1, 16)
    epoch = TrainEpoch(shards, layout, 0, 1, start, 50, 0, keys_only, key_batch)
    return [batch["keys"] for batch in epoch]


def test_shards_at_urls_are_indexed_and_trained_through_a_dropped_connection(
    small_data: dict[str, Path], served: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = load_manifest(small_data["cifar10"])
    with ShardServer(served) as server:
        out = tmp_path / "urls"
        assert index(out, (f"{server.url}/{TRAIN}", "train"), (f"{server.url}/{TEST}", "test")) == 0
        remote = load_manifest(out)
        for split in ("train", "test"):
            got = [(s.name, s.num_samples, s.bytes, s.sha256, s.path) for s in remote.split(split).shards]
            want = [
                (s.name, s.num_samples, s.bytes, s.sha256, f"{server.url}/{s.name}")
                for s in local.split(split).shards
            ]
            assert got == want  # counts, sizes and sha256 of the bytes served; the URLs as given
            verify_shards(remote, split, checksum=False)  # the trainer's pre-flight check: HEAD sizes

        # One epoch as the trainer's loader reads it: a connection dropped half-way through one
        # shard (resumed with Range), a 503 on another; the same batches as from the local files.
        reference = epoch_keys(split_shards(local, "train", 0, 1, shuffle=True, verify=True))
        shards = split_shards(remote, "train", 0, 1, shuffle=True, verify=True)
        server.drop, server.unavailable = {"cifar10-train-000003.tar"}, {"cifar10-train-000005.tar"}
        capsys.readouterr()
        assert epoch_keys(shards) == reference  # nothing twice, nothing lost, sha256 checked
        retries = [line for line in capsys.readouterr().err.splitlines() if "retry 1 of 5" in line]
        assert (
            len(retries) == 2 and "connection closed" in " ".join(retries) and "HTTP 503" in " ".join(retries)
        )
        ranged = [r for r in server.requests if r[1] == "cifar10-train-000003.tar" and r[2]]
        assert ranged and ranged[0][2] != "bytes=0-"  # resumed from the byte reached
        # A server that ignores Range (200, the whole body again): what was read is skipped; and a
        # run resumed at micro-batch 7 gets exactly the rest of the epoch.
        server.ignore_range, server.drop = True, {"cifar10-train-000006.tar"}
        assert epoch_keys(shards, start=7) == reference[7:]
        (served / "cifar10-test-000001.tar").unlink()
        with pytest.raises(UserError, match=r"cifar10-test-000001.tar: HTTP 404"):
            verify_shards(remote, "test", checksum=False)


def test_credentials_never_land_in_the_manifest_or_the_log(
    served: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "s3cret-Pw"
    with ShardServer(served) as server:
        server.auth = f"reader:{secret}"
        host = server.url.removeprefix("http://")
        for literal in (
            f"http://reader:{secret}@{host}/{TEST}",
            f"{server.url}/{TEST}?X-Amz-Signature={secret}",
        ):
            assert index(tmp_path / "refused", (literal, "test")) == 2
            err = capsys.readouterr().err
            assert secret not in err and "${VARIABLE}" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "refused").exists()

        monkeypatch.setenv("SHARD_PW", secret)  # named in the URL, read from the environment
        out = tmp_path / "env"
        assert index(out, (f"http://reader:${{SHARD_PW}}@{host}/{TEST}", "test")) == 0
        text = (out / "manifest.json").read_text()
        assert secret not in text and "${SHARD_PW}" in text
        assert len(list(read_split(load_manifest(out), "test"))) == 64

        monkeypatch.setenv("SHARD_PW", "wrong")
        with pytest.raises(UserError, match="HTTP 401.*netrc") as refused:
            list(read_split(load_manifest(out), "test"))
        assert "wrong" not in str(refused.value) + capsys.readouterr().err

        netrc = tmp_path / "netrc"  # or ~/.netrc, as curl -n, wget and requests read it
        netrc.write_text(f"machine 127.0.0.1 login reader password {secret}\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
        assert index(tmp_path / "netrc-out", (f"{server.url}/{TEST}", "test")) == 0
        assert secret not in (tmp_path / "netrc-out" / "manifest.json").read_text()


@pytest.mark.parametrize(
    ("location", "masked"),
    [
        ("https://u:pw1@h/x.tar", "https://u:***@h/x.tar"),
        (
            "https://h/x.tar?X-Amz-Date=1&X-Amz-Signature=ab12",
            "https://h/x.tar?X-Amz-Date=1&X-Amz-Signature=***",
        ),
        (
            "https://acct.blob.core.windows.net/c/x.tar?sv=1&sig=ab%2B",
            "https://acct.blob.core.windows.net/c/x.tar?sv=1&sig=***",
        ),
        (
            'pipe:curl -s -H "Authorization: Bearer ab12" https://h/x.tar',
            'pipe:curl -s -H "Authorization: Bearer ***" https://h/x.tar',
        ),
        (
            "pipe:AWS_SECRET_ACCESS_KEY=ab12 aws s3 cp s3://b/x.tar -",
            "pipe:AWS_SECRET_ACCESS_KEY=*** aws s3 cp s3://b/x.tar -",
        ),
    ],
)
def test_literal_secrets_are_refused_and_placeholders_kept(location: str, masked: str) -> None:
    assert redact(location) == masked and secret_problem(location)
    for kept in ("https://u:${PW}@h/x.tar", 'pipe:curl -s -H "Authorization: Bearer $TOKEN" https://h/x.tar'):
        assert redact(kept) == kept and secret_problem(kept) is None


def test_pipe_commands_and_fsspec_urls_are_shards_too(
    small_data: dict[str, Path], served: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import fsspec

    local = [s["__key__"] for s in read_split(load_manifest(small_data["cifar10"]), "test")]
    out = tmp_path / "pipe"  # webdataset's pipe: (open_clip's `pipe:aws s3 cp s3://… -`)
    assert index(out, (f"pipe:cat {served}/{TEST}", "test")) == 0
    manifest = load_manifest(out)
    assert [s.name for s in manifest.split("test").shards] == [
        "cifar10-test-000000.tar",
        "cifar10-test-000001.tar",
    ]
    assert [s["__key__"] for s in read_split(manifest, "test")] == local

    memory = fsspec.filesystem("memory")  # an fsspec file system with no server: s3fs, gcsfs are the same API
    for shard in sorted(served.glob("cifar10-test-*.tar")):
        memory.pipe(f"/bucket/{shard.name}", shard.read_bytes())
    assert index(tmp_path / "fsspec", ("memory://bucket/*.tar", "test")) == 0
    assert [s["__key__"] for s in read_split(load_manifest(tmp_path / "fsspec"), "test")] == local

    assert index(tmp_path / "s3", ("s3://bucket/{00000..00009}.tar", "train")) == 2
    assert "pip install 'clip-harness[s3]'" in capsys.readouterr().err

    broken = json.loads((out / "manifest.json").read_text())  # a command that fails every time
    broken["splits"]["test"]["shards"][0]["path"] = f"pipe:cat {served}/gone.tar"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(UserError, match="the command exited 1 at byte 0; gave up after 5 retries"):
        list(read_split(load_manifest(tmp_path / "broken"), "test"))


@pytest.mark.system
def test_the_trainer_runs_an_epoch_from_urls_through_a_dropped_connection(
    small_data: dict[str, Path], served: Path, tmp_path: Path
) -> None:
    """The real trainer (1 process, 1 loader worker, contrastive on the demo's Flickr8k shards) on
    shards at URLs, with a password named in the URL and one connection dropped mid-shard: the same loss
    curve as on the local files, the retry in the log, and the password nowhere in the run's files."""
    secret = "s3cret-Pw"
    with ShardServer(served) as server:
        server.auth = f"reader:{secret}"
        host = server.url.removeprefix("http://")
        out = tmp_path / "urls"
        names = ("flickr8k-train-{000000..000003}.tar", "flickr8k-test-{000000..000001}.tar")
        patterns = [f"http://reader:${{SHARD_PW}}@{host}/{p}" for p in names]
        proc = run(
            [PY, "-m", "data_prep", "index", "--shards", patterns[0], "--split", "train"]
            + ["--shards", patterns[1], "--split", "test", "--out", str(out), "--quiet"],
            SHARD_PW=secret,
        )
        server.drop = {"flickr8k-train-000001.tar"}
        runs = {}
        for name, manifest in (("local", small_data["flickr8k"]), ("urls", out / "manifest.json")):
            overrides = ("train.epochs=1", "data.workers=1", "data.eval_split=test")
            args = trainer_args(manifest, tmp_path / name, *overrides, config="configs/demo-flickr8k.yaml")
            proc = run([PY, "-m", "trainer", *args], SHARD_PW=secret)
            runs[name] = proc.stderr
        assert "retry 1 of 5" in runs["urls"] and "connection closed" in runs["urls"]
    loss = {name: scalars(tmp_path / name / "tensorboard", "train/loss") for name in runs}
    assert loss["urls"] == loss["local"] and len(loss["local"]) == 8  # 128 samples / 16, every one once
    leaked = [p for p in (tmp_path / "urls").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked and secret not in runs["urls"]
