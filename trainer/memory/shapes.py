"""What the memory plan knows of a model, read from the task's skeleton: its model built on the meta
device (exact shapes, no memory, a second or two even at ViT-L/14) and one training forward of it
at the configured micro-batch, also on the meta device.

Activations are what autograd keeps for the backward pass: every tensor it saves, counted once per
storage (torch.autograd.graph.saved_tensors_hooks sees each one as the forward saves it; the
module's own weights excluded). Gradient checkpointing saves only each checkpointed block's inputs,
and the hooks see exactly that. Beside them the step holds, for a moment, the largest operation's
inputs and output (and in backward their gradients): `transient` is the largest such sum over the
model's leaf modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.engine import model_width
from trainer.tasks.base import Skeleton


@dataclass(frozen=True)
class ModelSize:
    trainable: int  # parameters the optimizer updates
    frozen: int  # parameters of the engine's module that do not train (ZeRO-3 partitions them too)
    beside: int  # parameters the task holds beside the engine (the diffusion task's frozen VAE)
    ema: int  # parameters the task keeps a moving average of (fp32)
    hidden: int  # the model's hidden size (trainer.engine.model_width), which sizes ZeRO's buffers
    numels: tuple[int, ...]  # every parameter's size (ZeRO-3 keeps the small ones whole)
    largest_layer: int  # parameters of the largest module with its own weights
    saved: int  # bytes autograd saves for backward in one forward at the micro-batch
    transient: int  # bytes of the largest operation's inputs and output in that forward
    beside_transient: int  # the same, for the task's no-grad forward beside the engine (VAE encode)

    @property
    def params(self) -> int:
        return self.trainable + self.frozen


def measure(skeleton: Skeleton, batch: int, dtype: torch.dtype) -> ModelSize:
    """The sizes of `skeleton`'s model, and its activations at `batch` samples in `dtype`."""
    # torch's own `to` (diffusers' would warn that some modules prefer fp32: nothing is loaded here)
    module = torch.nn.Module.to(skeleton.module, dtype).train()
    params = list(module.parameters())
    saved, transient = _forward_bytes(module, lambda: skeleton.forward(module, batch, dtype), True)
    beside = sum(p.numel() for p in skeleton.beside.parameters()) if skeleton.beside is not None else 0
    beside_transient = 0
    if skeleton.beside is not None and skeleton.beside_forward is not None:
        other = torch.nn.Module.to(skeleton.beside, dtype).eval()
        fn = skeleton.beside_forward
        _, beside_transient = _forward_bytes(other, lambda: fn(other, batch, dtype), False)
    return ModelSize(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        frozen=sum(p.numel() for p in params if not p.requires_grad),
        beside=beside,
        ema=skeleton.ema,
        hidden=model_width(module),
        numels=tuple(p.numel() for p in params),
        largest_layer=max(
            (sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0
        ),
        saved=saved,
        transient=transient,
        beside_transient=beside_transient,
    )


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return sum(_nbytes(v) for v in getattr(value, "values", lambda: [])())


def _forward_bytes(module: torch.nn.Module, forward: Any, grad: bool) -> tuple[int, int]:
    """(bytes saved for backward, the largest leaf module's inputs + output) of one forward."""
    own = {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in own:
            saved[storage._cdata] = storage.nbytes()
        return t

    largest = [0]

    def leaf(_m: torch.nn.Module, args: Any, output: Any) -> None:
        largest[0] = max(largest[0], _nbytes(args) + _nbytes(output))

    leaves = [m for m in module.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(leaf) for m in leaves]
    try:
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in hooks:
            h.remove()
    return sum(saved.values()), largest[0]
