"""The VAE task (offline default only): the tiny VAE learns to reconstruct the shards' images; its
export measures the latents' std for the scaling factor."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from core.manifest import Manifest, load_manifest
from core.shards import decode, read_split
from plumbing.dist import DistInfo, all_sum
from plumbing.errors import UserError
from trainer.config import TrainConfig
from trainer.engine import Engine, Weights, load_weights
from trainer.run import RunFolder
from trainer.tasks.base import Batch, Evaluation, Skeleton
from trainer.tasks.diffusion.base import DiffusionTask
from trainer.tasks.diffusion.data import DiffusionCollate, DiffusionPrep, check_decode, square, to_unit_range
from trainer.tasks.diffusion.modules import VaeModule
from trainer.tasks.diffusion.objective import reconstruction_loss
from trainer.tasks.diffusion.parts import check_parts, sources
from trainer.tasks.diffusion.skeleton import meta_parts, vae_side

log = logging.getLogger("trainer.diffusion")


class VaeTask(DiffusionTask):
    """The tiny VAE learns to reconstruct the shards' images: MSE plus a small KL to the unit Gaussian.
    Real runs keep a pretrained VAE frozen and never run this."""

    objective = "vae"

    def __init__(self, cfg: TrainConfig, run: RunFolder, info: DistInfo, device: str) -> None:
        super().__init__(cfg, run, info, device)
        self.prep = DiffusionPrep(self.side, 0.0)
        self.collate = DiffusionCollate(None, 0)

    def build(self) -> torch.nn.Module:
        return VaeModule(self._vae())

    @staticmethod
    def skeleton(cfg: TrainConfig, manifest: Manifest | None) -> Skeleton | None:
        """The VAE on the meta device and one step's reconstruction of the images."""
        unet, vae, _ = meta_parts(cfg.diffusion, Path(cfg.run.dir) / "base-model")
        if vae is None:
            return None
        side, _ = vae_side(vae, None, cfg.diffusion.resolution)

        def forward(module: torch.nn.Module, batch: int, dtype: torch.dtype) -> Any:
            return module(torch.zeros(batch, 3, side, side, dtype=dtype, device="meta"))

        return Skeleton(VaeModule(vae), forward)

    def loss(self, engine: Engine, batch: Batch, draw: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.dtype = next(engine.module.parameters()).dtype
        pixels = to_unit_range(batch["pixel_values"].to(self.device, non_blocking=True), self.dtype)
        recon, kl = engine(pixels, torch.Generator(self.device).manual_seed(draw))
        mse = reconstruction_loss(recon.float(), pixels.float(), self.cfg.vae_object_weight)
        return mse + self.cfg.kl_weight * kl.float().mean(), {"train/reconstruction_mse": mse.detach()}

    def evaluate(self, engine: Engine, batches: Iterable[Batch], step: int) -> Evaluation:
        """Reconstruction MSE and PSNR (of the posterior's mean) over the eval split; a grid of
        originals above their reconstructions."""
        self.dtype = next(engine.module.parameters()).dtype
        vae = engine.module.vae
        sums, shown = [0.0, 0.0, 0.0], None
        for batch in batches:
            pixels = to_unit_range(batch["pixel_values"].to(self.device), self.dtype)
            recon = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.float()
            valid = batch["valid"].to(self.device)
            per = ((recon.clamp(-1, 1) - pixels.float()) ** 2).mean(dim=(1, 2, 3))
            sums[0] += float((per * valid).sum())
            sums[1] += float((10 * torch.log10(4 / per.clamp(min=1e-10)) * valid).sum())  # peak-to-peak 2
            sums[2] += float(valid.sum())
            if shown is None:
                shown = torch.cat([pixels[:8].float().cpu(), recon[:8].clamp(-1, 1).cpu()])
        mse, psnr, n = all_sum(sums)
        metrics = {"reconstruction_mse": mse / max(n, 1), "psnr": psnr / max(n, 1), "images": n}
        return Evaluation(metrics, {"eval/reconstructions": (shown + 1) / 2} if shown is not None else {})

    def export(
        self, weights: Mapping[str, torch.Tensor], extra: list[dict[str, torch.Tensor]], out: Path
    ) -> None:
        """vae/: an AutoencoderKL whose scaling_factor is 1 / the std of its latents on the eval split's
        first images (Rombach et al. 2022 §4.3.2: unit-variance latents for the diffusion model)."""
        vae = self._vae()
        load_weights(vae, Weights(weights).under("vae."))
        vae.eval()
        std = latent_std(
            vae, load_manifest(Path(self.train_cfg.data.manifest)), self.train_cfg.data.eval_split, self.side
        )
        vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        vae.save_pretrained(out / "vae", safe_serialization=True)
        log.info("VAE latents have std %.4f: scaling_factor %.5f", std, 1.0 / std)

    def exported(self, out: Path) -> dict[str, torch.Tensor]:
        from diffusers import AutoencoderKL

        return {
            f"vae.{k}": v for k, v in AutoencoderKL.from_pretrained(out, subfolder="vae").named_parameters()
        }

    def expected_export(self, name: str, live: torch.Tensor) -> torch.Tensor | None:
        return live

    @classmethod
    def check(cls, cfg: TrainConfig, manifest: Manifest) -> None:
        check_decode(cfg.data.decode)
        check_parts(cfg.diffusion, sources(cfg.diffusion, Path(cfg.run.dir) / "base-model"), cls.objective)


@torch.no_grad()
def latent_std(vae: Any, manifest: Manifest, split: str, side: int, count: int = 256) -> float:
    pixels = []
    for sample in read_split(manifest, split):
        try:
            pixels.append(square(decode(sample)["image"], side))
        except Exception:  # an undecodable sample is simply not measured
            continue
        if len(pixels) == count:
            break
    if not pixels:
        raise UserError(
            f"{manifest.root / 'manifest.json'}: split {split!r} has no readable images to measure the VAE on"
        )
    x = to_unit_range(torch.stack(pixels))
    return float(
        torch.cat([vae.encode(x[i : i + 64]).latent_dist.mode() for i in range(0, len(x), 64)]).std()
    )
