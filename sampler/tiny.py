"""The offline default diffusion model: a tiny random-init U-Net, VAE and scheduler, and a text encoder
shaped like the tiny CLIP's text tower (same tokenizer, same width) so that a trainer export of the
tiny CLIP can be swapped in. Saved as an ordinary diffusers folder, loaded the way real weights are.
Random weights draw noise-like pictures: the point is the plumbing, offline, in seconds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from plumbing.config import require
from trainer.tiny import TinyConfig, text_config, tiny_tokenizer

MARKER = "tiny-preset.json"


@dataclass
class TinyDiffusionConfig:
    latent_size: int = 32
    """Latent side; images are twice as large (the tiny VAE has two blocks)."""
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    """U-Net block widths."""
    seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self) -> None:
        require(
            len(self.unet_channels) == 2 and all(c % 32 == 0 for c in self.unet_channels),
            self,
            "unet_channels",
            "two multiples of 32",
        )


def build_tiny_diffusion(folder: Path, cfg: TinyDiffusionConfig, clip: TinyConfig) -> None:
    """unet/, vae/, scheduler/, text_encoder/, tokenizer/ and model_index.json in `folder`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    tokenizer = tiny_tokenizer(clip.max_length)
    text = CLIPTextModel(CLIPTextConfig(**text_config(clip, tokenizer)))
    unet = UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=clip.text_width,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=2 * cfg.latent_size,
    )
    scheduler = sd_scheduler()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(folder, safe_serialization=True)
    (folder / MARKER).write_text(
        json.dumps({"diffusion": asdict(cfg), "clip": asdict(clip)}, indent=2) + "\n"
    )


def sd_scheduler() -> Any:
    """Stable Diffusion v1's DDIM schedule; steps_offset=1 as SD ships it (and without a FutureWarning)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def is_built(folder: Path, cfg: TinyDiffusionConfig, clip: TinyConfig) -> bool:
    marker = folder / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == {
        "diffusion": asdict(cfg),
        "clip": asdict(clip),
    }
