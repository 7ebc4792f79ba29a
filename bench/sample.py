"""Benchmark: the sampler's pipeline against diffusers' StableDiffusionPipeline on the same components,
prompts, seeds, batch and steps, in the same run; and batch 1 against batch 8.

    python -m bench.sample [--model DIR] [--steps 20] [--repeat 5]

Default components: the tiny offline set (built in a temporary folder). Target: ≥ 0.97 of the direct
pipeline's images/s. Calls alternate and the median counts. Writes bench/results/sample-<cpu>.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Target, machine, slug, write_results
from core.presets import TinyConfig, TinyDiffusionConfig, build_diffusion
from sampler.pipeline import LatentDiffusion, Request, load_components


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="", help="a diffusers folder (default: the tiny set)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--out", default="", help="results file (default bench/results/sample-<cpu>.json)")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(Path(tmp) / "tiny")
        if not args.model:
            build_diffusion(
                Path(model), "tiny", TinyDiffusionConfig(), TinyConfig(image_size=64, patch_size=8)
            )
        ours = LatentDiffusion(
            load_components(model, None, "ddim", "cpu", torch.float32), "cpu", torch.float32
        )
        pipe = StableDiffusionPipeline.from_pretrained(
            model, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)

        def request(batch: int) -> Request:
            prompts = [f"a red circle number {i}" for i in range(batch)]
            return Request(prompts, [""] * batch, list(range(batch)), args.steps, 7.5, args.size, args.size)

        def run_ours(batch: int) -> None:
            ours(request(batch))

        def run_pipe(batch: int) -> None:
            r = request(batch)
            gens = [torch.Generator().manual_seed(s) for s in r.seeds]
            pipe(
                r.prompts,
                negative_prompt=r.negative_prompts,
                generator=gens,
                num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale,
                height=r.height,
                width=r.width,
                output_type="np",
            )

        times: dict[str, list[float]] = {"ours-8": [], "pipe-8": [], "ours-1": []}
        runners = {
            "ours-8": lambda: run_ours(8),
            "pipe-8": lambda: run_pipe(8),
            "ours-1": lambda: run_ours(1),
        }
        for fn in runners.values():
            fn()  # warm-up
        for _ in range(args.repeat):
            for name, fn in runners.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    rate = {name: (8 if name.endswith("-8") else 1) / statistics.median(t) for name, t in times.items()}
    targets = [Target("sampler / StableDiffusionPipeline, batch 8", rate["ours-8"] / rate["pipe-8"], 0.97)]
    text = "\n".join(
        [
            f"images/s, {args.size}×{args.size}, {args.steps} DDIM steps, guidance on, CPU fp32 (median of {args.repeat})",
            f"  {'StableDiffusionPipeline, batch 8':34s} {rate['pipe-8']:8.2f}",
            f"  {'sampler pipeline, batch 8':34s} {rate['ours-8']:8.2f}",
            f"  {'sampler pipeline, batch 1':34s} {rate['ours-1']:8.2f}",
            *[t.line() for t in targets],
        ]
    )
    print(text)
    name = f"sample-{slug(machine()['cpu'])}"
    print(f"wrote {write_results(name, rate, targets, text, args.out)}")


if __name__ == "__main__":
    main()
