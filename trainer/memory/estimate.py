"""The memory plan: what each rank will hold, by kind, at the configured ZeRO stage, precision and
micro-batch, before anything is launched; the memory it has; and, when it does not fit, the smallest
change that would.

Model states per parameter, Ψ parameters of which Ψt train, N data-parallel ranks, b bytes a weight
(4 in fp32, 2 in bf16/fp16), as DeepSpeed 0.19.7 holds them (its estimators,
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_…`, count the same for 16-bit training;
ZeRO paper, Rajbhandari et al. 2020, §3: (2+2+K)·Ψ, K=12 for mixed-precision Adam):

    stage   weights          fp32 masters   gradients                 Adam moments   DeepSpeed's buffers
    0       b·Ψ              4·Ψt if b=2    b·Ψt (+4·Ψt if b=2)       8·Ψt           b·Ψt (all-reduce copy)
    1       b·Ψ              4·Ψt/N         b·Ψt + 4·Ψt/N             8·Ψt/N         b·12·h² (reduce bucket)
    2       b·Ψ              4·Ψt/N         b·Ψt/N + 4·Ψt/N           8·Ψt/N         b·12·h²
    3       b·Ψ/N + window   4·Ψt/N         b·Ψt/N (+4·Ψt/N if b=2)   8·Ψt/N         b·h²

ZeRO-1/2/3 keep an fp32 master copy even in fp32 (stage_1_and_2.py `single_partition_of_fp32_groups`,
stage3.py `fp32_partitioned_groups_flat`: clones), and step it with a flat fp32 gradient partition
made at the step (stage 1/2 `get_flat_partition`; stage 3 only converts bf16/fp16 gradients).
ZeRO-0 all-reduces gradients through a flattened
copy of up to 5e8 elements (engine.py `allreduce_gradients`, MEMORY_OPT_ALLREDUCE_SIZE: not
configurable). ZeRO-3's window: small parameters kept whole (under the persistence threshold) and up
to stage3_max_live_parameters gathered at once (trainer/engine.py `zero_buffers`: 12·h²).

Beside the model states: the activations of a micro-batch (trainer/memory/shapes.py), what the task
holds beside the engine (a frozen VAE, an EMA), and the process itself (`RUNTIME`). The training
peak counts all of them at once (an upper bound: activations are freed while gradients fill). Other
phases peak on their own: every rank builds the whole model in fp32 before DeepSpeed partitions it
(no zero.Init: shared/notes/stack-on-cpu.md), ZeRO-1/2 then flatten it into one more copy, and the
export (after the engine is freed) holds the model it writes and the checkpoint's fp32 masters it reads
(memory-mapped), each consolidated tensor made and copied in turn (trainer.engine.Weights).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.engine import zero_buffers
from trainer.memory.shapes import ModelSize

GiB = 2**30
# The process before any model, measured at the start of the model's build (bench/memory.py, CPU,
# torch 2.14.1's CUDA build, DeepSpeed, transformers, the task's tokenizer): 0.83–0.97 GiB a rank.
RUNTIME_CPU = int(0.95 * GiB)
# On a GPU: the CUDA context and what the caching allocator reserves beyond its peak (not in
# torch.cuda.max_memory_allocated, which the drill measures; held out of the GPU's memory all the same).
RUNTIME_GPU = int(1.0 * GiB)
# A forked loader worker's own memory (its pages not shared with its rank): decoding, a prefetch of
# batches (bench/memory.py measures them).
LOADER_WORKER = int(0.25 * GiB)
# What a node keeps for itself: the kernel, the page cache, the launcher.
HEADROOM = 0.9
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Setting:
    """What the plan is made for."""

    stage: int
    precision: str
    world: int  # data-parallel ranks
    per_node: int  # ranks sharing a node's RAM
    batch: int  # micro-batch per rank
    workers: int  # loader workers per rank
    cuda: bool
    offload_optimizer: bool = False
    offload_param: bool = False
    persistence: int = -1  # ZeRO-3's whole-kept threshold (-1: 10·h)

    def describe(self) -> str:
        extra = " + optimizer offload" if self.offload_optimizer else ""
        extra += " + parameter offload" if self.offload_param else ""
        return f"ZeRO-{self.stage}{extra}, {self.precision}, batch {self.batch}, {self.world} ranks"


@dataclass(frozen=True)
class MemoryPlan:
    setting: Setting
    rows: dict[str, int]  # what a rank holds at the training peak, by kind (bytes)
    phases: dict[str, int]  # the peak of each phase the plan models
    node: int  # what a node needs: its ranks (and their loader workers) on CPU; on CUDA each GPU's
    capacity: int  # the memory that must hold `node`: the node's RAM (CPU) or one GPU's
    host: int = 0  # CUDA: host RAM the node's ranks need at once (every rank builds the model there)
    host_capacity: int = 0

    @property
    def per_rank(self) -> int:
        return max(self.phases.values())

    @property
    def fits(self) -> bool:
        gpu_ok = self.node <= HEADROOM * self.capacity
        return gpu_ok and (not self.setting.cuda or self.host <= HEADROOM * self.host_capacity)

    def to_dict(self) -> dict[str, object]:
        """For memory.json: bytes, and the setting."""
        return {
            "setting": self.setting.describe(),
            "rows": self.rows,
            "phases": self.phases,
            "total": self.per_rank,
            # what memory.json's peaks should reach: on CPU the resident set (the process included),
            # on CUDA max_memory_allocated (without the context and the allocator's cache)
            "expected_peak": self.per_rank - (self.rows["runtime"] if self.setting.cuda else 0),
            "node": self.node,
            "capacity": self.capacity,
            "fits": self.fits,
        }


def plan(size: ModelSize, s: Setting, capacity: int, host_capacity: int = 0) -> MemoryPlan:
    """The per-rank plan of `size` under `s`; `capacity`: the node's RAM (CPU) or one GPU's memory."""
    b = WEIGHT_BYTES[s.precision]
    n = s.world
    sharded = n if s.stage >= 1 else 1
    pt, p = size.trainable, size.params
    h2 = size.hidden * size.hidden
    low = b == 2
    weights = b * p
    if s.stage == 3:
        threshold = 10 * size.hidden if s.persistence < 0 else s.persistence
        whole = sum(k for k in size.numels if k < threshold)
        window = min(12 * h2 + int(0.9 * h2), p)  # stage3_max_live_parameters + prefetch
        weights = 0 if s.offload_param else b * (p // n + whole + window)
    masters = 4 * pt // sharded if (s.stage >= 1 or low) else 0
    moments = 8 * pt // sharded
    if s.stage == 0:
        grads = b * pt + (4 * pt if low else 0)
    else:  # + the flat fp32 partition the optimizer steps with (stage 3: made only from bf16/fp16)
        grads = (b * pt if s.stage == 1 else b * pt // n) + (4 * pt // n if s.stage < 3 or low else 0)
    bucket = zero_buffers(s.stage, size.hidden).get("reduce_bucket_size", 0)  # what the engine is given
    buffers = b * pt if s.stage == 0 and n > 1 else b * bucket
    optimizer = 0 if s.offload_optimizer and s.cuda else masters + moments
    rows = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "deepspeed": buffers,
        "activations": size.saved + size.transient,
        "task": 4 * size.ema // (n if s.stage == 3 else 1) + b * size.beside + size.beside_transient,
        "runtime": RUNTIME_GPU if s.cuda else RUNTIME_CPU,
    }
    runtime = rows["runtime"]
    build = 4 * p + 4 * size.beside + (0 if s.cuda else runtime)  # fp32, on the host
    initialize = build + (b * p if s.stage in (1, 2) else 0) + masters
    export = (
        2 * 4 * p + runtime
    )  # the model written, the checkpoint's fp32 pages read (one tensor made at a time)
    phases = {"train": sum(rows.values())}
    if not s.cuda:
        phases |= {"build": build, "initialize": initialize, "export": export}
    if s.cuda:
        node = max(phases.values())
    else:  # every rank is in the same phase, but rank 0 exports alone while the others wait, their engines freed
        together = {k: v * s.per_node for k, v in phases.items()}
        together["export"] = export + (s.per_node - 1) * runtime
        node = max(together.values()) + s.per_node * s.workers * LOADER_WORKER
    host = s.per_node * (build + RUNTIME_CPU) if s.cuda else 0
    return MemoryPlan(s, rows, phases, node, capacity, host, host_capacity)


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"
