"""Where each diffusion part comes from (a model folder or hub id, a preset, a VAE or text-encoder
override), the shape checks made before anything heavy, and loading with one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.presets import TinyDiffusionConfig
from plumbing.errors import UserError
from trainer.tasks.diffusion.config import DiffusionConfig


@dataclass(frozen=True)
class Sources:
    """Where each part comes from: (folder, subfolder) pairs for from_pretrained."""

    unet: tuple[str, str]
    vae: tuple[str, str]
    text: str  # a folder or hub id with text_encoder/ and tokenizer/
    scheduler: tuple[str, str]


def where(location: tuple[str, str]) -> Path:
    """The folder a (folder or hub id, subfolder) pair names, for messages and config files."""
    return Path(location[0]) / location[1]


def vae_location(path: str) -> tuple[str, str]:
    """A VAE folder, or a folder with vae/ (a `train.objective=vae` export, a diffusers model)."""
    return (path, "vae") if (Path(path) / "vae").is_dir() else (path, "")


def sources(cfg: DiffusionConfig, base_model: Path) -> Sources:
    root = str(base_model) if cfg.preset else cfg.model
    if not root and not cfg.preset:
        raise UserError(
            "diffusion.model: a diffusers model (hub id or folder) is required, or diffusion.preset"
        )
    vae = vae_location(cfg.vae) if cfg.vae else (root, "vae")
    return Sources((root, "unet"), vae, cfg.text_encoder or root, (root, "scheduler"))


def part_config(location: tuple[str, str], what: str) -> dict[str, Any]:
    """A part's config.json when it is a local folder (hub ids are checked when loaded)."""
    folder = where(location)
    file = folder / ("scheduler_config.json" if what == "scheduler" else "config.json")
    if not Path(location[0]).exists():
        return {}
    if not file.is_file():
        raise UserError(f"{folder}: no {file.name} (expected the {what} of a diffusers model)")
    return json.loads(file.read_text())


def check_parts(cfg: DiffusionConfig, src: Sources, objective: str) -> dict[str, Any]:
    """The shapes must fit before anything heavy starts: text width = the U-Net's cross-attention,
    VAE latent channels = the U-Net's input, the image side a multiple of the VAE's downsampling."""
    vae = part_config(src.vae, "VAE") or (_tiny_vae_shape(cfg.tiny) if cfg.preset == "tiny" else {})
    factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    unet = {} if objective == "vae" else part_config(src.unet, "U-Net")
    side = cfg.resolution or (
        unet.get("sample_size", cfg.tiny.latent_size) * factor if objective != "vae" else 0
    )
    side = side or vae.get("sample_size", 0)
    if side % factor:
        raise UserError(
            f"diffusion.resolution={side}: the VAE {where(src.vae)} downsamples by {factor}; use a multiple of {factor}"
        )
    if objective == "vae":
        return {"side": side, "factor": factor}
    if cfg.text_encoder:
        for part in ("text_encoder", "tokenizer"):
            if not (Path(cfg.text_encoder) / part).is_dir():
                raise UserError(
                    f"diffusion.text_encoder={cfg.text_encoder}: no {part}/ (expected a trainer CLIP export)"
                )
    text = part_config((src.text, "text_encoder"), "text encoder")
    hidden, channels = text.get("hidden_size"), vae.get("latent_channels")
    cross, inputs = unet.get("cross_attention_dim", hidden), unet.get("in_channels", channels)
    if hidden and cross and hidden != cross:
        raise UserError(
            f"text encoder {Path(src.text) / 'text_encoder'} has hidden size {hidden}, but the U-Net of "
            f"{src.unet[0]} cross-attends to {cross}: Stable Diffusion v1.x conditions on "
            "openai/clip-vit-large-patch14 (768), SD 2.x on OpenCLIP ViT-H/14 (1024)"
        )
    if channels and inputs and channels != inputs:
        raise UserError(
            f"the VAE {where(src.vae)} has {channels} latent channels, but the U-Net of {src.unet[0]} takes {inputs}"
        )
    return {"side": side, "factor": factor}


def load(cls: Any, location: tuple[str, str], what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` of a part, or one line naming where it was looked for."""
    root, sub = location
    try:
        return cls.from_pretrained(root, subfolder=sub or None, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the {what} from {where(location)} ({first})") from None


def _tiny_vae_shape(tiny: TinyDiffusionConfig) -> dict[str, Any]:
    return {
        "block_out_channels": tiny.vae_channels,
        "latent_channels": tiny.latent_channels,
        "sample_size": tiny.image_size,
    }
