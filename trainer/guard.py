"""The step's guard: whether a micro-batch's loss is finite and whether a stop signal came, agreed across
ranks, without stalling the device's queue every step.

The flags [non-finite, stop] are built on the loss's device after the forward pass, max-reduced over
ranks there (a collective queued behind the forward, not read), and copied to pinned host memory
behind an event. Two ways to use them:

- on the device (`skips_on_device`): backward and the optimizer step are queued at once; a non-finite
  loss on any rank since the last optimizer step is the fused AdamW's `found_inf`, so that update is
  skipped on the device (parameters, Adam's moments and step count untouched: torch's optim/adam.py,
  _fused_adamw, the mechanism torch.amp.GradScaler uses), and the host reads the flags only after
  queueing the step: it waits for the forward pass to end while the GPU runs the backward pass. This is
  GradScaler's pattern, without its per-step read of `found_inf`.
- on the host (any other optimizer: bf16 ZeRO-0, fp16, ZeRO-Offload, where DeepSpeed reads flags on
  the host every step anyway): the flags are read before backward and a non-finite micro-batch is
  dropped before DeepSpeed sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plumbing.dist import all_max_


@dataclass(frozen=True)
class Verdict:
    finite: bool  # every rank's loss was finite
    stop: bool  # some rank received a stop signal


class StepGuard:
    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer  # the fused AdamW to skip on the device; None: decide on the host
        self.stop: torch.Tensor | None = None  # [1] on the loss's device, made at the first forward
        self.window: torch.Tensor | None = None  # 0-dim, as the step counts found_inf is taken from
        self.host = torch.zeros(2)
        self.ready: torch.cuda.Event | None = None
        self.signalled = False

    @property
    def skips_on_device(self) -> bool:
        return self.optimizer is not None

    def agree(self, loss: torch.Tensor, stop_requested: bool) -> None:
        """After the forward pass: the flags on the loss's device (a CPU flag beside a CUDA loss would
        fail NCCL), max-reduced over ranks and copied to the host, nothing waited for."""
        if self.stop is None or self.window is None or self.stop.device != loss.device:
            self._allocate(loss.device)
        assert self.stop is not None and self.window is not None
        if stop_requested and not self.signalled:
            self.stop.fill_(1.0)  # a kernel with a scalar argument: no host-to-device copy, no wait
            self.signalled = True
        bad = loss.detach().isfinite().logical_not().float().reshape(1)
        flags = all_max_(torch.cat([bad, self.stop]))
        if self.skips_on_device:
            torch.maximum(self.window, flags[0], out=self.window)
        self.host.copy_(flags, non_blocking=self.ready is not None)
        if self.ready is not None:
            self.ready.record()

    def verdict(self) -> Verdict:
        """The agreed flags of the last `agree`, read on the host once the forward pass is done."""
        if self.ready is not None:
            self.ready.synchronize()
        bad, stop = self.host.tolist()
        return Verdict(finite=bad == 0, stop=stop > 0)

    def stepped(self) -> None:
        """After an optimizer step: the next accumulation window starts clean (queued after the step)."""
        if self.window is not None:
            self.window.zero_()

    def _allocate(self, device: torch.device) -> None:
        self.stop = torch.zeros(1, device=device)
        self.window = torch.zeros((), device=device)
        if device.type == "cuda":
            self.host = torch.zeros(2, pin_memory=True)  # a non-blocking copy needs pinned memory
            self.ready = torch.cuda.Event()
        if self.optimizer is not None:
            # read by the fused kernel at every step (optim/adam.py: found_inf=getattr(self, "found_inf"))
            self.optimizer.found_inf = self.window  # type: ignore[attr-defined]
