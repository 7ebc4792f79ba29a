"""The real trainer, launched as users launch it (torchrun, 2 ranks on CPU), on tiny shards."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from plumbing.files import sha256_file
from plumbing.tars import end_of_archive, tar_member
from tests.helpers import PY, run, scalars, tags, torchrun, trainer_args

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def stages(small_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """2-rank runs of the same seed and data under ZeRO 0, 1, 2 and 3 (stage 3 with every parameter
    partitioned: persistence threshold 0)."""
    root = tmp_path_factory.mktemp("stages")
    runs = {}
    for stage in (0, 1, 2, 3):
        run_dir = root / f"zero{stage}"
        extra = [f"deepspeed.zero_stage={stage}", "deepspeed.stage3_param_persistence_threshold=0"]
        torchrun(2, trainer_args(small_data["cifar10"], run_dir, *extra))
        runs[stage] = run_dir
    return runs


def test_loss_falls_and_accuracy_rises_under_every_stage(stages: dict[int, Path]) -> None:
    for stage, run_dir in stages.items():
        loss = scalars(run_dir / "tensorboard", "train/loss")
        assert len(loss) == 20, stage
        first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (18, 19, 20)) / 3
        assert last < first - 0.3, (stage, first, last)
        top1 = scalars(run_dir / "tensorboard", "eval/top1")
        assert top1[20] > top1[0] + 0.2, (stage, top1)


def test_zero1_2_and_3_follow_the_zero0_loss_curve(stages: dict[int, Path]) -> None:
    reference = scalars(stages[0] / "tensorboard", "train/loss")
    for stage in (1, 2, 3):
        other = scalars(stages[stage] / "tensorboard", "train/loss")
        assert other.keys() == reference.keys()
        assert max(abs(other[s] - reference[s]) for s in reference) < 1e-4, stage


def test_tensorboard_holds_what_a_user_watches(stages: dict[int, Path]) -> None:
    found = tags(stages[2] / "tensorboard")
    wanted = {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/temperature",
        "perf/samples_per_s",
        "perf/step_time_s",
        "perf/data_wait_fraction",
        "perf/peak_memory_mb",
        "data/skipped_samples",
        "eval/top1",
        "eval/top5",
    }
    assert wanted <= found, wanted - found
    lr = scalars(stages[2] / "tensorboard", "train/lr")
    assert (
        lr[1] < lr[4] < lr[5] == pytest.approx(1e-3, rel=1e-6)
    )  # linear warm-up over 5 steps (optim.warmup_steps)
    assert lr[5] > lr[10] > lr[20]  # then the cosine decay


def test_run_folder_layout_and_resolved_config(stages: dict[int, Path]) -> None:
    run_dir = stages[2]
    for name in ("config.yaml", "train.log", "tensorboard", "checkpoints", "export"):
        assert (run_dir / name).exists(), name
    assert "zero_stage: 2" in (run_dir / "config.yaml").read_text()
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["step-00000010", "step-00000020"]  # one per epoch
    state = json.loads((run_dir / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    assert state["state"]["epoch"] == 1 and state["state"]["micro_in_epoch"] == 0
    assert state["config"]["deepspeed"]["zero_stage"] == 2


@pytest.mark.parametrize("stage", [2, 3])
def test_export_equals_the_live_engine_gathered_at_the_end(stages: dict[int, Path], stage: int) -> None:
    """The export (consolidated from the last checkpoint's partitions) is checked by the run itself
    against the live engine's fp32 parameters gathered across ranks; it loads with plain transformers
    classes; nothing in it is a pickle."""
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    from core.clip import CLIPFineTuner

    run_dir = stages[stage]
    assert re.search(
        r"export verified: its \d+ tensors equal the live engine's", (run_dir / "train.log").read_text()
    )
    export = run_dir / "export"
    assert not [p for p in export.rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pickle")]
    tuned = CLIPFineTuner.from_pretrained(export)
    tokenizer = CLIPTokenizer.from_pretrained(export)
    tokens = tokenizer(
        ["An image of a cat.", "a red circle"], padding="max_length", max_length=32, return_tensors="pt"
    )
    with torch.no_grad():
        clip = CLIPModel.from_pretrained(export)
        text = CLIPTextModel.from_pretrained(export / "text_encoder")
        assert torch.equal(clip.logit_scale.exp(), tuned.logit_scale.exp().reshape(()))
        hidden = text(**tokens).last_hidden_state
        assert torch.equal(hidden, clip.text_model(**tokens).last_hidden_state)
    info = json.loads((export / "export.json").read_text())
    assert info["step"] == 20 and len(info["content_sha256"]) == 64


def test_the_export_check_fails_on_an_export_that_differs(stages: dict[int, Path], tmp_path: Path) -> None:
    """The check itself can fail: a copy of the export with one head weight nudged is refused."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from core.clip import HEADS_FILE, CLIPFineTuner
    from plumbing.config import config_from_dict
    from plumbing.dist import DistInfo
    from trainer.config import TrainConfig
    from trainer.export import live_digests, verify_export
    from trainer.run import RunFolder
    from trainer.tasks import make_task

    run_dir = stages[2]
    cfg = config_from_dict(TrainConfig, yaml.safe_load((run_dir / "config.yaml").read_text()), "config.yaml")
    task = make_task(cfg, RunFolder(run_dir), DistInfo.from_env({}), "cpu")
    live = live_digests(SimpleNamespace(module=CLIPFineTuner.from_pretrained(run_dir / "export")), task, True)
    verify_export(live, task, run_dir / "export")  # the export equals itself
    copy = tmp_path / "export"
    shutil.copytree(run_dir / "export", copy)
    heads = load_file(str(copy / HEADS_FILE))
    heads["text_head.net.bias"] = heads["text_head.net.bias"] + 1e-6
    save_file(heads, str(copy / HEADS_FILE))
    with pytest.raises(RuntimeError, match="different .*text_head.net.bias"):
        verify_export(live, task, copy)


def test_resume_mid_epoch_and_at_epoch_end_equals_an_uninterrupted_run(
    small_data: dict[str, Path], stages: dict[int, Path], tmp_path: Path
) -> None:
    """Stopped at step 7 (inside epoch 1: 2 loader workers, an exact data position), resumed and
    stopped again at step 10 (the epoch's end), resumed to the end: the loss curve of the run that
    never stopped."""
    reference = scalars(stages[2] / "tensorboard", "train/loss")
    run_dir = tmp_path / "run"
    torchrun(2, trainer_args(small_data["cifar10"], run_dir, "train.max_steps=7"))
    for stop, then in ((7, ["train.max_steps=10"]), (10, [])):
        assert (run_dir / "checkpoints" / f"step-{stop:08d}").is_dir()
        resumed = torchrun(2, trainer_args(small_data["cifar10"], run_dir, *then))
        assert f"resumed from {run_dir / 'checkpoints' / f'step-{stop:08d}'}" in resumed.stderr
    loss = scalars(run_dir / "tensorboard", "train/loss")
    assert loss.keys() == reference.keys()
    assert max(abs(loss[s] - reference[s]) for s in reference) < 1e-5


def test_contrastive_flickr8k_run(small_data: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "flickr"
    args = trainer_args(
        small_data["flickr8k"],
        run_dir,
        "train.epochs=3",
        "train.batch_size=8",
        config="configs/demo-flickr8k.yaml",
    )
    torchrun(2, [*args, "eval.every_epochs=3"])
    loss = scalars(run_dir / "tensorboard", "train/loss")
    steps = sorted(loss)
    assert sum(loss[s] for s in steps[-3:]) < sum(loss[s] for s in steps[:3]) - 0.2
    found = tags(run_dir / "tensorboard")
    assert {"eval/i2t_R@1", "eval/t2i_R@1", "eval/i2t_R@10", "eval/t2i_R@5"} <= found
    r10 = scalars(run_dir / "tensorboard", "eval/i2t_R@10")
    assert r10[max(r10)] > r10[0]


def test_decoding_on_the_device_trains_as_decoding_in_the_workers(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    """data.decode=gpu (here the training process's own CPU decodes, with torchvision): the same
    samples, crops and flips, pixels within rounding, so the same loss curve within a hair; the
    diffusion tasks, which have no device path, refuse it in one line before anything heavy."""
    losses = {}
    for decode in ("cpu", "gpu"):
        run_dir = tmp_path / decode
        args = trainer_args(
            small_data["flickr8k"],
            run_dir,
            "train.epochs=1",
            "train.batch_size=8",
            "data.random_crop=true",
            "data.hflip=true",
            f"data.decode={decode}",
            "eval.every_epochs=1",
            config="configs/demo-flickr8k.yaml",
        )
        run([PY, "-m", "trainer", *args])
        losses[decode] = scalars(run_dir / "tensorboard", "train/loss")
        assert scalars(run_dir / "tensorboard", "eval/i2t_R@10")
    assert losses["cpu"].keys() == losses["gpu"].keys() and len(losses["cpu"]) >= 10
    assert max(abs(losses["cpu"][s] - losses["gpu"][s]) for s in losses["cpu"]) < 0.02
    refused = run(
        [
            PY,
            "-m",
            "trainer",
            "--check",
            *trainer_args(
                small_data["flickr8k"],
                tmp_path / "unet",
                "data.decode=gpu",
                config="configs/demo-diffusion.yaml",
            ),
        ],
        check=False,
    )
    assert (
        refused.returncode == 2
        and "data.decode=gpu: only the CLIP tasks" in refused.stderr.strip().splitlines()[-1]
    )


def _corrupt_one_image(manifest: Path, out: Path) -> str:
    """A copy of the dataset where one sample's PNG is garbage (the manifest updated to match, as if
    data_prep had shipped it): the trainer must skip and count it."""
    shutil.copytree(manifest.parent, out)
    data = json.loads((out / "manifest.json").read_text())
    shard = data["splits"]["train"]["shards"][0]
    path = out / "train" / shard["name"]
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = members[0][0].split(".")[0]
    parts: list[bytes] = []
    for name, blob in members:
        parts += tar_member(name, b"\x89PNG not really" if name == f"{victim}.png" else blob)
    body = b"".join(parts)
    path.write_bytes(body + end_of_archive(len(body)))
    shard["sha256"], shard["bytes"] = sha256_file(path), path.stat().st_size
    (out / "manifest.json").write_text(json.dumps(data))
    return victim


def test_an_undecodable_sample_is_skipped_and_counted(small_data: dict[str, Path], tmp_path: Path) -> None:
    victim = _corrupt_one_image(small_data["cifar10"], tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = run(
        [
            PY,
            "-m",
            "trainer",
            *trainer_args(
                tmp_path / "data" / "manifest.json", run_dir, "train.epochs=1", "data.max_bad_fraction=0.01"
            ),
        ]
    )
    assert f"skipping undecodable sample {victim}" in proc.stderr
    skipped = scalars(run_dir / "tensorboard", "data/skipped_samples")
    assert skipped[max(skipped)] == 1
    too_strict = run(
        [
            PY,
            "-m",
            "trainer",
            *trainer_args(
                tmp_path / "data" / "manifest.json",
                tmp_path / "strict",
                "train.epochs=1",
                "data.max_bad_fraction=0.001",
            ),
        ],
        check=False,
    )
    assert too_strict.returncode == 2 and "exceed data.max_bad_fraction=0.001" in too_strict.stderr


def test_unusable_layout_and_bad_data_are_one_line_before_training(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    args = trainer_args(small_data["cifar10"], tmp_path / "r", "train.batch_size=128")
    check = run([PY, "-m", "trainer", "--check", "--world-size", "2", *args], check=False)
    assert check.returncode == 2
    assert check.stderr.strip().count("\n") == 0 and "need at least 512" in check.stderr
    launched = torchrun(2, args, check=False)
    assert launched.returncode != 0 and launched.stderr.count("trainer: error:") == 1
    ok = run(
        [
            PY,
            "-m",
            "trainer",
            "--check",
            "--world-size",
            "2",
            *trainer_args(small_data["cifar10"], tmp_path / "r"),
        ]
    )
    assert ok.stdout.startswith("ok: 320 train samples")
    broken = tmp_path / "broken"
    shutil.copytree(small_data["cifar10"].parent, broken)
    victim = sorted((broken / "train").glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:1000])
    proc = run([PY, "-m", "trainer", *trainer_args(broken / "manifest.json", tmp_path / "r2")], check=False)
    assert proc.returncode == 2 and f"shard {victim} has 1000 bytes" in proc.stderr
    assert not (tmp_path / "r2" / "checkpoints").exists()


def test_a_bad_config_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  objective: classification\n  epocs: 3\n")
    proc = run([PY, "-m", "trainer", "--config", str(bad)], check=False)
    assert (
        proc.returncode == 2
        and proc.stderr.strip()
        == f"trainer: error: {bad}: unknown key 'train.epocs' (Key 'epocs' not in 'LoopConfig'. Did you mean: 'epochs'?)"
    )


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_exports_hold_the_fp32_master_weights(
    small_data: dict[str, Path], tmp_path: Path, stage: int
) -> None:
    """Under bf16 the module keeps rounded copies; the export must carry DeepSpeed's fp32 masters."""
    from core.clip import CLIPFineTuner

    run_dir = tmp_path / "run"
    overrides = [
        "train.max_steps=3",
        "deepspeed.precision=bf16",
        f"deepspeed.zero_stage={stage}",
        "data.workers=1",
        "eval.at_start=false",
    ]
    run([PY, "-m", "trainer", *trainer_args(small_data["cifar10"], run_dir, *overrides)])
    tuned = CLIPFineTuner.from_pretrained(run_dir / "export")
    weights = [p for n, p in tuned.named_parameters() if n.startswith("clip.vision_model.encoder")]
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights)  # finer than bf16: the fp32 masters


def test_checkpointing_and_offload_options_follow_the_plain_loss_curve(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    """Gradient checkpointing, ZeRO-Offload (DeepSpeedCPUAdam, built once) and ZeRO-3 parameter offload
    change where memory goes, not the arithmetic: the same losses as a plain ZeRO-2 run."""
    variants = {
        "plain": [],
        "checkpointing": ["model.gradient_checkpointing=true"],
        "offload": ["deepspeed.offload_optimizer=true"],
        "stage3-offload": [
            "deepspeed.zero_stage=3",
            "deepspeed.offload_param=true",
            "deepspeed.offload_optimizer=true",
        ],
    }
    curves = {}
    for name, extra in variants.items():
        run_dir = tmp_path / name
        run(
            [
                PY,
                "-m",
                "trainer",
                *trainer_args(
                    small_data["cifar10"],
                    run_dir,
                    "train.max_steps=4",
                    "data.workers=1",
                    "eval.at_start=false",
                    *extra,
                ),
            ]
        )
        curves[name] = scalars(run_dir / "tensorboard", "train/loss")
    for name, curve in curves.items():
        assert (
            curve.keys() == {1, 2, 3, 4} and max(abs(curve[s] - curves["plain"][s]) for s in curve) < 1e-4
        ), name


def test_keep_last_prunes_old_checkpoints_and_the_export_cli(
    small_data: dict[str, Path], stages: dict[int, Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    run(
        [
            PY,
            "-m",
            "trainer",
            *trainer_args(
                small_data["cifar10"],
                run_dir,
                "train.epochs=1",
                "checkpoint.every_steps=2",
                "checkpoint.keep_last=2",
                "data.workers=1",
                "train.batch_size=32",  # 320 samples, one rank: 10 steps
            ),
        ]
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir()) == [
        "step-00000008",
        "step-00000010",
    ]
    # the export command, by hand, on any checkpoint: refuses to overwrite, writes a loadable export
    checkpoint = stages[0] / "checkpoints" / "step-00000010"
    out = tmp_path / "exported"
    out.mkdir()
    (out / "mine.txt").write_text("not yours")
    refused = run(
        [PY, "-m", "trainer.export", "--checkpoint", str(checkpoint), "--out", str(out)], check=False
    )
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and (out / "mine.txt").exists()
    run([PY, "-m", "trainer.export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "fresh")])
    info = json.loads((tmp_path / "fresh" / "export.json").read_text())
    assert info["step"] == 10 and (tmp_path / "fresh" / "text_encoder" / "model.safetensors").is_file()


def test_hparams_are_logged_with_the_final_metrics(stages: dict[int, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(stages[2] / "tensorboard"))
    acc.Reload()
    assert acc.PluginTagToContent("hparams"), "no hparams summary"
    final = scalars(stages[2] / "tensorboard", "hparam/top1")
    assert final and 0 < next(iter(final.values())) <= 1
