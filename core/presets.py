"""The models a run can build instead of downloading: the offline default (a tiny CLIP, a tiny
VAE and U-Net) and random-init real shapes (CLIP ViT-B/32 and ViT-L/14, Stable Diffusion v1) for
measuring on a GPU without network. Each is written as an ordinary Hugging Face / diffusers folder,
so that it loads through the same `from_pretrained` path real weights use.

The tokenizer is a real CLIP byte-level BPE: every byte is a token, and merges turn the words of the
synthetic captions and the CIFAR-10 class names into single tokens (others fall back to bytes).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from plumbing.config import require
from plumbing.errors import UserError

# OpenAI CLIP's normalisation (the values CLIPImageProcessor ships with for openai/clip-*).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
MARKER = "tiny-preset.json"

WORDS = """
a an the of on in at to with and is are there picture image photo background backdrop scene sits placed
coloured colored left right top bottom middle centre center red green blue yellow purple orange white black
grey gray brown pink circle square triangle cross shape airplane automobile bird cat deer dog frog horse ship
truck small large big little man woman boy girl child people dog water grass street running playing
""".split()


# --------------------------------------------------------------------------- CLIP


@dataclass
class TinyConfig:
    image_size: int = 32
    """Input resolution of the tiny vision tower (images are resized and centre-cropped to it)."""
    patch_size: int = 4
    """ViT patch size; image_size must be a multiple of it."""
    width: int = 64
    """Hidden size of the vision tower."""
    text_width: int = 32
    """Hidden size of the text tower (a diffusion U-Net conditioned on it cross-attends to this size)."""
    layers: int = 2
    """Transformer layers in each tower."""
    heads: int = 4
    """Attention heads in each tower."""
    projection_dim: int = 64
    """CLIP's shared embedding size (the heads' input)."""
    max_length: int = 32
    """Longest tokenised caption (position embeddings of the text tower)."""
    seed: int = 0
    """Seed of the random initialisation (the same on every rank and every rerun)."""

    def __post_init__(self) -> None:
        require(self.image_size % self.patch_size == 0, self, "image_size", "a multiple of patch_size")
        require(
            self.width % self.heads == 0 and self.text_width % self.heads == 0,
            self,
            "heads",
            "a divisor of width and text_width",
        )

    def vision(self) -> dict[str, Any]:
        w = self.width
        return dict(
            hidden_size=w,
            intermediate_size=4 * w,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )

    def text(self) -> dict[str, Any]:
        w = self.text_width
        return dict(
            hidden_size=w,
            intermediate_size=4 * w,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=self.max_length,
        )


# OpenAI's released shapes (the config.json of openai/clip-vit-base-patch32 and -large-patch14).
CLIP_SHAPES: dict[str, dict[str, Any]] = {
    "vit-b-32": dict(
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
        ),
        text=dict(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            max_position_embeddings=77,
        ),
        projection_dim=512,
    ),
    "vit-l-14": dict(
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        ),
        text=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        ),
        projection_dim=768,
    ),
}
CLIP_PRESETS = ("tiny", *CLIP_SHAPES)


def clip_shape(preset: str, tiny: TinyConfig) -> dict[str, Any]:
    if preset == "tiny":
        return dict(vision=tiny.vision(), text=tiny.text(), projection_dim=tiny.projection_dim)
    return CLIP_SHAPES[preset]


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 / CLIP convention)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges: bytes, bytes at word end, one merge chain per known word, specials last."""
    symbols = _byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(WORDS):
        parts = [*word[:-1], word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            if (merged, part) not in merges:
                merges.append((merged, part))
            merged += part
            if merged not in vocab:
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def tiny_tokenizer(max_length: int) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def text_config(text: dict[str, Any], tokenizer: Any, vocab_size: int = 0) -> Any:
    """A CLIPTextConfig of the given shape that fits `tokenizer` (its special tokens, at least its size)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **text,
        vocab_size=max(vocab_size, len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def clip_config(preset: str, tiny: TinyConfig, tokenizer: Any = None) -> Any:
    """The CLIPConfig of `preset` (real shapes get CLIP's 49,408-token vocabulary size, so the
    embedding costs what it really does)."""
    from transformers import CLIPConfig

    shape = clip_shape(preset, tiny)
    tokenizer = tokenizer or tiny_tokenizer(shape["text"]["max_position_embeddings"])
    text = text_config(shape["text"], tokenizer, 0 if preset == "tiny" else 49408)
    return CLIPConfig(
        text_config=text.to_dict(), vision_config=shape["vision"], projection_dim=shape["projection_dim"]
    )


def build_clip(folder: Path, preset: str, tiny: TinyConfig) -> None:
    """A random-init CLIPModel of `preset`'s shape with its tokenizer and image processor in `folder`."""
    from transformers import CLIPImageProcessor, CLIPModel

    shape = clip_shape(preset, tiny)
    tokenizer = tiny_tokenizer(shape["text"]["max_position_embeddings"])
    torch.manual_seed(tiny.seed)
    model = CLIPModel(clip_config(preset, tiny, tokenizer))
    side = shape["vision"]["image_size"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    _publish(folder, lambda staging: _save_all(staging, model, tokenizer, processor), _marker(preset, tiny))


def _save_all(folder: Path, *parts: Any) -> None:
    for part in parts:
        part.save_pretrained(folder)


def _marker(preset: str, *cfgs: Any) -> dict[str, Any]:
    """What a built folder records: the preset, and for the tiny ones the configs that shaped it."""
    return {"preset": preset, "config": [asdict(c) for c in cfgs] if preset == "tiny" else []}


def _publish(folder: Path, write: Callable[[Path], None], marker: dict[str, Any]) -> None:
    """Write into a staging sibling, add the marker, rename into place: a folder is whole or absent.
    A folder that a preset did not build (no marker) is never replaced: it may be someone's model."""
    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise UserError(
            f"{folder} exists and was not built by a preset (no {MARKER}): refusing to replace it; "
            "to use it as it is, leave preset empty"
        )
    staging = folder.with_name(f".{folder.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def is_built(folder: Path, preset: str, *cfgs: Any) -> bool:
    """`folder` holds what `preset` (with `cfgs`, for the tiny ones) builds."""
    marker = folder / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == _marker(preset, *cfgs)


# --------------------------------------------------------------------------- diffusion


@dataclass
class TinyDiffusionConfig:
    image_size: int = 32
    """Image side of the tiny model; its latents are image_size / 2^(len(vae_channels) - 1) on a side."""
    vae_channels: list[int] = field(default_factory=lambda: [32, 32, 32])
    """VAE block widths; every block after the first halves the side (three: 8×8 latents at 32 px)."""
    vae_norm_groups: int = 16
    """GroupNorm groups of the VAE (a divisor of its widths)."""
    latent_channels: int = 4
    """Channels of the VAE's latents (the U-Net's input and output)."""
    unet_channels: list[int] = field(default_factory=lambda: [32, 64])
    """U-Net block widths, one per resolution level."""
    cross_attention: list[bool] = field(default_factory=lambda: [True, True])
    """Which U-Net levels cross-attend to the text (at the highest resolution, words can map onto places)."""
    layers_per_block: int = 1
    """ResNet layers in each U-Net block."""
    attention_head_dim: int = 8
    """Attention heads of each U-Net block that attends: diffusers' `attention_head_dim`, which
    UNet2DConditionModel reads as the number of heads (8: heads of 4 channels at width 32, 8 at 64)."""
    seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self) -> None:
        require(
            len(self.unet_channels) == len(self.cross_attention),
            self,
            "cross_attention",
            "one flag per unet_channels entry",
        )
        require(
            all(c % 8 == 0 for c in [*self.unet_channels, *self.vae_channels]),
            self,
            "unet_channels",
            "multiples of 8",
        )
        require(
            all(c % self.vae_norm_groups == 0 for c in self.vae_channels),
            self,
            "vae_norm_groups",
            "a divisor of every vae_channels entry",
        )
        require(
            self.image_size % self.factor == 0,
            self,
            "image_size",
            f"a multiple of the VAE's downsampling ({self.factor})",
        )

    @property
    def factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.factor


def _groups(channels: list[int]) -> int:
    """GroupNorm groups that divide every width (diffusers' 32 where it can)."""
    return math.gcd(32, *channels)


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


def tiny_unet(cfg: TinyDiffusionConfig, cross_attention_dim: int) -> Any:
    from diffusers import UNet2DConditionModel

    attend = cfg.cross_attention
    return UNet2DConditionModel(
        sample_size=cfg.latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)),
        cross_attention_dim=cross_attention_dim,
        # read as the number of heads (diffusers' unet_2d_condition.py, after huggingface/diffusers#2011)
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=_groups(cfg.unet_channels),
    )


def tiny_vae(cfg: TinyDiffusionConfig) -> Any:
    """The tiny AutoencoderKL; no attention in its mid block (at 8×8 it buys nothing), and its posterior's
    log-variance starting at -6: training begins as a near-deterministic autoencoder and learns the
    pictures before the KL term widens it (tuned on the synthetic set: colours reconstruct sooner)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size,
        mid_block_add_attention=False,
    )
    with torch.no_grad():
        vae.quant_conv.bias[cfg.latent_channels :] = -6.0  # the log-variance half of the moments
    return vae


def sd_v1_unet() -> Any:
    """Stable Diffusion v1's U-Net shape: diffusers' defaults are SD v1's, at 64×64 latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def sd_v1_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )


DIFFUSION_PRESETS = ("tiny", "sd-v1")


def diffusion_parts(preset: str, cfg: TinyDiffusionConfig, clip: TinyConfig) -> tuple[Any, Any, Any, Any]:
    """(U-Net, VAE, text encoder, tokenizer) of a preset, random weights (made under
    `torch.device("meta")` they take no memory: the trainer's memory plan counts them so)."""
    from transformers import CLIPTextModel

    if preset == "tiny":
        text_shape = clip.text()
        unet, vae = tiny_unet(cfg, clip.text_width), tiny_vae(cfg)
    else:
        text_shape = CLIP_SHAPES["vit-l-14"]["text"]
        unet, vae = sd_v1_unet(), sd_v1_vae()
    tokenizer = tiny_tokenizer(text_shape["max_position_embeddings"])
    text = CLIPTextModel(text_config(text_shape, tokenizer, 0 if preset == "tiny" else 49408))
    return unet, vae, text, tokenizer


def build_diffusion(folder: Path, preset: str, cfg: TinyDiffusionConfig, clip: TinyConfig) -> None:
    """unet/, vae/, scheduler/, text_encoder/, tokenizer/ and model_index.json in `folder`: random
    weights of the tiny shapes (the text encoder shaped like the tiny CLIP's text tower, so a trainer
    export of it swaps in) or of Stable Diffusion v1 (U-Net, VAE, ViT-L/14's text tower)."""
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(cfg.seed)
    unet, vae, text, tokenizer = diffusion_parts(preset, cfg, clip)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    save = lambda staging: pipe.save_pretrained(staging, safe_serialization=True)  # noqa: E731
    _publish(folder, save, _marker(preset, cfg, clip))


# Hub models whose shapes are a preset's (the presets copy their config.json): the memory plan
# counts them offline, before anything is downloaded.
HUB_SHAPES = {
    "openai/clip-vit-base-patch32": "vit-b-32",
    "openai/clip-vit-large-patch14": "vit-l-14",
    "CompVis/stable-diffusion-v1-4": "sd-v1",
    "runwayml/stable-diffusion-v1-5": "sd-v1",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd-v1",
}
