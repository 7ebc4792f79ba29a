"""The benchmarks run (in small settings) so that they cannot rot; their numbers are in bench/results/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import PY, run

pytestmark = pytest.mark.system


def test_gpu_drill_runs_the_real_entry_points_in_its_tiny_cpu_mode(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = run([PY, "-m", "bench.gpu", "--tiny", "--out", str(out)], timeout=1200)
    for command in (
        "python -m data_prep synthetic",
        "python -m data_prep flickr8k",
        "-m torch.distributed.run --standalone --nproc-per-node 1 -m trainer --config configs/flickr8k.yaml",
        "resume=auto",
        "transformers.CLIPModel.from_pretrained(",
        "python -m sampler --config configs/sample.yaml",
        "diffusers.StableDiffusionPipeline.from_pretrained(",
        "python -m retrieval caption",
    ):
        assert command in proc.stdout, command
    results = json.loads(out.read_text())["results"]
    assert set(results["trainer"]) == {"zero2", "zero3"}
    assert all(r["samples_per_s"] > 0 and r["exported_step"] == 6 for r in results["trainer"].values())
    assert results["sampler"]["ours_batch8"] > 0 and results["retrieval"]["images_per_s"] > 0


def test_the_gpu_drill_fails_loudly_naming_the_step(tmp_path: Path) -> None:
    """A step that fails stops the drill (non-zero, the step named); nothing is skipped."""
    bad = tmp_path / "bin"
    bad.mkdir()
    proc = run(
        [
            PY,
            "-c",
            "import bench.gpu as g, sys; g.Drill.data = lambda self: g.Path('/nonexistent/manifest.json'); "
            "sys.argv = ['bench.gpu', '--tiny']; g.main()",
        ],
        check=False,
        timeout=600,
    )
    assert proc.returncode != 0 and "step 'train-zero2' failed" in proc.stderr


@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        ("bench.prep", ["--images", "60", "--repeat", "1", "--shard-size", "20"], "data_prep --workers 2"),
        ("bench.sample", ["--steps", "2", "--repeat", "1"], "sampler pipeline, batch 8"),
        (
            "bench.train_overhead",
            ["--steps", "8", "--repeat", "1", "--run-steps", "10"],
            "data-wait fraction",
        ),
    ],
)
def test_cpu_benchmarks_print_their_ratios_and_write_their_results(
    module: str, args: list[str], needle: str, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    proc = run([PY, "-m", module, *args, "--out", str(out)], timeout=1200)
    assert needle in proc.stdout and "target" in proc.stdout
    results = json.loads(out.read_text())
    assert results["command"].startswith(f"python -m {module}") or module in results["command"]
    assert {"machine", "versions", "date", "targets"} <= set(results)
    assert all(("met" in line or "MISSED" in line) for line in proc.stdout.splitlines() if "target" in line)
