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

The room, one module per concern: config (DiffusionConfig), objective (the loss maths, pure),
data (preprocessing and collation), parts (where each part comes from, shape checks, loading),
modules (what DeepSpeed wraps), ema, base (what both tasks share), denoising (the U-Net task),
vae (the VAE task). The package imports nothing, so that its config stays a leaf.
"""
