"""SampleConfig: one typed config for a bulk sampling job. Stored beside its outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from core.presets import DIFFUSION_PRESETS, TinyConfig, TinyDiffusionConfig
from plumbing.config import require
from plumbing.watchdog import WatchdogConfig
from sampler.pipeline import SCHEDULERS


@dataclass
class SampleConfig:
    model: str = MISSING
    """Diffusers model folder or hub id (e.g. CompVis/stable-diffusion-v1-4): unet/, vae/, scheduler/, text_encoder/, tokenizer/."""
    preset: str = ""
    """Build random-init components into `model` (if missing) and load them from there: "tiny" (offline default) or "sd-v1" (Stable Diffusion v1's shapes, for measuring)."""
    tiny: TinyDiffusionConfig = field(default_factory=TinyDiffusionConfig)
    tiny_clip: TinyConfig = field(default_factory=TinyConfig)
    """The tiny text encoder's shape: keep it equal to the trainer's model.tiny so its export fits."""
    text_encoder: str = ""
    """A trainer export (its text_encoder/ and tokenizer/) to condition on instead of the model's own."""
    prompts: list[str] = MISSING
    """Prompt files or globs: .txt (a prompt per line), .jsonl (objects with "prompt" and options), .csv/.tsv (a header row; PartiPrompts, DrawBench), COCO captions .json, or a data_prep split (data/flickr8k/manifest.json:test)."""
    prompt_column: str = ""
    """The prompt column of .csv/.tsv files; empty: the first named prompt, prompts, text or caption (any case). Other columns are kept as metadata."""
    captions: str = "first"
    """COCO captions and data_prep splits: "first" (an item per image, its first caption) or "all" (an item per caption)."""
    group_by: str = ""
    """A metadata column (e.g. PartiPrompts' Category) to break the summary down by: images, mean CLIP score and R-precision per value."""
    out_dir: str = MISSING
    """Output folder: images/, manifest.jsonl, contact_sheet.png, tensorboard/, config.yaml."""
    batch_size: int = 4
    """Images per forward pass (items with equal steps, guidance and size share batches)."""
    seed: int = 0
    """Global seed; an item's seed is derived from it and the item's id unless the item gives one."""
    steps: int = 25
    """Denoising steps (a .jsonl item may set its own)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale; <= 1 turns guidance off."""
    negative_prompt: str = ""
    """Default negative prompt."""
    num_images: int = 1
    """Images per prompt (a .jsonl item may set its own)."""
    height: int = 0
    """Image height; 0: the U-Net's native size."""
    width: int = 0
    """Image width; 0: the U-Net's native size."""
    scheduler: str = "ddim"
    """ddim, pndm, euler, euler_a (ancestral) or dpmpp (DPM-Solver++)."""
    dtype: str = "auto"
    """auto (fp32 on CPU, fp16 on CUDA), fp32, fp16 or bf16."""
    attention: str = "sdpa"
    """"sdpa" (PyTorch scaled_dot_product_attention) or "eager"."""
    compile: bool = False
    """torch.compile the U-Net (pays off for long jobs on GPUs)."""
    skip_bad_lines: bool = False
    """Record and skip malformed prompt lines instead of stopping at the first."""
    contact_sheet: int = 64
    """Images in the contact-sheet grid (0: none)."""
    tensorboard: bool = True
    """Log the contact sheet and a few images to out_dir/tensorboard."""
    webdataset: bool = False
    """Also pack the images with their records into WebDataset tars (out_dir/shards/)."""
    clip_score: str = ""
    """A CLIP folder or trainer export to score each image against its prompt (0-100, CLIPScore) and, for a data_prep split, against its real image."""
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    """On several ranks: a batch of images (or a wait for the other ranks) that takes longer ends the job as hung (stacks in the log, exit 124)."""

    def __post_init__(self) -> None:
        require(
            self.preset in ("", *DIFFUSION_PRESETS), self, "preset", '"" or ' + ", ".join(DIFFUSION_PRESETS)
        )
        require(self.batch_size >= 1, self, "batch_size", "an int >= 1")
        require(self.steps >= 1, self, "steps", "an int >= 1")
        require(self.num_images >= 1, self, "num_images", "an int >= 1")
        require(self.height >= 0 and self.width >= 0, self, "height", "a size >= 0 (0: native)")
        require(self.scheduler in SCHEDULERS, self, "scheduler", " or ".join(SCHEDULERS))
        require(self.dtype in ("auto", "fp32", "fp16", "bf16"), self, "dtype", "auto, fp32, fp16 or bf16")
        require(self.attention in ("sdpa", "eager"), self, "attention", '"sdpa" or "eager"')
        require(self.captions in ("first", "all"), self, "captions", '"first" or "all"')
        require(self.contact_sheet >= 0, self, "contact_sheet", "an int >= 0")
