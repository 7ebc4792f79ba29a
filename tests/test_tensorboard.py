"""The dashboard a user opens shows the training: a real `tensorboard` server over a finished tiny run,
read through the HTTP API its web page uses."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import PY, env, run, trainer_args

pytestmark = pytest.mark.system


def get(base: str, path: str) -> bytes:
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return response.read()


def test_tensorboard_server_shows_the_run(small_data: dict[str, Path], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    run(
        [
            PY,
            "-m",
            "trainer",
            *trainer_args(small_data["cifar10"], runs / "tiny", "train.max_steps=6", "train.epochs=1"),
        ]
    )
    tensorboard = str(Path(PY).with_name("tensorboard"))
    server = subprocess.Popen(
        [tensorboard, "--logdir", str(runs), "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
    )
    try:
        base, deadline, seen = "", time.time() + 60, []
        while not base:
            line = server.stdout.readline()
            seen.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if match:
                base = match.group(1)
            assert time.time() < deadline and server.poll() is None, "".join(seen)
        for _ in range(60):  # the first scan of the log folder takes a moment
            if json.loads(get(base, "/data/runs")):
                break
            time.sleep(0.5)
        assert json.loads(get(base, "/data/runs")) == ["tiny/tensorboard"]
        tags = json.loads(get(base, "/data/plugin/scalars/tags"))["tiny/tensorboard"]
        assert {"train/loss", "train/lr", "eval/top1", "perf/samples_per_s"} <= set(tags)
        query = urllib.parse.urlencode({"run": "tiny/tensorboard", "tag": "train/loss"})
        series = json.loads(get(base, f"/data/plugin/scalars/scalars?{query}"))
        assert [step for _, step, _ in series] == [1, 2, 3, 4, 5, 6]
        images = json.loads(get(base, "/data/plugin/images/tags"))["tiny/tensorboard"]
        assert "data/train_images" in images
        query = urllib.parse.urlencode({"run": "tiny/tensorboard", "tag": "data/train_images"})
        entries = json.loads(get(base, f"/data/plugin/images/images?{query}"))
        png = get(base, f"/data/plugin/images/individualImage?{entries[0]['query']}")
        assert png.startswith(b"\x89PNG")
    finally:
        server.terminate()
        server.wait(timeout=30)
