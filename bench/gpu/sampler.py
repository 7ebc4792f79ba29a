"""The drill's sampler steps: `python -m sampler` against diffusers' StableDiffusionPipeline on the same
folder, dtype, scheduler, steps, guidance, size and batch, images/s after the first batch."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu.drill import Base, Size, short, torch_cuda


class Sampler(Base):
    def sample(self, batch: int) -> dict[str, float]:
        """The sampler on the drill's diffusion parts (built by the U-Net step, or here if it did not),
        enough prompts for two steady batches after the first, against diffusers in this process."""
        s = self.size
        model = self.work / "sd"
        prompts = self.work / f"prompts-{batch}.txt"
        count = s.prompts if batch == 8 else max(3, s.prompts // 4)
        prompts.write_text("".join(f"a red circle number {i} on a grey background\n" for i in range(count)))
        folder = self.work / f"samples-b{batch}"
        self.run(
            f"sample-batch{batch}",
            [
                sys.executable,
                "-m",
                "sampler",
                "--config",
                "configs/sample.yaml",
                f"model={model}",
                f"preset={s.diffusion}",
                f"prompts=[{prompts}]",
                f"out_dir={folder}",
                f"batch_size={batch}",
                f"steps={s.sample_steps}",
                f"height={s.side}",
                f"width={s.side}",
                "guidance_scale=7.5",
                "scheduler=ddim",
                "contact_sheet=0",
                "tensorboard=false",
            ],
            600,
        )
        job = json.loads((folder / "summary.json").read_text())["images_per_s"]
        ours = steady_rate(folder / "manifest.jsonl", batch)
        theirs = diffusers_rate(model, batch, s)
        if torch_cuda():
            import torch

            torch.cuda.empty_cache()
        return {"ours": ours, "ours_whole_job": job, "diffusers": theirs, "ratio": ours / theirs}


def steady_rate(manifest: Path, batch: int) -> float:
    """Images/s of the sampler's batches after its first (the first pays CUDA's warm-up: kernel
    selection, cuBLAS handles), from each image's pipeline seconds in the run's manifest.jsonl: the
    rate a bulk job runs at, as diffusers' is timed after a warm-up call. The whole job's rate is
    reported beside it (on the H200 run of 2026-12-04, 16 images: 1.52 against 4.78 for diffusers)."""
    records = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    later = records[batch:] or records
    return len(later) / sum(r["seconds"] for r in later)


def diffusers_rate(model: Path, batch: int, size: Size) -> float:
    """diffusers' StableDiffusionPipeline on the same folder and settings: images/s (after a warm-up),
    the best of two calls."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    print(
        f"$ diffusers.StableDiffusionPipeline.from_pretrained({short(str(model))}), batch {batch}", flush=True
    )
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        model, dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of a red circle number {i} on a grey background" for i in range(batch)]

    def once() -> float:
        start = time.perf_counter()
        pipe(
            prompts,
            num_inference_steps=size.sample_steps,
            guidance_scale=7.5,
            height=size.side,
            width=size.side,
            output_type="pil",
        )
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    return batch / min(once() for _ in range(2))


def details(results: dict[str, Any]) -> list[str]:
    """The sampler's lines of the drill's table."""
    lines = []
    for b, r in results.items():
        lines.append(
            f"  batch {b[5:]}: {r['ours']:.2f} vs {r['diffusers']:.2f} (whole job, warm-up included: {r['ours_whole_job']:.2f})"
        )
    return lines
