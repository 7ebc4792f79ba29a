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
import shutil
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
from trainer.checkpoint import Saved, TrainState
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


def saved_at(step: int, ranks: int, accum: int, horizon: int, micro: int, asked_accum: int = 1) -> Saved:
    """A checkpoint's record (no files): trained as stated, by a run configured with batch 16 and
    `asked_accum`."""
    state = TrainState(
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
    config = {"train": {"batch_size": 16, "grad_accum": asked_accum}}
    return Saved(Path("checkpoints") / f"step-{step:08d}", state, config, [], {})


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
    # a grad_accum raised to keep the global batch stays raised on the next resume on 1 rank, and is
    # yours when set: grad_accum=4 on purpose doubles the batch again, and the note says it was set
    again = plan(cfg, manifest, 1, saved_at(9, 1, 2, 20, 4))
    assert again.accum == 2 and again.note == "" and again.state().micro_in_epoch == 4
    mine = plan(config(small_data["cifar10"], "train.grad_accum=4"), manifest, 1, saved_at(9, 1, 2, 20, 4))
    assert mine.accum == 4 and "global batch 32 → 64 (train.batch_size or grad_accum set)" in mine.note


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


# Each chain: a run stopped mid-epoch (train.max_steps), resumed on another number of ranks and stopped
# again, then on the first number to the end. hops: (ranks, stop at step or 0 for the end, LR horizon,
# what the log says of the global batch); `probe`: the hop whose loaded state is compared.
CHAINS = [
    pytest.param(
        2,
        "fp32",
        2,
        [
            (2, 2, 20, ""),
            (1, 4, 20, "global batch kept at 32 (grad_accum 1 → 2)"),
            (2, 0, 20, "global batch kept at 32 (grad_accum 2 → 1)"),
        ],
        2,
        id="zero2-fp32-2to1to2",
    ),
    pytest.param(
        3,
        "bf16",
        1,
        [
            (1, 8, 20, ""),
            (2, 10, 14, "global batch 16 → 32 (16 is not a multiple of 2 ranks × batch 16)"),
            (1, 0, 14, "global batch kept at 32 (grad_accum 1 → 2)"),
        ],
        2,
        id="zero3-bf16-1to2to1",
    ),
    pytest.param(
        0,
        "bf16",
        1,
        [(2, 3, 10, ""), (1, 0, 10, "global batch kept at 32 (grad_accum 1 → 2)")],
        1,
        id="zero0-bf16-2to1",
    ),
]


@pytest.fixture(scope="module")
def originals(small_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Runs stopped mid-epoch (train.max_steps), made once per module and copied by each user: the
    run folder (its checkpoint at the stop) and the keys it trained."""
    made: dict[tuple[Any, ...], Path] = {}

    def original(
        stage: int, precision: str, ranks: int, stop: int, epochs: int, into: Path
    ) -> tuple[Path, Path]:
        key = (stage, precision, ranks, stop, epochs)
        if key not in made:
            root = tmp_path_factory.mktemp(f"zero{stage}-{precision}-{ranks}")
            (root / "keys").mkdir()
            args = run_args(small_data["cifar10"], root / "run", stage, precision, epochs)
            launch(ranks, [*args, f"train.max_steps={stop}"], root / "keys")
            made[key] = root
        shutil.copytree(made[key], into)
        return into / "run", into / "keys"

    return original


@pytest.mark.system
@pytest.mark.parametrize(("stage", "precision", "epochs", "hops", "probe"), CHAINS)
def test_a_run_stopped_mid_epoch_goes_on_on_another_number_of_ranks(
    small_data: dict[str, Path],
    originals: Any,
    tmp_path: Path,
    stage: int,
    precision: str,
    epochs: int,
    hops: list[tuple[int, int, int, str]],
    probe: int,
) -> None:
    """ZeRO-2 fp32 2 → 1 → 2 ranks, ZeRO-3 bf16 1 → 2 → 1, ZeRO-0 bf16 2 → 1, each hop mid-epoch:

    - at the `probe` hop (1 → 2 for ZeRO-2, 2 → 1 for ZeRO-3 and ZeRO-0), the state the resumed engine
      holds, written again at once by a run of the new size that resumes the checkpoint and trains
      nothing, equals the checkpoint's exactly (torch.equal): every trainable parameter's fp32 weights
      (bf16: the fp32 masters), both Adam moments (exp_avg, exp_avg_sq) and the step counters — ZeRO
      1-3 read whole from both checkpoints through DeepSpeed's ds_to_universal, ZeRO-0 from its one
      model-states file — and the LR scheduler's state (a dict, ==);
    - each hop resumes its predecessor's checkpoint, converting it once under ZeRO 1-3 (a probe's
      conversion is reused) and saying what changes (the global batch kept by grad_accum, or doubled;
      the LR horizon); the last finishes, its export is verified against the live engine by the run
      itself and loads with CLIPFineTuner.from_pretrained;
    - the keys trained in the interrupted epoch, over all hops, are the split, each once (two or three
      legs), and so are a later epoch's;
    - every logged learning rate is the schedule's at its step, with the horizon of the hop that took
      it (rel 1e-6: the ZeRO-3 chain's second hop, past the warm-up, starts a shorter schedule at once);
      every Adam step counter in the final checkpoint is the final step (plus the one step DeepSpeed's
      unfused ZeRO-0 bf16 optimizer takes as it is built, in any run); without trainer.engine's
      _own_steps a ZeRO-3 run counts 17 where 10 steps were taken.
    """
    from core.clip import CLIPFineTuner

    manifest = small_data["cifar10"]
    ranks, stop, horizon, _ = hops[0]
    run_dir, keys = originals(stage, precision, ranks, stop, epochs, tmp_path / "original")
    args = run_args(manifest, run_dir, stage, precision, epochs)
    (counted,) = optimizer_steps(run_dir / "checkpoints" / f"step-{stop:08d}")
    counted -= stop  # 1 for ZeRO-0 bf16: DeepSpeed's unfused optimizer steps once as it is built
    for hop, (ranks, until, horizon, batch_note) in enumerate(hops[1:], start=1):
        checkpoint = run_dir / "checkpoints" / f"step-{stop:08d}"
        if hop == probe:
            again = tmp_path / "probe"
            probe_args = run_args(manifest, again, stage, precision, epochs, f"resume={checkpoint}")
            launch(ranks, [*probe_args, f"train.max_steps={stop}", "run.verify_export=false"])
            resaved = again / "checkpoints" / checkpoint.name
            was, now = whole_states(checkpoint, tmp_path / "u-was"), whole_states(resaved, tmp_path / "u-now")
            assert was.keys() == now.keys() and len(was) > 3 * 80
            different = [k for k in was if not torch.equal(was[k], now[k])]
            assert not different, different[:5]
            assert lr_scheduler(checkpoint) == lr_scheduler(resaved)
        log = launch(ranks, [*args, *([f"train.max_steps={until}"] if until else [])], keys).stderr
        assert f"resumed from {checkpoint}" in log
        assert ("converted " in log) == (stage > 0 and hop != probe), hop  # once: a probe's is reused
        assert batch_note in log and f"LR horizon {hops[hop - 1][2]} → {horizon} steps" in log, hop
        stop = until
    assert re.search(r"export verified: its \d+ tensors equal the live engine's", log)
    CLIPFineTuner.from_pretrained(run_dir / "export")
    epoch_keys = trained(keys)
    assert all(len(epoch_keys[e]) == len(set(epoch_keys[e])) == 320 for e in range(epochs)), {
        e: len(k) for e, k in epoch_keys.items()
    }
    lr = scalars(run_dir / "tensorboard", "train/lr")
    end = max(lr)
    assert sorted(lr) == list(range(1, end + 1)) and end == hops[-1][2]
    starts = [0] + [h[1] for h in hops[:-1]]  # each hop takes the steps after its predecessor's stop
    for step, value in lr.items():
        hop = max(i for i, first in enumerate(starts) if step > first)
        expected = 1e-3 * lr_lambda(5, hops[hop][2], 0.0)(step - 1)
        assert value == pytest.approx(expected, rel=1e-6), step
    assert optimizer_steps(run_dir / "checkpoints" / f"step-{end:08d}") == {counted + end}


@pytest.mark.system
def test_a_checkpoint_that_cannot_be_continued_is_refused_in_one_line(
    small_data: dict[str, Path], originals: Any, tmp_path: Path
) -> None:
    """On one rank, the 2-rank ZeRO-2 checkpoint the first chain starts from: another task, another model (a
    wider tiny CLIP), a checkpoint whose rank-1 partition is missing and one still half written (a
    .partial- folder): each one line, exit 2, before any conversion (the other refusals: the unit
    test below)."""
    run_dir, _ = originals(2, "fp32", 2, 2, 2, tmp_path / "original")
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    holed = tmp_path / "holed" / checkpoint.name
    shutil.copytree(checkpoint, holed)
    next(holed.glob("*zero_pp_rank_1_*optim_states.pt")).unlink()
    partial = tmp_path / "partial" / ".partial-step-00000002"
    shutil.copytree(checkpoint, partial)
    (partial / "trainer_state.json").unlink()
    cases = [
        (
            [f"resume={checkpoint}", "train.objective=contrastive"],
            "was trained with train.objective=classification, this run has contrastive",
        ),
        ([f"resume={checkpoint}", "model.tiny.width=48"], "holds another model: parameter "),
        (
            [f"resume={checkpoint}", "deepspeed.zero_stage=3"],
            "was written under deepspeed.zero_stage=2, this run has 3",
        ),
        (
            [f"resume={holed}"],
            "is incomplete: it was written by 2 ranks, but the ZeRO partitions of rank(s) 1",
        ),
        ([f"resume={partial}"], "not a complete checkpoint (no trainer_state.json)"),
    ]
    for i, (overrides, needle) in enumerate(cases):
        args = run_args(small_data["cifar10"], tmp_path / f"run{i}", 2, "fp32", 2, *overrides)
        proc = launch(1, args, check=False)
        lines = [line for line in proc.stderr.splitlines() if "trainer: error:" in line]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (needle, proc.stderr[-2000:])
    assert not list(checkpoint.parent.glob("*.universal")), "converted a checkpoint it refused"


def test_check_fits_names_what_differs() -> None:
    """Each refusal of check_fits, in-process: task, ZeRO stage, model (a parameter's shape, a parameter
    more or less, another optimizer group), and task state partitioned over the ranks that wrote it
    (the ZeRO-3 EMA) on another number of ranks; nothing said of a checkpoint that fits."""
    import tempfile

    from plumbing.errors import UserError
    from trainer.checkpoint import Saved, check_fits

    groups, shapes = [["w", "v"], ["b"]], {"w": [4, 2], "v": [3, 2], "b": [4]}
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        config = {"train": {"objective": "classification"}, "deepspeed": {"zero_stage": 3}}
        saved = Saved(where, TrainState(world_size=2), config, groups, shapes)
        check_fits(saved, "classification", 3, groups, shapes, 1)
        refusals = [
            (
                ("contrastive", 3, groups, shapes, 2),
                "train.objective=classification, this run has contrastive",
            ),
            (("classification", 2, groups, shapes, 2), "deepspeed.zero_stage=3, this run has 2"),
            (
                ("classification", 3, groups, {**shapes, "w": [5, 2]}, 2),
                "parameter w is [4, 2] there, [5, 2] here",
            ),
            (
                ("classification", 3, [["w", "v"], ["b", "c"]], {**shapes, "c": [1]}, 2),
                "parameter c trains here",
            ),
            (("classification", 3, [["w"], ["b"]], shapes, 2), "parameter v trained there, not here"),
            (
                ("classification", 3, [["w"], ["v", "b"]], shapes, 2),
                "v is in optimizer group 0 there, 1 here",
            ),
        ]
        for args, needle in refusals:
            with pytest.raises(UserError, match=re.escape(needle)):
                check_fits(saved, *args)
        for rank in range(2):
            (where / f"extra-rank{rank:05d}.safetensors").write_bytes(b"")
        check_fits(saved, "classification", 3, groups, shapes, 2)  # the same ranks: its own partitions
        with pytest.raises(UserError, match="partitioned over its 2 ranks .*resume it with 2 ranks"):
            check_fits(saved, "classification", 3, groups, shapes, 1)


@pytest.mark.system
def test_a_conversion_is_made_once_beside_the_checkpoint_and_a_cut_short_one_is_redone(
    originals: Any, tmp_path: Path
) -> None:
    """convert_once on the 2-rank ZeRO-2 checkpoint the first chain starts from (in-process): what a conversion cut
    short left (a .partial- folder) and a stale conversion of another checkpoint of that step (its
    marker differs) are never used: the conversion is redone beside the checkpoint, whose files stay
    byte for byte what they were; a second call finds it whole and leaves it as it is."""
    from plumbing.files import sha256_file
    from trainer.checkpoint import SOURCE, Saved, convert_once, universal_of

    run_dir, _ = originals(2, "fp32", 2, 2, 2, tmp_path / "original")
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    before = {f.name: sha256_file(f) for f in checkpoint.iterdir()}
    target = universal_of(checkpoint)
    leftover = target.with_name(".partial-" + target.name)
    leftover.mkdir()
    (leftover / "zero").mkdir()
    target.mkdir()
    (target / SOURCE).write_text('{"state": {"step": 2}}')  # a conversion of another step-2 checkpoint
    convert_once(Saved.read(checkpoint), target)
    assert (
        not leftover.exists()
        and (target / SOURCE).read_bytes() == (checkpoint / "trainer_state.json").read_bytes()
    )
    assert len(list((target / "zero").iterdir())) > 80 and (target / "mp_rank_00_model_states.pt").is_file()
    assert {f.name: sha256_file(f) for f in checkpoint.iterdir()} == before
    made = (target / SOURCE).stat().st_mtime_ns
    convert_once(Saved.read(checkpoint), target)
    assert (target / SOURCE).stat().st_mtime_ns == made
    assert not (checkpoint.parent / "latest_universal").exists()
