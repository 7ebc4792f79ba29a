"""The machine's side of memory: what this process holds now and at its peak since a mark, what the
node (its RAM) or a GPU has, and handing freed heap back to the operating system.

On CPU the measure is the resident set: `VmRSS` now and `VmHWM` (its high-water mark) from
/proc/self/status. Writing "5" to /proc/self/clear_refs resets the mark (Linux ≥ 4.0,
Documentation/filesystems/proc.rst, "clear_refs"), so each phase of a run gets its own peak; where
the kernel refuses, the mark is the process's lifetime peak and a phase's peak is an upper bound.
On CUDA it is the caching allocator's `memory_allocated` / `max_memory_allocated`, whose peak
`reset_peak_memory_stats` resets (the CUDA context and the allocator's cache are not in it).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
MEMINFO = Path("/proc/meminfo")
# cgroup v2, then v1: a Slurm job's --mem (or a container's limit) is the memory it really has
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def _status_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Gauge:
    """This process's memory on `device`: now, and the peak since the last `mark()` (bytes)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.device = device
        self.resettable = self.cuda or _can_reset_peak()

    @property
    def measure(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated (reset per phase)"
        return "peak resident set, VmHWM" + (" (reset per phase)" if self.resettable else " (since start)")

    def now(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return _status_kib("VmHWM") * 1024

    def mark(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            CLEAR_REFS.write_text("5")

    def reserved(self) -> int:
        """What the process holds beyond its tensors' use: the CUDA cache, or (CPU) the resident set."""
        return int(torch.cuda.memory_reserved(self.device)) if self.cuda else self.now()


def _can_reset_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def node_memory() -> int:
    """Bytes of RAM this node gives its processes: MemTotal, or the cgroup's limit when lower."""
    total = 0
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    for limit in CGROUP_LIMITS:
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def gpu_memory() -> int:
    """Bytes of memory of this node's first GPU (every rank has one of the same kind)."""
    return int(torch.cuda.get_device_properties(0).total_memory)


def give_back() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim): after a phase that freed much
    (the full model partitioned away, an export's state dict), the resident set shrinks to what is
    used instead of keeping the freed arenas; a no-op without glibc."""
    if os.name != "posix":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def map_large_blocks(threshold: int) -> bool:
    """Have glibc serve every block of at least `threshold` bytes by mmap and unmap it when freed
    (mallopt M_MMAP_THRESHOLD). Its default threshold starts at 128 KiB but rises to the size of any
    mapped block freed, up to 32 MiB (mallopt(3), "M_MMAP_THRESHOLD"): once ZeRO-2/3 free the whole
    model every rank built, weights gathered and activations of a few MiB come from the heap, and
    what they leave behind stays resident. Set explicitly, the threshold stays put: every stage's
    allocator behaves as it already does under ZeRO-0, which frees nothing of that size. False when
    the C library has no mallopt."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
