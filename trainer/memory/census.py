"""Where a live engine's memory is: every tensor it holds, counted once (by storage) and filed under
parameters, gradients, optimizer state or DeepSpeed's own buffers.

Parameters: the module's weights and buffers (under ZeRO-3 this rank's partitions, `ds_tensor`, and
what is gathered at the moment). Gradients: `.grad`, and DeepSpeed's tensors whose attribute names
say grad (the ZeRO-2 partitions `averaged_gradients`, ZeRO-3's `grad_partitions_flat_buffer`).
Optimizer state: the wrapped torch optimizer's state (Adam's moments) and the tensors it steps (the
fp32 master copies ZeRO 1–3 keep beside the module's weights, wherever DeepSpeed's attribute names
say fp32). DeepSpeed's buffers: every other
tensor reachable from the engine's ZeRO optimizer (the flat weight buffers, gradient buckets).
A storage's full size counts, whether or not its pages were touched yet.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

KINDS = ("parameters", "gradients", "optimizer", "deepspeed")
MAX_DEPTH = 4  # DeepSpeed keeps its buffers in attributes, lists and dicts a few levels down


class Census:
    def __init__(self) -> None:
        self.bytes = dict.fromkeys(KINDS, 0)
        self.seen: set[int] = set()

    def add(self, kind: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.seen:
            self.seen.add(key)
            self.bytes[kind] += storage.nbytes()


def engine_census(engine: Any) -> dict[str, int]:
    """Bytes of each kind the engine holds on this rank."""
    c = Census()
    for kind, tensor in engine_tensors(engine):
        c.add(kind, tensor)
    return c.bytes


def engine_tensors(engine: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(kind, tensor) of every tensor the engine holds on this rank (a storage may come more than once)."""
    for p in engine.module.parameters():
        yield "parameters", getattr(p, "ds_tensor", p.data)
        yield "parameters", p.data
        if p.grad is not None:
            yield "gradients", p.grad
    for b in engine.module.buffers():
        yield "parameters", b
    wrapper = getattr(engine, "optimizer", None)
    inner = getattr(wrapper, "optimizer", wrapper)
    if isinstance(inner, torch.optim.Optimizer):
        for state in inner.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield "optimizer", value
        for group in inner.param_groups:
            for p in group["params"]:
                yield "optimizer", p  # ZeRO's fp32 masters (under ZeRO-0 fp32: the weights, counted above)
                if p.grad is not None:
                    yield "gradients", p.grad
    if wrapper is not None and wrapper is not inner:
        for name, tensor in _tensors(wrapper, "", 0, set()):
            yield _kind(name.lower()), tensor


def _tensors(obj: Any, name: str, depth: int, visited: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(attribute path, tensor) of every tensor under `obj`: its attributes, lists, tuples and dicts,
    and DeepSpeed's own objects within; never into a torch module (the weights are counted already)."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
        return
    if depth > MAX_DEPTH or id(obj) in visited or isinstance(obj, torch.nn.Module):
        return
    visited.add(id(obj))
    if isinstance(obj, dict):
        # a key is named only when it is a name: optimizer state is keyed by parameters, and a tensor
        # formatted into a name costs milliseconds (and, on a GPU, a copy to the host) for nothing
        items: Any = ((f"{name}.{k}" if isinstance(k, str | int) else name, v) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((name, v) for v in obj)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        items = ((f"{name}.{k}", v) for k, v in vars(obj).items())
    else:
        return
    for path, value in items:
        yield from _tensors(value, path, depth + 1, visited)


def _kind(name: str) -> str:
    """What a DeepSpeed optimizer attribute holds, by its name: gradients, the fp32 master copy
    (ZeRO-3 keeps it out of the wrapped optimizer's groups between steps: fp32_partitioned_groups_flat),
    or DeepSpeed's own buffers."""
    if "grad" in name:
        return "gradients"
    return "optimizer" if "fp32" in name else "deepspeed"
