"""The modules DeepSpeed wraps: the U-Net with its conditioning text encoder, and the VAE."""

from __future__ import annotations

from typing import Any

import torch


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
