"""The benchmarks run (in small settings) so that they cannot rot; their numbers are in bench/results/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import PY, run

pytestmark = pytest.mark.system


def test_gpu_benchmark_in_its_tiny_cpu_mode(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = run([PY, "-m", "bench.gpu", "--tiny", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["trainer"]["tiny"]["samples_per_s"] > 0
    assert set(results["memory"]) == {"zero0", "zero1", "zero2", "zero3"}
    assert results["sampler"]["batch8"] > 0 and "sampler (16×16, 2 steps)" in proc.stdout


@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        ("bench.prep", ["--images", "60", "--repeat", "1", "--shard-size", "20"], "data_prep --workers 2"),
        ("bench.sample", ["--steps", "2", "--repeat", "1"], "sampler pipeline, batch 8"),
        ("bench.train_overhead", ["--steps", "8", "--repeat", "1"], "loader delivers"),
    ],
)
def test_cpu_benchmarks_print_their_ratios(module: str, args: list[str], needle: str) -> None:
    proc = run([PY, "-m", module, *args])
    assert needle in proc.stdout and "target" in proc.stdout
