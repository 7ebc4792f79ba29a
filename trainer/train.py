"""`train(cfg)`: the table of contents of a training run. Each line is one concern's module."""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_prep.manifest import Manifest, load_manifest, verify_shards
from plumbing.config import save_config, to_dict
from plumbing.dist import DistInfo, destroy_process_group, init_process_group
from plumbing.errors import UserError
from plumbing.logs import setup_logging
from trainer.checkpoint import Checkpointer, TrainState
from trainer.config import TrainConfig
from trainer.data import Collate, TrainData
from trainer.engine import BatchSizes, build_engine, group_names, teardown
from trainer.evaluate import Evaluator
from trainer.export import export
from trainer.model import build_finetuner, load_processors
from trainer.monitor import Monitor, Stopwatch
from trainer.objectives import classification_loss, contrastive_loss
from trainer.tiny import build_tiny_clip, is_built

log = logging.getLogger("trainer")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on a signal; run again (or requeue) to continue
EXIT_DIVERGED = 3


@dataclass(frozen=True)
class RunFolder:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    log = property(lambda self: self.root / "train.log")
    tensorboard = property(lambda self: self.root / "tensorboard")
    checkpoints = property(lambda self: self.root / "checkpoints")
    export = property(lambda self: self.root / "export")
    base_model = property(lambda self: self.root / "base-model")


def train(cfg: TrainConfig) -> int:
    info = DistInfo.from_env()
    run = RunFolder(Path(cfg.run.dir))
    setup_logging(info.rank, run.log if info.is_main else None, cfg.run.verbose)
    device = init_process_group(info)
    engine = monitor = None
    try:
        log.info(
            "%s launch, %d ranks (%s); device %s", info.launcher, info.world_size, ranks_by_node(info), device
        )
        manifest = check_data(cfg, info)  # 1. the data, checked before anything heavy
        if info.is_main:
            save_config(cfg, run.config)
        source = model_source(cfg, run, info)  # 2. CLIP weights: hub id, folder, or the tiny preset
        torch.manual_seed(cfg.run.seed)
        model = build_finetuner(cfg.model, source)
        tokenizer, processor = load_processors(source)
        max_length = model.clip.config.text_config.max_position_embeddings
        collate = Collate(tokenizer, max_length, cfg.train.objective == "contrastive", processor)
        data = TrainData.of(cfg, manifest, info, collate, processor, device)  # 3. the epoch plan
        schedule = data.steps_per_epoch * cfg.train.epochs  # the LR horizon: train.max_steps only stops early
        total = min(schedule, cfg.train.max_steps) if cfg.train.max_steps else schedule
        sizes = BatchSizes(cfg.train.batch_size, cfg.train.grad_accum, info.world_size)
        on_cuda = device.startswith("cuda")
        engine = build_engine(
            model, cfg.model, cfg.deepspeed, cfg.optim, sizes, schedule, on_cuda
        )  # 4. DeepSpeed
        ckpt = Checkpointer(cfg.checkpoint, run.checkpoints, info)
        state = TrainState(
            world_size=info.world_size, loader_workers=data.layout.workers, micro_batch=sizes.micro
        )
        found = ckpt.find(cfg.resume)  # 5. resume
        if found is not None:
            state = ckpt.load(engine, found, state)
        class_prompts = prompts(manifest, cfg, collate) if cfg.train.objective == "classification" else None
        evaluator = Evaluator.of(cfg, data, class_prompts, collate, device)
        monitor = Monitor(run.root, info.is_main, device, cfg.run.log_every, total, state.step)
        log.info(
            "%d steps/epoch × %d epochs (%d steps), global batch %d; run folder %s",
            data.steps_per_epoch,
            cfg.train.epochs,
            total,
            sizes.global_batch,
            run.root,
        )
        loop = Loop(cfg, engine, data, ckpt, evaluator, monitor, state, class_prompts, device, total)
        code = loop.run()  # 6. train
        monitor.hparams(hyperparameters(cfg, sizes))
        if code == 0 and info.is_main:  # 7. export
            export(loop.last_checkpoint, run.export, overwrite=True)
            log.info("export: %s (tensorboard --logdir %s)", run.export, run.tensorboard)
        barrier()
        return code
    finally:
        if monitor is not None:
            monitor.close()
        teardown(engine)
        destroy_process_group()


def hyperparameters(cfg: TrainConfig, sizes: BatchSizes) -> dict[str, Any]:
    return {
        "model": cfg.model.name if cfg.model.preset != "tiny" else "tiny",
        "objective": cfg.train.objective,
        "head": cfg.model.head,
        "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay,
        "epochs": cfg.train.epochs,
        "global_batch": sizes.global_batch,
        "zero_stage": cfg.deepspeed.zero_stage,
        "precision": cfg.deepspeed.precision,
        "seed": cfg.run.seed,
    }


def ranks_by_node(info: DistInfo) -> str:
    """Which ranks run where, e.g. "node1: 0,1; node2: 2,3"."""
    names: list[str] = [info.node_name] * info.world_size
    if dist.is_initialized() and info.world_size > 1:
        dist.all_gather_object(names, info.node_name)
    by_node: dict[str, list[int]] = {}
    for rank, name in enumerate(names):
        by_node.setdefault(name, []).append(rank)
    return "; ".join(f"{name}: {','.join(map(str, ranks))}" for name, ranks in by_node.items())


def check_data(cfg: TrainConfig, info: DistInfo) -> Manifest:
    """Load the manifest and check the shards (rank 0 hashes; every rank gets the verdict)."""
    manifest = load_manifest(Path(cfg.data.manifest))
    problem = ""
    if info.is_main and cfg.data.verify != "none":
        try:
            for split in (cfg.data.train_split, cfg.data.eval_split):
                verify_shards(manifest, split, checksum=cfg.data.verify == "sha256")
        except UserError as err:
            problem = str(err)
    problem = broadcast(problem)
    if problem:
        raise UserError(problem)
    if cfg.train.objective == "classification" and not manifest.classes:
        raise UserError(
            f"{manifest.root / 'manifest.json'}: train.objective=classification needs class names (a cifar10 manifest)"
        )
    return manifest


def model_source(cfg: TrainConfig, run: RunFolder, info: DistInfo) -> str:
    """Where to `from_pretrained` from: the tiny preset is built once (rank 0) into the run folder."""
    if cfg.model.preset != "tiny":
        return cfg.model.name
    if info.is_main and not is_built(run.base_model, cfg.model.tiny):
        build_tiny_clip(run.base_model, cfg.model.tiny)
    barrier()
    return str(run.base_model)


def prompts(manifest: Manifest, cfg: TrainConfig, collate: Collate) -> dict[str, torch.Tensor]:
    texts = [t.format(label=name) for name in manifest.classes for t in cfg.train.class_templates]
    return collate.tokenize(texts)


class Loop:
    """Epochs of micro-steps, with the checkpoint, evaluation, signal and divergence checks between."""

    def __init__(
        self,
        cfg: TrainConfig,
        engine: Any,
        data: TrainData,
        ckpt: Checkpointer,
        evaluator: Evaluator,
        monitor: Monitor,
        state: TrainState,
        class_prompts: dict[str, torch.Tensor] | None,
        device: str,
        total: int,
    ) -> None:
        self.cfg, self.engine, self.data, self.ckpt, self.evaluator, self.monitor = (
            cfg,
            engine,
            data,
            ckpt,
            evaluator,
            monitor,
        )
        self.state, self.class_prompts, self.device, self.total = state, class_prompts, device, total
        self.dtype = next(engine.module.parameters()).dtype
        self.config = to_dict(cfg)
        self.groups = group_names(engine.module, cfg.optim.weight_decay)
        done = ckpt.complete()
        self.last_checkpoint: Path | None = done[-1] if done else None
        self.signals = StopSignals()
        self.bad_in_row = 0
        self.temperature = math.nan
        self.step_lr = math.nan
        self.unsynced = [0.0, 0.0]  # samples read, undecodable samples: summed over ranks at log steps
        self.read_total = 0.0
        self.step_samples = cfg.train.batch_size * cfg.train.grad_accum * state.world_size

    def run(self) -> int:
        s = self.state
        if s.step == 0 and s.micro_in_epoch == 0 and s.epoch == 0 and self.cfg.eval.at_start:
            self.monitor.evaluation(0, 0, self.evaluator.run(self.engine))
        while s.epoch < self.cfg.train.epochs and s.step < self.total:
            code = self.epoch()
            if code is not None:
                return code
        if self.last_checkpoint is None or self.last_checkpoint.name != s.tag():
            self.save()
        return 0

    def epoch(self) -> int | None:
        s = self.state
        watch = Stopwatch()
        data_time = 0.0
        for batch in self.data.epoch(s.epoch, s.micro_in_epoch):
            data_time += watch.lap()
            if s.step == 0 and s.micro_in_epoch == 0:  # what the model sees, once
                self.monitor.images(0, batch["pixel_values"], self.data.image_mean, self.data.image_std)
            loss, finite, boundary, stop = self.micro_step(batch)
            s.micro_in_epoch += 1
            self.unsynced[0] += len(batch["keys"])
            self.unsynced[1] += int(batch["skipped"])
            if not finite:
                s.nonfinite_steps += 1
                self.bad_in_row += 1
                if self.bad_in_row >= self.cfg.train.max_nonfinite:
                    return self.diverged()
            else:
                self.bad_in_row = 0
            if not (finite and boundary):
                continue
            s.step += 1
            s.samples_seen += self.step_samples
            if s.step % self.cfg.run.log_every == 0:
                self.sync_counters()
            step_time = watch.lap() + data_time
            self.monitor.step(
                s.step,
                loss,
                self.step_samples,
                step_time,
                data_time,
                self.step_lr,
                self.grad_norm(),
                self.temperature,
                s.skipped_samples,
                s.nonfinite_steps,
            )
            data_time = 0.0
            if stop:
                return self.preempted()
            if s.micro_in_epoch == self.data.micro_per_epoch:
                break  # the epoch's last step: its checkpoint is the epoch-end one, below
            if self.ckpt.should_save(s, epoch_end=False):
                self.save()
            if s.step >= self.total:  # train.max_steps, mid-epoch
                self.save()
                return 0
        s.epoch, s.micro_in_epoch = s.epoch + 1, 0
        self.sync_counters()
        if self.ckpt.should_save(s, epoch_end=True) or self.ckpt.should_save(s, epoch_end=False):
            self.save()
        if self.evaluator.should_eval(s.epoch, last=s.epoch == self.cfg.train.epochs):
            self.monitor.evaluation(s.step, s.epoch, self.evaluator.run(self.engine))
        return None

    def micro_step(self, batch: dict[str, Any]) -> tuple[float, bool, bool, bool]:
        """Forward, then agree across ranks whether the loss is finite and whether a stop signal came.
        A non-finite micro-batch is dropped before backward: DeepSpeed never sees it, and the next
        micro-batch takes its place in the accumulation window. Returns (loss, finite, boundary, stop)."""
        loss, self.temperature = self.loss(batch)
        flags = torch.tensor(
            [float(not torch.isfinite(loss)), float(self.signals.requested)], device=self.device
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop = bool(flags[1] > 0)
        if flags[0] > 0:
            log.warning(
                "non-finite loss at step %d (micro-batch %d of epoch %d): skipped",
                self.state.step,
                self.state.micro_in_epoch,
                self.state.epoch,
            )
            return math.nan, False, False, stop
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.step_lr = float(
            self.engine.get_lr()[0]
        )  # the rate this update uses (the scheduler steps after it)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach()), True, boundary, stop

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, float]:
        """The objective's loss and the temperature (read from the forward: under ZeRO-3 the parameter
        itself is only gathered inside it)."""
        pixels = batch["pixel_values"].to(self.device, self.dtype, non_blocking=True)
        if self.cfg.train.objective == "classification":
            assert self.class_prompts is not None
            ids, mask = self.class_prompts["input_ids"], self.class_prompts["attention_mask"]
        else:
            ids, mask = batch["input_ids"], batch["attention_mask"]
        image, text, scale = self.engine(
            pixel_values=pixels, input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
        )
        image, text, scale = image.float(), text.float(), scale.float()
        if self.cfg.train.objective == "classification":
            labels = batch["labels"].to(self.device)
            return classification_loss(
                image, text, scale, labels, len(self.cfg.train.class_templates)
            ), float(scale)
        return contrastive_loss(image, text, scale), float(scale.detach())

    def sync_counters(self) -> None:
        """Sum the undecodable-sample counts over ranks; too many stops the run."""
        counts = torch.tensor(self.unsynced, dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(counts)
        self.unsynced = [0.0, 0.0]
        self.read_total += float(counts[0])
        self.state.skipped_samples += int(counts[1])
        fraction = self.state.skipped_samples / max(self.read_total, 1.0)
        if (
            self.state.skipped_samples
            and fraction > self.cfg.data.max_bad_fraction
            and self.read_total >= 100
        ):
            raise UserError(
                f"{self.state.skipped_samples} undecodable samples ({fraction:.1%} of those read) exceed "
                f"data.max_bad_fraction={self.cfg.data.max_bad_fraction}: check the shards of {self.cfg.data.manifest}"
            )

    def save(self) -> bool:
        """Checkpoint, unless the parameters went non-finite: a checkpoint is always one to go back to."""
        if not params_finite(self.engine):
            log.error(
                "parameters are not finite at step %d: not checkpointed (newest good: %s)",
                self.state.step,
                self.last_checkpoint,
            )
            return False
        self.last_checkpoint = self.ckpt.save(self.engine, self.state, self.config, self.groups)
        return True

    def preempted(self) -> int:
        self.save()
        since = time.monotonic() - (self.signals.received_at or time.monotonic())
        log.info(
            "stop signal: checkpoint %s written %.1f s after the signal; exiting %d",
            self.last_checkpoint,
            since,
            EXIT_PREEMPTED,
        )
        return EXIT_PREEMPTED

    def diverged(self) -> int:
        """N non-finite losses in a row. They were skipped, so if the parameters are still finite they
        are those from before the divergence: checkpoint them. Either way, stop with a message."""
        saved = self.save()
        where = (
            f"checkpoint {self.last_checkpoint} holds the parameters from before the divergence"
            if saved
            else f"the newest good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint was written"
        )
        raise UserError(
            f"{self.bad_in_row} non-finite losses in a row at step {self.state.step} (train.max_nonfinite): {where}; "
            "lower optim.lr or check the data"
        )

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)


class StopSignals:
    """SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption, torchrun's shutdown):
    finish the step, checkpoint, exit EXIT_PREEMPTED."""

    def __init__(self) -> None:
        self.requested = False
        self.received_at: float | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self.requested:
            self.received_at = time.monotonic()
            log.info("received %s: checkpointing after this step", signal.Signals(signum).name)
        self.requested = True


def params_finite(engine: Any) -> bool:
    ok = torch.tensor([1.0])
    for p in engine.module.parameters():
        data = getattr(p, "ds_tensor", p.data)  # ZeRO-3 keeps this rank's partition there
        if data.numel() and not bool(torch.isfinite(data).all()):
            ok[0] = 0.0
            break
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok[0] > 0)


def broadcast(text: str) -> str:
    if not dist.is_initialized():
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
