"""The offline default model: a tiny random-init CLIP, its tokenizer and image processor, written as an
ordinary Hugging Face folder so that it loads through the same `from_pretrained` path real weights use.

The tokenizer is a real CLIP byte-level BPE: every byte is a token, and merges turn the words of the
synthetic captions and the CIFAR-10 class names into single tokens (others fall back to bytes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from plumbing.config import require

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


@dataclass
class TinyConfig:
    image_size: int = 32
    """Input resolution of the tiny vision tower (images are resized and centre-cropped to it)."""
    patch_size: int = 4
    """ViT patch size; image_size must be a multiple of it."""
    width: int = 64
    """Hidden size of the vision tower."""
    text_width: int = 32
    """Hidden size of the text tower (the sampler's tiny U-Net uses it as cross-attention size)."""
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


def text_config(cfg: TinyConfig, tokenizer: Any) -> dict[str, Any]:
    """The tiny text tower, as CLIPTextConfig arguments (the sampler's tiny text encoder has its shape)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_width,
        intermediate_size=4 * cfg.text_width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_clip(folder: Path, cfg: TinyConfig) -> None:
    """Write config.json, model.safetensors, the tokenizer and preprocessor_config.json into `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = tiny_tokenizer(cfg.max_length)
    vision = dict(
        hidden_size=cfg.width,
        intermediate_size=4 * cfg.width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    torch.manual_seed(cfg.seed)
    model = CLIPModel(
        CLIPConfig(
            text_config=text_config(cfg, tokenizer), vision_config=vision, projection_dim=cfg.projection_dim
        )
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / MARKER).write_text(json.dumps(asdict(cfg), indent=2) + "\n")


def is_built(folder: Path, cfg: TinyConfig) -> bool:
    marker = folder / MARKER
    return marker.is_file() and json.loads(marker.read_text()) == asdict(cfg)
