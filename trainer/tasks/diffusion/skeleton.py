"""The diffusion tasks' parts on the meta device, for the memory plan made before a run: what a run
would load (a preset's shapes, a hub model whose shapes a preset copies, or a local folder's
config.json), built without weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.presets import HUB_SHAPES, TinyConfig, diffusion_parts
from trainer.tasks.diffusion.config import DiffusionConfig
from trainer.tasks.diffusion.parts import part_config, sources


def preset_configs(cfg: DiffusionConfig) -> tuple[Any, ...]:
    """(preset, its configs): the tiny text encoder is shaped like the conditioning one."""
    text = part_config((cfg.text_encoder, "text_encoder"), "text encoder") if cfg.text_encoder else {}
    clip = TinyConfig(
        text_width=text.get("hidden_size", 32),
        max_length=text.get("max_position_embeddings", 32),
        heads=text.get("num_attention_heads", 4),
        layers=text.get("num_hidden_layers", 2),
    )
    return cfg.preset, cfg.tiny, clip


def meta_parts(cfg: DiffusionConfig, base_model: Path) -> tuple[Any, Any, Any]:
    """(U-Net, VAE, text encoder) on the meta device; None for a part whose shapes are not known here."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = cfg.preset or HUB_SHAPES.get(cfg.model, "")
    src = sources(cfg, base_model)
    with torch.device("meta"):
        made = diffusion_parts(preset, *preset_configs(cfg)[1:]) if preset else (None, None, None, None)
        unet = _from_config(UNet2DConditionModel, src.unet, "U-Net", made[0], cfg.preset)
        vae = _from_config(AutoencoderKL, src.vae, "VAE", None if cfg.vae else made[1], cfg.preset)
        text_config = part_config((src.text, "text_encoder"), "text encoder")
        text = CLIPTextModel(CLIPTextConfig(**text_config)) if text_config else made[2]
    return unet, vae, text


def _from_config(cls: Any, location: tuple[str, str], what: str, made: Any, preset: str) -> Any:
    """The part a preset makes, or the one a local folder's config.json describes."""
    if preset and made is not None:
        return made
    config = part_config(location, what)
    return cls.from_config(config) if config else made


def vae_side(vae: Any, unet: Any, resolution: int) -> tuple[int, int]:
    """(image side, latent side) a run trains at: diffusion.resolution, or the U-Net's sample size ×
    the VAE's downsampling (trainer/tasks/diffusion/parts.py, `check_parts`)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = resolution or (unet.config.sample_size * factor if unet is not None else vae.config.sample_size)
    return side, side // factor
