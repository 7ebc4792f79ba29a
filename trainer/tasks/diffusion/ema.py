"""An exponential moving average of the U-Net's weights, across ZeRO stages."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from trainer.engine import Engine, Weights


class Ema:
    """An exponential moving average of the trainable weights, in fp32, on their device. Under ZeRO-3
    each rank averages its own partition (`ds_tensor`) and checkpoints it; below it every rank holds
    the whole and rank 0 checkpoints it for all."""

    def __init__(self, module: torch.nn.Module, decay: float, rank: int) -> None:
        self.decay, self.rank = decay, rank
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.shadow = {n: self._data(p).detach().float().clone() for n, p in self.params.items()}

    def _data(self, p: torch.Tensor) -> torch.Tensor:
        return getattr(p, "ds_tensor", p.data)

    @torch.no_grad()
    def update(self) -> None:
        current = [self._data(p).float() for p in self.params.values()]  # views where already fp32
        torch._foreach_lerp_(
            list(self.shadow.values()), current, 1 - self.decay
        )  # one call, not one per tensor

    def state(self) -> dict[str, torch.Tensor]:
        if not self.partitioned and self.rank != 0:
            return {}  # the same on every rank: rank 0's copy serves all
        return {f"ema.{n}": t.cpu() for n, t in self.shadow.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in self.shadow.items():
            if f"ema.{name}" in state:
                t.copy_(state[f"ema.{name}"])

    @contextlib.contextmanager
    def swapped_in(self, engine: Engine) -> Iterator[None]:
        """The EMA weights in the module for the duration (evaluation), the trained ones after. Every
        rank must enter it (under ZeRO-3 the swap ends in a gather)."""
        saved = {n: self._data(p).detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                self._data(p).copy_(self.shadow[n])
        self._regather(engine)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    self._data(p).copy_(saved[n])
            self._regather(engine)

    def _regather(self, engine: Engine) -> None:
        """ZeRO-3 keeps its small ("persistent") parameters whole on every rank beside their partition,
        and gathers them again only after an optimizer step: after the partitions change here, gather
        them as DeepSpeed's stage-3 optimizer does after a step (release, then all-gather)."""
        persistent = getattr(getattr(engine, "optimizer", None), "persistent_parameters", None)
        if self.partitioned and persistent:
            persistent[0].partition(persistent)
            persistent[0].all_gather(persistent)


def full_ema(
    weights: Mapping[str, torch.Tensor], extra: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Whole EMA tensors from the checkpoint's extra states: rank 0's whole ones, or every rank's
    ZeRO-3 partitions joined (each parameter is split evenly over the ranks, padded at the end).
    `weights` gives the shapes (read without making its tensors)."""
    out: dict[str, torch.Tensor] = {}
    shapes = Weights(weights)
    for key in [k for k in (extra[0] if extra else {}) if k.startswith("ema.")]:
        name, shape = key[4:], shapes.shape(key[4:])
        first = extra[0][key]
        if first.shape == shape:
            out[name] = first
        else:
            flat = torch.cat([e[key].reshape(-1) for e in extra])
            out[name] = flat[: shape.numel()].view(shape)
    return out
