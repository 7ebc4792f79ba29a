"""Embeddings through a trainer export, exactly as the trainer's evaluation computes them (its eval
preprocessing, its tokenisation, its projection heads), and a cache for banks embedded once."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from plumbing.errors import UserError
from plumbing.files import tmp_name, tree_digest
from trainer.data import Collate, ImageTransform
from trainer.model import CLIPFineTuner, load_processors

log = logging.getLogger("retrieval")


class Embedder:
    def __init__(self, export: str, device: str) -> None:
        folder = Path(export)
        if not folder.is_dir():
            raise UserError(
                f"export={export}: no such folder (expected a trainer export: runs/<name>/export)"
            )
        self.model = CLIPFineTuner.from_pretrained(folder).to(device)
        tokenizer, processor = load_processors(str(folder))
        max_length = self.model.clip.config.text_config.max_position_embeddings
        self.collate = Collate(tokenizer, max_length, False, processor)
        self.transform = ImageTransform.of(processor, None, train=False)
        self.device = device
        info = folder / "export.json"
        self.fingerprint = (
            json.loads(info.read_text())["content_sha256"]
            if info.is_file()
            else tree_digest(folder, "**/*.safetensors")
        )

    @torch.no_grad()
    def images(self, pictures: list[Image.Image]) -> torch.Tensor:
        fixed = random.Random(0)  # eval preprocessing draws nothing; the argument serves train transforms
        batch = self.collate(
            [{"pixel_values": self.transform(p, fixed), "key": str(i)} for i, p in enumerate(pictures)]
        )
        return self.model.encode_image(batch["pixel_values"].to(self.device)).float().cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.collate.tokenize(texts)
        return (
            self.model.encode_text(
                tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
            )
            .float()
            .cpu()
        )


def cached(
    path: Path, compute: Callable[[], tuple[torch.Tensor, list[str]]]
) -> tuple[torch.Tensor, list[str]]:
    """(embeddings, the id of each row) from `path`, else computed and written there atomically.
    The file name carries the model's and the data's content hashes, so a hit is always current."""
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            log.info("embeddings from the cache %s", path)
            return f.get_tensor("embeddings"), json.loads(f.metadata()["ids"])
    table, ids = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(path)
        save_file({"embeddings": table.contiguous()}, str(tmp), metadata={"ids": json.dumps(ids)})
        tmp.replace(path)
        log.info("embeddings cached in %s", path)
    except OSError as err:
        log.warning("cannot cache embeddings in %s (%s): set cache_dir", path, err.strerror)
    return table, ids
