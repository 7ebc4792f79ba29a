"""The one module that imports DeepSpeed: the ds config from TrainConfig, the optimizer and LR
schedule, `deepspeed.initialize`, what the loop may call on the engine (`Engine`), checkpoints (saved,
loaded, converted to DeepSpeed's universal format for another number of ranks), teardown, and the
model's full fp32 weights: consolidated from a checkpoint of any ZeRO stage, or gathered live.

Version facts worked around here (../shared/notes/stack-on-cpu.md): no `zero.Init` (it corrupts
`from_pretrained` on CPU + gloo: every rank builds the whole model and `initialize` partitions it);
the 0-dim CLIP logit_scale stays frozen (the trained temperature is shaped [1]); the engine is
destroyed before the process group so that torchrun exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from plumbing.config import require
from plumbing.errors import UserError
from plumbing.files import is_write_error


def _deepspeed() -> Any:
    """DeepSpeed, imported when first needed (configs and `--check` do without its seconds of import),
    told its accelerator first: without CUDA it would guess the CPU, with a warning."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


log = logging.getLogger("trainer.engine")


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to biases, norms or the temperature."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas (CLIP's 0.98 for beta2)."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warm-up from 0 to lr over this many optimizer steps, then a cosine decay."""
    min_lr_ratio: float = 0.0
    """The cosine decays to lr × this at the last step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def __post_init__(self) -> None:
        require(self.lr > 0, self, "lr", "a positive learning rate")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            self,
            "betas",
            "two numbers in [0, 1)",
        )
        require(self.warmup_steps >= 0, self, "warmup_steps", "an int >= 0")
        require(0 <= self.min_lr_ratio <= 1, self, "min_lr_ratio", "a fraction in [0, 1]")
        require(self.grad_clip >= 0, self, "grad_clip", "a norm >= 0")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    """ZeRO stage: 0 (data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""
    precision: str = "fp32"
    """"fp32", "bf16" or "fp16" (fp16 needs CUDA)."""
    offload_optimizer: bool = False
    """Keep optimizer states and the step on the CPU (ZeRO-Offload; builds DeepSpeedCPUAdam once)."""
    offload_param: bool = False
    """Keep parameters on the CPU between uses (ZeRO-Infinity; stage 3 only)."""
    stage3_param_persistence_threshold: int = -1
    """ZeRO-3 keeps parameters smaller than this whole on every rank (0 partitions all of them; -1: 10 × the model's hidden size, as Hugging Face's DeepSpeed integration fills "auto")."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys merged over the generated config (for experts; logged). `checkpoint.load_universal: true` resumes through DeepSpeed's universal format even on the same number of ranks."""

    def __post_init__(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), self, "zero_stage", "0, 1, 2 or 3")
        require(self.precision in ("fp32", "bf16", "fp16"), self, "precision", '"fp32", "bf16" or "fp16"')
        require(
            not self.offload_param or self.zero_stage == 3,
            self,
            "offload_param",
            "zero_stage 3 (parameters are only partitioned there)",
        )
        require(
            not self.offload_optimizer or self.zero_stage >= 1, self, "offload_optimizer", "zero_stage >= 1"
        )
        require(
            self.stage3_param_persistence_threshold >= -1,
            self,
            "stage3_param_persistence_threshold",
            "an int >= 0, or -1 (10 × the model's hidden size)",
        )
        require(
            not (self.universal_forced and self.zero_stage == 0),
            self,
            "overrides",
            "no checkpoint.load_universal under zero_stage 0 (its optimizer state is whole and loads as it is)",
        )

    @property
    def universal_forced(self) -> bool:
        """The overrides ask DeepSpeed to load checkpoints in its universal format."""
        section = self.overrides.get("checkpoint")
        return isinstance(section, dict) and bool(section.get("load_universal"))


@dataclass(frozen=True)
class BatchSizes:
    """Derived once; DeepSpeed's own arithmetic must agree (checked after initialize)."""

    micro: int
    accum: int
    world: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world


def ds_config(
    ds: DeepSpeedConfig,
    optim: OptimConfig,
    sizes: BatchSizes,
    on_cuda: bool,
    universal: bool = False,
    hidden: int = 1024,
) -> dict[str, Any]:
    """DeepSpeed's config for this run; `hidden`: the model's hidden size (`model_width`), which sizes
    ZeRO's buffers (`zero_buffers`) unless deepspeed.overrides sets them."""
    if ds.precision == "fp16" and not on_cuda:
        raise UserError("deepspeed.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    zero: dict[str, Any] = {"stage": ds.zero_stage, **zero_buffers(ds.zero_stage, hidden)}
    if not on_cuda and ds.zero_stage in (1, 2):
        # Without CUDA streams nothing overlaps, and gloo gains nothing from reduce-scatter: off, they
        # trim ZeRO-2's step overhead over a bare loop (bench/train_overhead.py). Not
        # contiguous_gradients=false: in DeepSpeed 0.19.7 it makes 2-rank ZeRO-2 diverge from ZeRO-0
        # (loss off by 0.05 after 10 steps), and 2-rank ZeRO-1 too (0.31 by the end of the system
        # test's run), though at ZeRO-1 it drops DeepSpeed's per-parameter hooks and bucket copies
        # (ViT-B/32's host share at one rank: 1.63 → 1.21× a bare loop). tests/test_trainer_system.py
        # holds ZeRO-1, 2 and 3 to ZeRO-0's loss curve.
        zero.update(overlap_comm=False, reduce_scatter=False)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    if ds.zero_stage == 3:
        threshold = ds.stage3_param_persistence_threshold
        zero["stage3_param_persistence_threshold"] = 10 * hidden if threshold < 0 else threshold
    config: dict[str, Any] = {
        "train_batch_size": sizes.global_batch,
        "train_micro_batch_size_per_gpu": sizes.micro,
        "gradient_accumulation_steps": sizes.accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # the client torch AdamW under ZeRO
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronises the device at every forward
        # and every step (deepspeed/utils/timer.py, ThroughputTimer.start/stop with `synchronized`;
        # engine.forward starts it when DeepSpeed has no dataloader of its own): we time steps ourselves.
        "timers": {"throughput": {"enabled": False}},
    }
    if ds.precision == "bf16" and ds.zero_stage in (1, 2) and not ds.offload_optimizer:
        # Its bf16 overflow check reads a flag on the host every step after a kernel per gradient
        # (stage_1_and_2.py, has_overflow); the loop's guard skips a non-finite step on the device
        # instead (trainer/guard.py), as it does in fp32, where DeepSpeed checks nothing.
        config["bf16"]["check_grad_overflow"] = False
    if universal:  # the checkpoint to resume is in DeepSpeed's universal format (to_universal)
        config["checkpoint"] = {"load_universal": True}
    if (
        ds.offload_optimizer
    ):  # ZeRO-Offload needs DeepSpeed's CPU Adam, so the optimizer comes from the config
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": optim.betas,
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
            },
        }
    for key, value in ds.overrides.items():
        log.info("deepspeed.overrides: %s = %r", key, value)
    merged = _deep_merge(config, ds.overrides)
    if clips_in_optimizer(merged, ds):
        merged["gradient_clipping"] = 0.0  # done by clip_before_step, on the optimizer
    return merged


def clips_in_optimizer(config: dict[str, Any], ds: DeepSpeedConfig) -> bool:
    """fp32 ZeRO-0 with our optimizer: the gradients are clipped by torch's clip_grad_norm_ (foreach,
    the clip coefficient computed on the device) in the optimizer's step pre-hook, not by DeepSpeed's
    runtime/utils.py clip_grad_norm_, which reads the norm on the host and loops over every tensor in
    Python (11 ms of a 37 ms CPU step of ViT-B/32's 403 tensors, bench/train_overhead.py). At that
    point DeepSpeed has already averaged the gradients over ranks (in backward), as before its clip."""
    zero, fp32 = config["zero_optimization"], not (config["bf16"]["enabled"] or config["fp16"]["enabled"])
    chosen = "gradient_clipping" in ds.overrides or "optimizer" in config
    return zero.get("stage") == 0 and fp32 and not chosen


def clip_before_step(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the global gradient norm of the optimizer's parameters before each of its steps, and leave
    the norm where DeepSpeed looks for it after the step (engine._take_model_step copies the
    optimizer's `_global_grad_norm` into the engine's)."""

    def clip(opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        opt._global_grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)  # type: ignore[attr-defined]

    optimizer.register_step_pre_hook(clip)


def zero_buffers(stage: int, hidden: int) -> dict[str, int]:
    """ZeRO's buffers sized from the model's hidden size h, as Hugging Face's DeepSpeed integration
    fills "auto" (transformers/integrations/deepspeed.py, `trainer_config_finalize`): gradient reduce
    buckets of h² elements and ZeRO-3's prefetch of 0.9·h²; and, ZeRO-3, at most about one transformer
    block's weights gathered at a time, 12·h² (attention 4·h², MLP 8·h²) for DeepSpeed's
    stage3_max_live_parameters and stage3_max_reuse_distance. ZeRO-1/2 reduce in buckets of one such
    block, 12·h² (28 MB at ViT-B/32 in fp32, about DDP's 25 MB): at h² nearly every gradient tensor was
    a bucket of its own, a Python pass of DeepSpeed's and a collective each (docs/RESULTS.md).
    DeepSpeed's defaults are sized for large GPUs, whatever the model: 5e8-element buckets (a 2 GB
    bucket, in fp32, beside ViT-B/32's 0.6 GB of weights) and 1e9 live parameters (a 428 M ViT-L/14 may stay gathered whole through forward and
    backward). Measured at ViT-B/32 shapes, fp32, 2 CPU ranks, ZeRO-3: the peak per rank fell from 5.4
    to 4.1 GB (bench/memory.py)."""
    h2 = hidden * hidden
    if stage == 0:
        return {}
    if stage in (1, 2):
        return {"reduce_bucket_size": 12 * h2}
    return {
        "reduce_bucket_size": h2,
        "stage3_prefetch_bucket_size": int(0.9 * h2),
        "stage3_max_live_parameters": 12 * h2,
        "stage3_max_reuse_distance": 12 * h2,
    }


def model_width(model: torch.nn.Module) -> int:
    """The model's hidden size, read from its widest normalisation: a LayerNorm's features (a
    transformer's width; CLIP's vision or text tower, whichever is wider) or a GroupNorm's channels
    (a U-Net's or VAE's widest block). 1024 when it has neither."""
    widths = [m.normalized_shape[-1] for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    widths += [m.num_channels for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    return max(widths, default=1024)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for biases, norm gains and the temperature (all < 2-D; open_clip's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # ZeRO-3 keeps a partitioned parameter's own shape in ds_shape
            ndim = len(getattr(p, "ds_shape", p.shape))
            (no_decay if ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def group_names(model: torch.nn.Module, weight_decay: float) -> list[list[str]]:
    """Parameter names of each optimizer group, in order: maps optimizer-held fp32 copies to names."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in param_groups(model, weight_decay)]


def trainable_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """The full shape of every trainable parameter (ZeRO-3 keeps it in `ds_shape` once partitioned)."""
    return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if p.requires_grad}


def adamw(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.AdamW:
    """The optimizer of every run (and of the benchmarks' bare loops): torch's fused AdamW, one kernel
    over every tensor, on CUDA and on the CPU. Measured here on the tiny CLIP's 3.4M parameters, one
    thread: 6.5 ms a step, against 20 ms for foreach and 34 ms for the per-tensor loop that ZeRO 1-3's
    one flat partition otherwise gets."""
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=True)


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Engine(Protocol):
    """What the harness uses of a DeepSpeed engine (deepspeed.runtime.engine.DeepSpeedEngine)."""

    module: torch.nn.Module
    training: bool
    global_steps: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def backward(self, loss: torch.Tensor) -> Any: ...
    def step(self) -> None: ...
    def is_gradient_accumulation_boundary(self) -> bool: ...
    def get_lr(self) -> list[float]: ...
    def get_global_grad_norm(self) -> float | torch.Tensor | None: ...
    def train(self, mode: bool = True) -> Any: ...
    def eval(self) -> Any: ...
    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool
    ) -> Any: ...
    def load_checkpoint(self, load_dir: str, tag: str, **kwargs: Any) -> tuple[str | None, Any]: ...
    def destroy(self) -> None: ...


def build_engine(
    model: torch.nn.Module,
    ds: DeepSpeedConfig,
    optim: OptimConfig,
    sizes: BatchSizes,
    total_steps: int,
    device: str,
    universal: bool = False,
) -> Engine:
    """Optimizer groups → ds config → deepspeed.initialize (ZeRO partitioning happens there). What
    must not train is frozen already (the task's `build`). `universal`: the checkpoint it will load is
    in DeepSpeed's universal format."""
    on_cuda = device.startswith("cuda")
    groups = param_groups(model, optim.weight_decay)
    config = ds_config(ds, optim, sizes, on_cuda, universal, model_width(model))
    optimizer = None
    if "optimizer" not in config:
        optimizer = adamw(groups, optim)
        if clips_in_optimizer(config, ds) and optim.grad_clip > 0:
            clip_before_step(optimizer, optim.grad_clip)
    schedule = lr_lambda(optim.warmup_steps, total_steps, optim.min_lr_ratio)
    engine, _, _, _ = _deepspeed().initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=groups if optimizer is None else None,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=config,
        dist_init_required=False,
    )
    if ds.zero_stage in (1, 2):
        vectorise_zero_grad_norm()
    if ds.zero_stage == 0 and sizes.world == 1:
        # One rank has nothing to average, yet ZeRO-0 would flatten, all-reduce, divide and copy back
        # every gradient each step (12 % of a CPU step of the tiny CLIP, by py-spy).
        engine.enable_backward_allreduce = False
    if engine.train_batch_size() != sizes.global_batch or engine.gradient_accumulation_steps() != sizes.accum:
        raise RuntimeError(
            f"DeepSpeed batch {engine.train_batch_size()} differs from the planned {sizes.global_batch}"
        )
    return engine


# The DeepSpeed versions whose `get_grad_norm_direct` (runtime/zero/stage_1_and_2.py) was read for
# `vectorise_zero_grad_norm`; another version keeps its own.
ZERO_NORM_READ = ("0.19.7",)


def vectorise_zero_grad_norm() -> bool:
    """ZeRO 1-2's gradient norm (for clipping and `train/grad_norm`) with one foreach kernel instead of
    DeepSpeed's Python loop of a `vector_norm` and a `.to()` per tensor: in DeepSpeed 0.19.7,
    runtime/zero/stage_1_and_2.py `get_grad_norm_direct` (lines 2149-2202), called by
    `scaled_global_norm` (2423) for each group's partition at every step. The same arithmetic
    (each norm in `get_norm_dtype()`, fp64 where the device has it; their squares summed, all-reduced
    over the data-parallel group, square-rooted; -1 for a non-finite norm), for the plain
    data-parallel case; anything else (another norm, model or pipeline parallelism) and other
    DeepSpeed versions keep DeepSpeed's loop. Returns whether the patch is in place."""
    deepspeed = _deepspeed()
    from deepspeed.runtime.zero import stage_1_and_2 as zero

    optimizer = zero.DeepSpeedZeroOptimizer
    if getattr(optimizer.get_grad_norm_direct, "vectorised", False):
        return True
    if deepspeed.__version__ not in ZERO_NORM_READ:
        log.info("DeepSpeed %s: ZeRO 1-2 keep their per-tensor gradient norm", deepspeed.__version__)
        return False
    original = optimizer.get_grad_norm_direct

    def get_grad_norm_direct(
        self: Any, gradients: list[torch.Tensor], params: list[Any], norm_type: float = 2
    ) -> Any:
        replicated = any(getattr(p, zero.PIPE_REPLICATED, False) for p in params)
        if float(norm_type) != 2.0 or self.model_parallel_rank != 0 or replicated:
            return original(self, gradients, params, norm_type)
        # as DeepSpeed's zip(param_gradients, params): padding left out, one gradient per parameter
        grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)][: len(params)]
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=zero.get_norm_dtype())
            total = torch.stack(norms).pow(2.0).sum().float()
        else:
            total = torch.tensor(0.0, dtype=torch.float32).to(self.device)
        zero.dist.all_reduce(total, op=zero.dist.ReduceOp.SUM, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=total, op=zero.dist.ReduceOp.SUM)
        total = total.pow(0.5)
        zero.mask_nan_or_inf_with_val_inplace(total, device=self.device)
        return total

    get_grad_norm_direct.vectorised = True  # type: ignore[attr-defined]
    get_grad_norm_direct.original = original  # type: ignore[attr-defined]
    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True


def device_skippable(engine: Engine) -> torch.optim.Optimizer | None:
    """The optimizer whose update the loop can skip on the device (trainer/guard.py), or None where it
    cannot: torch's fused AdamW (ours) takes `found_inf` as GradScaler gives it (optim/adam.py,
    _fused_adamw: the update and the step count are undone where it is nonzero), and DeepSpeed calls its
    `step()` directly under fp32 ZeRO-0 (engine._take_model_step) and ZeRO 1–3 (their _optimizer_step).
    Not under bf16 ZeRO-0, whose BF16_Optimizer asserts on the global norm (a host read, and an error on
    NaN), fp16 (its loss scaler reads overflow on the host itself) or ZeRO-Offload (DeepSpeed's CPU Adam)."""
    outer = getattr(engine, "optimizer", None)
    inner = getattr(outer, "optimizer", outer)
    fused = isinstance(inner, torch.optim.AdamW) and all(g.get("fused") for g in inner.param_groups)
    wrapper = type(outer).__name__
    if not fused or wrapper in ("BF16_Optimizer", "FP16_Optimizer", "FP16_UnfusedOptimizer"):
        return None
    fp16 = getattr(engine, "fp16_enabled", lambda: False)()
    return None if fp16 else inner


def save_checkpoint(engine: Engine, root: Path, tag: str, client_state: dict[str, Any]) -> None:
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)


def load_checkpoint(engine: Engine, root: Path, tag: str) -> None:
    path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise UserError(f"{root / tag}: DeepSpeed found no checkpoint to load")
    _reapply_schedule(engine)


def to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's own conversion of a ZeRO 1-3 checkpoint to its universal format
    (deepspeed/checkpoint/ds_to_universal.py, called as DeepSpeed's tests/unit/checkpoint do): each
    parameter's fp32 weights, Adam moments and step whole under out/zero/<name>/, which a ZeRO 1-3
    engine of any number of ranks re-partitions as it loads (`checkpoint.load_universal`). One process
    (its worker pools would fork a training process); `inject_missing_state` marks a checkpoint written
    without Megatron's universal-checkpoint info, which a plain data-parallel model does not need."""
    _deepspeed()
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as convert

    args = SimpleNamespace(
        input_folder=str(checkpoint),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    try:
        with (
            open(os.devnull, "w") as quiet,
            contextlib.redirect_stdout(quiet),
            contextlib.redirect_stderr(quiet),
        ):
            convert(args)  # prints every step and a progress bar
    except Exception as err:  # the converter asserts: any failure of it is a checkpoint it cannot take
        if isinstance(err, OSError | RuntimeError) and is_write_error(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(
            f"{checkpoint}: DeepSpeed cannot convert it to its universal format ({first})"
        ) from None
    finally:
        (out.parent / "latest_universal").unlink(
            missing_ok=True
        )  # its pointer for tag-less loads; we name tags


def load_universal(engine: Engine, folder: Path) -> None:
    """Load a checkpoint converted by `to_universal` into an engine built with `universal=True`: its
    ZeRO optimizer re-partitions every fp32 weight and moment over this run's ranks; the LR schedule
    and step counters come from the original's model states (copied into the folder by the converter)."""
    load_checkpoint(engine, folder.parent, folder.name)
    _own_steps(engine)


def _own_steps(engine: Engine) -> None:
    """Every optimizer state gets its own `step`, placed as torch's Optimizer.load_state_dict places it
    (optim/optimizer.py, _process_value_according_to_param_policy: float32 on the parameter's device
    for a fused or capturable optimizer). DeepSpeed 0.19.7's universal loader gives every ZeRO-3
    sub-group one shared step tensor (runtime/zero/stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    and leaves steps on the CPU; torch's fused AdamW adds 1 to each group's step in place
    (optim/adam.py, _fused_adam) and ZeRO-3 steps its sub-groups one at a time, so a shared step
    counted 2 per optimizer step here (Adam's bias correction then drifts)."""
    optimizer = getattr(engine, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        return
    on_device = any(g.get("fused") or g.get("capturable") for g in inner.param_groups)
    for param, state in inner.state.items():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            device = param.device if on_device else step.device
            state["step"] = step.to(dtype=torch.float32, device=device, copy=True)


def _reapply_schedule(engine: Engine) -> None:
    """The learning rate of the next update from this run's schedule at the loaded step. The saved
    scheduler state holds the step, not the schedule (a LambdaLR's function is not saved), so the
    rate DeepSpeed restores is the old schedule's; when a resume changes the schedule's length (another
    global batch), the new one applies from the first update, not the second. Untouched otherwise."""
    scheduler = getattr(engine, "lr_scheduler", None)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    step = scheduler.last_epoch
    rates = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    if rates != scheduler.get_last_lr():
        scheduler.last_epoch -= 1
        scheduler.step()  # the public way to set every group's rate (and the scheduler's record of it)


class Weights(Mapping[str, torch.Tensor]):
    """A checkpoint's consolidated fp32 weights, each tensor made when it is asked for and not kept:
    an export copies them into its model one at a time (`load_weights`) and never holds a second
    whole model beside it (at SD v1's U-Net, 3.4 GB fp32: the export ran out of memory on a 24 GiB
    node that trained it under ZeRO-3, bench/memory.py). Under ZeRO 1–3 a tensor is joined from the
    ranks' partitions of the fp32 masters, which DeepSpeed reads memory-mapped (zero_to_fp32.py,
    `lazy_mode`: its GatheredTensor)."""

    def __init__(self, made: Mapping[str, Any], prefix: str = "") -> None:
        if isinstance(made, Weights):  # a view of a view: of the same tensors, still unmade
            made, prefix = made.made, made.prefix + prefix
        self.made, self.prefix = made, prefix

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self.made[self.prefix + name]
        return (value if isinstance(value, torch.Tensor) else value.contiguous()).float()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.prefix + name in self.made  # Mapping's own would make it

    def __iter__(self) -> Iterator[str]:
        n = len(self.prefix)
        return (k[n:] for k in self.made if k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def under(self, prefix: str) -> Weights:
        """The weights whose names start with `prefix`, named without it."""
        return Weights(self.made, self.prefix + prefix)

    def shape(self, name: str) -> torch.Size:
        """A tensor's shape, without making it."""
        return torch.Size(self.made[self.prefix + name].shape)


def load_weights(
    module: torch.nn.Module, weights: Mapping[str, torch.Tensor], optional: tuple[str, ...] = ()
) -> None:
    """Copy `weights` into `module`'s parameters and persistent buffers of the same names, one tensor
    at a time (what `load_state_dict` does, without first making every tensor of a lazy mapping);
    a name missing on either side (but those in `optional`) is one line."""
    own = module.state_dict(keep_vars=True)
    missing = [k for k in own if k not in weights and k not in optional]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise UserError(
            f"the checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name in weights:
            target, value = own[name], weights[name]
            if target.shape != value.shape:
                raise UserError(
                    f"the checkpoint's {name} is {tuple(value.shape)}, the model's {tuple(target.shape)}"
                )
            target.copy_(value)
            del value  # before the next is made: one at a time


def consolidated_state_dict(checkpoint: Path, groups: list[list[str]] | None = None) -> Weights:
    """The full fp32 weights of the model from a checkpoint of any ZeRO stage, made one tensor at a
    time as they are read (`Weights`). `groups` (the optimizer groups' parameter names, kept in
    trainer_state.json) finds the fp32 masters that stage 0 with bf16/fp16 keeps inside its
    optimizer state."""
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        return Weights(_consolidate(checkpoint, groups))  # zero_to_fp32 prints every group it reassembles


def _consolidate(checkpoint: Path, groups: list[list[str]] | None) -> Mapping[str, Any]:
    _deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # ZeRO 1-3 (bf16 too) keep the fp32 master weights in per-rank partitions: joined when read.
    if any("zero_pp_rank" in p.name for p in checkpoint.iterdir()):
        return get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint.parent), tag=checkpoint.name, lazy_mode=True
        )
    model_file = checkpoint / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise UserError(f"{checkpoint}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
    saved = torch.load(
        model_file, map_location="cpu", weights_only=True, mmap=True
    )  # tensors and plain data only
    state = dict(saved["module"])
    masters = (
        (saved.get("optimizer") or {}).get("fp32_groups")
        if isinstance(saved.get("optimizer"), dict)
        else None
    )
    if masters and groups:  # stage 0 with bf16/fp16: the module holds rounded copies
        for names, tensors in zip(groups, masters, strict=True):
            for name, tensor in zip(names, tensors, strict=True):
                state[name] = tensor.view_as(state[name])
    return state


def live_weights(engine: Engine) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 tensor on the CPU) of every parameter of the live engine: DeepSpeed's fp32
    masters, gathered from the ranks' partitions under ZeRO 1–3 (a collective: every rank iterates),
    or kept whole beside the bf16/fp16 weights under ZeRO-0 (its unfused optimizer's fp32_groups)."""
    deepspeed = _deepspeed()
    from deepspeed.utils import safe_get_full_fp32_param

    optimizer = getattr(engine, "optimizer", None)
    masters = {
        id(low): high
        for lows, highs in zip(getattr(optimizer, "fp16_groups", []), getattr(optimizer, "fp32_groups", []))
        if isinstance(lows, list) and isinstance(highs, list)
        for low, high in zip(lows, highs)
        if low.shape == high.shape
    }
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None and hasattr(p, "ds_id"):  # ZeRO-3, frozen: gather the partitions to read them
            with deepspeed.zero.GatheredParameters([p]):
                full = p.data.detach().clone()
        if full is None:
            full = masters.get(id(p), p.data)
        yield name, full.detach().float().cpu()


def teardown(engine: Engine | None) -> None:
    """Destroy the engine before the process group: without it ~20 % of gloo runs abort at exit
    (shared/notes/stack-on-cpu.md; a gc.collect() here cost 0.6 s of every run and is not needed).
    Then let go of what ZeRO-3 keeps of it after destroy(), so that the engine, with every partition,
    gradient and optimizer state, is freed once the caller drops it (`_forget_zero3`)."""
    if engine is None:
        return
    module = engine.module
    engine.destroy()
    if hasattr(module, "ds_id"):  # partitioned by ZeRO-3
        _forget_zero3(module)


def _forget_zero3(module: torch.nn.Module) -> None:
    """Two references DeepSpeed 0.19.7's ZeRO-3 keeps to the module it partitioned, and through its
    hooks to the engine, after `destroy()` (runtime/zero/): the module-level stack its hooks start
    with the top module (parameter_offload.py, `setup_zero_stage3_hooks`:
    FWD_MODULE_STACK.append(self.module), never popped) and onto which its forward hooks push
    submodules (under gradient checkpointing a U-Net's recomputed blocks are left there: 70 of the
    tiny U-Net's convolutions, and through them the whole engine), and the class-level lru_cache of
    `PartitionedParameterCoordinator.__params_to_release` (partitioned_param_coordinator.py), keyed by
    the coordinator and each submodule. Found with gc.get_referrers; without this, 1.5 GB of ZeRO-3's
    training state stayed resident at ViT-B/32 shapes under the export."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = parameter_offload.FWD_MODULE_STACK
    mine = {id(m) for m in module.modules()}
    stack[:] = [m for m in stack if id(m) not in mine]
    release = getattr(
        PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None
    )
    for cell in getattr(release, "__closure__", None) or ():  # under DeepSpeed's nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()
