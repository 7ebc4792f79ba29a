"""The CLIPFineTuner a CLIP task trains: where it comes from (a preset built once), its heads, what is frozen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.clip import CLIPFineTuner, HeadSpec, load_clip
from core.presets import HUB_SHAPES, build_clip, clip_config, is_built
from plumbing.dist import DistInfo, barrier
from trainer.tasks.clip.config import ModelConfig


def build_finetuner(cfg: ModelConfig, source: str) -> CLIPFineTuner:
    return around(load_clip(source), cfg)


def around(clip: Any, cfg: ModelConfig) -> CLIPFineTuner:
    """The fine-tuner the config makes of a CLIPModel: its heads, gradient checkpointing."""
    if cfg.gradient_checkpointing:
        clip.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    in_dim = clip.config.projection_dim
    return CLIPFineTuner(clip, HeadSpec(cfg.head, in_dim, cfg.head_dim or in_dim, cfg.head_hidden))


def skeleton_model(cfg: ModelConfig) -> CLIPFineTuner | None:
    """The model a run builds, on the meta device (the memory plan's), frozen as the run freezes it;
    its shapes from a preset, a hub model the presets copy, or a local folder's config.json (None: a
    hub id not cached here)."""
    from transformers import CLIPConfig, CLIPModel

    preset = cfg.preset or HUB_SHAPES.get(cfg.name, "")
    if preset:
        config = clip_config(preset, cfg.tiny)
    else:
        try:
            config = CLIPConfig.from_pretrained(cfg.name, local_files_only=True)
        except (OSError, ValueError):
            return None
    with torch.device("meta"):
        model = around(CLIPModel(config), cfg)
    freeze(model, cfg)
    return model


def freeze(model: CLIPFineTuner, cfg: ModelConfig) -> None:
    """Freeze whole towers, or all but their last N layers (the final norm and projection train)."""
    clip = model.clip
    towers = [
        (
            cfg.freeze_vision,
            cfg.vision_trainable_layers,
            clip.vision_model,
            clip.vision_model.post_layernorm,
            clip.visual_projection,
        ),
        (
            cfg.freeze_text,
            cfg.text_trainable_layers,
            clip.text_model,
            clip.text_model.final_layer_norm,
            clip.text_projection,
        ),
    ]
    for frozen, last_n, tower, final_norm, projection in towers:
        if frozen:
            tower.requires_grad_(False)
            projection.requires_grad_(False)
        elif last_n >= 0:
            tower.requires_grad_(False)
            layers = tower.encoder.layers
            for layer in layers[len(layers) - last_n :] if last_n else []:
                layer.requires_grad_(True)
            final_norm.requires_grad_(True)
    clip.logit_scale.requires_grad_(False)  # ours is model.logit_scale


def model_source(cfg: ModelConfig, base_model: Path, info: DistInfo) -> str:
    """Where to `from_pretrained` from: a preset is built once (rank 0) into the run folder."""
    if not cfg.preset:
        return cfg.name
    if info.is_main and not is_built(base_model, cfg.preset, cfg.tiny):
        build_clip(base_model, cfg.preset, cfg.tiny)
    barrier()
    return str(base_model)
