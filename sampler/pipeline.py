"""A latent-diffusion pipeline built from its parts, as a numbered recipe:

1. check inputs   2. encode prompts   3. prepare latents   4. denoise   5. decode
(6. save is the runner's, sampler/run.py). On the same components, seeds and settings the images
equal diffusers' StableDiffusionPipeline's (tests/test_sampler.py), and every image's randomness comes
from its own generator, so it does not depend on which other images share its batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from plumbing.errors import UserError
from plumbing.logs import quiet_hf_progress

log = logging.getLogger("sampler")

SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CLIP_FOR_UNET = (
    "Stable Diffusion v1.x conditions on openai/clip-vit-large-patch14 (768), SD 2.x on OpenCLIP ViT-H/14 (1024); "
    "fine-tune that CLIP (model.name) to swap it into this U-Net"
)


@dataclass(frozen=True)
class Request:
    """One batch: the prompts, their negative prompts and one seed per image, and shared settings."""

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    steps: int
    guidance_scale: float
    height: int
    width: int


@dataclass(frozen=True)
class Output:
    images: list[Image.Image]
    seconds: float


@dataclass(frozen=True)
class Components:
    tokenizer: Any
    text_encoder: Any
    unet: Any
    vae: Any
    scheduler: Any


def load_components(
    model: str, text_encoder: str | None, scheduler: str, device: str, dtype: torch.dtype
) -> Components:
    """The parts of a diffusers model folder or hub id; `text_encoder` (a trainer export, or any folder
    with text_encoder/ and tokenizer/) replaces the model's own."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_hf_progress()

    try:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
        name, extra = SCHEDULERS[scheduler]
        scheduler_cls = getattr(diffusers, name)
        sched = scheduler_cls.from_pretrained(model, subfolder="scheduler", **extra)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load the diffusion model {model!r} ({str(err).splitlines()[0][:160]}); offline, use a local folder or preset=tiny"
        ) from None
    source = text_encoder or model
    root = Path(source)
    try:
        if text_encoder and not (root / "text_encoder").is_dir():
            raise UserError(
                f"text_encoder={text_encoder}: no text_encoder/ folder (expected a trainer export)"
            )
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", torch_dtype=dtype)
    except OSError as err:
        raise UserError(
            f"cannot load the text encoder of {source!r} ({str(err).splitlines()[0][:160]})"
        ) from None
    hidden, cross = encoder.config.hidden_size, unet.config.cross_attention_dim
    if hidden != cross:
        raise UserError(
            f"text encoder {source} has hidden size {hidden}, but the U-Net of {model} cross-attends to {cross}: "
            f"{CLIP_FOR_UNET}"
        )
    for part in (unet, vae, encoder):
        part.to(device).eval().requires_grad_(False)
    return Components(tokenizer, encoder, unet, vae, sched)


class LatentDiffusion:
    def __init__(self, parts: Components, device: str, dtype: torch.dtype) -> None:
        self.parts, self.device, self.dtype = parts, device, dtype
        self.vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        self.max_length = min(
            parts.tokenizer.model_max_length, parts.text_encoder.config.max_position_embeddings
        )

    @property
    def default_size(self) -> int:
        return self.parts.unet.config.sample_size * self.vae_scale

    @torch.no_grad()
    def __call__(self, req: Request, progress: Any = None) -> Output:
        start = time.perf_counter()
        self.check_inputs(req)  # 1
        cond, uncond = self.encode_prompts(req)  # 2
        latents, generators = self.prepare_latents(req)  # 3
        latents = self.denoise(latents, cond, uncond, generators, req, progress)  # 4
        images = self.decode(latents)  # 5
        return Output(images, time.perf_counter() - start)

    def check_inputs(self, req: Request) -> None:
        n = len(req.prompts)
        if not (n == len(req.negative_prompts) == len(req.seeds)) or n == 0:
            raise ValueError("a request needs one negative prompt and one seed per prompt")
        if req.height % self.vae_scale or req.width % self.vae_scale:
            raise UserError(
                f"height and width must be multiples of {self.vae_scale} for this VAE, got {req.height}×{req.width}"
            )

    def encode_prompts(self, req: Request) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last hidden states of the text encoder, as Stable Diffusion conditions on them (no
        attention mask: CLIP's causal mask makes padding irrelevant to the tokens before it)."""
        cond = self._embed(req.prompts)
        uncond = self._embed(req.negative_prompts) if req.guidance_scale > 1 else None
        return cond, uncond

    def _embed(self, texts: list[str]) -> torch.Tensor:
        ids = self.parts.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.parts.text_encoder(ids.to(self.device))[0].to(self.dtype)

    def prepare_latents(self, req: Request) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Per-image noise from per-image generators (kept for ancestral schedulers' noise too)."""
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in req.seeds]
        shape = (
            1,
            self.parts.unet.config.in_channels,
            req.height // self.vae_scale,
            req.width // self.vae_scale,
        )
        noise = torch.cat([torch.randn(shape, generator=g, dtype=self.dtype) for g in generators]).to(
            self.device
        )
        self.parts.scheduler.set_timesteps(req.steps, device=self.device)
        return noise * self.parts.scheduler.init_noise_sigma, generators

    def denoise(
        self,
        latents: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor | None,
        generators: list[torch.Generator],
        req: Request,
        progress: Any,
    ) -> torch.Tensor:
        """The U-Net on [unconditional, conditional] each step, classifier-free guidance, scheduler step."""
        scheduler, unet = self.parts.scheduler, self.parts.unet
        context = torch.cat([uncond, cond]) if uncond is not None else cond
        extra = {"generator": generators} if "generator" in _step_params(scheduler) else {}
        if "eta" in _step_params(scheduler):
            extra["eta"] = 0.0
        for t in scheduler.timesteps:
            model_in = torch.cat([latents] * 2) if uncond is not None else latents
            model_in = scheduler.scale_model_input(model_in, t)
            noise = unet(model_in, t, encoder_hidden_states=context).sample
            if uncond is not None:
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + req.guidance_scale * (noise_cond - noise_uncond)
            latents = scheduler.step(noise, t, latents, **extra).prev_sample
            if progress is not None:
                progress()
        return latents

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.parts.vae
        images = vae.decode(latents / vae.config.scaling_factor).sample
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]


def _step_params(scheduler: Any) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if name in ("fp16", "bf16") and not device.startswith("cuda"):
        raise UserError(f"dtype={name} needs CUDA; use fp32 (or auto) on CPU")
    return DTYPES[name]
