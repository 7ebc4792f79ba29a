"""The GPU drill: the commands users run, on one GPU, at real model sizes, random-init from configs
(no network), in ONE call of at most 8 minutes; it writes bench/results/gpu-<device>-<date>.json and
prints a table with every step's outcome and the targets met or MISSED.

    python -m bench.gpu --budget 420    # one H100/H200 (bench/gpu_wheels.sh: a bare machine's packages)
    python -m bench.gpu --tiny          # the same code on tiny models, on the CPU (the test suite runs it)

Each step is a real entry point or measuring script in a subprocess, printed before it runs ($ …). A
lent GPU comes for minutes, rarely, so a failed step never stops the drill: every later step runs, a
step that needs an earlier one's output is marked "not run" (naming what it needed), and the drill
ends with a table of every step's outcome and the first lines of each failure's log, exiting non-zero
if any step failed. `--steps a,b` reruns only the named steps (and what they need); `--budget S`
marks the steps that would start after S seconds "not run", and stops a step still running a minute
later, rather than outlive the machine's lease (results file and table are written either way).
The steps, what decides first (bench/gpu/steps.py):

1. data: `python -m data_prep synthetic` and `python -m data_prep flickr8k`: Flickr8k-format shards
   of 256×256 JPEGs (decoded and cropped to 224 px by the loader, as real photos would be).
2. train-zero2, export-zero2: `torchrun --nproc-per-node 1 -m trainer` on configs/flickr8k.yaml with a
   random-init CLIP ViT-B/32 (`model.preset=vit-b-32`), bf16, ZeRO-2, batch 256, 8 loader workers,
   open_clip's augmentation (a random resized crop of 0.9–1): samples/s, model FLOP utilisation
   against the card's dense bf16 peak, peak memory beside the ZeRO paper's model-state estimate
   ((2+2+K)·Ψ/N bytes, K=12 for Adam, N=1 GPU), the data-wait fraction (all log windows, and those
   without an epoch start: this data set's epochs are 16 steps, each starting fresh loader workers),
   from the run's own TensorBoard; then the export loaded with `transformers.CLIPModel.from_pretrained`.
3. clip-step (bench/gpu/clip_step.py): the same model's training step alone, in-memory batches of 64,
   256 and 512: samples/s and MFU per batch; a torch.profiler summary of five steady steps at 256 (the
   GPU's busy fraction, the top kernels, the host's CPU time and waits per step); beside it at 256 the
   harness under ZeRO-0 (one GPU partitions nothing) and a bare loop (fp32 weights under bf16
   autocast, fused AdamW: open_clip's way), profiled too.
4. openclip: open_clip 3.3.0's own trainer (`open_clip_train.main` through bench/peer_openclip.py's
   launcher) on the same shards, batch, precision, augmentation and loader workers, its
   `--dataset-resampled` loader: steady samples/s from its TensorBoard (`--openclip-site`: where
   open_clip and its trainer's imports are installed; bench/gpu_wheels.sh carries them).
5. train-decode-gpu: the ZeRO-2 run again (30 steps) with `data.decode=gpu`: the workers read JPEG
   headers and pass the bytes, nvJPEG decodes the batch in the training process: samples/s, data-wait.
6. unet-step (bench/train_diffusion.py): the U-Net training step of random-init Stable Diffusion v1
   parts (512 px, bf16, ZeRO-2, gradient checkpointing, EMA) against a bare diffusers-style loop.
7. sample-batch8, sample-batch1: `python -m sampler` on those parts, 512×512, 25 steps, fp16, against
   diffusers' StableDiffusionPipeline on the same folder and settings in this process: images/s
   after the first batch (two steady batches at batch 8), and the ratio.
8. What proves the rest on a GPU, last: resume-zero2 (`resume=auto`), universal-zero2 (the ZeRO-2
   run's last checkpoint resumed in a new run folder through DeepSpeed's universal checkpoint format,
   forced on one GPU with `deepspeed.overrides.checkpoint.load_universal=true`, `train.grad_accum=2`:
   the conversion and the universal load under CUDA and NCCL at world size 1; another number of ranks
   needs two GPUs, the CPU tests run 2 → 1 and 1 → 2 over gloo), train-zero3 and export-zero3, the
   U-Net's own run (configs/flickr8k-unet.yaml with its loader, checkpoint and export), and
   `python -m retrieval caption` of the test split with the ViT-B/32 export.
"""

from bench.gpu.report import main
from bench.gpu.steps import NEEDS, STEPS, Drill, with_needs

__all__ = ["NEEDS", "STEPS", "Drill", "main", "with_needs"]
