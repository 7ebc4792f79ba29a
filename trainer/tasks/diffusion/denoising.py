"""The denoising task: the text-conditioned U-Net learns to denoise VAE latents of the shards'
images (Stable Diffusion's objective), evaluated by validation loss at fixed noise and by drawing
the eval prompts."""

from __future__ import annotations

import contextlib
from collections import ChainMap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.clip import Embedder
from core.manifest import Manifest
from plumbing.dist import DistInfo, all_sum
from plumbing.errors import UserError
from plumbing.seeds import derive_seed
from trainer.config import TrainConfig
from trainer.engine import Engine, Weights, load_weights
from trainer.run import RunFolder
from trainer.tasks.base import Batch, Evaluation, Skeleton
from trainer.tasks.diffusion.base import DiffusionTask
from trainer.tasks.diffusion.config import PREDICTIONS
from trainer.tasks.diffusion.data import DiffusionCollate, DiffusionPrep, to_unit_range
from trainer.tasks.diffusion.ema import Ema, full_ema
from trainer.tasks.diffusion.modules import UNetModule
from trainer.tasks.diffusion.objective import denoising_loss
from trainer.tasks.diffusion.parts import load, part_config, where
from trainer.tasks.diffusion.skeleton import meta_parts, vae_side


class DenoisingTask(DiffusionTask):
    """The U-Net learns to denoise the VAE latents of the shards' images, conditioned on their captions."""

    def __init__(self, cfg: TrainConfig, run: RunFolder, info: DistInfo, device: str) -> None:
        super().__init__(cfg, run, info, device)
        from diffusers import DDIMScheduler, DDPMScheduler
        from transformers import CLIPTokenizer

        self.tokenizer = load(CLIPTokenizer, (self.src.text, "tokenizer"), "tokenizer")
        self.max_length = min(
            self.tokenizer.model_max_length,
            part_config((self.src.text, "text_encoder"), "text encoder").get("max_position_embeddings", 77),
        )
        extra: dict[str, Any] = (
            {"prediction_type": self.cfg.prediction_type} if self.cfg.prediction_type else {}
        )
        if self.cfg.zero_terminal_snr:
            extra.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        self.noise = load(DDPMScheduler, self.src.scheduler, "noise scheduler", **extra)
        self.prediction = self.noise.config.prediction_type
        scheduler = where(self.src.scheduler)
        if self.prediction not in PREDICTIONS:
            raise UserError(
                f"{scheduler}: prediction_type {self.prediction!r}; this trainer learns {' or '.join(PREDICTIONS)} "
                "(set diffusion.prediction_type)"
            )
        steps = self.noise.config.num_train_timesteps
        if max(self.cfg.eval_timesteps) >= steps:
            raise UserError(
                f"diffusion.eval_timesteps={self.cfg.eval_timesteps}: the schedule of {scheduler} has {steps} "
                f"timesteps; use timesteps below {steps}"
            )
        self.sampling = DDIMScheduler.from_config(self.noise.config)
        self.prep = DiffusionPrep(self.side, self.cfg.caption_dropout, cfg.data.captions)
        self.collate = DiffusionCollate(self.tokenizer, self.max_length)
        self.vae = self._vae().to(device).eval().requires_grad_(False)
        self.scaling = self.vae.config.scaling_factor
        self.ema: Ema | None = None
        self._pending_ema: dict[str, torch.Tensor] = {}
        self._cache: dict[str, torch.Tensor] = {}  # sample key → the VAE posterior's moments
        self._embedder: Embedder | None = None  # the eval CLIP, loaded at the first evaluation

    @staticmethod
    def skeleton(cfg: TrainConfig, manifest: Manifest | None) -> Skeleton | None:
        """The U-Net and its text encoder on the meta device, one step's forward of them on noisy
        latents, and the frozen VAE beside them with its encoding of the step's images."""
        unet, vae, text = meta_parts(cfg.diffusion, Path(cfg.run.dir) / "base-model")
        if unet is None or vae is None or text is None:
            return None
        if cfg.diffusion.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        side, latent = vae_side(vae, unet, cfg.diffusion.resolution)
        length = text.config.max_position_embeddings

        def forward(module: torch.nn.Module, batch: int, dtype: torch.dtype) -> Any:
            noisy = torch.zeros(batch, unet.config.in_channels, latent, latent, dtype=dtype, device="meta")
            steps = torch.zeros(batch, dtype=torch.long, device="meta")
            return module(noisy, steps, torch.zeros(batch, length, dtype=torch.long, device="meta"))

        def encode(vae: torch.nn.Module, batch: int, dtype: torch.dtype) -> Any:
            return vae.encode(
                torch.zeros(batch, 3, side, side, dtype=dtype, device="meta")
            ).latent_dist.parameters

        ema = sum(p.numel() for p in unet.parameters()) if cfg.diffusion.ema_decay else 0
        module = UNetModule(unet, text, cfg.diffusion.train_text_encoder)
        return Skeleton(module, forward, vae, encode, ema)

    def build(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = load(UNet2DConditionModel, self.src.unet, "U-Net")
        text = load(CLIPTextModel, (self.src.text, "text_encoder"), "text encoder")
        if self.cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return UNetModule(unet, text, self.cfg.train_text_encoder)

    def _ready(self, engine: Engine) -> None:
        """On first use: the frozen VAE in the engine's precision, the EMA started."""
        dtype = next(engine.module.parameters()).dtype
        if dtype != self.dtype:
            self.dtype = dtype
            self.vae.to(dtype)
        if self.cfg.ema_decay and self.ema is None:
            self.ema = Ema(engine.module.unet, self.cfg.ema_decay, self.rank)
            self.ema.load(self._pending_ema)

    def latents(
        self, pixels: torch.Tensor, generator: torch.Generator | None, keys: list[str] | None = None
    ) -> torch.Tensor:
        """VAE latents × scaling_factor: sampled from the posterior in training, its mean otherwise.
        With `cache_latents` the posterior of each sample (by key) is encoded once and kept: the VAE is
        frozen and the preprocessing draws nothing, so it is the same every epoch; each step still
        draws a fresh `sample()` from it (the same draw as without the cache)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        with torch.no_grad():
            if keys is not None and self.cfg.cache_latents:
                moments = self._moments(pixels, keys)
            else:
                moments = self.vae.encode(self._pixels(pixels)).latent_dist.parameters
            posterior = DiagonalGaussianDistribution(moments)
            z = posterior.sample(generator=generator) if generator is not None else posterior.mode()
        return z.float() * self.scaling

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The loader's uint8 pixels as the VAE's input, on the device in the VAE's precision."""
        return to_unit_range(pixels.to(self.device, non_blocking=True), self.dtype)

    def _moments(self, pixels: torch.Tensor, keys: list[str]) -> torch.Tensor:
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            fresh = self.vae.encode(self._pixels(pixels[missing])).latent_dist.parameters
            self._cache.update({keys[i]: m for i, m in zip(missing, fresh)})
        return torch.stack([self._cache[key] for key in keys])

    def loss(self, engine: Engine, batch: Batch, draw: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._ready(engine)
        generator = torch.Generator(self.device).manual_seed(draw)
        latents = self.latents(batch["pixel_values"], generator, batch["keys"])
        ids = batch["input_ids"].to(self.device, non_blocking=True)

        def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return engine(noisy.to(self.dtype), timesteps, ids)

        c = self.cfg
        return denoising_loss(
            self.noise, latents, predict, generator, self.prediction, c.snr_gamma, c.noise_offset
        ), {}

    def after_step(self, engine: Engine) -> None:
        if self.ema is not None:
            self.ema.update()

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.ema.state() if self.ema is not None else {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self._pending_ema = state  # the EMA starts with the engine, on first use

    def evaluate(self, engine: Engine, batches: Iterable[Batch], step: int) -> Evaluation:
        """The validation loss at fixed timesteps with fixed noise per image (comparable between runs
        and after a resume), and the eval prompts drawn (CLIP score and R-precision with eval_clip);
        with EMA on, of the EMA weights (those the export holds)."""
        self._ready(engine)
        with self.ema.swapped_in(engine) if self.ema is not None else contextlib.nullcontext():
            metrics = self.validation_loss(engine, batches)
            pictures = self.draw(engine.module, self.cfg.eval_prompts)
        if self.cfg.eval_clip:
            self._embedder = self._embedder or Embedder(self.cfg.eval_clip, self.device)
            metrics["clip_score"], metrics["r_precision"] = self._embedder.r_precision(
                pictures, self.cfg.eval_prompts
            )
        grid = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pictures]).float() / 255
        return Evaluation(metrics, {"eval/images": grid})

    def validation_loss(self, engine: Engine, batches: Iterable[Batch]) -> dict[str, float]:
        timesteps = list(self.cfg.eval_timesteps)
        sums = [0.0] * (len(timesteps) + 1)
        for n, batch in enumerate(batches):
            if self.cfg.eval_batches and n >= self.cfg.eval_batches:
                continue  # every rank still consumes its (equally long) loader
            latents = self.latents(batch["pixel_values"], None)
            ids = batch["input_ids"].to(self.device)
            valid = batch["valid"].to(self.device)
            for k, t in enumerate(timesteps):
                noise = torch.stack(
                    [
                        torch.randn(
                            latents.shape[1:],
                            generator=torch.Generator().manual_seed(derive_seed("val", int(i), t)),
                        )
                        for i in batch["index"]
                    ]
                ).to(self.device)
                steps = torch.full((latents.shape[0],), t, device=self.device, dtype=torch.long)
                noisy = self.noise.add_noise(latents, noise, steps)
                target = (
                    noise if self.prediction == "epsilon" else self.noise.get_velocity(latents, noise, steps)
                )
                pred = engine(noisy.to(self.dtype), steps, ids).float()
                per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
                sums[k] += float((per * valid).sum())
            sums[-1] += float(valid.sum())
        totals = all_sum(sums)
        count = max(totals[-1], 1.0)
        out = {f"val_loss_t{t}": totals[k] / count for k, t in enumerate(timesteps)}
        out["val_loss"] = sum(out.values()) / len(timesteps)
        return out

    def pipeline(self, module: Any, vae: Any = None) -> Any:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=vae or self.vae,
            text_encoder=module.text_encoder,
            tokenizer=self.tokenizer,
            unet=module.unet,
            scheduler=self.sampling,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def draw(self, module: Any, prompts: list[str]) -> list[Image.Image]:
        """The prompts drawn with fixed seeds (every rank draws all: ZeRO-3 needs every rank in every
        forward); diffusers' own pipeline on the parts being trained."""
        pipe = self.pipeline(module)
        generators = [torch.Generator(self.device).manual_seed(i) for i in range(len(prompts))]
        out = pipe(
            prompts,
            num_inference_steps=self.cfg.eval_steps,
            guidance_scale=self.cfg.guidance_scale,
            generator=generators,
            height=self.side,
            width=self.side,
            output_type="pil",
        )
        return list(out.images)

    def export(
        self, weights: Mapping[str, torch.Tensor], extra: list[dict[str, torch.Tensor]], out: Path
    ) -> None:
        """A complete diffusers folder: model_index.json, unet/ (the EMA weights when EMA is on), vae/,
        text_encoder/ (the one the U-Net was trained with), tokenizer/, scheduler/ (DDIM on the
        training schedule): StableDiffusionPipeline.from_pretrained and the sampler take it as it is."""
        module = self.build()
        ema = full_ema(Weights(weights).under("unet."), extra)
        load_weights(module, ChainMap({f"unet.{k}": v for k, v in ema.items()}, weights))
        # the VAE as loaded (fp32; the training copy may be in bf16)
        self.pipeline(module, self._vae()).save_pretrained(out, safe_serialization=True)

    def exported(self, out: Path) -> dict[str, torch.Tensor]:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
        text = CLIPTextModel.from_pretrained(out, subfolder="text_encoder")
        return {
            **{f"unet.{k}": v for k, v in unet.named_parameters()},
            **{f"text_encoder.{k}": v for k, v in text.named_parameters()},
        }

    def expected_export(self, name: str, live: torch.Tensor) -> torch.Tensor | None:
        if self.ema is None or not name.startswith("unet."):
            return live
        if (
            self.ema.partitioned
        ):  # rank 0 holds its partition only: the U-Net's EMA is checked by the export path
            return None
        shadow = self.ema.shadow.get(name[len("unet.") :])
        return live if shadow is None else shadow.cpu()

    def release(self) -> None:
        self.ema = None  # it holds the engine's parameters; the checkpoint holds the EMA
