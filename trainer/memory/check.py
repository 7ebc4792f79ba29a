"""The memory plan of a config, as `python -m trainer --check` (every launcher's pre-flight and
DRY_RUN) prints it and the trainer logs it: the model's skeleton measured on the meta device
(trainer/memory/shapes.py), the arithmetic of trainer/memory/estimate.py, the memory this node has
(each GPU's on CUDA; on CPU the node's RAM, which its ranks share), and a verdict that names the
smallest change that would fit."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from core.manifest import Manifest
from trainer.config import TrainConfig
from trainer.memory.estimate import (
    HEADROOM,
    LOADER_WORKER,
    MemoryPlan,
    Setting,
    gib,
    plan,
)
from trainer.memory.host import gpu_memory, node_memory
from trainer.memory.shapes import ModelSize, measure
from trainer.tasks import task_class

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROWS = {
    "weights": "the model's weights (this rank's share)",
    "gradients": "",
    "optimizer": "fp32 master copy and Adam's two moments",
    "deepspeed": "DeepSpeed's buckets and copies",
    "activations": "kept for backward, at the micro-batch",
    "task": "EMA, frozen VAE beside the engine",
    "runtime": "the process itself",
}
# Which key turns on gradient checkpointing for each task (the VAE task has none).
CHECKPOINTING = {
    "classification": "model.gradient_checkpointing",
    "contrastive": "model.gradient_checkpointing",
    "denoising": "diffusion.gradient_checkpointing",
}


@dataclass(frozen=True)
class Verdict:
    plan: MemoryPlan
    size: ModelSize
    lines: list[str]  # the plan as --check prints it
    refusal: str  # one line naming the smallest change that fits ("" when it fits)


def setting_of(cfg: TrainConfig, world: int, per_node: int, cuda: bool) -> Setting:
    d = cfg.deepspeed
    return Setting(
        d.zero_stage,
        d.precision,
        world,
        per_node,
        cfg.train.batch_size,
        cfg.data.workers,
        cuda,
        d.offload_optimizer,
        d.offload_param,
        d.stage3_param_persistence_threshold,
    )


def checkpointing(cfg: TrainConfig) -> bool:
    key = CHECKPOINTING.get(cfg.train.objective, "")
    section, _, name = key.partition(".")
    return bool(key) and bool(getattr(getattr(cfg, section), name))


def with_checkpointing(cfg: TrainConfig) -> TrainConfig:
    section, _, name = CHECKPOINTING[cfg.train.objective].partition(".")
    return replace(cfg, **{section: replace(getattr(cfg, section), **{name: True})})


def memory_verdict(
    cfg: TrainConfig,
    world: int,
    per_node: int,
    manifest: Manifest | None,
    cuda: bool | None = None,
    capacity: int = 0,
) -> Verdict | None:
    """The plan of `cfg` on `world` ranks, `per_node` of them on each node, against `capacity` (0:
    this node's RAM, or on CUDA its first GPU's memory); None when the model's shapes cannot be read
    here (a hub id not in the local cache)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    capacity = capacity or (gpu_memory() if cuda else node_memory())
    host = node_memory() if cuda else 0
    with warnings.catch_warnings():  # transformers 5's deprecation of gradient_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        skeleton = task_class(cfg.train.objective).skeleton(cfg, manifest)
    if skeleton is None:
        return None
    dtype = DTYPES[cfg.deepspeed.precision]
    s = setting_of(cfg, world, per_node, cuda)
    size = measure(skeleton, s.batch, dtype)
    made = plan(size, s, capacity, host)
    refusal = "" if made.fits else _refusal(cfg, made, size, manifest, capacity, host)
    return Verdict(made, size, report(made, size), refusal)


def _refusal(
    cfg: TrainConfig, made: MemoryPlan, size: ModelSize, manifest: Manifest | None, capacity: int, host: int
) -> str:
    """One line: what the plan needs, what there is, and the smallest change that fits."""
    s = made.setting
    where = f"each GPU's {gib(made.capacity)}" if s.cuda else f"this node's {gib(made.capacity)} of RAM"
    need = f"{gib(made.per_rank)} per rank"
    if not s.cuda:
        need = f"{gib(made.node)} for the node's {s.per_node} ranks (up to {gib(made.per_rank)} each)"
    elif made.node <= HEADROOM * made.capacity:  # the GPUs would do; the host cannot build the model
        need, where = f"{gib(made.host)} of host RAM to build the model on {s.per_node} ranks", gib(host)
    fix = smallest_fix(cfg, size, s, manifest, capacity, host)
    return (
        f"memory: {s.describe()} needs {need}, more than {int(HEADROOM * 100)} % of {where}; "
        f"{fix or 'no one setting fits: more nodes, or a smaller model'}; run.check_memory=false runs it anyway"
    )


def smallest_fix(
    cfg: TrainConfig, size: ModelSize, s: Setting, manifest: Manifest | None, capacity: int, host: int
) -> str:
    """The first change that fits, smallest first: a higher ZeRO stage, gradient checkpointing,
    optimizer offload (CUDA: to the host), half the micro-batch (and so on; grad_accum keeps the
    global batch). Each is planned like the original (activations measured again where they change)."""
    dtype, task = DTYPES[s.precision], task_class(cfg.train.objective)

    def measured(c: TrainConfig, batch: int) -> ModelSize | None:
        with warnings.catch_warnings():  # as in memory_verdict: transformers 5's FutureWarning
            warnings.simplefilter("ignore", FutureWarning)
            skeleton = task.skeleton(c, manifest)
        return measure(skeleton, batch, dtype) if skeleton is not None else None

    tries: list[tuple[str, Callable[[], tuple[ModelSize | None, Setting]]]] = [
        (f"deepspeed.zero_stage={z}", lambda z=z: (size, replace(s, stage=z))) for z in range(s.stage + 1, 4)
    ]
    if cfg.train.objective in CHECKPOINTING and not checkpointing(cfg):
        key = CHECKPOINTING[cfg.train.objective]
        tries.append((f"{key}=true", lambda: (measured(with_checkpointing(cfg), s.batch), s)))
    if s.cuda and not s.offload_optimizer:
        offload = replace(s, stage=max(1, s.stage), offload_optimizer=True)
        tries.append(("deepspeed.offload_optimizer=true", lambda: (size, offload)))
    batch = s.batch // 2
    while batch >= 1:
        accum = cfg.train.grad_accum * s.batch // batch
        change = f"train.batch_size={batch}" + (f" train.grad_accum={accum}" if s.batch % batch == 0 else "")
        tries.append((change, lambda m=batch: (measured(cfg, m), replace(s, batch=m))))
        batch //= 2
    for change, make in tries:
        this, setting = make()
        if this is not None and (p := plan(this, setting, capacity, host)).fits:
            return f"{change} would fit ({gib(p.node)} {'a GPU' if s.cuda else 'for the node'})"
    return ""


def unplanned(cfg: TrainConfig) -> str:
    """Why a config has no plan: its model's shapes are not known offline."""
    name = cfg.model.name if cfg.train.objective in ("classification", "contrastive") else cfg.diffusion.model
    return f"the shapes of {name} are not known here: a preset, or a folder with its config.json, has them"


def report(made: MemoryPlan, size: ModelSize) -> list[str]:
    """The plan as --check prints it."""
    s = made.setting
    lines = [
        f"memory plan per rank ({s.describe()}; {size.params / 1e6:.1f} M parameters, "
        f"{size.trainable / 1e6:.1f} M training):"
    ]
    lines += [f"  {name:18s} {gib(made.rows[name]):>10s}   {why}".rstrip() for name, why in ROWS.items()]
    named = {
        "train": "training peak",
        "build": "building the model",
        "initialize": "DeepSpeed's initialize",
        "export": "the export",
    }
    lines += [f"  {named[k]:18s} {gib(v):>10s}" for k, v in made.phases.items()]
    verdict = "fits" if made.fits else "DOES NOT FIT"
    usable = f"{int(HEADROOM * 100)} % usable"
    if s.cuda:
        lines.append(f"each GPU: {gib(made.node)} of {gib(made.capacity)} ({usable}): {verdict}")
        lines.append(
            f"host RAM: {s.per_node} ranks building the model at once need {gib(made.host)} of "
            f"{gib(made.host_capacity)}"
        )
    else:
        workers = s.per_node * s.workers
        lines.append(
            f"this node: {s.per_node} ranks (rank 0 alone exports) + {workers} loader workers × "
            f"{gib(LOADER_WORKER)} = {gib(made.node)} of {gib(made.capacity)} RAM ({usable}): {verdict}"
        )
    return lines
