"""Stage 2: the training harness. One loop, engine (DeepSpeed ZeRO), epoch plan, checkpoints with exact
resume, signals, TensorBoard and export serve every task: CLIP fine-tuning with projection heads
(classification, contrastive), the diffusion U-Net (denoising) and the offline default's tiny VAE
(trainer/tasks/). It reads data_prep's shards and writes checkpoints and an export."""
