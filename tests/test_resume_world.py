"""Resuming on another number of ranks (or loader workers, batch, shuffle buffer): the data of the
interrupted epoch stays exact, and the model, Adam moments and LR schedule carry over.

The fast tests read the real shards in-process through the trainer's own TrainEpoch, one loader worker
at a time in the DataLoader's order, and check the legs of an epoch key by key. The system tests
(2-rank torchrun on CPU/gloo) stop real runs mid-epoch and resume them on another number of ranks.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import trainer.data as data
from core.manifest import load_manifest
from core.shards import cut, read_ranges, split_shards
from plumbing.config import load_config
from tests.helpers import PY, ROOT, launcher, run, scalars, trainer_args
from trainer.checkpoint import TrainState
from trainer.config import TrainConfig
from trainer.data import Layout, Leg, Rest, TrainEpoch, untrained
from trainer.engine import lr_lambda, to_universal
from trainer.plan import plan

SEED, EPOCH, SHUFFLE = 0, 1, 50


def keys_only(sample: dict[str, Any], _seed: int, _train: bool) -> dict[str, Any]:
    return {"key": sample["key"]}


def key_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"keys": [i["key"] for i in items]}


def rank_stream(
    monkeypatch: pytest.MonkeyPatch,
    shards: list,
    layout: Layout,
    rank: int,
    start: int,
    count: int,
    rest: Rest | None = None,
) -> list[list[str]]:
    """Micro-batches `start`.. of one rank, as its DataLoader hands them over: loader worker j's
    batches in turn (worker 0 first), each loader worker its own TrainEpoch iterator."""
    streams: list[Iterator[dict[str, Any]]] = []
    for worker in range(layout.workers):
        monkeypatch.setattr(data, "get_worker_info", lambda w=worker: SimpleNamespace(id=w))
        dataset = TrainEpoch(shards, layout, rank, EPOCH, start, SHUFFLE, SEED, keys_only, key_batch, rest)
        streams.append(iter(dataset))  # the pipeline reads get_worker_info when it starts
        monkeypatch.undo()
    out = []
    for turn in itertools.islice(itertools.cycle(range(layout.workers)), count):
        out.append(next(streams[turn])["keys"])
    return out


@pytest.fixture(scope="module")
def epoch_shards(small_data: dict[str, Path]) -> tuple[list, list[str]]:
    """The train split's shards in epoch 1's seeded order, and every sample key in that order."""
    manifest = load_manifest(small_data["cifar10"])
    shards = split_shards(manifest, "train", SEED, EPOCH, shuffle=True)
    keys = [s["__key__"] for s in read_ranges(cut(shards, 0, 320))]
    return shards, keys


def flat(batches: list[list[str]]) -> list[str]:
    return [k for b in batches for k in b]


def test_an_epoch_continued_under_other_layouts_trains_each_untrained_sample_once(
    epoch_shards: tuple[list, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leg 0: 2 ranks × 2 workers × batch 16 stop after 3 micro-batches each. The untrained positions,
    replayed from the legs alone, are exactly the samples the real readers did not hand out. Leg 1
    (1 rank × 2 workers × batch 16, accum 2) reads them all, none twice; stopped after 4 micro-batches
    and resumed on the same layout it hands out the very batches an uninterrupted leg 1 would. Leg 2
    (2 ranks × 1 worker × batch 12) reads what is left in whole steps and leaves out the remainder
    (16 samples: fewer than ranks × batch × accum per slot, as at an epoch's end)."""
    shards, every = epoch_shards
    assert len(every) == len(set(every)) == 320
    a = Leg(2, 2, 16, SHUFFLE, micro=3)
    lay_a = Layout.over(320, 2, 2, 16)
    trained = [k for r in range(2) for k in flat(rank_stream(monkeypatch, shards, lay_a, r, 0, a.micro))]
    pool = untrained(320, [a], SEED, EPOCH)
    assert len(trained) == len(set(trained)) == 96
    assert [every[p] for p in pool] == [k for k in every if k not in set(trained)]

    lay_b = Layout.over(len(pool), 1, 2, 16)
    rest_b = Rest(EPOCH, (a,), lay_b, lay_b.micro_batches // 2 * 2, pool)
    whole_b = rank_stream(monkeypatch, shards, lay_b, 0, 0, rest_b.micro, rest_b)
    assert rest_b.micro == 14 and sorted(trained + flat(whole_b)) == sorted(every)
    resumed_b = rank_stream(monkeypatch, shards, lay_b, 0, 4, rest_b.micro - 4, rest_b)
    assert resumed_b == whole_b[4:]  # the same layout again: the exact batches (rotated loader workers)

    b = Leg(1, 2, 16, SHUFFLE, micro=4)
    pool_c = untrained(320, [a, b], SEED, EPOCH)
    done = set(trained) | set(flat(whole_b[:4]))
    assert [every[p] for p in pool_c] == [k for k in every if k not in done]
    lay_c = Layout.over(len(pool_c), 2, 1, 12)
    rest_c = Rest(EPOCH, (a, b), lay_c, lay_c.micro_batches, pool_c)
    read_c = [
        k for r in range(2) for k in flat(rank_stream(monkeypatch, shards, lay_c, r, 0, rest_c.micro, rest_c))
    ]
    assert len(read_c) == len(set(read_c)) == 2 * 6 * 12 and not set(read_c) & done
    assert len(pool_c) - len(read_c) == 16  # 80 a slot, 6 whole batches of 12: 8 left out in each of 2


def test_a_replay_of_leg_zero_is_the_resume_the_trainer_always_did(
    epoch_shards: tuple[list, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without legs the reader is the one exact resume was proven with: micro-batches 5.. of a rank
    resumed at 5 are those of an uninterrupted epoch (the leg-0 seeds are the seeds it always had)."""
    shards, _ = epoch_shards
    lay = Layout.over(320, 2, 2, 16)
    whole = rank_stream(monkeypatch, shards, lay, 1, 0, lay.micro_batches)
    assert rank_stream(monkeypatch, shards, lay, 1, 5, lay.micro_batches - 5) == whole[5:]
    rest = Rest(EPOCH, (), lay, lay.micro_batches, np.arange(320))
    assert data.shuffle_seed(SEED, EPOCH, 3, 0) == data.derive_seed(SEED, "shuffle", EPOCH, 3)
    assert rank_stream(monkeypatch, shards, lay, 1, 0, lay.micro_batches, rest) == whole


def config(manifest: Path, *overrides: str) -> TrainConfig:
    base = [
        f"data.manifest={manifest}",
        "run.dir=unused",
        "train.batch_size=16",
        "train.epochs=2",
        "data.workers=2",
        f"data.shuffle_buffer={SHUFFLE}",
        *overrides,
    ]
    return load_config(TrainConfig, ROOT / "configs/demo-cifar10.yaml", base)


def saved_at(step: int, ranks: int, accum: int, horizon: int, micro: int) -> TrainState:
    return TrainState(
        epoch=0,
        step=step,
        micro_in_epoch=micro,
        world_size=ranks,
        loader_workers=2,
        micro_batch=16,
        shuffle_buffer=SHUFFLE,
        grad_accum=accum,
        horizon=horizon,
    )


def test_the_plan_keeps_the_global_batch_when_it_divides_and_says_what_changes(small_data) -> None:
    manifest = load_manifest(small_data["cifar10"])
    cfg = config(small_data["cifar10"])
    # 2 → 1 rank at step 3: grad_accum 1 → 2 keeps 32; the 224 untrained samples are 7 steps, the
    # next epoch 10: the same 20-step LR horizon as the run it continues
    down = plan(cfg, manifest, 1, saved_at(3, 2, 1, 20, 3))
    assert (down.accum, down.global_batch, down.rest.micro, down.horizon, down.total) == (2, 32, 14, 20, 20)
    assert "global batch kept at 32 (grad_accum 1 → 2)" in down.note
    assert (
        "224 samples of epoch 0 not yet trained: 7 steps" in down.note and "LR horizon 20 → 20" in down.note
    )
    start = down.state()
    assert (start.step, start.micro_in_epoch, start.world_size, start.grad_accum, start.horizon) == (
        3,
        0,
        1,
        2,
        20,
    )
    assert start.legs == [Leg(2, 2, 16, SHUFFLE, 3)]
    # 1 → 2 ranks at step 4 of 40: 16 does not divide over 2 ranks × 16: the global batch doubles, the
    # 256 untrained samples are 8 steps, the next epoch 10: horizon 4 + 8 + 10
    up = plan(cfg, manifest, 2, saved_at(4, 1, 1, 40, 4))
    assert (up.accum, up.global_batch, up.rest.micro, up.horizon) == (1, 32, 8, 22)
    assert "global batch 16 → 32 (16 is not a multiple of 2 ranks × batch 16)" in up.note
    assert "steps per epoch 20 → 10" in up.note and "LR horizon 40 → 22 steps" in up.note
    # a leg whose untrained samples do not fill whole steps leaves the rest out, and says how many
    odd = plan(config(small_data["cifar10"], "train.batch_size=12"), manifest, 2, saved_at(4, 1, 1, 40, 4))
    assert odd.rest.micro == 10 and "16 left out (whole steps only" in odd.note
    # the same layout: nothing to say, the recorded horizon kept, the data position kept
    same = plan(cfg, manifest, 2, saved_at(7, 2, 1, 20, 7))
    assert same.note == "" and same.rest is None and same.state().micro_in_epoch == 7 and same.horizon == 20


# --------------------------------------------------------------------------- system: torchrun on CPU/gloo


def launch(
    ranks: int, args: list[str], keys: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """The trainer on `ranks` ranks (torchrun for 2, a plain process for 1), recording trained keys."""
    cmd = [*launcher(ranks), *args] if ranks > 1 else [PY, "-m", "trainer", *args]
    extra = {"TRAINER_RECORD_KEYS": str(keys)} if keys else {}
    return run(cmd, check=check, **extra)


def run_args(manifest: Path, run_dir: Path, stage: int, precision: str, epochs: int, *more: str) -> list[str]:
    return trainer_args(
        manifest,
        run_dir,
        f"deepspeed.zero_stage={stage}",
        f"deepspeed.precision={precision}",
        "deepspeed.stage3_param_persistence_threshold=0",  # ZeRO-3 partitions every tensor
        f"train.epochs={epochs}",
        "eval.at_start=false",
        "eval.every_epochs=0",
        *more,
    )


def trained(keys: Path) -> dict[int, list[str]]:
    """Every rank's trained keys by epoch (the TRAINER_RECORD_KEYS files)."""
    out: dict[int, list[str]] = {}
    for f in keys.glob("keys-rank*.tsv"):
        for line in f.read_text().splitlines():
            epoch, key = line.split("\t")
            out.setdefault(int(epoch), []).append(key)
    return out


def whole_states(checkpoint: Path, work: Path) -> dict[str, torch.Tensor]:
    """Each trainable parameter's fp32 weights, Adam moments and step, whole: ZeRO-0's as saved (one
    file for every rank), ZeRO 1-3's reassembled by DeepSpeed's own ds_to_universal."""
    names = [
        n
        for group in json.loads((checkpoint / "trainer_state.json").read_text())["param_groups"]
        for n in group
    ]
    out: dict[str, torch.Tensor] = {}
    if not list(checkpoint.glob("*zero_pp_rank_*optim_states.pt")):
        saved = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        optim = saved["optimizer"]
        inner = optim.get("optimizer_state_dict", optim)  # bf16: DeepSpeed's wrapper around torch's state
        masters = [t for group in optim.get("fp32_groups", []) for t in group]
        for i, name in enumerate(names):
            out[f"{name}/fp32"] = (masters[i] if masters else saved["module"][name]).float().flatten()
            for key, value in inner["state"][i].items():
                out[f"{name}/{key}"] = torch.as_tensor(value).float().flatten()
        return out
    to_universal(checkpoint, work)
    common = torch.load(work / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    for i, state in (
        (common.get("optimizer_state_dict") or {}).get("state", {}).items()
    ):  # ZeRO-3 keeps it here
        out[f"group{i}/step"] = torch.as_tensor(state["step"]).float().flatten()
    for name in names:
        for f in (work / "zero" / name).glob("*.pt"):
            value = torch.load(f, map_location="cpu", weights_only=False)
            out[f"{name}/{f.stem}"] = torch.as_tensor(
                value["param"] if isinstance(value, dict) else value
            ).flatten()
    return out


def optimizer_steps(checkpoint: Path) -> set[float]:
    """Every Adam `step` counter in a checkpoint's optimizer files (all ranks)."""
    found: set[float] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key == "step" and isinstance(value, torch.Tensor | int | float):
                    found.add(float(value))
                else:
                    walk(value)
        elif isinstance(obj, list | tuple):
            for value in obj:
                walk(value)

    files = sorted(checkpoint.glob("*optim_states.pt")) or [checkpoint / "mp_rank_00_model_states.pt"]
    for f in files:
        walk(
            torch.load(f, map_location="cpu", weights_only=False)[
                "optimizer" if "mp_rank_00_model" in f.name else "optimizer_state_dict"
            ]
        )
    return found


def lr_scheduler(checkpoint: Path) -> dict[str, Any]:
    model_states = next(checkpoint.glob("*mp_rank_00_model_states.pt"))
    return torch.load(model_states, map_location="cpu", weights_only=False)["lr_scheduler"]


CASES = [  # stage, precision, ranks before → after, stop at step, epochs, LR horizon before → after
    pytest.param(2, "fp32", 2, 1, 3, 2, (20, 20), id="zero2-fp32-2to1"),
    pytest.param(2, "bf16", 1, 2, 4, 1, (20, 12), id="zero2-bf16-1to2"),
    pytest.param(3, "bf16", 2, 1, 3, 1, (10, 10), id="zero3-bf16-2to1"),
    pytest.param(3, "fp32", 1, 2, 4, 1, (20, 12), id="zero3-fp32-1to2"),
    pytest.param(0, "fp32", 2, 1, 3, 1, (10, 10), id="zero0-fp32-2to1"),
]


@pytest.mark.system
@pytest.mark.parametrize(("stage", "precision", "before", "after", "stop", "epochs", "horizons"), CASES)
def test_a_run_stopped_mid_epoch_finishes_on_another_number_of_ranks(
    small_data: dict[str, Path],
    tmp_path: Path,
    stage: int,
    precision: str,
    before: int,
    after: int,
    stop: int,
    epochs: int,
    horizons: tuple[int, int],
) -> None:
    """Stopped at a mid-epoch step (train.max_steps), then resumed on the other number of ranks:

    - the state the resumed engine holds, written again at once by a run of the new size that resumes
      the checkpoint and trains nothing, equals the checkpoint's, exactly (torch.equal): every
      trainable parameter's fp32 weights (bf16's masters), both Adam moments (exp_avg, exp_avg_sq) and
      the step counter — ZeRO 1-3 read whole through DeepSpeed's ds_to_universal from both
      checkpoints, ZeRO-0 from its one model-states file — and the LR scheduler's state;
    - the resumed run finishes, converting the checkpoint once; its export is verified against the live
      engine by the run itself and loads with CLIPFineTuner.from_pretrained;
    - the keys trained in the interrupted epoch are the split, each once (the log says what changes:
      the global batch kept by grad_accum 2 on one rank, doubled on two);
    - every logged learning rate is the schedule's at its step, before and after (the horizon of each
      run, rel 1e-6); every Adam step counter in the final checkpoint is the final step (a shared ZeRO-3
      step tensor counted twice per step).
    """
    from core.clip import CLIPFineTuner

    manifest, keys = small_data["cifar10"], tmp_path / "keys"
    keys.mkdir()
    run_dir = tmp_path / "run"
    args = run_args(manifest, run_dir, stage, precision, epochs)
    launch(before, [*args, f"train.max_steps={stop}"], keys)
    checkpoint = run_dir / "checkpoints" / f"step-{stop:08d}"

    probe = tmp_path / "probe"
    launch(
        after,
        [
            *run_args(manifest, probe, stage, precision, epochs),
            f"resume={checkpoint}",
            f"train.max_steps={stop}",
            "run.verify_export=false",
        ],
    )
    was, now = (
        whole_states(checkpoint, tmp_path / "u-was"),
        whole_states(probe / "checkpoints" / checkpoint.name, tmp_path / "u-now"),
    )
    assert was.keys() == now.keys() and len(was) > 3 * 80
    different = [k for k in was if not torch.equal(was[k], now[k])]
    assert not different, different[:5]
    assert lr_scheduler(checkpoint) == lr_scheduler(probe / "checkpoints" / checkpoint.name)

    resumed = launch(after, args, keys)
    log = resumed.stderr
    assert f"resumed from {checkpoint}" in log
    assert "converted " not in log  # the probe converted it (ZeRO 1-3): once is enough
    assert re.search(r"export verified: its \d+ tensors equal the live engine's", log)
    CLIPFineTuner.from_pretrained(run_dir / "export")
    note = "global batch kept at 32 (grad_accum 1 → 2)" if after < before else "global batch 16 → 32"
    assert note in log and f"LR horizon {horizons[0]} → {horizons[1]} steps" in log
    epoch_keys = trained(keys)
    assert len(epoch_keys[0]) == len(set(epoch_keys[0])) == 320, len(epoch_keys[0])
    assert all(len(epoch_keys[e]) == len(set(epoch_keys[e])) == 320 for e in range(1, epochs))
    lr = scalars(run_dir / "tensorboard", "train/lr")
    end = max(lr)
    assert sorted(lr) == list(range(1, end + 1)) and end == horizons[1]
    for step, value in lr.items():
        horizon = horizons[0] if step <= stop else horizons[1]
        assert value == pytest.approx(1e-3 * lr_lambda(5, horizon, 0.0)(step - 1), rel=1e-6), step
    assert optimizer_steps(run_dir / "checkpoints" / f"step-{end:08d}") == {float(end)}
