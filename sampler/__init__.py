"""Stage 3: bulk text-to-image from prompt files with a latent-diffusion pipeline built from its parts,
optionally conditioned by the trainer's fine-tuned CLIP text encoder."""
