#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded default, offline, on this machine's CPUs.
#   1. synthetic data in the official CIFAR-10 / Flickr8k formats → WebDataset shards
#   2. train the tiny CLIPFineTuner on both CLIP tasks: launch/torchrun.sh, 2 processes, DeepSpeed
#      (CIFAR-10 under ZeRO-2; Flickr8k under ZeRO-0, the stage its many small steps run fastest on CPU)
#   3. train the tiny VAE, then the tiny U-Net conditioned by the fine-tuned text encoder (same harness)
#   4. every run's own evaluation, before and after
#   5. draw configs/prompts/demo.txt from the U-Net's export; CLIP score and R-precision of the pictures
#   6. caption a few test images with the fine-tuned CLIP, from the training captions
# Rerunning it reuses what is done (data, checkpoints, images). DATA, RUNS, SAMPLES, CAPTIONS move outputs;
# SEED sets every training run's run.seed (heads, data order, augmentations, noise draws) and the
# tiny models' random initialisation (model.tiny.seed, diffusion.tiny.seed).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHON=${PYTHON:-.venv/bin/python}
DATA=${DATA:-data/demo}
RUNS=${RUNS:-runs}
SAMPLES=${SAMPLES:-samples/demo}
CAPTIONS=${CAPTIONS:-captions/demo}
SEED=${SEED:-0}
start=$(date +%s)
stage() { printf '\n== %s  (%ds)\n' "$1" "$(( $(date +%s) - start ))"; }

stage "1/6 data: synthetic CIFAR-10 and Flickr8k in their official formats → WebDataset shards"
"$PYTHON" -m data_prep synthetic --out "$DATA/raw"
"$PYTHON" -m data_prep cifar10 --source "$DATA/raw/cifar-10-python.tar.gz" --no-verify --out "$DATA/cifar10" --workers 2
"$PYTHON" -m data_prep flickr8k --images "$DATA/raw/Flickr8k_Dataset.zip" --captions "$DATA/raw/Flickr8k_text.zip" \
  --out "$DATA/flickr8k" --workers 2 --image-size 64

stage "2/6 train CLIP: CIFAR-10 classification, then Flickr8k contrastive (torchrun, 2 processes, ZeRO-2 then ZeRO-0, CPU)"
CONFIG=configs/demo-cifar10.yaml NPROC=2 launch/torchrun.sh \
  "data.manifest=$DATA/cifar10/manifest.json" "run.dir=$RUNS/demo-cifar10" "run.seed=$SEED" "model.tiny.seed=$SEED"
CONFIG=configs/demo-flickr8k.yaml NPROC=2 launch/torchrun.sh \
  "data.manifest=$DATA/flickr8k/manifest.json" "run.dir=$RUNS/demo-flickr8k" "run.seed=$SEED" "model.tiny.seed=$SEED"

stage "3/6 train text-to-image: the tiny VAE, then the tiny U-Net conditioned by the fine-tuned text encoder"
CONFIG=configs/demo-vae.yaml NPROC=2 launch/torchrun.sh \
  "data.manifest=$DATA/flickr8k/manifest.json" "run.dir=$RUNS/demo-vae" "run.seed=$SEED" "diffusion.tiny.seed=$SEED"
CONFIG=configs/demo-diffusion.yaml NPROC=2 launch/torchrun.sh \
  "data.manifest=$DATA/flickr8k/manifest.json" "run.dir=$RUNS/demo-diffusion" "run.seed=$SEED" "diffusion.tiny.seed=$SEED" "diffusion.vae=$RUNS/demo-vae/export" \
  "diffusion.text_encoder=$RUNS/demo-flickr8k/export" "diffusion.eval_clip=$RUNS/demo-flickr8k/export"

stage "4/6 evaluation before and after training (chance: top-1 10 %, R@1 0.2 %, R-precision 1/8)"
"$PYTHON" -m trainer.report "$RUNS/demo-cifar10" "$RUNS/demo-flickr8k" "$RUNS/demo-vae" "$RUNS/demo-diffusion"

stage "5/6 sample: the prompts of configs/prompts/demo.txt, drawn by the U-Net's export"
"$PYTHON" -m sampler --config configs/sample.yaml "model=$RUNS/demo-diffusion/export" "preset=''" "out_dir=$SAMPLES" \
  "clip_score=$RUNS/demo-flickr8k/export"

stage "6/6 caption: five test images, each with the best of the training captions (and its own first caption)"
"$PYTHON" -m retrieval caption --export "$RUNS/demo-flickr8k/export" --manifest "$DATA/flickr8k/manifest.json" \
  --bank "$DATA/flickr8k/manifest.json" --out "$CAPTIONS" limit=5 top_k=3 show=5

stage "done"
echo "exports:      $RUNS/demo-cifar10/export  $RUNS/demo-flickr8k/export"
echo "samples:      $SAMPLES/images  $SAMPLES/manifest.jsonl  $SAMPLES/contact_sheet.png"
echo "captions:     $CAPTIONS/captions.jsonl  $CAPTIONS/sheets/"
echo "watch it:     .venv/bin/tensorboard --logdir $RUNS --host 127.0.0.1 --port 6006"
