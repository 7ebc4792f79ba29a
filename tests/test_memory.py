"""The memory plan and what keeps memory down: the plan's verdicts on real shapes (counted on the
meta device, nothing allocated), its arithmetic against DeepSpeed's own estimator, ZeRO's buffers
sized from the model, the per-phase record, ZeRO-3's padding never read as a parameter."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from plumbing.config import load_config
from tests.helpers import PY, ROOT, run, tags, torchrun, trainer_args
from trainer.config import TrainConfig
from trainer.engine import BatchSizes, DeepSpeedConfig, OptimConfig, ds_config
from trainer.loop import own_part
from trainer.memory.check import memory_verdict
from trainer.memory.estimate import GiB, Setting, plan
from trainer.memory.shapes import ModelSize

SD_V1 = ["train.objective=denoising", "diffusion.preset=sd-v1", "diffusion.resolution=64"]


def config(*overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig, ROOT / "configs/flickr8k-unet.yaml", ["diffusion.model=''", *overrides], {}
    )


def sized(params: int, hidden: int = 1024) -> ModelSize:
    return ModelSize(params, 0, 0, 0, hidden, (params,), params // 10, 0, 0, 0)


def test_the_sd_v1_unet_under_zero0_on_two_ranks_is_refused_on_24_gib_naming_zero3() -> None:
    """860 M trainable parameters in fp32 (bench/memory.py's row): ZeRO-0 holds ~20 bytes of each per
    rank (weights, gradients, Adam, the all-reduce copy), two ranks need ~36 GiB; ZeRO-1 and 2 do not
    fit either (in bf16 ZeRO-2 would); ZeRO-3 does."""
    common = [
        *SD_V1,
        "deepspeed.precision=fp32",
        "diffusion.text_encoder=''",
        "diffusion.ema_decay=0",
        "data.workers=1",
        "train.batch_size=2",
    ]
    refused = memory_verdict(config(*common, "deepspeed.zero_stage=0"), 2, 2, None, False, 24 * GiB)
    assert refused is not None and not refused.plan.fits
    line = refused.refusal
    assert "\n" not in line and line.startswith("memory: ZeRO-0, fp32, batch 2, 2 ranks needs ")
    assert "deepspeed.zero_stage=3 would fit" in line, line
    assert refused.plan.per_rank > 15 * GiB
    accepted = memory_verdict(config(*common, "deepspeed.zero_stage=3"), 2, 2, None, False, 24 * GiB)
    assert accepted is not None and accepted.plan.fits and accepted.refusal == ""
    assert accepted.size.trainable == 859_520_964  # diffusers' UNet2DConditionModel at SD v1's shape
    assert any(line.endswith(": fits") for line in accepted.lines)


def test_a_batch_that_does_not_fit_is_refused_naming_a_smaller_one_or_checkpointing() -> None:
    """ViT-L/14 at batch 128 per rank under ZeRO-3: its activations alone outgrow 24 GiB; gradient
    checkpointing (the smallest change that fits) is named, with the key that turns it on."""
    cfg = config(
        "train.objective=contrastive",
        "model.preset=vit-l-14",
        "train.batch_size=128",
        "deepspeed.zero_stage=3",
    )
    verdict = memory_verdict(cfg, 2, 2, None, False, 24 * GiB)
    assert verdict is not None and not verdict.plan.fits
    assert "model.gradient_checkpointing=true would fit" in verdict.refusal, verdict.refusal
    cfg = config(
        "train.objective=contrastive",
        "model.preset=vit-l-14",
        "train.batch_size=64",
        "deepspeed.zero_stage=3",
        "model.gradient_checkpointing=true",
    )
    verdict = memory_verdict(cfg, 2, 2, None, False, 17 * GiB)
    assert verdict is not None and "train.batch_size=32 train.grad_accum=2 would fit" in verdict.refusal


def test_model_states_per_rank_match_deepspeeds_own_estimator() -> None:
    """bf16 ZeRO-2 and ZeRO-3 on 2 GPUs: DeepSpeed's estimators (estimate_zero2_model_states_mem_needs,
    estimate_zero3_…, without offload) count weights, gradients and Adam states as the plan does,
    within 15 % (they round the bf16 gradient and the fp32 copies differently)."""

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    size = sized(428_000_000)
    for stage, theirs in (
        (2, estimate_zero2_model_states_mem_needs(size.params, 2, cpu_offload=False)[1]),
        (3, estimate_zero3_model_states_mem_needs(size.params, size.largest_layer, 2, cpu_offload=False)[1]),
    ):
        made = plan(size, Setting(stage, "bf16", 2, 2, 1, 0, True), 80 * GiB)
        ours = sum(made.rows[k] for k in ("weights", "gradients", "optimizer"))
        assert ours == pytest.approx(theirs, rel=0.15), (stage, ours / GiB, theirs / GiB)


def test_zero3_plans_about_ten_bytes_a_parameter_on_two_ranks_zero0_twenty_in_fp32() -> None:
    """The issue's arithmetic: ZeRO-0 holds weights, gradients, Adam (16 bytes) and its flattened
    all-reduce copy (4); ZeRO-3 on 2 ranks its halves of weights, fp32 masters, gradients and Adam."""
    size = sized(428_000_000)
    per = {
        stage: sum(plan(size, Setting(stage, "fp32", 2, 2, 1, 0, False), 24 * GiB).rows[k] for k in rows)
        / size.params
        for stage, rows in ((0, ("weights", "gradients", "optimizer", "deepspeed")),)
        + ((3, ("weights", "gradients", "optimizer")),)
    }
    assert per[0] == pytest.approx(20, abs=0.01)
    assert per[3] == pytest.approx(10, abs=0.2)  # + the gathered window of ~13 h² parameters


def test_zero_buffers_are_sized_from_the_model_unless_set() -> None:
    sizes = BatchSizes(8, 1, 2)
    zero3 = ds_config(DeepSpeedConfig(zero_stage=3), OptimConfig(), sizes, False, hidden=768)[
        "zero_optimization"
    ]
    assert zero3["reduce_bucket_size"] == 768**2 and zero3["stage3_prefetch_bucket_size"] == int(0.9 * 768**2)
    assert zero3["stage3_param_persistence_threshold"] == 7680
    assert zero3["stage3_max_live_parameters"] == zero3["stage3_max_reuse_distance"] == 12 * 768**2
    zero2 = ds_config(DeepSpeedConfig(zero_stage=2), OptimConfig(), sizes, False, hidden=768)[
        "zero_optimization"
    ]
    assert zero2["reduce_bucket_size"] == 12 * 768**2  # one transformer block's gradients a flush
    mine = DeepSpeedConfig(zero_stage=2, overrides={"zero_optimization": {"reduce_bucket_size": 5e8}})
    assert (
        ds_config(mine, OptimConfig(), sizes, False, hidden=768)["zero_optimization"]["reduce_bucket_size"]
        == 5e8
    )


def test_zero3_padding_is_never_read_as_a_parameter() -> None:
    """A 3-element parameter on 2 ranks: rank 1's partition holds one element and one of padding,
    which DeepSpeed leaves uninitialised: only the element is this rank's."""
    p = SimpleNamespace(ds_tensor=torch.tensor([1.0, float("nan")]), ds_numel=3)
    assert own_part(p, 1).tolist() == [1.0]  # type: ignore[arg-type]
    assert own_part(p, 0).numel() == 2  # type: ignore[arg-type]


@pytest.mark.smoke
def test_check_prints_the_plan_and_refuses_one_that_cannot_fit(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    args = [
        PY,
        "-m",
        "trainer",
        "--config",
        str(ROOT / "configs/demo-flickr8k.yaml"),
        "--check",
        "--world-size",
        "2",
        f"data.manifest={small_data['flickr8k']}",
        f"run.dir={tmp_path / 'run'}",
    ]
    ok = run(args)
    assert ok.stdout.startswith("ok: ") and "memory plan per rank (ZeRO-" in ok.stdout
    assert re.search(
        r"this node: 2 ranks \(rank 0 alone exports\) .* = [\d.]+ GiB of [\d.]+ GiB RAM .*: fits", ok.stdout
    ), ok.stdout
    huge = run([*args, "model.preset=vit-l-14", "train.batch_size=64", "deepspeed.zero_stage=3"], check=False)
    lines = huge.stderr.strip().splitlines()
    assert huge.returncode == 2 and len(lines) == 1 and "DOES NOT FIT" in huge.stdout
    assert lines[0].startswith("trainer: error: memory: ZeRO-3, ") and "would fit" in lines[0], lines[0]


@pytest.mark.system
def test_vit_b_32_under_zero3_trains_resumes_and_exports_within_its_plan(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    """Real size, as CI on 2 cores affords it: CLIP ViT-B/32's shapes (151 M parameters), 2 ranks,
    ZeRO-3, fp32: 2 steps and a checkpoint, then resume=auto for a third and the export (checked
    tensor by tensor against the trained weights). Each run's memory.json holds every rank's peak per
    phase; the checkpoint and the export stay within 10 % of the training peak (the engine is freed
    before the export), and the plan made before launch is within 1.25× of what was measured."""
    run_dir = tmp_path / "vit-b-32"
    args = [
        *trainer_args(small_data["flickr8k"], run_dir, config="configs/flickr8k.yaml"),
        "model.preset=vit-b-32",
        "deepspeed.zero_stage=3",
        "deepspeed.precision=fp32",
        "train.batch_size=4",
        "data.workers=1",
        "eval.at_start=false",
        "eval.every_epochs=0",
        "checkpoint.keep_last=1",
    ]
    torchrun(2, [*args, "train.max_steps=2"], timeout=900)
    resumed = torchrun(2, [*args, "train.max_steps=3"], timeout=900)
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000002'}" in resumed.stderr
    assert re.search(r"export verified: its \d+ tensors equal the live engine.s", resumed.stderr)
    record = json.loads((run_dir / "memory.json").read_text())
    assert [r["rank"] for r in record["ranks"]] == [0, 1] and record["device"] == "cpu"
    for rank in record["ranks"]:
        peak = {name: p["peak"] for name, p in rank["phases"].items()}
        assert {"build", "initialize", "resume", "forward", "backward", "step", "checkpoint"} <= set(peak)
        training = max(peak[p] for p in ("forward", "backward", "step"))
        assert max(peak["checkpoint"], peak.get("export", 0)) <= 1.1 * training, peak
        assert 1 / 1.25 <= record["plan"]["total"] / max(peak.values()) <= 1.25, (record["plan"], peak)
    assert rank["phases"]["step"]["held"]["optimizer"] > 0.5 * 151e6 * 12 / 2  # fp32 masters + Adam, halved
    assert {"memory/rank0/backward_peak_mb", "memory/rank1/backward_peak_mb"} <= tags(run_dir / "tensorboard")


@pytest.mark.smoke
def test_a_zero3_engine_is_freed_after_teardown_even_with_checkpointed_submodules(tmp_path: Path) -> None:
    """After teardown and the last reference dropped, a ZeRO-3 engine is collected, with every
    partition and optimizer state: here a U-Net under gradient checkpointing, whose recomputed blocks
    DeepSpeed leaves on its module stack (the sd-v1 row's ranks held their whole engines at export)."""
    script = f"""
import gc, weakref
import torch
from core.presets import TinyDiffusionConfig, tiny_unet
from plumbing.config import load_config
from plumbing.dist import DistInfo, destroy_process_group, init_process_group
from trainer.config import TrainConfig
from trainer.engine import BatchSizes, build_engine, teardown

init_process_group(DistInfo.from_env({{}}))
overrides = ["train.objective=denoising", "data.manifest=x", "run.dir={tmp_path}", "deepspeed.zero_stage=3"]
cfg = load_config(TrainConfig, None, [*overrides, "deepspeed.precision=fp32"])
tiny = TinyDiffusionConfig()
unet = tiny_unet(tiny, 32)
unet.enable_gradient_checkpointing()
engine = build_engine(unet, cfg.deepspeed, cfg.optim, BatchSizes(2, 1, 1), 10, "cpu")
side = tiny.latent_size
for _ in range(2):
    noisy = torch.randn(2, tiny.latent_channels, side, side)
    out = engine(noisy, torch.tensor([1, 500]), encoder_hidden_states=torch.randn(2, 8, 32)).sample
    engine.backward(out.pow(2).mean())
    engine.step()
gone = weakref.ref(engine)
del out, unet
teardown(engine)
del engine
gc.collect()
print("freed", gone() is None)
destroy_process_group()
"""
    proc = run([PY, "-c", script], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "freed True" in proc.stdout, "the engine outlived its teardown"


def test_the_census_walks_optimizer_state_keyed_by_parameters_without_formatting_them(monkeypatch) -> None:
    """Optimizer state is keyed by parameters: the walk names its entries without formatting the key
    (milliseconds a tensor, and on a GPU a copy to the host)."""
    from trainer.memory.census import _kind, _tensors

    held = {
        "state": {torch.zeros(3): {"exp_avg": torch.ones(3)}},
        "fp32_groups": [torch.ones(2)],
        0: torch.ones(1),
    }
    monkeypatch.setattr(torch.Tensor, "__format__", lambda *_: pytest.fail("a tensor formatted into a name"))
    found = [(name, _kind(name.lower())) for name, _ in _tensors(held, "", 0, set())]
    assert found == [(".state.exp_avg", "deepspeed"), (".fp32_groups", "optimizer"), (".0", "deepspeed")]
