"""`train(cfg)`: the table of contents of a training run. Each line is one concern's module."""

from __future__ import annotations

import logging
from pathlib import Path

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
from trainer.export import export, verify_export
from trainer.loop import Loop, Parts
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
    engine = monitor = None
    try:
        where = ranks_by_node(info)
        log.info("%s launch, %d ranks (%s); device %s", info.launcher, info.world_size, where, device)
        manifest = check_data(cfg, info)  # 1. the data, checked before anything heavy
        ckpt = Checkpointer(cfg.checkpoint, run.checkpoints, info)
        saved = ckpt.find(cfg.resume)  # 2. the checkpoint to resume, if any (read, not loaded yet)
        # 3. the plan: steps, total, LR horizon; how a resume continues under this run's layout
        the_plan = plan(cfg, manifest, info.world_size, saved)
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
        torch.manual_seed(cfg.run.seed)  # the initialisation of what the task adds (the heads)
        model = task.build()
        universal = continuable(ckpt, saved, cfg, model, info.world_size)  # 5. refused, or converted
        # 6. DeepSpeed: ZeRO partitions the task's model, the optimizer and the LR schedule
        engine = build_engine(
            model,
            cfg.deepspeed,
            cfg.optim,
            the_plan.sizes,
            the_plan.horizon,
            device,
            universal is not None,
        )
        state = resume(ckpt, engine, task, saved, universal, the_plan)  # 7. resume
        tries.state = state
        evaluator = Evaluator(cfg.eval, task, lambda: data.eval_batches(cfg.eval.batch_size))
        monitor = Monitor(run.root, info.is_main, device, cfg.run.log_every, the_plan.total, state.step)
        log.info("%s; run folder %s", the_plan.describe(cfg.data.train_split), run.root)
        if saved is not None and the_plan.note:
            log.info("resuming %s under another layout: %s", saved.path, the_plan.note)
        parts = Parts(task, data, engine, ckpt, evaluator, monitor, watchdog)
        loop = Loop(cfg, the_plan, parts, state, info.rank)
        code = loop.run()  # 8. train
        monitor.hparams({**task.hyperparameters(), **hyperparameters(cfg, the_plan.global_batch)})
        with watchdog.phase("export"):
            if code == 0:  # 9. export, checked against the live engine
                publish(engine, task, loop.last_checkpoint, run, cfg.run.verify_export, info.is_main)
            barrier()
        tries.finished(code)
        return code
    except BaseException as err:
        tries.failed(err)
        raise
    finally:
        watchdog.arm("shutdown", long=True)
        if monitor is not None:
            monitor.close()
        teardown(engine)
        destroy_process_group()
        watchdog.close()


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


def publish(
    engine: Engine, task: Task, checkpoint: Path | None, run: RunFolder, verify: bool, main: bool
) -> None:
    """Rank 0 exports the last checkpoint; then every rank helps check it against the live engine."""
    if main:
        export(checkpoint, run.export, task)
        log.info("export: %s (tensorboard --logdir %s)", run.export, run.tensorboard)
    barrier()
    if verify:
        verify_export(engine, task, run.export, main)


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
