"""RetrievalConfig: one typed config for a captioning or search job. Stored beside its outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from plumbing.config import require
from plumbing.watchdog import WatchdogConfig


@dataclass
class RetrievalConfig:
    mode: str = MISSING
    """"caption" (images → top-k captions from the bank) or "search" (queries → top-k images); set by the sub-command."""
    export: str = MISSING
    """A trainer export (CLIPFineTuner.from_pretrained: embeddings through its projection heads)."""
    images: list[str] = field(default_factory=list)
    """Image files, folders or globs (.jpg, .jpeg, .png)."""
    manifest: str = ""
    """Or the images of a data_prep manifest's `split` (their captions then give hit rates)."""
    split: str = "test"
    """Split of `manifest` to take the images from."""
    bank: str = ""
    """Captions to choose from: a .txt (one per line), a .jsonl ({"caption", "id"?}) or a data_prep manifest.json."""
    bank_split: str = "train"
    """Split whose captions make the bank when `bank` is a manifest."""
    queries: list[str] = field(default_factory=list)
    """Search: query files (.txt: one per line; .jsonl: {"query" or "caption", "id"?, "image"?})."""
    top_k: int = 5
    """Captions per image (caption) or images per query (search)."""
    batch_size: int = 64
    """Images or texts embedded per forward pass."""
    limit: int = 0
    """Only the first N images (caption) or queries (search); 0: all."""
    out_dir: str = MISSING
    """Output folder: captions.jsonl or search.jsonl, summary.json, sheets/, config.yaml."""
    cache_dir: str = ""
    """Where embeddings of the bank (or the searched images) are cached; empty: beside the bank / images."""
    show: int = 0
    """Print the first N results (an image with its best caption, or a query with its best image)."""
    contact_sheets: int = 8
    """Contact sheets to draw: one per 16 captioned images, or one per query (0: none)."""
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    """On several ranks: a batch (or a wait for the other ranks) that takes longer ends the job as hung (stacks in the log, exit 124)."""

    def __post_init__(self) -> None:
        require(self.mode in ("caption", "search"), self, "mode", '"caption" or "search"')
        require(self.top_k >= 1, self, "top_k", "an int >= 1")
        require(self.batch_size >= 1, self, "batch_size", "an int >= 1")
        require(self.limit >= 0, self, "limit", "an int >= 0")
        require(self.contact_sheets >= 0, self, "contact_sheets", "an int >= 0")
        require(self.show >= 0, self, "show", "an int >= 0")
        require(
            bool(self.images) != bool(self.manifest),
            self,
            "images",
            "image paths or a manifest (one of the two)",
        )
        if self.mode == "caption":
            require(bool(self.bank), self, "bank", "a caption bank (--bank)")
        else:
            require(bool(self.queries), self, "queries", "query files (--queries)")
