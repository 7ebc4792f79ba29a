"""The distributed environment, and every collective the project calls.

`DistInfo.from_env()` turns the launcher's variables (torchrun, Slurm with one task per GPU, or none)
into one frozen record and refuses a half-set environment with a message naming what is missing;
every other module asks it (dinov2's distributed/__init__.py and open_clip's distributed.py do the
same job). `init_process_group` joins the group; the helpers at the end (barrier, sums, max/min,
object broadcast and gather, row gathers) are the only `torch.distributed` calls outside DeepSpeed,
each putting its tensors on the backend's device: a CPU tensor all-reduced under NCCL fails only on
the GPU run nobody here watches.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import subprocess
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from plumbing.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

T = TypeVar("T")

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_ID")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    launcher: str  # "single", "torchrun" or "slurm"
    node_name: str
    array_index: int = 0  # Slurm job arrays: this task's place among the array's tasks
    array_count: int = 1
    launch: str = ""  # the launch this process belongs to: a torchrun run id, a Slurm job id, or "" alone
    attempt: int = 0  # restarts of that launch before this one (torchrun's restarts, Slurm's requeues)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def work_slice(self) -> tuple[int, int]:
        """(index, count) of this process among all that share a bulk job: array tasks × ranks."""
        return self.array_index * self.world_size + self.rank, self.array_count * self.world_size

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistInfo:
        env = os.environ if env is None else env
        node_name = env.get("SLURMD_NODENAME") or socket.gethostname()
        if any(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
            info = cls._torchrun(env, node_name)
        elif "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            info = cls._slurm(env, node_name)
        else:
            info = cls(0, 1, 0, 1, 0, 1, "127.0.0.1", 0, "single", node_name)
        launch, attempt = launch_of(env)
        return replace(info, **_array(env), launch=launch, attempt=attempt)

    @classmethod
    def _torchrun(cls, env: Mapping[str, str], node_name: str) -> DistInfo:
        _require(env, TORCHRUN_VARS, "torchrun")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK")
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        if not (0 <= rank < world and 0 <= local_rank < local_world):
            raise UserError(
                f"torchrun environment: RANK={rank} LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world}"
            )
        return cls(
            rank,
            world,
            local_rank,
            local_world,
            int(env.get("GROUP_RANK", rank // local_world)),
            max(1, world // local_world),
            env["MASTER_ADDR"],
            _int(env, "MASTER_PORT"),
            "torchrun",
            node_name,
        )

    @classmethod
    def _slurm(cls, env: Mapping[str, str], node_name: str) -> DistInfo:
        """srun with one task per GPU: ranks from SLURM_PROCID, the head node from the step's node list."""
        _require(env, SLURM_VARS, "Slurm (srun)")
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        num_nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
        local_world = max(1, world // num_nodes)
        addr, port = rendezvous(env)
        return cls(
            rank,
            world,
            _int(env, "SLURM_LOCALID"),
            local_world,
            _int(env, "SLURM_NODEID"),
            num_nodes,
            addr,
            port,
            "slurm",
            node_name,
        )


def rendezvous(env: Mapping[str, str]) -> tuple[str, int]:
    """Where a Slurm job's ranks meet: MASTER_ADDR/MASTER_PORT if set, else the first node of the
    step's (or job's) node list and a port derived from the job id, so two jobs on a node differ."""
    addr = env.get("MASTER_ADDR") or _head_node(
        env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    )
    port = int(env.get("MASTER_PORT") or 20000 + _int(env, "SLURM_JOB_ID") % 20000)
    return addr, port


def _array(env: Mapping[str, str]) -> dict[str, int]:
    """A Slurm job array task (sbatch --array=0-7): its index among the array's tasks."""
    if "SLURM_ARRAY_TASK_ID" not in env:
        return {}
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    low, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
    high = int(env.get("SLURM_ARRAY_TASK_MAX", task))
    count = int(env.get("SLURM_ARRAY_TASK_COUNT") or (high - low) // step + 1)
    index = (task - low) // step
    if not 0 <= index < count:
        raise UserError(f"SLURM_ARRAY_TASK_ID={task} is outside the array's {count} tasks from {low}")
    return {"array_index": index, "array_count": count}


def launch_of(env: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Which launch this process belongs to, and its restart count. The launch: the launchers'
    CLIP_LAUNCH_ID (launch/torchrun.sh sets one per run of the script: torchrun --standalone makes its
    TORCHELASTIC_RUN_ID inside itself, unknown to the script), else torchrun's run id, else the Slurm
    job id. The count: torchrun's TORCHELASTIC_RESTART_COUNT or Slurm's SLURM_RESTART_COUNT (requeues,
    preemption's included)."""
    env = os.environ if env is None else env
    launch = env.get("CLIP_LAUNCH_ID") or env.get("TORCHELASTIC_RUN_ID") or env.get("SLURM_JOB_ID", "")
    count = env.get("TORCHELASTIC_RESTART_COUNT") or env.get("SLURM_RESTART_COUNT") or "0"
    return launch, int(count) if count.isdigit() else 0


def _require(env: Mapping[str, str], names: tuple[str, ...], launcher: str) -> None:
    missing = [n for n in names if n not in env]
    if missing:
        present = [n for n in names if n in env]
        raise UserError(
            f"half-set {launcher} environment: {', '.join(present)} set but {', '.join(missing)} missing "
            "(launch with torchrun or srun, or unset them for a single process)"
        )


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _head_node(nodelist: str) -> str:
    if not nodelist:
        raise UserError(
            "Slurm environment without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: cannot find the head node"
        )
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as err:
        raise UserError(
            f"cannot expand the Slurm node list {nodelist!r} with scontrol ({err}); set MASTER_ADDR"
        ) from None
    return out.stdout.split()[0]


def comm_device(backends: str, local_rank: int) -> str:
    """The device a collective's tensors must live on: NCCL moves only CUDA tensors, gloo CPU ones.
    `backends` is what `init_process_group` was given ("gloo", "nccl" or "cpu:gloo,cuda:nccl"); with
    both, small bookkeeping tensors still go over NCCL, beside the training tensors they follow."""
    return f"cuda:{local_rank}" if "nccl" in backends else "cpu"


def backends_for(cuda: bool) -> str:
    """gloo alone on CPU; on GPUs NCCL for tensors and gloo beside it, so that object collectives and
    any CPU tensor still have a backend (an NCCL-only group fails them: "No backend type associated
    with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


@dataclass(frozen=True)
class _Comm:
    device: str = "cpu"
    local_rank: int = 0


_COMM = _Comm()


def init_process_group(info: DistInfo, timeout_s: float = 600) -> str:
    """Join the job's process group (NCCL + gloo on GPUs, gloo on CPU). Returns the compute device."""
    import torch
    import torch.distributed as dist

    global _COMM
    # Libraries that read the launcher's variables themselves (DeepSpeed asserts on LOCAL_RANK) get
    # them from here, whatever launched us.
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )
    cuda = torch.cuda.is_available() and torch.cuda.device_count() > info.local_rank
    device = f"cuda:{info.local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(info.local_rank)
        # An NCCL collective that times out (the backstop behind the watchdog) tears the process down
        # (1) rather than leaving it waiting: torchrun sets this for its workers, srun does not
        # (torch/distributed/elastic/agent/server/local_elastic_agent.py).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    backends = backends_for(cuda)
    if not info.distributed and not dist.is_initialized():
        # DeepSpeed wants a process group even alone: a one-rank group on an in-process store.
        dist.init_process_group(backends, store=dist.HashStore(), rank=0, world_size=1)
    elif not dist.is_initialized():
        # Under torchrun the agent may already host the store at MASTER_PORT
        # (TORCHELASTIC_USE_AGENT_STORE): env:// knows to join it rather than bind the port again.
        init = "env://" if info.launcher == "torchrun" else f"tcp://{info.master_addr}:{info.master_port}"
        dist.init_process_group(
            backend=backends,
            init_method=init,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    _COMM = _Comm(comm_device(backends, info.local_rank), info.local_rank)
    return device


C10D = "torch/distributed/distributed_c10d.py"
C10D_LOGGER = "torch/distributed/c10d_logger.py"  # wraps each collective of C10D


def set_collective_timeout(seconds: float) -> None:
    """From now on, a collective of the default group that waits longer fails (gloo: the waiting rank
    raises; NCCL: its watchdog aborts the communicator). Local to this rank; a no-op alone."""
    import torch.distributed as dist

    if world_size() > 1:
        dist.set_timeout(datetime.timedelta(seconds=seconds))


def collective_now() -> tuple[str, int]:
    """What the main thread is doing in torch.distributed, read from its Python frames (from the
    watchdog's thread, while the main thread waits): e.g. "all_reduce(torch.float32[1024]) from
    deepspeed/runtime/engine.py:2470 allreduce_bucket", or "none"; and how many collectives this rank's
    default group has issued (its sequence number; -1 unknown). Ranks of one job that issued fewer
    collectives are behind the others: the one to look at."""
    import sys
    import threading

    import torch.distributed as dist

    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    api, caller = None, None  # the outermost c10d frame of the innermost run of them; who called it
    while frame is not None and caller is None:
        name = frame.f_code.co_filename
        if name.endswith(C10D):
            api = frame
        elif api is not None and not name.endswith(C10D_LOGGER):
            caller = frame
        frame = frame.f_back
    where = "none"
    if api is not None:
        shapes = [
            f"{v.dtype}{list(v.shape)}"
            for v in api.f_locals.values()
            if hasattr(v, "shape") and hasattr(v, "dtype")
        ]
        where = f"{api.f_code.co_name}({', '.join(shapes[:2])})"
        if caller is not None:
            path = os.path.relpath(caller.f_code.co_filename).split("site-packages/")[-1]
            where += f" from {path}:{caller.f_lineno} {caller.f_code.co_name}"
    try:
        issued = int(dist.distributed_c10d._get_default_group()._get_sequence_number_for_group())
    except Exception:  # no group, or a torch without the (private) counter: the report goes on without it
        issued = -1
    return where, issued


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives
# Every torch.distributed call of the project is below (tests/test_layering.py scans for others).
# Each helper is a no-op alone, and puts its tensors on the backend's device (`comm_device`).


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    import torch.distributed as dist

    if world_size() > 1:
        on_cuda = _COMM.device.startswith("cuda")
        dist.barrier(device_ids=[_COMM.local_rank] if on_cuda else None)


def _reduce(values: list[float] | Tensor, op: str) -> list[float]:
    """Reduce over ranks, read on the host (one synchronisation when the values live on a GPU)."""
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if isinstance(values, torch.Tensor):
        t = values.detach().to(_COMM.device, torch.float64)
    else:
        t = torch.tensor(values, dtype=torch.float64, device=_COMM.device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def all_sum(values: list[float] | Tensor) -> list[float]:
    """Element-wise sums over ranks."""
    return _reduce(values, "SUM")


def all_max(values: list[float] | Tensor) -> list[float]:
    return _reduce(values, "MAX")


def all_min(values: list[float] | Tensor) -> list[float]:
    return _reduce(values, "MIN")


def all_max_(t: Tensor) -> Tensor:
    """Element-wise max over ranks, in place, left where it is: nothing is read on the host, so on a GPU
    the collective queues behind the work before it and the host goes on (trainer/guard.py)."""
    import torch.distributed as dist

    if world_size() == 1:
        return t
    local = t if str(t.device) == _COMM.device else t.to(_COMM.device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return t if local is t else t.copy_(local)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` on every rank (picklable objects only; small ones: a verdict, a path)."""
    import torch.distributed as dist

    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return typing.cast(T, box[0])


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order."""
    import torch.distributed as dist

    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(x: Tensor) -> Tensor:
    """Equal-shaped tensors of all ranks, concatenated in rank order, on `x`'s device."""
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return x
    local = x.detach().to(_COMM.device).contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(x.device)


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' rows in rank order, with gradients flowing back to their owners.

    Every rank then computes its loss over the whole global batch; the gradient that reaches each
    rank's rows is the sum over ranks of the gathered gradient's slice (open_clip's gather_with_grad,
    full-loss variant). The backward sums with all_reduce, which gloo and NCCL both have
    (reduce_scatter is NCCL-only)."""
    if world_size() == 1:
        return x
    return typing.cast("Tensor", _gather_with_grad_fn().apply(x))


@functools.cache
def _gather_with_grad_fn() -> Any:
    """The autograd Function, built on first use (this module imports torch lazily)."""
    import torch
    import torch.distributed as dist

    class GatherWithGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor) -> Tensor:
            ctx.rows, ctx.rank = x.shape[0], dist.get_rank()
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts)

        @staticmethod
        def backward(ctx: Any, grad: Tensor) -> Tensor:
            grad = grad.contiguous()
            dist.all_reduce(grad)
            return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]

    return GatherWithGrad


if __name__ == "__main__":  # `python -m plumbing.dist`: a Slurm job's rendezvous point, for its log
    try:
        host, port = rendezvous(os.environ)
        print(f"{host}:{port}")
    except (UserError, KeyError) as err:
        print(f"none ({err})" if "SLURM_JOB_ID" in os.environ else "none (not in a Slurm job)")
