"""The benchmarks run (in small settings) so that they cannot rot; their numbers are in bench/results/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import PY, ROOT, run

pytestmark = pytest.mark.system


def openclip_site() -> Path:
    """open_clip 3.3.0 and its trainer's imports in .peer-site/ (pip install --target, once)."""
    from bench.gpu.clip import OPENCLIP

    site = ROOT / ".peer-site"
    if not (site / "open_clip_train").is_dir():
        run([PY, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), *OPENCLIP], timeout=900)
    return site


@pytest.mark.slow
def test_the_gpu_drill_runs_every_step_and_reports_a_failed_one_at_the_end(tmp_path: Path) -> None:
    """The drill in its tiny CPU mode, through the real entry points, with one step made to fail on
    purpose (a bad override on the ZeRO-3 run): every other step still runs (open_clip's trainer, the
    step sweep and profile, the U-Net step against its bare loop among them), the one that needs the
    failed one is "not run", the table names both with the failure's log line, the results file is
    written, and the exit is non-zero."""
    out = tmp_path / "gpu.json"
    inject = (
        "import bench.gpu as g, sys\n"
        "real = g.Drill.trainer_args\n"
        "def args(self, run_dir, stage, steps):\n"
        "    extra = ['optim.lr=not-a-number'] if stage == 3 else []\n"
        "    return real(self, run_dir, stage, steps) + extra\n"
        "g.Drill.trainer_args = args\n"
        f"sys.argv = ['bench.gpu', '--tiny', '--out', {str(out)!r}, '--openclip-site', {str(openclip_site())!r}]\n"
        "g.main()\n"
    )
    proc = run([PY, "-c", inject], check=False, timeout=1500)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "1 of 16 steps failed: train-zero3" in proc.stderr, proc.stdout[-6000:]
    for command in (
        "python -m data_prep synthetic",
        "python -m data_prep flickr8k",
        "-m torch.distributed.run --standalone --nproc-per-node 1 -m trainer --config configs/flickr8k.yaml",
        "python -m bench.gpu.clip_step --model",
        "bench/peer_openclip.py openclip-worker",
        "python -m bench.train_diffusion --model",
        "resume=auto",
        "deepspeed.overrides.checkpoint.load_universal=true",
        "transformers.CLIPModel.from_pretrained(",
        "python -m sampler --config configs/sample.yaml",
        "diffusers.StableDiffusionPipeline.from_pretrained(",
        "python -m retrieval caption",
    ):
        assert command in proc.stdout, command
    table = proc.stdout[proc.stdout.index("step ") :]
    assert "train-zero3        failed" in table
    assert "export-zero3       not run" in table and "needs train-zero3" in table
    assert "--- train-zero3 failed:" in table and "optim.lr" in table
    assert "CLIP zero2:" in proc.stdout and "memory per phase" in proc.stdout  # the trainer's memory.json
    for step in (
        "train-zero2",
        "export-zero2",
        "clip-step",
        "openclip",
        "train-decode-gpu",
        "unet-step",
        "sample-batch8",
        "sample-batch1",
        "resume-zero2",
        "universal-zero2",
        "train-unet",
        "retrieval-caption",
    ):
        assert f"{step:18s} ok" in table, step
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert set(results["trainer"]) == {"zero2"} and results["trainer"]["zero2"]["exported_step"] == 4
    assert results["sampler"]["batch8"]["ours"] > 0 and results["retrieval"]["images_per_s"] > 0
    assert results["universal"]["to_step"] == 8 and len(results["universal"]["losses_after"]) >= 1
    assert results["steps"]["train-zero3"]["status"] == "failed"
    step = results["clip_step"]
    assert set(step["batches"]) == {"4", "8", "16"} and step["bare"]["samples_per_s"] > 0
    assert step["zero0"]["samples_per_s"] > 0 and step["bare"]["profile"]["host_cpu_ms_per_step"] > 0
    assert step["profile"]["host_cpu_ms_per_step"] > 0 and step["profile"]["top_host_ops"]
    assert results["openclip"]["samples_per_s"] > 0 and results["unet_step"]["ratio"] > 0
    assert results["decode_gpu"]["samples_per_s"] > 0
    names = {t["name"] for t in payload["targets"]}
    assert (
        "CLIP samples/s / open_clip's (same GPU, batch)" in names
        and "U-Net step / bare diffusers-style loop" in names
    )


def test_the_gpu_drill_reruns_named_steps_with_what_they_need() -> None:
    from bench.gpu import with_needs

    assert with_needs(["retrieval-caption"]) == {
        "retrieval-caption",
        "export-zero2",
        "train-zero2",
        "data-flickr8k",
        "data-synthetic",
    }
    assert with_needs(["sample-batch1"]) == {"sample-batch1"}
    assert with_needs(["universal-zero2"]) == {
        "universal-zero2",
        "resume-zero2",
        "train-zero2",
        "data-flickr8k",
        "data-synthetic",
    }
    assert with_needs(["openclip"]) == {"openclip", "data-flickr8k", "data-synthetic"}
    with pytest.raises(SystemExit, match="unknown step"):
        with_needs(["train-zero4"])


@pytest.mark.parametrize(
    ("module", "args", "needle"),
    [
        (
            "bench.prep",
            ["--images", "60", "--repeat", "1", "--shard-size", "20", "--index-copies", "2"],
            "data_prep --workers 2",
        ),
        ("bench.sample", ["--steps", "2", "--repeat", "1"], "sampler pipeline, batch 8"),
        ("bench.loader", ["--images", "16", "--repeat", "1"], "cores per GPU"),
        (
            "bench.train_overhead",
            ["--steps", "8", "--repeat", "1", "--run-steps", "10"],
            "data-wait fraction",
        ),
        ("bench.memory", ["--rows", "tiny:0,tiny:3"], "tiny:3: ZeRO-3, fp32, batch 8, 2 ranks"),
        ("bench.hang_stress", ["--rounds", "16", "--mode", "loaders"], "rounds 16 in"),
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
