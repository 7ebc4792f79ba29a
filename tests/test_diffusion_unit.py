"""The denoising objective against diffusers' own pieces, and the diffusion data, checks and EMA."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from plumbing.config import ConfigError, load_config
from trainer.config import TrainConfig
from trainer.tasks.diffusion.data import DiffusionCollate, DiffusionPrep, square, to_unit_range
from trainer.tasks.diffusion.ema import full_ema
from trainer.tasks.diffusion.objective import denoising_loss, min_snr_weights, snr


def scheduler(prediction: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction
    )


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_loss_is_diffusers_add_noise_and_target(prediction: str) -> None:
    """Same generator draws, same noisy latents as scheduler.add_noise, target the noise or
    scheduler.get_velocity: a predictor that returns the exact target has zero loss."""
    sched = scheduler(prediction)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = {}

    def oracle(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(7)  # replay the draws the loss made
        noise = torch.randn(latents.shape, generator=g)
        steps = torch.randint(0, 1000, (4,), generator=g)
        assert torch.equal(t, steps)
        assert torch.allclose(noisy, sched.add_noise(latents, noise, steps))
        seen["ok"] = True
        return noise if prediction == "epsilon" else sched.get_velocity(latents, noise, steps)

    loss = denoising_loss(sched, latents, oracle, torch.Generator().manual_seed(7), prediction)
    assert seen and float(loss) == 0.0


def test_min_snr_weights_are_diffusers_compute_snr_clipped() -> None:
    from diffusers.training_utils import compute_snr

    sched = scheduler()
    t = torch.tensor([0, 10, 100, 500, 999])
    assert torch.allclose(snr(sched.alphas_cumprod, t), compute_snr(sched, t))
    s = compute_snr(sched, t)
    want = torch.stack([s, 5 * torch.ones_like(s)], dim=1).min(dim=1)[0]
    assert torch.allclose(min_snr_weights(s, 5.0, "epsilon"), want / s)
    assert torch.allclose(min_snr_weights(s, 5.0, "v_prediction"), want / (s + 1))


def test_min_snr_weights_are_finite_at_a_zero_terminal_snr() -> None:
    """rescale_betas_zero_snr makes the last timestep's SNR exactly 0: min(SNR, γ)/SNR is 0/0 there;
    its limit is 1 (a NaN would drop every batch that draws t = 999)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        beta_schedule="scaled_linear", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    s = snr(sched.alphas_cumprod, torch.tensor([0, 500, 999]))
    assert s[-1] == 0
    weights = min_snr_weights(s, 5.0, "epsilon")
    assert torch.isfinite(weights).all() and weights[-1] == 1
    assert torch.allclose(weights[:2], torch.minimum(s[:2], torch.tensor(5.0)) / s[:2])


def test_min_snr_weighting_changes_the_loss_as_defined() -> None:
    sched = scheduler()
    latents = torch.randn(3, 4, 8, 8)
    zero = lambda noisy, t: torch.zeros_like(noisy)  # noqa: E731
    plain = denoising_loss(sched, latents, zero, torch.Generator().manual_seed(3), "epsilon")
    weighted = denoising_loss(
        sched, latents, zero, torch.Generator().manual_seed(3), "epsilon", snr_gamma=5.0
    )
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    per = (noise**2).mean(dim=(1, 2, 3))
    assert torch.allclose(plain, per.mean())
    assert torch.allclose(
        weighted, (per * min_snr_weights(snr(sched.alphas_cumprod, t), 5.0, "epsilon")).mean()
    )


def test_caption_dropout_is_seeded_and_at_the_rate() -> None:
    prep = DiffusionPrep(16, 0.1)
    image = Image.new("RGB", (40, 30), "red")
    texts = [
        prep({"key": str(i), "image": image, "text": "a red square"}, draw=i, train=True)["text"]
        for i in range(2000)
    ]
    assert 0.07 < texts.count("") / len(texts) < 0.13
    again = [
        prep({"key": "1", "image": image, "text": "a red square"}, draw=i, train=True)["text"]
        for i in range(50)
    ]
    assert again == texts[:50]
    assert (
        prep({"key": "k", "image": image, "text": "x"}, draw=3, train=False)["text"] == "x"
    )  # never in eval


def test_images_are_centre_squares_in_minus_one_to_one() -> None:
    image = Image.new("RGB", (160, 120), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 120))  # a white stripe well outside the centre square
    pixels = square(image, 32)
    assert pixels.shape == (3, 32, 32) and int(pixels.max()) == 0
    tokenizer = type(
        "T", (), {"__call__": lambda self, *a, **k: type("O", (), {"input_ids": torch.zeros(1, 4)})()}
    )()
    batch = DiffusionCollate(tokenizer, 4)([{"key": "a", "pixel_values": pixels, "text": ""}])
    assert batch["pixel_values"].dtype == torch.uint8  # to [-1, 1] on the device
    assert float(to_unit_range(batch["pixel_values"]).min()) == -1.0


def test_full_ema_joins_zero3_partitions() -> None:
    weights = {"w": torch.zeros(3, 3), "b": torch.zeros(5)}
    whole = [{"ema.w": torch.arange(9.0).view(3, 3), "ema.b": torch.arange(5.0)}]
    assert torch.equal(full_ema(weights, whole)["w"], torch.arange(9.0).view(3, 3))
    # two ranks, each parameter split evenly and padded: 9 → 5 + 5, 5 → 3 + 3
    parts = [
        {"ema.w": torch.arange(5.0), "ema.b": torch.arange(3.0)},
        {"ema.w": torch.arange(5.0, 10.0), "ema.b": torch.tensor([3.0, 4.0, 0.0])},
    ]
    out = full_ema(weights, parts)
    assert torch.equal(out["w"], torch.arange(9.0).view(3, 3)) and torch.equal(out["b"], torch.arange(5.0))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["diffusion.caption_dropout=1.5"], "diffusion.caption_dropout: expected a fraction in [0, 1)"),
        (["diffusion.prediction_type=x0"], "diffusion.prediction_type"),
        (["diffusion.preset=sd-v3"], "diffusion.preset"),
        (["diffusion.eval_prompts=[]"], "diffusion.eval_prompts: expected a non-empty list"),
        (["diffusion.eval_timesteps=[]"], "diffusion.eval_timesteps: expected a non-empty list"),
        (["train.objective=unet"], 'expected "classification", "contrastive", "vae" or "denoising"'),
    ],
)
def test_bad_diffusion_config_names_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(
            TrainConfig, None, ["train.objective=denoising", "data.manifest=m", "run.dir=r", *overrides]
        )
