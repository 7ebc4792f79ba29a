"""Text-to-image training in the harness, launched as users launch it (torchrun, 2 ranks on CPU): the
tiny VAE, then the U-Net under ZeRO-2 and ZeRO-3 with exact mid-epoch resume, and the export that
diffusers and the sampler both load; bad input refused in one line before anything heavy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import PY, ROOT, run, scalars, torchrun, trainer_args

pytestmark = pytest.mark.system


def diffusion_args(config: str, manifest: Path, run_dir: Path, *overrides: str) -> list[str]:
    return trainer_args(
        manifest, run_dir, "eval.batch_size=16", "optim.warmup_steps=2", *overrides, config=config
    )


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer-export-shaped tiny CLIP (text width 32): what conditions the U-Net."""
    from core.clip import CLIPFineTuner, load_clip, load_processors
    from core.presets import TinyConfig, build_clip

    root = tmp_path_factory.mktemp("clip")
    build_clip(root / "base", "tiny", TinyConfig(image_size=64, patch_size=8))
    CLIPFineTuner.around(load_clip(str(root / "base"))).save_pretrained(
        root / "export", *load_processors(str(root / "base"))
    )
    return root / "export"


@pytest.fixture(scope="module")
def trained(
    small_data: dict[str, Path], clip_export: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The tiny VAE (1 epoch), then the U-Net in its latent space under ZeRO-2 and ZeRO-3 (EMA on)."""
    root = tmp_path_factory.mktemp("diffusion")
    manifest = small_data["flickr8k"]
    # 16 steps of the 128 samples, whatever batch the demo's recipe takes
    vae_args = ("train.epochs=1", "train.batch_size=4")
    torchrun(2, diffusion_args("configs/demo-vae.yaml", manifest, root / "vae", *vae_args))
    runs = {"vae": root / "vae"}
    for stage in (2, 3):
        extra = [
            f"deepspeed.zero_stage={stage}",
            "deepspeed.stage3_param_persistence_threshold=1000",  # biases and norms whole, weights split
            "diffusion.cache_latents=false",
            f"diffusion.vae={root / 'vae' / 'export'}",
            f"diffusion.text_encoder={clip_export}",
            f"diffusion.eval_clip={clip_export}",
            "diffusion.eval_steps=3",
            "diffusion.ema_decay=0.9",
            "diffusion.eval_batches=1",
        ]
        torchrun(2, diffusion_args("configs/demo-diffusion.yaml", manifest, root / f"zero{stage}", *extra))
        runs[stage] = root / f"zero{stage}"
    return runs


def test_the_vae_learns_and_exports_a_scaled_vae(trained: dict[str, Path]) -> None:
    from diffusers import AutoencoderKL

    evals = [json.loads(line) for line in (trained["vae"] / "eval.jsonl").read_text().splitlines()]
    assert evals[-1]["reconstruction_mse"] < evals[0]["reconstruction_mse"]
    vae = AutoencoderKL.from_pretrained(trained["vae"] / "export", subfolder="vae")
    assert vae.config.scaling_factor != 0.18215  # measured on the data, not the SD default


def test_zero3_follows_the_zero2_loss_curve_and_both_learn(trained: dict[str, Path]) -> None:
    z2, z3 = (scalars(trained[s] / "tensorboard", "train/loss") for s in (2, 3))
    assert z2.keys() == z3.keys() and len(z2) == 8
    assert max(abs(z2[s] - z3[s]) for s in z2) < 1e-3
    assert sum(list(z2.values())[-2:]) < sum(list(z2.values())[:2])
    evals = [json.loads(line) for line in (trained[2] / "eval.jsonl").read_text().splitlines()]
    assert {"val_loss", "val_loss_t500", "clip_score", "r_precision"} <= set(evals[-1])
    # evaluation runs the EMA weights under both stages alike (ZeRO-3's whole small parameters included)
    last3 = json.loads((trained[3] / "eval.jsonl").read_text().splitlines()[-1])
    assert abs(evals[-1]["val_loss"] - last3["val_loss"]) < 1e-3


def test_resume_mid_epoch_gives_exactly_the_uninterrupted_losses(
    small_data: dict[str, Path], clip_export: Path, trained: dict[str, Path], tmp_path: Path
) -> None:
    reference = scalars(trained[2] / "tensorboard", "train/loss")
    extra = [
        f"diffusion.vae={trained['vae'] / 'export'}",
        f"diffusion.text_encoder={clip_export}",
        "diffusion.ema_decay=0.9",
        "diffusion.eval_batches=1",
        "diffusion.eval_steps=3",
        f"diffusion.eval_clip={clip_export}",
    ]
    run_dir = tmp_path / "stopped"
    # the cached posteriors of diffusion.cache_latents give the same draws: the reference ran without
    args = diffusion_args(
        "configs/demo-diffusion.yaml",
        small_data["flickr8k"],
        run_dir,
        *extra,
        "deepspeed.zero_stage=2",
        "diffusion.cache_latents=true",
    )
    torchrun(2, [*args, "train.max_steps=3"])  # step 3 of 4: inside epoch 1, 2 loader workers
    resumed = torchrun(2, args)
    assert f"resumed from {run_dir / 'checkpoints' / 'step-00000003'}" in resumed.stderr
    loss = scalars(run_dir / "tensorboard", "train/loss")
    assert loss.keys() == reference.keys()
    assert max(abs(loss[s] - reference[s]) for s in reference) < 1e-6
    # the EMA continued across the resume too: the exports are the same weights
    from safetensors.torch import load_file

    a = load_file(str(run_dir / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(trained[2] / "export" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_the_export_is_a_diffusers_folder_the_sampler_and_diffusers_draw_alike(
    trained: dict[str, Path], clip_export: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from sampler.pipeline import LatentDiffusion, Request, load_components

    export = trained[3] / "export"
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (export / part).exists(), part
    # the text encoder inside is exactly the one the U-Net was trained with (frozen: the CLIP export's)
    ours = load_file(str(export / "text_encoder" / "model.safetensors"))
    theirs = load_file(str(clip_export / "text_encoder" / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    prompts = ["A red circle on the left on a black background .", "A blue square at the top ."]
    pipe = StableDiffusionPipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompts,
        generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
        num_inference_steps=4,
        guidance_scale=4.0,
        output_type="np",
    ).images
    sampler = LatentDiffusion(
        load_components(str(export), None, "ddim", "cpu", torch.float32), "cpu", torch.float32
    )
    side = sampler.default_size
    got = sampler(Request(prompts, ["", ""], [1, 2], 4, 4.0, side, side)).images
    import numpy as np

    assert np.abs(np.stack([np.asarray(im, np.float32) for im in got]) - reference * 255).max() <= 1.0
    out = tmp_path / "samples"
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    run(
        [
            PY,
            "-m",
            "sampler",
            "--config",
            str(ROOT / "configs/sample.yaml"),
            f"model={export}",
            "preset=''",
            f"prompts=[{prompt_file}]",
            f"out_dir={out}",
            "steps=4",
            f"clip_score={clip_export}",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["done"] == 2 and 0 <= summary["r_precision"] <= 1


@pytest.fixture(scope="module")
def mismatched(clip_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from core.clip import CLIPFineTuner, load_clip, load_processors
    from core.presets import TinyConfig, TinyDiffusionConfig, build_clip, build_diffusion

    root = tmp_path_factory.mktemp("mismatched")
    build_diffusion(root / "model", "tiny", TinyDiffusionConfig(), TinyConfig())  # cross-attends to 32
    build_diffusion(root / "vae8", "tiny", TinyDiffusionConfig(latent_channels=8), TinyConfig())
    build_clip(root / "wide-base", "tiny", TinyConfig(text_width=48))
    CLIPFineTuner.around(load_clip(str(root / "wide-base"))).save_pretrained(
        root / "wide", *load_processors(str(root / "wide-base"))
    )
    shutil.copytree(clip_export, root / "no-tokenizer")
    shutil.rmtree(root / "no-tokenizer" / "tokenizer")
    return root


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (
            ["diffusion.text_encoder={root}/wide"],
            ["wide/text_encoder has hidden size 48", "cross-attends to 32"],
        ),
        (["diffusion.vae={root}/vae8"], ["vae8/vae has 8 latent channels", "takes 4"]),
        (["diffusion.resolution=33"], ["diffusion.resolution=33", "downsamples by 4"]),
        (["diffusion.text_encoder={root}/no-tokenizer"], ["no-tokenizer: no tokenizer/"]),
    ],
)
def test_parts_that_do_not_fit_are_one_line_before_anything_heavy(
    small_data: dict[str, Path], mismatched: Path, tmp_path: Path, overrides: list[str], needles: list[str]
) -> None:
    args = [
        PY,
        "-m",
        "trainer",
        "--config",
        str(ROOT / "configs/demo-diffusion.yaml"),
        "--check",
        f"data.manifest={small_data['flickr8k']}",
        f"run.dir={tmp_path / 'run'}",
        "diffusion.preset=''",
        f"diffusion.model={mismatched / 'model'}",
        "diffusion.vae=''",
        "diffusion.text_encoder=''",
        *[o.format(root=mismatched) for o in overrides],
    ]
    proc = run(args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert all(n in lines[0] for n in needles), lines[0]


def test_shards_without_captions_are_one_line(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from core.manifest import FORMAT_VERSION
    from plumbing.files import sha256_file
    from plumbing.tars import write_tar

    (tmp_path / "train").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="JPEG")
    shard = tmp_path / "train" / "x-000000.tar"
    write_tar(str(shard), [(f"{i:04d}.jpg", buffer.getvalue()) for i in range(64)])
    record = {
        "name": shard.name,
        "num_samples": 64,
        "bytes": shard.stat().st_size,
        "sha256": sha256_file(shard),
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": "images",
        "fingerprint": "x",
        "splits": {s: {"shards": [record]} for s in ("train", "test")},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "test").symlink_to(tmp_path / "train")
    proc = run(
        [
            PY,
            "-m",
            "trainer",
            "--config",
            str(ROOT / "configs/demo-diffusion.yaml"),
            "--check",
            f"data.manifest={tmp_path}",
            f"run.dir={tmp_path / 'run'}",
            "diffusion.text_encoder=''",
            "diffusion.vae=''",
        ],
        check=False,
    )
    assert proc.returncode == 2 and "split 'train' has no captions" in proc.stderr.strip().splitlines()[-1]
