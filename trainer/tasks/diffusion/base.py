"""What the VAE and U-Net tasks share: parts, preset, preprocessing side, checks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from core.clip import Embedder
from core.manifest import Manifest
from core.presets import build_diffusion, is_built
from plumbing.dist import DistInfo, barrier
from plumbing.errors import UserError
from plumbing.logs import quiet_hf_progress
from trainer.config import TrainConfig
from trainer.engine import Engine
from trainer.run import RunFolder
from trainer.tasks.base import Batch
from trainer.tasks.diffusion.data import check_captions, check_decode
from trainer.tasks.diffusion.parts import check_parts, load, sources
from trainer.tasks.diffusion.skeleton import preset_configs

log = logging.getLogger("trainer.diffusion")


class DiffusionTask:
    """What the VAE and U-Net tasks share: the parts' sources (a preset built into the run folder once),
    the image preprocessing, the frozen parts on the device."""

    objective = "denoising"

    def __init__(self, cfg: TrainConfig, run: RunFolder, info: DistInfo, device: str) -> None:
        import diffusers  # noqa: F401  (imported here: quieted below)

        quiet_hf_progress()
        self.train_cfg, self.cfg, self.device, self.rank = cfg, cfg.diffusion, device, info.rank
        self.base_model = run.base_model
        if info.is_main and self.cfg.preset and not is_built(run.base_model, *self._preset()):
            build_diffusion(run.base_model, *self._preset())
        barrier()
        self.src = sources(self.cfg, run.base_model)
        self.side = check_parts(self.cfg, self.src, self.objective)["side"]
        self.dtype = torch.float32

    def _preset(self) -> tuple[Any, ...]:
        return preset_configs(self.cfg)

    def shown(self, batch: Batch) -> torch.Tensor:
        return batch["pixel_values"][:16].float() / 255  # uint8, as the loader gives them

    def _vae(self) -> Any:
        from diffusers import AutoencoderKL

        return load(AutoencoderKL, self.src.vae, "VAE")

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def after_step(self, engine: Engine) -> None:
        pass

    def release(self) -> None:
        pass

    def hyperparameters(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "model": c.preset or c.model,
            "objective": self.objective,
            "resolution": self.side,
            "ema": c.ema_decay,
        }

    @classmethod
    def check(cls, cfg: TrainConfig, manifest: Manifest) -> None:
        check_captions(manifest, cfg.data.train_split)
        check_decode(cfg.data.decode)
        check_parts(cfg.diffusion, sources(cfg.diffusion, Path(cfg.run.dir) / "base-model"), cls.objective)
        if cfg.diffusion.eval_clip and cls.objective == "denoising":
            try:
                Embedder.check(cfg.diffusion.eval_clip)
            except UserError as err:
                raise UserError(f"diffusion.eval_clip={err}") from None
