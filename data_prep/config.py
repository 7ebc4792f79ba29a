"""PrepConfig: everything a data_prep run depends on. Stored in every manifest it writes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from plumbing.config import require

DATASETS = ("cifar10", "flickr8k", "synthetic", "coco", "csv", "folder", "parquet", "index")
RESIZE_MODES = ("keep_ratio", "center_crop", "border", "keep_ratio_largest")  # img2dataset's names


@dataclass
class ShardsConfig:
    shard_size: int = 1000
    """Samples per tar shard (the last shard of a split holds the rest)."""
    workers: int = 1
    """Processes that write shards; the shards are byte-identical whatever this is."""
    overwrite: bool = False
    """Replace an existing output made from another config or other sources."""
    tasks: int = 0
    """Independent tasks that share the work (each writes its shards, then `data_prep merge` writes the manifest); 0: the Slurm array's task count in an array task, else 1."""
    task: int = -1
    """This task's number, 0..tasks-1; -1: the Slurm array task's (SLURM_ARRAY_TASK_ID counted from SLURM_ARRAY_TASK_MIN), else 0."""

    def __post_init__(self) -> None:
        require(self.shard_size >= 1, self, "shard_size", "an int >= 1")
        require(self.workers >= 1, self, "workers", "an int >= 1")
        require(self.tasks >= 0, self, "tasks", "an int >= 1 (or 0: from the Slurm array)")
        require(self.task >= -1, self, "task", "an int >= 0 (or -1: from the Slurm array)")
        require(
            not self.tasks or self.task < self.tasks, self, "task", f"a task number below tasks={self.tasks}"
        )


@dataclass
class ImageConfig:
    size: int = 0
    """Resize every image on write so that the side `resize_mode` names is this many pixels; 0 keeps images as they are."""
    resize_mode: str = "keep_ratio"
    """img2dataset's modes: keep_ratio (short side N), center_crop (short side N, then the centre N×N), border (long side N, padded to N×N with white), keep_ratio_largest (long side N)."""
    resize_only_if_bigger: bool = False
    """Leave images whose side (the one resize_mode sets) is at most N as they are (img2dataset's option)."""
    quality: int = 95
    """JPEG quality of resized images (img2dataset's encode_quality default)."""

    def __post_init__(self) -> None:
        require(self.size >= 0, self, "size", "0 (keep) or a size in pixels")
        require(self.resize_mode in RESIZE_MODES, self, "resize_mode", " or ".join(RESIZE_MODES))
        require(1 <= self.quality <= 100, self, "quality", "a JPEG quality in 1..100")


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
    """Re-encode images with the long side at most this many pixels (image.size=N image.resize_mode=keep_ratio_largest image.resize_only_if_bigger=true); 0 keeps the original JPEG bytes."""
    full_decode: bool = False
    """Decode every image (at 1/8 scale) instead of checking its JPEG structure: ~10x slower, also
    catches scan data corrupted in place (the trainer skips and counts those anyway)."""

    def __post_init__(self) -> None:
        require(self.resize >= 0, self, "resize", "0 (keep) or a size in pixels")


@dataclass
class CocoConfig:
    root: str = ""
    """Folder with COCO's captions release: annotations/captions_<split><year>.json (or annotations_trainval<year>.zip) and the <split><year>/ image folders (or <split><year>.zip)."""
    year: str = ""
    """Which release to read when the folder holds several (2014, 2017); empty: the only one there."""


@dataclass
class CsvConfig:
    source: str = ""
    """A .csv, .tsv or .jsonl file with a row per (image, caption), as open_clip reads them; relative image paths resolve against the file's folder."""
    image_key: str = "filepath"
    """Column with the image path (open_clip's --csv-img-key default)."""
    caption_key: str = "title"
    """Column with the caption (open_clip's --csv-caption-key default)."""
    separator: str = "tab"
    """Field separator of .csv/.tsv files: one character, or tab (written \\t too); a TAB by default, as open_clip's --csv-separator."""
    split_key: str = ""
    """Column naming each row's split (train, dev, test, …); empty: the hash split (75/12.5/12.5 %)."""
    image_root: str = ""
    """Folder that relative image paths resolve against; empty: the table's own folder."""

    def __post_init__(self) -> None:
        require(
            len(self.delimiter) == 1 and self.delimiter not in '"\r\n',
            self,
            "separator",
            "one character, e.g. ',' or a TAB (written tab or \\t)",
        )

    @property
    def delimiter(self) -> str:
        """The separator as a character ("tab" and a typed backslash-t are a TAB)."""
        return {"tab": "\t", "TAB": "\t", "\\t": "\t"}.get(self.separator, self.separator)


@dataclass
class FolderConfig:
    source: str = ""
    """An imagefolder (Hugging Face's layout): images with metadata.jsonl or metadata.csv (file_name + a caption column); train/, validation/, test/ sub-folders are splits."""
    caption_key: str = "text"
    """Metadata column with the caption (a string, or a list of captions)."""


@dataclass
class ParquetConfig:
    source: str = ""
    """Parquet files as Hugging Face datasets writes them: one file, a folder (searched recursively) or a glob ('data/*.parquet'); splits from the file names (train-00000-of-00004.parquet), else the hash split."""
    image_key: str = "image"
    """Column with the image: datasets' Image feature (a struct of bytes and path), image bytes, or a path relative to the Parquet file."""
    caption_key: str = ""
    """Column with the caption (a string, or a list of captions); empty: the first of text, caption, captions, sentences."""


@dataclass
class IndexConfig:
    shards: list[str] = field(default_factory=list)
    """Existing WebDataset shards (img2dataset's layout): brace patterns as webdataset takes them ('data/{00000..00099}.tar'), globs, files or folders, http(s):// URLs, webdataset's pipe: commands, or s3://, gs:// (fsspec, with the s3 or gcs extra); credentials only as ${VARIABLE}s or in ~/.netrc; one entry per split."""
    split: list[str] = field(default_factory=lambda: ["train"])
    """The split each `shards` entry is (one name for all of them, or one per entry)."""


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
    flickr_object: float = 0.25
    """Half-width of each picture's object, as a fraction of the picture's short side (±10 % jitter): at 0.25 the shapes still differ by their corners where the demo's models see them (64 px for CLIP, 32 for the U-Net)."""

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
    """What to prepare: cifar10, flickr8k, coco, csv, folder, parquet, index or synthetic (set by the sub-command)."""
    out: str = MISSING
    """Output folder: <split>/ shards, <split>/sizes.json and manifest.json (index: no shards; synthetic: the archives)."""
    seed: int = 0
    """Seed for the synthetic data and for choosing one CIFAR prompt template per image."""
    progress: bool = True
    """Show a progress bar."""
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    cifar10: Cifar10Config = field(default_factory=Cifar10Config)
    flickr8k: Flickr8kConfig = field(default_factory=Flickr8kConfig)
    coco: CocoConfig = field(default_factory=CocoConfig)
    csv: CsvConfig = field(default_factory=CsvConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)
    parquet: ParquetConfig = field(default_factory=ParquetConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        require(self.dataset in DATASETS, self, "dataset", " or ".join(DATASETS))
        required = {
            "cifar10": ("cifar10.source", "--source"),
            "flickr8k": ("flickr8k.images", "--images"),
            "coco": ("coco.root", "--root"),
            "csv": ("csv.source", "--source"),
            "folder": ("folder.source", "--source"),
            "parquet": ("parquet.source", "--source"),
        }
        if self.dataset in required:
            key, flag = required[self.dataset]
            section, name = key.split(".")
            require(bool(getattr(getattr(self, section), name)), self, key, f"a path ({flag})")
        if self.dataset == "flickr8k":
            require(bool(self.flickr8k.captions), self, "flickr8k.captions", "a path (--captions)")
            require(
                not (self.flickr8k.resize and self.image.size),
                self,
                "flickr8k.resize",
                "0 when image.size is set (use one of --resize and --image-size)",
            )
        if self.dataset == "index":
            i = self.index
            require(bool(i.shards), self, "index.shards", "at least one pattern (--shards)")
            require(len(i.split) in (1, len(i.shards)), self, "index.split", "one split, or one per --shards")
            require(not self.image.size, self, "image.size", "0: indexed shards are never rewritten")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)
