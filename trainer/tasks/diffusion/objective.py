"""The diffusion objectives, pure functions of tensors: Stable Diffusion's denoising loss (noise or
velocity target, min-SNR-γ weighting, noise offset) and the VAE's reconstruction loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


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


def reconstruction_loss(recon: torch.Tensor, pixels: torch.Tensor, object_weight: float) -> torch.Tensor:
    """MSE, the pixels that differ from the image's border (its top and bottom two rows' median colour,
    by more than 0.4 in [-1, 1] units) weighted 1 + object_weight, normalised by the mean weight."""
    if not object_weight:
        return F.mse_loss(recon, pixels)
    border = torch.cat([pixels[:, :, :2].flatten(2), pixels[:, :, -2:].flatten(2)], 2).median(2).values
    weight = 1 + object_weight * ((pixels - border[:, :, None, None]).norm(dim=1, keepdim=True) > 0.4).float()
    return ((recon - pixels) ** 2 * weight).mean() / weight.mean()
