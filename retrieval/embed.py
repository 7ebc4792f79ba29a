"""A cache for embeddings computed once (a caption bank, the searched images); the embeddings
themselves come from core.clip.Embedder, exactly as the trainer's evaluation computes them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plumbing.files import tmp_name

log = logging.getLogger("retrieval")


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
