"""The launchers as users run them: sbatch on a real (local, 2-node) Slurm, and torchrun.sh."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import PY, env, run, scalars

SLURM_CONF = os.environ.get("SLURM_CONF", "/tmp/clip-harness-slurm/slurm.conf")


def slurm_ready() -> str:
    """Empty when the local cluster answers; else why not."""
    if not shutil.which("sbatch"):
        return "Slurm is not installed: `bash tests/slurm/start.sh` installs and starts it (root + apt); .ci/run does"
    if not Path(SLURM_CONF).is_file():
        return (
            f"no local Slurm ({SLURM_CONF}): start it with `bash tests/slurm/start.sh` (root); .ci/run does"
        )
    ping = subprocess.run(
        ["scontrol", "ping"], capture_output=True, text=True, env=env(SLURM_CONF=SLURM_CONF)
    )
    return (
        ""
        if "UP" in ping.stdout
        else f"slurmctld does not answer: {ping.stdout.strip()} {ping.stderr.strip()}"
    )


slurm = pytest.mark.skipif(bool(slurm_ready()), reason=slurm_ready() or "ok")


def sbatch(script: str, out: Path, overrides: list[str], *options: str, config: str) -> str:
    proc = run(
        [
            "sbatch",
            "--parsable",
            f"--output={out}/%x-%j.out",
            "--time=10",
            "--cpus-per-task=1",
            *options,
            script,
        ],
        SLURM_CONF=SLURM_CONF,
        CONFIG=config,
        OVERRIDES=" ".join(overrides),
    )
    return proc.stdout.strip().split(";")[0]


def job(jobid: str) -> dict[str, str]:
    proc = subprocess.run(
        ["scontrol", "show", "job", jobid], capture_output=True, text=True, env=env(SLURM_CONF=SLURM_CONF)
    )
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def wait_for(
    jobid: str,
    done: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
    timeout: float = 600,
) -> dict[str, str]:
    """Poll the controller every 0.5 s (`sbatch --wait` polls at 2, 10, 42, 74 s). A job still going
    at the deadline is cancelled, so that it cannot slow the tests after it, and its log is shown."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(jobid)
        if info.get("JobState") in done:
            return info
        time.sleep(0.5)
    info = job(jobid)
    subprocess.run(["scancel", "--full", jobid], env=env(SLURM_CONF=SLURM_CONF), check=False)
    out = Path(info.get("StdOut") or "/nonexistent")
    log = out.read_text()[-3000:] if out.is_file() else ""
    raise AssertionError(f"job {jobid} still {info.get('JobState')} after {timeout} s; its log:\n{log}")


def log_of(out: Path, name: str, jobid: str) -> str:
    return (out / f"{name}-{jobid}.out").read_text()


def flickr_overrides(manifest: Path, run_dir: Path, epochs: int) -> list[str]:
    return [
        f"data.manifest={manifest}",
        f"run.dir={run_dir}",
        f"train.epochs={epochs}",
        "train.batch_size=8",
        "data.workers=1",
        "run.log_every=1",
        "eval.every_epochs=0",
        "optim.warmup_steps=5",
        # What these tests check, whatever the demo recipe chooses: ZeRO-2's optimizer state sharded
        # across the nodes, and a checkpoint at each epoch's end.
        "deepspeed.zero_stage=2",
        "checkpoint.at_epoch_end=true",
    ]


@slurm
@pytest.mark.slurm
def test_flickr8k_sbatch_trains_across_two_nodes(small_data: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    jobid = sbatch(
        "launch/flickr8k.sbatch",
        tmp_path,
        flickr_overrides(small_data["flickr8k"], run_dir, 2),
        "--ntasks-per-node=2",
        config="configs/demo-flickr8k.yaml",
    )
    info = wait_for(jobid)
    log = log_of(tmp_path, "clip-flickr8k", jobid)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "2 nodes × 2 processes = world size 4" in log
    assert "slurm launch, 4 ranks (node1: 0,1; node2: 2,3)" in log
    assert (run_dir / "export" / "heads.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == [
        "step-00000004",
        "step-00000008",
    ]
    assert max(scalars(run_dir / "tensorboard", "train/loss")) == 8


@slurm
@pytest.mark.slurm
def test_preemption_checkpoints_requeues_and_resumes_without_retraining_a_step(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    epochs, per_epoch = 8, 4  # 128 samples / (4 ranks × 8)
    jobid = sbatch(
        "launch/flickr8k.sbatch",
        tmp_path,
        flickr_overrides(small_data["flickr8k"], run_dir, epochs),
        "--ntasks-per-node=2",
        config="configs/demo-flickr8k.yaml",
    )
    logfile = tmp_path / f"clip-flickr8k-{jobid}.out"
    deadline = time.time() + 240
    while not (logfile.exists() and "step 5 loss" in logfile.read_text()):
        assert time.time() < deadline and job(jobid)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (
            logfile.read_text()[-2000:] if logfile.exists() else job(jobid)
        )
        time.sleep(0.2)
    # What `#SBATCH --signal=B:USR1@120` does ahead of the time limit, sent now rather than waited for.
    run(["scancel", "--signal=USR1", "--batch", jobid], SLURM_CONF=SLURM_CONF)
    deadline = time.time() + 240
    while job(jobid).get("Restarts", "0") == "0":
        assert time.time() < deadline, logfile.read_text()[-3000:]
        time.sleep(0.5)
    # No `scontrol update StartTime=now` to skip the requeue delay: a batch job started before its old
    # credential expires is killed ("Job credential revoked"); slurm.conf's cred_expire=10 keeps it short.
    info = wait_for(jobid)
    log = logfile.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    stopped = int(re.search(r"checkpoint \S+step-(\d+) written ([\d.]+) s after the signal", log).group(1))
    assert "SLURM_RESTART_COUNT=1" in log and f"resumed from {run_dir}/checkpoints/step-{stopped:08d}" in log
    steps = [int(s) for s in re.findall(r"\] step (\d+) loss", log)]
    assert steps == list(range(1, epochs * per_epoch + 1)), steps  # each step exactly once, in order
    assert max(scalars(run_dir / "tensorboard", "train/loss")) == epochs * per_epoch


@slurm
@pytest.mark.slurm
def test_a_stopped_rank_on_another_node_requeues_the_job_which_finishes(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    """SIGSTOP of the rank on node2, as a bad node would: node1's rank reports within watchdog.step_s
    and exits 124, srun ends the step (the stopped rank included), the batch script requeues the job
    (a failure restart, not a preemption), and the rerun resumes and writes the final checkpoint."""
    import psutil

    run_dir = tmp_path / "run"
    epochs, per_epoch = 6, 8  # 128 samples / (2 ranks × 8)
    overrides = [*flickr_overrides(small_data["flickr8k"], run_dir, epochs), "watchdog.step_s=10"]
    jobid = sbatch(
        "launch/flickr8k.sbatch",
        tmp_path,
        overrides,
        "--ntasks-per-node=1",
        config="configs/demo-flickr8k.yaml",
    )
    logfile = tmp_path / f"clip-flickr8k-{jobid}.out"
    deadline = time.time() + 240
    while not (logfile.exists() and "step 10 loss" in logfile.read_text()):
        assert time.time() < deadline and job(jobid)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), (
            logfile.read_text()[-2000:] if logfile.exists() else job(jobid)
        )
        time.sleep(0.2)

    def rank_on_node2() -> psutil.Process | None:
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                cmd = p.info["cmdline"] or []
                if "trainer" in cmd and "--check" not in cmd and p.parent().name() != p.name():
                    environ = p.environ()
                    if environ.get("SLURM_JOB_ID") == jobid and environ.get("SLURMD_NODENAME") == "node2":
                        return p
        return None

    victim = rank_on_node2()
    assert victim is not None
    victim.send_signal(signal.SIGSTOP)
    info = wait_for(jobid)
    log = logfile.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]
    assert "hung: rank 0 spent" in log and "thread 'MainThread' (main)" in log  # node1's report
    assert "requeueing job" in log and "SLURM_RESTART_COUNT=1" in log
    resumed = int(re.search(rf"resumed from {run_dir}/checkpoints/step-(\d+)", log).group(1))
    steps = [int(s) for s in re.findall(r"\] step (\d+) loss", log)]
    again = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])  # the rerun's first step
    assert steps[:again] == list(range(1, again + 1)) and steps[again:] == list(range(resumed + 1, 49))
    assert sorted(scalars(run_dir / "tensorboard", "train/loss")) == list(range(1, epochs * per_epoch + 1))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())[-1] == "step-00000048"


@slurm
@pytest.mark.slurm
def test_cifar10_sbatch_on_one_node(small_data: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        f"data.manifest={small_data['cifar10']}",
        f"run.dir={run_dir}",
        "train.epochs=1",
        "train.batch_size=16",
        "data.workers=1",
    ]
    jobid = sbatch(
        "launch/cifar10.sbatch",
        tmp_path,
        overrides,
        "--ntasks-per-node=2",
        config="configs/demo-cifar10.yaml",
    )
    info = wait_for(jobid)
    log = log_of(tmp_path, "clip-cifar10", jobid)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "1 nodes × 2 processes = world size 2" in log and "eval after epoch 1" in log
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_sbatch_dry_run_prints_what_would_run() -> None:
    proc = run(
        ["bash", "launch/flickr8k.sbatch"],
        DRY_RUN="1",
        RUN_NAME="try",
        OVERRIDES="train.epochs=1",
        PYTHON=PY,
    )
    assert "ok: config valid; data not checked" in proc.stdout
    assert (
        f"would run: {PY} -m trainer --check --world-size 1 --ranks-per-node 1 --config configs/flickr8k.yaml run.dir=runs/try train.epochs=1"
        in proc.stdout
    )
    assert (
        f"would run: srun --nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=1 {PY} -m trainer" in proc.stdout
    )


@pytest.mark.parametrize("script", ["launch/flickr8k.sbatch", "launch/torchrun.sh", "launch/sample.sbatch"])
@pytest.mark.parametrize(
    ("variables", "needle"),
    [
        ({"CONFIG": "configs/does-not-exist.yaml"}, "configs/does-not-exist.yaml: cannot read config"),
        ({"OVERRIDES": "bogus.key=1"}, "unknown key 'bogus'"),
    ],
)
def test_a_dry_run_refuses_a_bad_config_or_key_in_one_line(
    script: str, variables: dict[str, str], needle: str
) -> None:
    """DRY_RUN checks the config file and every override exactly as the run would, and stops with its
    one-line error instead of printing what would run."""
    extra = dict(variables)
    args = []
    if script == "launch/torchrun.sh" and "OVERRIDES" in extra:  # torchrun.sh takes overrides as arguments
        args = [extra.pop("OVERRIDES")]
    proc = run(["bash", script, *args], check=False, DRY_RUN="1", PYTHON=PY, **extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "would run" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr


@pytest.mark.system
def test_torchrun_script_trains_with_two_processes(small_data: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run(
        [
            "bash",
            "launch/torchrun.sh",
            f"data.manifest={small_data['cifar10']}",
            f"run.dir={run_dir}",
            "train.epochs=1",
            "train.batch_size=16",
            "data.workers=1",
        ],
        CONFIG="configs/demo-cifar10.yaml",
    )
    assert proc.stdout.startswith("ok: 320 train samples; 2 ranks")
    assert "torchrun launch, 2 ranks" in proc.stderr and "single launch" not in proc.stderr
    assert (run_dir / "export" / "finetuner.json").is_file()


@slurm
@pytest.mark.slurm
def test_sample_sbatch_array_splits_the_images_and_merges_one_manifest(tmp_path: Path) -> None:
    from core.presets import TinyConfig, TinyDiffusionConfig, build_diffusion

    model = tmp_path / "tiny-diffusion"
    build_diffusion(model, "tiny", TinyDiffusionConfig(), TinyConfig(image_size=64, patch_size=8))
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(6)))
    out = tmp_path / "out"
    overrides = [
        f"model={model}",
        "preset=''",
        f"prompts=[{prompts}]",
        f"out_dir={out}",
        "steps=3",
        "batch_size=2",
    ]
    jobid = sbatch(
        "launch/sample.sbatch",
        tmp_path,
        overrides,
        "--array=0-1",
        "--ntasks-per-node=1",
        "--output=" + str(tmp_path / "%x-%A_%a.out"),
        config="configs/sample.yaml",
    )
    for task in (0, 1):
        info = wait_for(f"{jobid}_{task}")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"clip-sample-{jobid}_{task}.out").read_text()[
            -3000:
        ]
    records = (out / "manifest.jsonl").read_text().splitlines()
    assert len(records) == 6
    assert sorted(p.name for p in (out / "parts").iterdir()) == ["a0000-r0000.jsonl", "a0001-r0000.jsonl"]
