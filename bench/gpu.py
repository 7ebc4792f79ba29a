"""GPU benchmark with real model sizes, random-init from configs (no network): one table + JSON.

    python -m bench.gpu --out bench/results/gpu-h100.json       # one H100/H200: ≤ 8 minutes
    python -m bench.gpu --tiny                                   # a CPU smoke run of the same code (tests)

1. Trainer, contrastive task, DeepSpeed ZeRO-2 bf16, one GPU, large batch: samples/s and model FLOP
   utilisation for CLIP ViT-B/32 and ViT-L/14 (FLOPs: 6 × parameters × tokens, plus attention
   scores, PaLM appendix B; peak: the card's dense bf16 rate).
2. Peak memory per ZeRO stage (0–3) for ViT-B/32 at that batch. On one GPU ZeRO partitions nothing,
   so the stages differ only by their own buffers: the numbers bound what a multi-GPU run needs.
3. Sampler: images/s with an SD-v1-sized U-Net and VAE and the ViT-L/14 text encoder, 512×512,
   25 DDIM steps, fp16, batch 1 and 8.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from plumbing.dist import DistInfo, init_process_group
from plumbing.logs import setup_logging
from trainer.monitor import peak_memory_mb

# Dense bf16 peak, TFLOP/s (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

CLIP_SIZES = {
    "ViT-B/32": dict(
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=224,
            patch_size=32,
        ),
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        projection_dim=512,
    ),
    "ViT-L/14": dict(
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        ),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        projection_dim=768,
    ),
}
TINY_CLIP = dict(
    vision=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    ),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    projection_dim=32,
)


def build_clip(spec: dict[str, Any]) -> Any:
    from transformers import CLIPConfig, CLIPModel

    text = dict(spec["text"], vocab_size=49408, max_position_embeddings=77)
    return CLIPModel(
        CLIPConfig(text_config=text, vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    )


def train_flops_per_sample(spec: dict[str, Any]) -> float:
    """6 × (non-embedding parameters) × tokens + attention (12 × layers × width × tokens²) per tower."""
    total = 0.0
    v, t = spec["vision"], spec["text"]
    for tower, tokens in ((v, (v["image_size"] // v["patch_size"]) ** 2 + 1), (t, 77)):
        d, layers, ff = tower["hidden_size"], tower["num_hidden_layers"], tower["intermediate_size"]
        params = layers * (4 * d * d + 2 * d * ff)
        total += 6 * params * tokens + 12 * layers * d * tokens * tokens
    return total


def bench_trainer(
    spec: dict[str, Any], batch: int, stage: int, steps: int, device: str, precision: str
) -> dict[str, float]:
    from plumbing.config import load_config
    from trainer.config import TrainConfig
    from trainer.engine import BatchSizes, build_engine
    from trainer.model import CLIPFineTuner, HeadSpec
    from trainer.objectives import contrastive_loss

    cfg = load_config(
        TrainConfig,
        None,
        [
            "run.dir=/tmp/bench-gpu",
            "data.manifest=none",
            "train.objective=contrastive",
            f"deepspeed.zero_stage={stage}",
            f"deepspeed.precision={precision}",
        ],
    )
    clip = build_clip(spec)
    d = spec["projection_dim"]
    model = CLIPFineTuner(clip, HeadSpec("linear", d, d, 0))
    engine = build_engine(
        model, cfg.model, cfg.deepspeed, cfg.optim, BatchSizes(batch, 1, 1), 1000, device.startswith("cuda")
    )
    dtype = next(engine.module.parameters()).dtype
    size = spec["vision"]["image_size"]
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    ids = torch.randint(0, 49407, (batch, 77), device=device)
    mask = torch.ones_like(ids)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        image, text, scale = engine(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        loss = contrastive_loss(image.float(), text.float(), scale.float())
        engine.backward(loss)
        engine.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    step = sorted(times)[len(times) // 2]
    peak = peak_memory_mb(device) / 1024  # CUDA: allocated; CPU: the process's peak RSS
    engine.destroy()
    del engine, model, clip
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"samples_per_s": batch / step, "step_s": step, "peak_memory_gib": peak}


def bench_sampler(batch: int, steps: int, size: int, device: str, tiny: bool) -> float:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sampler.pipeline import Components, LatentDiffusion, Request
    from sampler.tiny import sd_scheduler
    from trainer.tiny import tiny_tokenizer

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    if tiny:
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
        )
        text_cfg = CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
        )
    else:  # Stable Diffusion v1 shapes: diffusers' defaults are SD v1's U-Net; SD v1's VAE; ViT-L/14's text tower
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
        )
        text_cfg = CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        )
    tokenizer = tiny_tokenizer(77)  # the offline tokenizer; a real vocabulary embeds at the same speed
    text_cfg.vocab_size = len(tokenizer)
    text = CLIPTextModel(text_cfg)
    scheduler = sd_scheduler()
    for part in (unet, vae, text):
        part.to(device, dtype).eval()
    pipe = LatentDiffusion(Components(tokenizer, text, unet, vae, scheduler), device, dtype)
    request = Request(
        [f"a photo number {i}" for i in range(batch)],
        [""] * batch,
        list(range(batch)),
        steps,
        7.5,
        size,
        size,
    )
    pipe(request)  # warm-up
    start = time.perf_counter()
    pipe(request)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes, a few steps, CPU-friendly: checks the script runs"
    )
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    setup_logging()
    device = init_process_group(DistInfo.from_env())
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), float("nan"))
    precision = "bf16" if device.startswith("cuda") else "fp32"
    results: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "precision": precision,
        "trainer": {},
        "memory": {},
        "sampler": {},
    }
    specs = {"tiny": TINY_CLIP} if args.tiny else CLIP_SIZES
    batches = {"tiny": 8, "ViT-B/32": 512, "ViT-L/14": 128}
    steps = 2 if args.tiny else 20
    for label, spec in specs.items():
        r = bench_trainer(spec, batches[label], 2, steps, device, precision)
        r["mfu"] = r["samples_per_s"] * train_flops_per_sample(spec) / (peak * 1e12)
        results["trainer"][label] = r
    first = next(iter(specs))
    for stage in (0, 1, 2, 3):
        results["memory"][f"zero{stage}"] = bench_trainer(
            specs[first], batches[first], stage, 2, device, precision
        )["peak_memory_gib"]
    size, sample_steps = (16, 2) if args.tiny else (512, 25)
    for batch in (1, 8):
        results["sampler"][f"batch{batch}"] = bench_sampler(batch, sample_steps, size, device, args.tiny)

    print(f"device: {name} ({precision}); peak {peak} TFLOP/s")
    print(f"{'trainer (contrastive, ZeRO-2, 1 GPU)':40s} {'samples/s':>10s} {'MFU':>7s} {'peak GiB':>9s}")
    for label, r in results["trainer"].items():
        print(f"  {label:38s} {r['samples_per_s']:10.1f} {r['mfu']:7.1%} {r['peak_memory_gib']:9.2f}")
    print(
        "peak memory per ZeRO stage ("
        + first
        + "): "
        + ", ".join(f"{k} {v:.2f} GiB" for k, v in results["memory"].items())
    )
    print(
        f"sampler ({size}×{size}, {sample_steps} steps): "
        + ", ".join(f"{k} {v:.2f} images/s" for k, v in results["sampler"].items())
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
