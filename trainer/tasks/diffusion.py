"""The latent-diffusion tasks: train a VAE (`train.objective=vae`, offline default only: real runs
keep a pretrained VAE frozen) and the text-conditioned U-Net (`train.objective=denoising`), on the
same shards and with the same harness as CLIP.

The denoising objective is Stable Diffusion's, as diffusers' examples/text_to_image defines it: VAE
latents (`latent_dist.sample() × scaling_factor`, the VAE frozen in eval mode), uniform random
timesteps, `scheduler.add_noise`, the target the noise or the velocity per the scheduler's
`prediction_type`, MSE; optionally min-SNR-γ weighting (Hang et al. 2023), a noise offset, an EMA of
the U-Net's weights. Captions drop to the empty prompt at `caption_dropout` so that classifier-free
guidance works when sampling. The U-Net is conditioned on the last hidden states of a text encoder:
a trainer CLIP export's (the fine-tuned one) or the model's own, frozen unless
`diffusion.train_text_encoder`. Every draw (noise, timesteps, the posterior sample) comes from a
generator seeded by the micro-step, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.clip import Embedder
from core.manifest import Manifest, load_manifest
from core.presets import DIFFUSION_PRESETS, TinyDiffusionConfig, build_diffusion, is_built
from core.shards import captions_of, decode, read_split
from plumbing.config import require
from plumbing.dist import DistInfo, all_sum, barrier
from plumbing.errors import UserError
from plumbing.logs import quiet_hf_progress
from plumbing.seeds import derive_seed
from trainer.data import pick_caption
from trainer.tasks import Batch, Evaluation

log = logging.getLogger("trainer.diffusion")
PREDICTIONS = ("epsilon", "v_prediction")
DEFAULT_PROMPTS = [
    "A red circle on the left on a black background .",
    "A blue square at the top on a white background .",
    "A green triangle in the middle on a grey background .",
    "A yellow cross at the bottom on a black background .",
    "A purple circle on the right on a white background .",
    "An orange square in the middle on a grey background .",
    "A blue cross on the left on a grey background .",
    "A red triangle on the right on a white background .",
]


@dataclass
class DiffusionConfig:
    model: str = ""
    """A diffusers model to start from (hub id or folder with unet/, vae/, scheduler/, text_encoder/, tokenizer/), e.g. CompVis/stable-diffusion-v1-4."""
    preset: str = ""
    """Build random-init parts into <run.dir>/base-model instead: "tiny" (shaped by diffusion.tiny) or "sd-v1"."""
    tiny: TinyDiffusionConfig = field(default_factory=TinyDiffusionConfig)
    vae: str = ""
    """The VAE to use instead of the model's: a `train.objective=vae` export, or a folder holding vae/."""
    text_encoder: str = ""
    """A trainer CLIP export (its text_encoder/ and tokenizer/) to condition on instead of the model's own."""
    train_text_encoder: bool = False
    """Train the text encoder with the U-Net (default: frozen)."""
    resolution: int = 0
    """Image side to train at; 0: the U-Net's sample_size × the VAE's downsampling factor."""
    caption_dropout: float = 0.1
    """Fraction of captions replaced by the empty prompt (classifier-free guidance needs it)."""
    prediction_type: str = ""
    """"epsilon" or "v_prediction"; empty: the scheduler's own."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule to zero SNR at its last step, sampled with trailing timesteps (Lin et al. 2023): with v_prediction, the model can draw truly dark or bright images; the export's scheduler keeps it."""
    snr_gamma: float = 0.0
    """Min-SNR-γ loss weighting (Hang et al. 2023; 5 is their choice); 0: plain MSE."""
    noise_offset: float = 0.0
    """Add this × per-channel noise to the noise (helps very dark / bright images); 0: off."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the U-Net's weights with this decay (0: none); exported when on."""
    gradient_checkpointing: bool = False
    """Recompute the U-Net's activations in the backward pass (less memory, more compute)."""
    cache_latents: bool = False
    """Keep each training image's VAE posterior (by sample key) after its first encoding, and draw from it every epoch: the same loss for less compute, at the cost of 2 × latent size of memory per image per rank (small sets)."""
    kl_weight: float = 1e-6
    """VAE task: weight of the KL term (summed over a latent) beside the reconstruction MSE (a mean over pixels)."""
    vae_object_weight: float = 0.0
    """VAE task: extra weight of the pixels that differ from the image's border (on plain backgrounds, the object: small ones otherwise drown in the MSE); 0: plain MSE."""
    eval_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Prompts drawn at every evaluation (TensorBoard images; CLIP score and R-precision with eval_clip)."""
    eval_clip: str = ""
    """A CLIP folder or trainer export to score the evaluation images (CLIP score, R-precision among eval_prompts)."""
    eval_steps: int = 25
    """Denoising steps (DDIM) of the evaluation images."""
    guidance_scale: float = 4.0
    """Classifier-free guidance of the evaluation images."""
    eval_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    """Timesteps of the validation loss (with fixed noise per image and timestep: comparable between runs)."""
    eval_batches: int = 4
    """Eval-split batches per rank for the validation loss (0: all)."""

    def __post_init__(self) -> None:
        require(
            self.preset in ("", *DIFFUSION_PRESETS), self, "preset", '"" or ' + ", ".join(DIFFUSION_PRESETS)
        )
        require(self.resolution >= 0, self, "resolution", "a size >= 0 (0: the U-Net's)")
        require(0 <= self.caption_dropout < 1, self, "caption_dropout", "a fraction in [0, 1)")
        require(
            self.prediction_type in ("", *PREDICTIONS),
            self,
            "prediction_type",
            '"", "epsilon" or "v_prediction"',
        )
        require(self.snr_gamma >= 0, self, "snr_gamma", "a number >= 0")
        require(0 <= self.ema_decay < 1, self, "ema_decay", "a decay in [0, 1)")
        require(self.kl_weight >= 0, self, "kl_weight", "a weight >= 0")
        require(self.vae_object_weight >= 0, self, "vae_object_weight", "a weight >= 0")
        require(self.eval_steps >= 1, self, "eval_steps", "an int >= 1")
        require(
            bool(self.eval_timesteps) and all(t >= 0 for t in self.eval_timesteps),
            self,
            "eval_timesteps",
            "a non-empty list of timesteps >= 0 (below the scheduler's num_train_timesteps)",
        )
        require(bool(self.eval_prompts), self, "eval_prompts", "a non-empty list of prompts")
        require(self.eval_batches >= 0, self, "eval_batches", "an int >= 0")


# --------------------------------------------------------------------------- the objective (pure)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio α̅_t / (1 − α̅_t) of each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023) for an MSE on the noise (÷ SNR) or the velocity (÷ SNR + 1).
    At SNR 0 (the last timestep of a zero-terminal-SNR schedule) the noise weight min(SNR, γ)/SNR is
    taken at its limit, 1, not 0/0."""
    clipped = torch.minimum(snr_t, torch.full_like(snr_t, gamma))
    if prediction == "v_prediction":
        return clipped / (snr_t + 1)
    return torch.where(
        snr_t > 0, clipped / snr_t.clamp(min=torch.finfo(snr_t.dtype).tiny), torch.ones_like(snr_t)
    )


def denoising_loss(
    scheduler: Any,
    latents: torch.Tensor,
    predict: Any,
    generator: torch.Generator,
    prediction: str,
    snr_gamma: float = 0.0,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """The training loss of one batch of latents: noise them at uniform random timesteps, let
    `predict(noisy, timesteps)` guess the target, MSE (min-SNR-weighted when snr_gamma > 0)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:  # Guttenberg 2023: a per-channel offset, so that the mean brightness can be learnt
        offset = torch.randn((b, latents.shape[1], 1, 1), generator=generator, device=latents.device)
        noise = noise + noise_offset * offset.to(latents.dtype)
    steps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (b,), generator=generator, device=latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    pred = predict(noisy, timesteps).float()
    if not snr_gamma:
        return F.mse_loss(pred, target.float())
    per_sample = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (
        per_sample * min_snr_weights(snr(scheduler.alphas_cumprod, timesteps), snr_gamma, prediction)
    ).mean()


# --------------------------------------------------------------------------- data


class DiffusionPrep:
    """A decoded sample → uint8 pixels (short side resized to `side`, centre crop; no flips: captions
    say left and right) and one caption, or the empty one at `dropout` (drawn from the sample's seed)."""

    def __init__(self, side: int, dropout: float, captions: str = "draw") -> None:
        self.side, self.dropout, self.captions = side, dropout, captions

    def __call__(self, sample: dict[str, Any], draw: int, train: bool) -> dict[str, Any]:
        sample["pixel_values"] = square(sample.pop("image"), self.side)
        sample = pick_caption(sample, draw, train, self.captions)
        if train and self.dropout and random.Random(draw ^ 0x5EED).random() < self.dropout:
            sample["text"] = ""
        return sample


def square(image: Image.Image, side: int) -> torch.Tensor:
    """The short side resized to `side` (bicubic, antialiased), then the centre square, as uint8 CHW."""
    w, h = image.size
    scale = side / min(w, h)
    w, h = max(side, round(w * scale)), max(side, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class DiffusionCollate:
    """Pixels to [-1, 1]; captions tokenised to the full length, as the sampler will tokenise prompts
    (Stable Diffusion's U-Net attends over every position, padding included)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        pixels = torch.stack([s["pixel_values"] for s in samples]).float().div_(127.5).sub_(1)
        batch: Batch = {
            "pixel_values": pixels,
            "keys": [s["key"] for s in samples],
            "skipped": sum(s.get("skipped", 0) for s in samples),
            "valid": torch.tensor([s.get("valid", True) and not s.get("substitute", False) for s in samples]),
            "index": torch.tensor([s.get("index", -1) for s in samples]),
        }
        if self.tokenizer is not None:
            batch["input_ids"] = self.tokenize([s.get("text", "") for s in samples])
        return batch

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids


# --------------------------------------------------------------------------- sources and checks


@dataclass(frozen=True)
class Sources:
    """Where each part comes from: (folder, subfolder) pairs for from_pretrained."""

    unet: tuple[str, str]
    vae: tuple[str, str]
    text: str  # a folder or hub id with text_encoder/ and tokenizer/
    scheduler: tuple[str, str]


def vae_location(path: str) -> tuple[str, str]:
    """A VAE folder, or a folder with vae/ (a `train.objective=vae` export, a diffusers model)."""
    return (path, "vae") if (Path(path) / "vae").is_dir() else (path, "")


def sources(cfg: DiffusionConfig, base_model: Path) -> Sources:
    root = str(base_model) if cfg.preset else cfg.model
    if not root and not cfg.preset:
        raise UserError(
            "diffusion.model: a diffusers model (hub id or folder) is required, or diffusion.preset"
        )
    vae = vae_location(cfg.vae) if cfg.vae else (root, "vae")
    return Sources((root, "unet"), vae, cfg.text_encoder or root, (root, "scheduler"))


def _config(location: tuple[str, str], what: str) -> dict[str, Any]:
    """A part's config.json when it is a local folder (hub ids are checked when loaded)."""
    folder = Path(location[0]) / location[1]
    file = folder / ("scheduler_config.json" if what == "scheduler" else "config.json")
    if not Path(location[0]).exists():
        return {}
    if not file.is_file():
        raise UserError(f"{folder}: no {file.name} (expected the {what} of a diffusers model)")
    return json.loads(file.read_text())


def check_parts(cfg: DiffusionConfig, src: Sources, objective: str) -> dict[str, Any]:
    """The shapes must fit before anything heavy starts: text width = the U-Net's cross-attention,
    VAE latent channels = the U-Net's input, the image side a multiple of the VAE's downsampling."""
    vae = _config(src.vae, "VAE") or (_tiny_vae_shape(cfg.tiny) if cfg.preset == "tiny" else {})
    factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    unet = {} if objective == "vae" else _config(src.unet, "U-Net")
    side = cfg.resolution or (
        unet.get("sample_size", cfg.tiny.latent_size) * factor if objective != "vae" else 0
    )
    side = side or vae.get("sample_size", 0)
    where_vae = Path(src.vae[0]) / src.vae[1]
    if side % factor:
        raise UserError(
            f"diffusion.resolution={side}: the VAE {where_vae} downsamples by {factor}; use a multiple of {factor}"
        )
    if objective == "vae":
        return {"side": side, "factor": factor}
    if cfg.text_encoder:
        for part in ("text_encoder", "tokenizer"):
            if not (Path(cfg.text_encoder) / part).is_dir():
                raise UserError(
                    f"diffusion.text_encoder={cfg.text_encoder}: no {part}/ (expected a trainer CLIP export)"
                )
    text = _config((src.text, "text_encoder"), "text encoder")
    hidden, channels = text.get("hidden_size"), vae.get("latent_channels")
    cross, inputs = unet.get("cross_attention_dim", hidden), unet.get("in_channels", channels)
    if hidden and cross and hidden != cross:
        raise UserError(
            f"text encoder {Path(src.text) / 'text_encoder'} has hidden size {hidden}, but the U-Net of "
            f"{src.unet[0]} cross-attends to {cross}: Stable Diffusion v1.x conditions on "
            "openai/clip-vit-large-patch14 (768), SD 2.x on OpenCLIP ViT-H/14 (1024)"
        )
    if channels and inputs and channels != inputs:
        raise UserError(
            f"the VAE {where_vae} has {channels} latent channels, but the U-Net of {src.unet[0]} takes {inputs}"
        )
    return {"side": side, "factor": factor}


def load(cls: Any, location: tuple[str, str], what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained` of a part, or one line naming where it was looked for."""
    root, sub = location
    try:
        return cls.from_pretrained(root, subfolder=sub or None, **kwargs)
    except (OSError, ValueError) as err:
        where = Path(root) / sub if sub else Path(root)
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the {what} from {where} ({first})") from None


def _tiny_vae_shape(tiny: TinyDiffusionConfig) -> dict[str, Any]:
    return {
        "block_out_channels": tiny.vae_channels,
        "latent_channels": tiny.latent_channels,
        "sample_size": tiny.image_size,
    }


def check_captions(manifest: Manifest, split: str) -> None:
    first = next(read_split(manifest, split), None)
    if first is None or not captions_of(first):
        raise UserError(
            f'{manifest.root / "manifest.json"}: split {split!r} has no captions (txt or json "captions"): '
            "text-to-image training needs them"
        )


# --------------------------------------------------------------------------- EMA


class Ema:
    """An exponential moving average of the trainable weights, in fp32, on their device. Under ZeRO-3
    each rank averages its own partition (`ds_tensor`) and checkpoints it; below it every rank holds
    the whole and rank 0 checkpoints it for all."""

    def __init__(self, module: torch.nn.Module, decay: float, rank: int) -> None:
        self.decay, self.rank = decay, rank
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.shadow = {n: self._data(p).detach().float().clone() for n, p in self.params.items()}

    def _data(self, p: torch.Tensor) -> torch.Tensor:
        return getattr(p, "ds_tensor", p.data)

    @torch.no_grad()
    def update(self) -> None:
        current = [self._data(p).float() for p in self.params.values()]  # views where already fp32
        torch._foreach_lerp_(
            list(self.shadow.values()), current, 1 - self.decay
        )  # one call, not one per tensor

    def state(self) -> dict[str, torch.Tensor]:
        if not self.partitioned and self.rank != 0:
            return {}  # the same on every rank: rank 0's copy serves all
        return {f"ema.{n}": t.cpu() for n, t in self.shadow.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in self.shadow.items():
            if f"ema.{name}" in state:
                t.copy_(state[f"ema.{name}"])

    @contextlib.contextmanager
    def swapped_in(self, engine: Any) -> Iterator[None]:
        """The EMA weights in the module for the duration (evaluation), the trained ones after. Every
        rank must enter it (under ZeRO-3 the swap ends in a gather)."""
        saved = {n: self._data(p).detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                self._data(p).copy_(self.shadow[n])
        self._regather(engine)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    self._data(p).copy_(saved[n])
            self._regather(engine)

    def _regather(self, engine: Any) -> None:
        """ZeRO-3 keeps its small ("persistent") parameters whole on every rank beside their partition,
        and gathers them again only after an optimizer step: after the partitions change here, gather
        them as DeepSpeed's stage-3 optimizer does after a step (release, then all-gather)."""
        persistent = getattr(getattr(engine, "optimizer", None), "persistent_parameters", None)
        if self.partitioned and persistent:
            persistent[0].partition(persistent)
            persistent[0].all_gather(persistent)


def full_ema(
    weights: dict[str, torch.Tensor], extra: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Whole EMA tensors from the checkpoint's extra states: rank 0's whole ones, or every rank's
    ZeRO-3 partitions joined (each parameter is split evenly over the ranks, padded at the end)."""
    out: dict[str, torch.Tensor] = {}
    for key in [k for k in (extra[0] if extra else {}) if k.startswith("ema.")]:
        name, shape = key[4:], weights[key[4:]].shape
        first = extra[0][key]
        if first.shape == shape:
            out[name] = first
        else:
            flat = torch.cat([e[key].reshape(-1) for e in extra])
            out[name] = flat[: weights[name].numel()].view(shape)
    return out


# --------------------------------------------------------------------------- the modules DeepSpeed trains


class UNetModule(torch.nn.Module):
    """The U-Net and the text encoder that conditions it (frozen unless trained): one module, so that
    ZeRO partitions, checkpoints and exports them together and the export holds the very encoder the
    U-Net learnt from."""

    def __init__(self, unet: Any, text_encoder: Any, train_text: bool) -> None:
        super().__init__()
        self.unet, self.text_encoder, self.train_text = unet, text_encoder, train_text
        text_encoder.requires_grad_(train_text)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden states, as Stable Diffusion conditions on them."""
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            return self.text_encoder(input_ids)[0]

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=self.encode(input_ids)).sample


class VaeModule(torch.nn.Module):
    """The VAE, returning the reconstruction and the KL of the posterior to the unit Gaussian."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(
        self, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels).latent_dist
        return self.vae.decode(posterior.sample(generator=generator)).sample, posterior.kl()


# --------------------------------------------------------------------------- the tasks


class DiffusionTask:
    """What the VAE and U-Net tasks share: the parts' sources (a preset built into the run folder once),
    the image preprocessing, the frozen parts on the device."""

    objective = "denoising"

    def __init__(self, cfg: Any, run: Any, info: DistInfo, device: str) -> None:
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
        """(preset, its configs): the tiny text encoder is shaped like the conditioning one."""
        from core.presets import TinyConfig

        text = (
            _config((self.cfg.text_encoder, "text_encoder"), "text encoder") if self.cfg.text_encoder else {}
        )
        clip = TinyConfig(
            text_width=text.get("hidden_size", 32),
            max_length=text.get("max_position_embeddings", 32),
            heads=text.get("num_attention_heads", 4),
            layers=text.get("num_hidden_layers", 2),
        )
        return self.cfg.preset, self.cfg.tiny, clip

    def shown(self, batch: Batch) -> torch.Tensor:
        return (batch["pixel_values"][:16].float().cpu() + 1) / 2

    def _vae(self) -> Any:
        from diffusers import AutoencoderKL

        return load(AutoencoderKL, self.src.vae, "VAE")

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def after_step(self, engine: Any) -> None:
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
    def check(cls, cfg: Any, manifest: Manifest) -> None:
        check_captions(manifest, cfg.data.train_split)
        check_parts(cfg.diffusion, sources(cfg.diffusion, Path(cfg.run.dir) / "base-model"), cls.objective)
        if cfg.diffusion.eval_clip and cls.objective == "denoising":
            try:
                Embedder.check(cfg.diffusion.eval_clip)
            except UserError as err:
                raise UserError(f"diffusion.eval_clip={err}") from None


class DenoisingTask(DiffusionTask):
    """The U-Net learns to denoise the VAE latents of the shards' images, conditioned on their captions."""

    def __init__(self, cfg: Any, run: Any, info: DistInfo, device: str) -> None:
        super().__init__(cfg, run, info, device)
        from diffusers import DDIMScheduler, DDPMScheduler
        from transformers import CLIPTokenizer

        self.tokenizer = load(CLIPTokenizer, (self.src.text, "tokenizer"), "tokenizer")
        self.max_length = min(
            self.tokenizer.model_max_length,
            _config((self.src.text, "text_encoder"), "text encoder").get("max_position_embeddings", 77),
        )
        extra: dict[str, Any] = (
            {"prediction_type": self.cfg.prediction_type} if self.cfg.prediction_type else {}
        )
        if self.cfg.zero_terminal_snr:
            extra.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        self.noise = load(DDPMScheduler, self.src.scheduler, "noise scheduler", **extra)
        self.prediction = self.noise.config.prediction_type
        where = Path(self.src.scheduler[0]) / self.src.scheduler[1]
        if self.prediction not in PREDICTIONS:
            raise UserError(
                f"{where}: prediction_type {self.prediction!r}; this trainer learns {' or '.join(PREDICTIONS)} "
                "(set diffusion.prediction_type)"
            )
        steps = self.noise.config.num_train_timesteps
        if max(self.cfg.eval_timesteps) >= steps:
            raise UserError(
                f"diffusion.eval_timesteps={self.cfg.eval_timesteps}: the schedule of {where} has {steps} "
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

    def build(self) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = load(UNet2DConditionModel, self.src.unet, "U-Net")
        text = load(CLIPTextModel, (self.src.text, "text_encoder"), "text encoder")
        if self.cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return UNetModule(unet, text, self.cfg.train_text_encoder)

    def _ready(self, engine: Any) -> None:
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
                moments = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.parameters
            posterior = DiagonalGaussianDistribution(moments)
            z = posterior.sample(generator=generator) if generator is not None else posterior.mode()
        return z.float() * self.scaling

    def _moments(self, pixels: torch.Tensor, keys: list[str]) -> torch.Tensor:
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            fresh = self.vae.encode(pixels[missing].to(self.device, self.dtype)).latent_dist.parameters
            self._cache.update({keys[i]: m for i, m in zip(missing, fresh)})
        return torch.stack([self._cache[key] for key in keys])

    def loss(self, engine: Any, batch: Batch, draw: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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

    def after_step(self, engine: Any) -> None:
        if self.ema is not None:
            self.ema.update()

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.ema.state() if self.ema is not None else {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self._pending_ema = state  # the EMA starts with the engine, on first use

    def evaluate(self, engine: Any, batches: Iterable[Batch], step: int) -> Evaluation:
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

    def validation_loss(self, engine: Any, batches: Iterable[Batch]) -> dict[str, float]:
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
        self, weights: dict[str, torch.Tensor], extra: list[dict[str, torch.Tensor]], out: Path
    ) -> None:
        """A complete diffusers folder: model_index.json, unet/ (the EMA weights when EMA is on), vae/,
        text_encoder/ (the one the U-Net was trained with), tokenizer/, scheduler/ (DDIM on the
        training schedule): StableDiffusionPipeline.from_pretrained and the sampler take it as it is."""
        module = self.build()
        ema = full_ema({k[len("unet.") :]: v for k, v in weights.items() if k.startswith("unet.")}, extra)
        state = {**weights, **{f"unet.{k}": v for k, v in ema.items()}}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"the checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
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

    def expected_export(self, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.ema is None:
            return live
        if (
            self.ema.partitioned
        ):  # rank 0 holds its partition only: the U-Net's EMA is checked by the export path
            return {k: v for k, v in live.items() if not k.startswith("unet.")}
        return {**live, **{f"unet.{k}": v.cpu() for k, v in self.ema.shadow.items()}}


class VaeTask(DiffusionTask):
    """The tiny VAE learns to reconstruct the shards' images: MSE plus a small KL to the unit Gaussian.
    Real runs keep a pretrained VAE frozen and never run this."""

    objective = "vae"

    def __init__(self, cfg: Any, run: Any, info: DistInfo, device: str) -> None:
        super().__init__(cfg, run, info, device)
        self.prep = DiffusionPrep(self.side, 0.0)
        self.collate = DiffusionCollate(None, 0)

    def build(self) -> torch.nn.Module:
        return VaeModule(self._vae())

    def loss(self, engine: Any, batch: Batch, draw: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.dtype = next(engine.module.parameters()).dtype
        pixels = batch["pixel_values"].to(self.device, self.dtype, non_blocking=True)
        recon, kl = engine(pixels, torch.Generator(self.device).manual_seed(draw))
        mse = reconstruction_loss(recon.float(), pixels.float(), self.cfg.vae_object_weight)
        return mse + self.cfg.kl_weight * kl.float().mean(), {"train/reconstruction_mse": mse.detach()}

    def evaluate(self, engine: Any, batches: Iterable[Batch], step: int) -> Evaluation:
        """Reconstruction MSE and PSNR (of the posterior's mean) over the eval split; a grid of
        originals above their reconstructions."""
        self.dtype = next(engine.module.parameters()).dtype
        vae = engine.module.vae
        sums, shown = [0.0, 0.0, 0.0], None
        for batch in batches:
            pixels = batch["pixel_values"].to(self.device, self.dtype)
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
        self, weights: dict[str, torch.Tensor], extra: list[dict[str, torch.Tensor]], out: Path
    ) -> None:
        """vae/: an AutoencoderKL whose scaling_factor is 1 / the std of its latents on the eval split's
        first images (Rombach et al. 2022 §4.3.2: unit-variance latents for the diffusion model)."""
        vae = self._vae()
        vae.load_state_dict({k[len("vae.") :]: v for k, v in weights.items() if k.startswith("vae.")})
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

    def expected_export(self, live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return live

    @classmethod
    def check(cls, cfg: Any, manifest: Manifest) -> None:
        check_parts(cfg.diffusion, sources(cfg.diffusion, Path(cfg.run.dir) / "base-model"), cls.objective)


def reconstruction_loss(recon: torch.Tensor, pixels: torch.Tensor, object_weight: float) -> torch.Tensor:
    """MSE, the pixels that differ from the image's border (its top and bottom two rows' median colour,
    by more than 0.4 in [-1, 1] units) weighted 1 + object_weight, normalised by the mean weight."""
    if not object_weight:
        return F.mse_loss(recon, pixels)
    border = torch.cat([pixels[:, :, :2].flatten(2), pixels[:, :, -2:].flatten(2)], 2).median(2).values
    weight = 1 + object_weight * ((pixels - border[:, :, None, None]).norm(dim=1, keepdim=True) > 0.4).float()
    return ((recon - pixels) ** 2 * weight).mean() / weight.mean()


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
    x = torch.stack(pixels).float().div_(127.5).sub_(1)
    return float(
        torch.cat([vae.encode(x[i : i + 64]).latent_dist.mode() for i in range(0, len(x), 64)]).std()
    )
