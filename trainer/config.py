"""TrainConfig: one typed config for a training job. Each section lives beside the code that uses it;
this file only assembles them and owns the run-level and loop-level settings. The import runs one
way: this file imports the sections, and nothing they import imports it back (tests/test_layering.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from plumbing.config import require
from plumbing.watchdog import WatchdogConfig
from trainer.checkpoint import CheckpointConfig
from trainer.data import DataConfig
from trainer.engine import DeepSpeedConfig, OptimConfig
from trainer.evaluate import EvalConfig
from trainer.tasks.clip.config import ModelConfig
from trainer.tasks.diffusion.config import DiffusionConfig

# The tasks (trainer.tasks.task_class maps each to its class; a test holds the two equal).
OBJECTIVES = ("classification", "contrastive", "vae", "denoising")


@dataclass
class RunConfig:
    dir: str = MISSING
    """Run folder: config.yaml, train.log, tensorboard/, checkpoints/, export/, attempts/ (what each try of a launch did; base-model/ for presets)."""
    seed: int = 0
    """Seed of the heads' initialisation, the data order and the augmentations."""
    log_every: int = 10
    """Write scalars and a log line every N optimizer steps."""
    verbose: bool = False
    """Let every rank log to the console (default: rank 0 only; all ranks still raise errors)."""
    verify_export: bool = True
    """After exporting, read the export back and check it equals the live engine's parameters (gathered across ranks)."""
    mmap_threshold_kb: int = 1024
    """On CPU: memory blocks of at least this many KiB come straight from the OS and go back to it when freed (glibc's M_MMAP_THRESHOLD), so freed activations and ZeRO-3's gathered weights leave no slack in each rank's memory; 0 keeps glibc's own threshold, which rises to 32 MiB (ZeRO-2/3 steps up to ~25 % faster, ~1 GB more per rank at ViT-B/32)."""
    check_memory: bool = True
    """Refuse a run whose memory plan (printed by --check) does not fit the memory it has; false: print the plan and run anyway."""

    def __post_init__(self) -> None:
        require(self.log_every >= 1, self, "log_every", "an int >= 1")
        require(self.mmap_threshold_kb >= 0, self, "mmap_threshold_kb", "a size in KiB >= 0 (0: glibc's own)")


@dataclass
class LoopConfig:
    objective: str = MISSING
    """The task: "classification" (CLIP: images against class prompts), "contrastive" (CLIP: InfoNCE over image–caption pairs), "vae" (the tiny VAE) or "denoising" (the diffusion U-Net)."""
    epochs: int = 1
    """Passes over the train split."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (then checkpoint and export); 0: no limit."""
    batch_size: int = 16
    """Micro-batch per rank (per GPU)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = batch_size × grad_accum × world size."""
    class_templates: list[str] = field(default_factory=lambda: ["An image of a {label}."])
    """Classification: prompts per class ({label} is the class name), averaged per class."""
    max_nonfinite: int = 5
    """A non-finite loss skips its optimizer update (on the device) or its micro-batch (trainer/guard.py); this many non-finite micro-batches in a row stop the run."""

    def __post_init__(self) -> None:
        named = [f'"{o}"' for o in OBJECTIVES]
        require(self.objective in OBJECTIVES, self, "objective", ", ".join(named[:-1]) + " or " + named[-1])
        require(self.epochs >= 1, self, "epochs", "an int >= 1")
        require(self.max_steps >= 0, self, "max_steps", "an int >= 0")
        require(self.batch_size >= 1, self, "batch_size", "an int >= 1")
        require(self.grad_accum >= 1, self, "grad_accum", "an int >= 1")
        require(
            all("{label}" in t for t in self.class_templates) and bool(self.class_templates),
            self,
            "class_templates",
            "templates containing {label}",
        )
        require(self.max_nonfinite >= 1, self, "max_nonfinite", "an int >= 1")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    resume: str = "auto"
    """"auto" (newest complete checkpoint in run.dir, or start fresh), "none", or a checkpoint folder."""
