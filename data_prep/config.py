"""PrepConfig: everything a data_prep run depends on. Stored in every manifest it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from plumbing.config import require

DATASETS = ("cifar10", "flickr8k", "synthetic")


@dataclass
class ShardsConfig:
    shard_size: int = 1000
    """Samples per tar shard (the last shard of a split holds the rest)."""
    workers: int = 1
    """Processes that write shards; the shards are byte-identical whatever this is."""
    overwrite: bool = False
    """Replace an existing output made from another config or other sources."""

    def __post_init__(self) -> None:
        require(self.shard_size >= 1, self, "shard_size", "an int >= 1")
        require(self.workers >= 1, self, "workers", "an int >= 1")


@dataclass
class Cifar10Config:
    source: str = ""
    """`cifar-10-python.tar.gz` or the extracted `cifar-10-batches-py/` folder."""
    verify: bool = True
    """Check the archive's and batches' MD5s against the official values."""
    templates: list[str] = field(default_factory=lambda: ["An image of a {label}."])
    """Prompt templates for the `txt` member; `{label}` is the class name. One is chosen per image."""

    def __post_init__(self) -> None:
        require(len(self.templates) > 0, self, "templates", "at least one template")
        for template in self.templates:
            require("{label}" in template, self, "templates", "templates that each contain {label}")
            try:
                template.format(label="x")
            except (KeyError, IndexError, ValueError):
                require(False, self, "templates", "templates whose only field is {label}")


@dataclass
class Flickr8kConfig:
    images: str = ""
    """`Flickr8k_Dataset.zip`, the `Flicker8k_Dataset/` folder, or Kaggle's `Images/` folder."""
    captions: str = ""
    """`Flickr8k_text.zip`, its folder, `Flickr8k.token.txt`, or Kaggle's `captions.txt`."""
    splits: str = ""
    """Folder or zip with `Flickr_8k.{train,dev,test}Images.txt`; empty: look beside the captions (else the hash split)."""
    resize: int = 0
    """Re-encode images with the long side at most this many pixels; 0 keeps the original JPEG bytes."""
    full_decode: bool = False
    """Decode every image (at 1/8 scale) instead of checking its JPEG structure: ~10x slower, also
    catches scan data corrupted in place (the trainer skips and counts those anyway)."""

    def __post_init__(self) -> None:
        require(self.resize >= 0, self, "resize", "0 (keep) or a size in pixels")


@dataclass
class SyntheticConfig:
    cifar_per_batch: int = 1000
    """Images in each of the five CIFAR-format training batches."""
    cifar_test: int = 1000
    """Images in the CIFAR-format test batch."""
    flickr_train: int = 3000
    """Flickr8k-format training images."""
    flickr_dev: int = 500
    """Flickr8k-format dev images."""
    flickr_test: int = 500
    """Flickr8k-format test images."""
    flickr_width: int = 160
    """Width of the Flickr8k-format JPEGs."""
    flickr_height: int = 120
    """Height of the Flickr8k-format JPEGs."""
    flickr_object: float = 0.16
    """Radius of each picture's object, as a fraction of the picture's short side (±15 % jitter)."""

    def __post_init__(self) -> None:
        for name in ("cifar_per_batch", "cifar_test", "flickr_train", "flickr_dev", "flickr_test"):
            require(getattr(self, name) >= 1, self, name, "an int >= 1")
        require(
            self.flickr_width >= 32 and self.flickr_height >= 32,
            self,
            "flickr_width",
            "images of at least 32×32",
        )
        require(0.05 <= self.flickr_object <= 0.3, self, "flickr_object", "a fraction in [0.05, 0.3]")


@dataclass
class PrepConfig:
    dataset: str = MISSING
    """What to prepare: cifar10, flickr8k or synthetic (set by the sub-command)."""
    out: str = MISSING
    """Output folder: <split>/ shards, <split>/sizes.json and manifest.json (synthetic: the archives)."""
    seed: int = 0
    """Seed for the synthetic data and for choosing one CIFAR prompt template per image."""
    progress: bool = True
    """Show a progress bar."""
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    cifar10: Cifar10Config = field(default_factory=Cifar10Config)
    flickr8k: Flickr8kConfig = field(default_factory=Flickr8kConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        require(self.dataset in DATASETS, self, "dataset", " or ".join(DATASETS))
        if self.dataset == "cifar10":
            require(bool(self.cifar10.source), self, "cifar10.source", "a path (--source)")
        if self.dataset == "flickr8k":
            require(bool(self.flickr8k.images), self, "flickr8k.images", "a path (--images)")
            require(bool(self.flickr8k.captions), self, "flickr8k.captions", "a path (--captions)")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)
