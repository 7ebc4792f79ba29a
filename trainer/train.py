"""`train(cfg)`: the table of contents of a training run. Each line is one concern's module."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.manifest import Manifest, load_manifest, verify_shards
from plumbing.config import save_config
from plumbing.dist import (
    DistInfo,
    barrier,
    broadcast_object,
    destroy_process_group,
    gather_objects,
    init_process_group,
)
from plumbing.errors import UserError
from plumbing.logs import setup_logging
from plumbing.watchdog import Watchdog
from trainer.attempts import AttemptLog
from trainer.checkpoint import Checkpointer, Saved, TrainState, check_fits
from trainer.config import TrainConfig
from trainer.data import TrainData
from trainer.engine import Engine, build_engine, group_names, teardown, trainable_shapes
from trainer.evaluate import Evaluator
from trainer.export import export, live_digests, verify_export
from trainer.loop import Loop, Parts
from trainer.memory.check import memory_verdict
from trainer.memory.host import give_back, map_large_blocks
from trainer.memory.recorder import MemoryRecorder
from trainer.monitor import Monitor
from trainer.plan import Plan, plan
from trainer.run import RunFolder
from trainer.tasks import make_task
from trainer.tasks.base import Task

log = logging.getLogger("trainer")


def train(cfg: TrainConfig) -> int:
    info = DistInfo.from_env()
    run = RunFolder(Path(cfg.run.dir))
    setup_logging(info.rank, run.log if info.is_main else None, cfg.run.verbose)
    tries = AttemptLog(run.attempts, info)  # 0. this try of the launch, recorded for the next one
    refused = tries.refusal()
    if refused is not None:  # a restart that would fail where the last ones did
        return tries.refuse(refused)
    tries.started()
    watchdog = Watchdog(cfg.watchdog, info.rank, run.log if info.is_main else None, tries.hung)
    watchdog.arm("start-up", long=True)  # until the first step: the watchdog's and c10d's long limit
    device = init_process_group(info, cfg.watchdog.collective_s(cfg.watchdog.startup_s))
    if device == "cpu" and cfg.run.mmap_threshold_kb:
        map_large_blocks(cfg.run.mmap_threshold_kb * 1024)
    memory = MemoryRecorder(device, info)
    monitor = None
    try:
        where = ranks_by_node(info)
        log.info("%s launch, %d ranks (%s); device %s", info.launcher, info.world_size, where, device)
        manifest = check_data(cfg, info)  # 1. the data, checked before anything heavy
        ckpt = Checkpointer(cfg.checkpoint, run.checkpoints, info)
        saved = ckpt.find(cfg.resume)  # 2. the checkpoint to resume, if any (read, not loaded yet)
        # 3. the plan: steps, total, LR horizon; how a resume continues under this run's layout
        the_plan = plan(cfg, manifest, info.world_size, saved)
        memory_plan = plan_memory(cfg, info, manifest, device)  # and the memory each rank will need
        if info.is_main:
            save_config(cfg, run.config)
        task = make_task(cfg, run, info, device)  # 4. the task: model, preprocessing, loss, export
        data = TrainData.of(
            cfg.data,
            manifest,
            the_plan.layout,
            the_plan.micro_per_epoch,
            info.rank,
            cfg.run.seed,
            task,
            device,
            the_plan.rest,
        )
        start = the_plan.state().step
        monitor = Monitor(run.root, info.is_main, device, cfg.run.log_every, the_plan.total, start)
        # 5.–8. build, partition, resume, train; everything the engine held is freed when it returns
        session = Session(
            info, device, run, ckpt, saved, the_plan, task, data, monitor, memory, watchdog, tries
        )
        trained = fit(cfg, session)
        monitor.hparams({**task.hyperparameters(), **hyperparameters(cfg, the_plan.global_batch)})
        with watchdog.phase("export"):
            if trained.code == 0:  # 9. export the last checkpoint, checked against the trained weights
                publish(trained, task, run, info.is_main, memory)
            memory.write(run.root, memory_plan, monitor, trained.step)
            barrier()
        tries.finished(trained.code)
        return trained.code
    except BaseException as err:
        tries.failed(err)
        raise
    finally:
        watchdog.arm("shutdown", long=True)
        if monitor is not None:
            monitor.close()
        destroy_process_group()
        watchdog.close()


@dataclass(frozen=True)
class Session:
    """What `train` prepared for `fit`."""

    info: DistInfo
    device: str
    run: RunFolder
    ckpt: Checkpointer
    saved: Saved | None
    plan: Plan
    task: Task
    data: TrainData
    monitor: Monitor
    memory: MemoryRecorder
    watchdog: Watchdog
    tries: AttemptLog


@dataclass(frozen=True)
class Trained:
    code: int  # the loop's exit code
    step: int  # optimizer steps done
    checkpoint: Path | None  # the last complete checkpoint
    digests: dict[str, str] | None  # the trained weights' fingerprints (rank 0), what the export must hold


def fit(cfg: TrainConfig, s: Session) -> Trained:
    """5.–8.: the task's model built, partitioned by DeepSpeed, resumed, trained; then the trained
    weights' fingerprints. The engine is destroyed on the way out and, once `train` drops the last
    reference, its partitions, gradients and optimizer state are freed: the export that follows
    builds its own copy of the model without the training state beside it (trainer/memory/)."""
    memory, engine = s.memory, None
    try:
        torch.manual_seed(cfg.run.seed)  # the initialisation of what the task adds (the heads)
        with memory.phase("build"):
            model = s.task.build()
        with memory.phase("convert"):  # 5. refused, or converted
            universal = continuable(s.ckpt, s.saved, cfg, model, s.info.world_size)
        # 6. DeepSpeed: ZeRO partitions the task's model, the optimizer and the LR schedule; the whole
        # model every rank built is freed then: its pages go back to the OS at once (host.give_back)
        with memory.phase("initialize", trim=True):
            built = build_engine(
                model,
                cfg.deepspeed,
                cfg.optim,
                s.plan.sizes,
                s.plan.horizon,
                s.device,
                universal is not None,
            )
        engine = memory.watch(built)
        state = resume(s.ckpt, engine, s.task, s.saved, universal, s.plan)  # 7. resume
        s.tries.state = state
        evaluator = Evaluator(cfg.eval, s.task, lambda: s.data.eval_batches(cfg.eval.batch_size))
        log.info("%s; run folder %s", s.plan.describe(cfg.data.train_split), s.run.root)
        if s.saved is not None and s.plan.note:
            log.info("resuming %s under another layout: %s", s.saved.path, s.plan.note)
        parts = Parts(s.task, s.data, engine, s.ckpt, evaluator, s.monitor, s.watchdog)
        loop = Loop(cfg, s.plan, parts, state, s.info.rank)
        code = loop.run()  # 8. train
        verify = code == 0 and cfg.run.verify_export
        s.watchdog.arm("export", long=True)  # the check, the teardown and the export: a long phase
        with memory.phase("verify"):
            digests = live_digests(engine, s.task, s.info.is_main) if verify else None
        return Trained(code, loop.state.step, loop.last_checkpoint, digests)
    finally:
        memory.forget_engine()
        s.task.release()
        teardown(engine)


def plan_memory(cfg: TrainConfig, info: DistInfo, manifest: Manifest, device: str) -> dict[str, Any] | None:
    """Rank 0 makes the memory plan (`--check` prints the same; trainer/memory/check.py) and logs it;
    every rank gets its verdict: a plan that does not fit stops the run here, in one line, unless
    run.check_memory=false. Kept for memory.json, beside what the run measures."""
    made, refusal = None, ""
    if info.is_main:
        cuda = device.startswith("cuda")
        verdict = memory_verdict(cfg, info.world_size, info.local_world_size, manifest, cuda)
        if verdict is not None:
            for line in verdict.lines:
                log.info("%s", line)
            made = verdict.plan.to_dict()
            refusal = verdict.refusal if cfg.run.check_memory else ""
    refusal = broadcast_object(refusal)
    if refusal:
        raise UserError(refusal)
    return made


def continuable(
    ckpt: Checkpointer, saved: Saved | None, cfg: TrainConfig, model: torch.nn.Module, world: int
) -> Path | None:
    """Refuse, in one line, a checkpoint of another task, ZeRO stage or model; return the folder it
    loads from in DeepSpeed's universal format when this run needs one (another number of ranks)."""
    if saved is None:
        return None
    groups = group_names(model, cfg.optim.weight_decay)
    check_fits(saved, cfg.train.objective, cfg.deepspeed.zero_stage, groups, trainable_shapes(model), world)
    return ckpt.universal(saved, world, cfg.deepspeed.zero_stage, cfg.deepspeed.universal_forced)


def resume(
    ckpt: Checkpointer,
    engine: Engine,
    task: Task,
    saved: Saved | None,
    universal: Path | None,
    the_plan: Plan,
) -> TrainState:
    """The state to start from (the plan's); the engine and task restored from the checkpoint, if any."""
    if saved is not None:
        task.load_extra_state(ckpt.load(engine, saved, universal))
    return the_plan.state()


def publish(trained: Trained, task: Task, run: RunFolder, main: bool, memory: MemoryRecorder) -> None:
    """Rank 0 exports the last checkpoint and checks it, tensor by tensor, against the trained
    weights' fingerprints; the other ranks wait. The engine is gone by now: what it held is collected
    first, and the freed pages handed back, so the export peaks below the training."""
    gc.collect()  # the engine's reference cycles (DeepSpeed's hooks on the module)
    give_back()
    with memory.phase("export"):
        if main:
            export(trained.checkpoint, run.export, task)
            log.info("export: %s (tensorboard --logdir %s)", run.export, run.tensorboard)
    if main and trained.digests is not None:
        with memory.phase("verify"):
            verify_export(trained.digests, task, run.export)
    barrier()


def hyperparameters(cfg: TrainConfig, global_batch: int) -> dict[str, object]:
    return {
        "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "epochs": cfg.train.epochs,
        "global_batch": global_batch,
        "zero_stage": cfg.deepspeed.zero_stage,
        "precision": cfg.deepspeed.precision,
        "seed": cfg.run.seed,
    }


def ranks_by_node(info: DistInfo) -> str:
    """Which ranks run where, e.g. "node1: 0,1; node2: 2,3"."""
    by_node: dict[str, list[int]] = {}
    for rank, name in enumerate(gather_objects(info.node_name)):
        by_node.setdefault(name, []).append(rank)
    return "; ".join(f"{name}: {','.join(map(str, ranks))}" for name, ranks in by_node.items())


def check_data(cfg: TrainConfig, info: DistInfo) -> Manifest:
    """Load the manifest and check that every shard is there with its size (rank 0 looks; every rank
    gets the verdict). Checksums are compared as the loader streams each shard (core.shards)."""
    manifest = load_manifest(Path(cfg.data.manifest))
    problem = ""
    if info.is_main and cfg.data.verify != "none":
        try:
            for split in (cfg.data.train_split, cfg.data.eval_split):
                verify_shards(manifest, split, checksum=False)
        except UserError as err:
            problem = str(err)
    problem = broadcast_object(problem)
    if problem:
        raise UserError(problem)
    return manifest
