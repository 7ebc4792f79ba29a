"""DiffusionConfig: the `diffusion:` section of a training job (both diffusion tasks read it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.presets import DIFFUSION_PRESETS, TinyDiffusionConfig
from plumbing.config import require

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
