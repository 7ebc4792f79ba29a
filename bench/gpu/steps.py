"""The drill's steps in their order: what decides the targets first (the data, the trainer's run, the
CLIP step alone, open_clip, the U-Net step, the sampler), then what proves the rest works on a GPU
(resume, universal resume, ZeRO-3, the U-Net's own run with its checkpoint, retrieval). `--budget`
leaves the late ones "not run" rather than outlive the machine's lease."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.gpu.clip import Clip
from bench.gpu.sampler import Sampler
from bench.gpu.unet import Unet

STEPS = (
    "data-synthetic data-flickr8k train-zero2 export-zero2 clip-step openclip train-decode-gpu unet-step sample-batch8 "
    "sample-batch1 resume-zero2 universal-zero2 train-zero3 export-zero3 train-unet retrieval-caption"
).split()
NEEDS = {  # what --steps adds for a step to have its inputs
    "data-flickr8k": ["data-synthetic"],
    "train-zero2": ["data-flickr8k"],
    "export-zero2": ["train-zero2"],
    "clip-step": ["train-zero2"],
    "openclip": ["data-flickr8k"],
    "train-decode-gpu": ["data-flickr8k"],
    "resume-zero2": ["train-zero2"],
    "universal-zero2": ["resume-zero2"],
    "train-zero3": ["data-flickr8k"],
    "export-zero3": ["train-zero3"],
    "train-unet": ["data-flickr8k"],
    "retrieval-caption": ["export-zero2"],
}


def with_needs(steps: list[str]) -> set[str]:
    """The named steps and, transitively, the steps whose output they read."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise SystemExit(
            f"bench.gpu: --steps: unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}"
        )
    out: set[str] = set()
    todo = list(steps)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo += NEEDS.get(name, [])
    return out


class Drill(Clip, Unet, Sampler):
    def all(
        self, only: set[str] | None = None, peak: float = float("nan"), site: Path | None = None
    ) -> dict[str, Any]:
        """Every step in order, each recorded; `only`: these steps, and what they need."""
        results: dict[str, Any] = {"trainer": {}, "sampler": {}}

        def step(name: str, action: Any) -> Any:
            if only is not None and name not in only:
                return None
            return self.attempt(name, action, tuple(NEEDS.get(name, ())))

        step("data-synthetic", lambda: self.data(0))
        step("data-flickr8k", lambda: self.data(1))
        step("train-zero2", lambda: self.train(2))
        if (r := step("export-zero2", lambda: self.export(2))) is not None:
            results["trainer"]["zero2"] = r
        results["clip_step"] = step("clip-step", lambda: self.clip_step(peak))
        results["openclip"] = step("openclip", lambda: self.openclip(site or Path("/nonexistent")))
        results["decode_gpu"] = step("train-decode-gpu", self.decode_on_device)
        results["unet_step"] = step("unet-step", self.unet_step)
        for batch in (8, 1):
            if (r := step(f"sample-batch{batch}", lambda b=batch: self.sample(b))) is not None:
                results["sampler"][f"batch{batch}"] = r
        step("resume-zero2", lambda: self.resume(2))
        results["universal"] = step("universal-zero2", self.universal)
        step("train-zero3", lambda: self.train(3, self.size.steps // 2))
        if (r := step("export-zero3", lambda: self.export(3))) is not None:
            results["trainer"]["zero3"] = r
        results["unet"] = step("train-unet", self.unet)
        results["retrieval"] = step(
            "retrieval-caption", lambda: self.retrieval(self.work / "zero2" / "export")
        )
        return results
