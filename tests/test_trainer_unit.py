"""Pure pieces of the trainer: metrics on hand-made embeddings, the epoch plan, launcher variables,
optimizer groups, the LR schedule, freezing, config errors."""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from core.shards import Range, cut
from plumbing.config import ConfigError, load_config
from plumbing.dist import DistInfo
from plumbing.errors import UserError
from trainer.config import TrainConfig
from trainer.data import pick_caption
from trainer.engine import lr_lambda, param_groups
from trainer.plan import train_layout
from trainer.tasks.clip.objective import retrieval_recall, topk_correct


def test_topk_correct_on_known_logits() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.3, 0.2, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    assert topk_correct(logits, labels, [1, 2]) == {1: 1, 2: 3}


def test_retrieval_recall_on_known_embeddings() -> None:
    # Three images on the axes; captions 0,1 belong to image 0, caption 2 to image 1, caption 3 to image 2.
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [0.9, 0, 0.1]])
    owner = torch.tensor([0, 0, 1, 2])
    r = retrieval_recall(image, text, owner, [1, 2])
    # image 0 → best caption 0 (own): hit; image 1 → caption 2 (own): hit; image 2 → caption 1 (image 0's): miss
    assert r["i2t_R@1"] == pytest.approx(2 / 3)
    # caption 0 → image 0 hit; caption 1 → image 2 miss; caption 2 → image 1 hit; caption 3 → image 0 miss
    assert r["t2i_R@1"] == pytest.approx(2 / 4)
    assert r["t2i_R@2"] == pytest.approx(4 / 4)  # caption 1's own image ranks second, caption 3's too


def test_cut_returns_the_shard_ranges_of_a_sample_range() -> None:
    shards = [("a", 40), ("b", 40), ("c", 15)]
    assert cut(shards, 30, 85) == [Range("a", 30, 40), Range("b", 0, 40), Range("c", 0, 5)]
    assert cut(shards, 0, 0) == []


def test_layout_gives_every_rank_the_same_steps_and_says_why_when_it_cannot(tmp_path) -> None:
    layout = train_layout(1000, ranks=2, workers=3, batch=16, split="train", manifest=tmp_path)
    assert layout.per_slot == 166 and layout.batches_per_slot == 10 and layout.micro_batches == 30
    with pytest.raises(
        UserError, match=r"has 60 samples, but 2 ranks × 2 loader workers × batch 16 need at least 64"
    ):
        train_layout(60, ranks=2, workers=2, batch=16, split="train", manifest=tmp_path)


def test_dist_info_from_torchrun_slurm_and_nothing() -> None:
    tr = DistInfo.from_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "29500",
            "GROUP_RANK": "1",
        }
    )
    assert (tr.rank, tr.world_size, tr.local_rank, tr.node_rank, tr.num_nodes, tr.launcher) == (
        3,
        4,
        1,
        1,
        2,
        "torchrun",
    )
    slurm = DistInfo.from_env(
        {
            "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "8",
            "SLURM_LOCALID": "1",
            "SLURM_NODEID": "1",
            "SLURM_JOB_ID": "77",
            "SLURM_NNODES": "2",
            "MASTER_ADDR": "node1",
            "SLURMD_NODENAME": "node2",
        }
    )
    assert (
        slurm.rank,
        slurm.world_size,
        slurm.local_world_size,
        slurm.master_addr,
        slurm.master_port,
        slurm.node_name,
    ) == (5, 8, 4, "node1", 20077, "node2")
    assert DistInfo.from_env({}).launcher == "single"
    # a batch script (no step) with many tasks is still a single process
    assert DistInfo.from_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}).launcher == "single"


def test_half_set_environment_is_refused_with_the_missing_names() -> None:
    with pytest.raises(
        UserError,
        match="half-set torchrun environment: RANK set but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing",
    ):
        DistInfo.from_env({"RANK": "0"})
    with pytest.raises(UserError, match="SLURM_LOCALID"):
        DistInfo.from_env(
            {
                "SLURM_STEP_ID": "0",
                "SLURM_PROCID": "0",
                "SLURM_NTASKS": "2",
                "SLURM_NODEID": "0",
                "SLURM_JOB_ID": "1",
            }
        )


def test_no_weight_decay_on_biases_norms_and_temperature() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.logit_scale = torch.nn.Parameter(torch.ones(1))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_lr_warms_up_then_decays_to_the_floor() -> None:
    f = lr_lambda(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)


def test_freezing_the_last_layers_only(tmp_path) -> None:
    from core.presets import TinyConfig, build_clip
    from trainer.tasks.clip.config import ModelConfig
    from trainer.tasks.clip.model import build_finetuner, freeze

    build_clip(tmp_path, "tiny", TinyConfig())
    cfg = ModelConfig(preset="tiny", vision_trainable_layers=1, freeze_text=True)
    model = build_finetuner(cfg, str(tmp_path))
    freeze(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("clip.vision_model.encoder.layers.1.") for n in trainable)
    assert not any(n.startswith("clip.vision_model.encoder.layers.0.") for n in trainable)
    assert not any(
        n.startswith("clip.text_model.") or n.startswith("clip.text_projection") for n in trainable
    )
    assert {"logit_scale", "image_head.net.weight", "text_head.net.weight"} <= trainable
    assert "clip.logit_scale" not in trainable


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["train.objective=regression"],
            'train.objective: expected "classification", "contrastive", "vae" or "denoising"',
        ),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: expected 0, 1, 2 or 3"),
        (["deepspeed.offload_param=true"], "deepspeed.offload_param: expected zero_stage 3"),
        (["train.batch_size=many"], "train.batch_size"),
        (["trian.epochs=3"], "unknown key 'trian'"),
        (["data.verify=md5"], "data.verify"),
        (["data.captions=random"], 'data.captions: expected "draw" or "first"'),
    ],
)
def test_bad_trainer_config_names_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(
            TrainConfig, None, ["train.objective=contrastive", "data.manifest=m", "run.dir=r", *overrides]
        )


def test_captions_are_drawn_per_epoch_or_always_the_first() -> None:
    def text(draw: int, train: bool, mode: str) -> str:
        return pick_caption({"meta": {"captions": ["a", "b", "c"]}}, draw, train, mode)["text"]

    assert {text(d, True, "draw") for d in range(30)} == {"a", "b", "c"}
    assert {text(d, True, "first") for d in range(30)} == {"a"}
    assert {text(d, False, "draw") for d in range(30)} == {"a"}  # evaluation: the first
    assert pick_caption({"text": "only"}, 7, True, "draw")["captions"] == ["only"]
    # a user's json member that is not an object, or whose "captions" are not strings, names none
    for meta in ([1, 2], "a string", 3, {"captions": [1, 2]}, {"captions": {}}, {"captions": []}):
        assert pick_caption({"meta": meta, "text": "txt"}, 1, True, "draw")["captions"] == ["txt"]
        assert "text" not in pick_caption({"meta": meta}, 1, True, "draw")
    assert pick_caption({"meta": {"captions": "one"}}, 1, True, "draw")["captions"] == ["one"]


def test_missing_required_values_are_named() -> None:
    with pytest.raises(ConfigError, match="data.manifest: a value is required"):
        load_config(TrainConfig, None, ["train.objective=contrastive", "run.dir=r"])


def test_the_step_agreement_is_built_on_the_device_of_the_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under NCCL a collective takes tensors on the GPU only: the [non-finite, stop] flags must sit on
    the loss's device (a CPU-built flag beside a CUDA loss fails before backward), and the window the
    optimizer skips on is there too. The meta device stands in for CUDA here."""
    import trainer.guard as guard

    seen: list[torch.device] = []

    class Sent(Exception):
        pass

    def all_max_(values: torch.Tensor) -> torch.Tensor:
        seen.append(values.device)
        raise Sent  # meta tensors cannot be read back: the collective's argument is what is checked

    monkeypatch.setattr(guard, "all_max_", all_max_)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], fused=True)
    with pytest.raises(Sent):
        guard.StepGuard(optimizer).agree(torch.zeros((), device="meta"), stop_requested=True)
    assert seen == [torch.device("meta")] and optimizer.found_inf.device == torch.device("meta")


def test_a_nonfinite_loss_skips_the_update_on_the_device_and_the_next_one_applies() -> None:
    """The guard with torch's fused AdamW alone (as DeepSpeed steps it): a NaN loss makes NaN gradients,
    yet the parameters, Adam's moments and its step count stay; the host learns of it from the agreed
    flags; after the window is cleared the next step trains."""
    from trainer.guard import StepGuard

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    keeper = StepGuard(optimizer)
    for scale, finite in ((float("nan"), False), (1.0, True)):
        loss = (weight * scale).sum()
        keeper.agree(loss, stop_requested=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        keeper.stepped()
        assert keeper.verdict().finite is finite
        if not finite:
            assert torch.equal(weight.detach(), torch.ones(3))
            assert int(optimizer.state[weight]["step"]) == 0 and not optimizer.state[weight]["exp_avg"].any()
    assert int(optimizer.state[weight]["step"]) == 1 and torch.all(weight < 1)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_complete_ones(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import trainer.checkpoint as checkpoint
    from plumbing.errors import LocalError

    def full(_engine, root, tag, _client) -> None:
        (root / tag).mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.ds, "save_checkpoint", full)
    info = DistInfo.from_env({})
    keeper = checkpoint.Checkpointer(checkpoint.CheckpointConfig(), tmp_path / "ckpt", info)
    done = tmp_path / "ckpt" / "step-00000001"
    done.mkdir(parents=True)
    (done / checkpoint.STATE).write_text('{"state": {"step": 1}}')
    with pytest.raises(
        LocalError, match=r"cannot write .*step-00000002: No space left on device \(disk full\?\)"
    ):
        keeper.save(None, checkpoint.TrainState(step=2), {}, [], {})  # type: ignore[arg-type]
    assert keeper.complete() == [done]


def test_zero_grad_norm_vectorised_equals_deepspeeds_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """ZeRO 1-2's gradient norm in one foreach kernel (`vectorise_zero_grad_norm`) gives DeepSpeed's own
    per-tensor loop's number bit for bit, padding left out, and its -1 for a non-finite norm; a
    DeepSpeed version it was not read against keeps the loop. One rank: the all-reduce is the identity."""
    from types import SimpleNamespace

    import deepspeed
    from deepspeed.runtime.zero import stage_1_and_2 as zero

    from trainer import engine as engine_module

    optimizer = zero.DeepSpeedZeroOptimizer
    current = optimizer.get_grad_norm_direct  # vectorised already if a test before built a ZeRO-2 engine
    loop = getattr(current, "original", current)
    monkeypatch.setattr(optimizer, "get_grad_norm_direct", loop)  # DeepSpeed's own; restored after
    monkeypatch.setattr(zero.dist, "all_reduce", lambda *args, **kwargs: None)
    fake = SimpleNamespace(
        model_parallel_rank=0,
        dp_process_group=None,
        device="cpu",
        _model_parallel_all_reduce=lambda **kw: None,
    )
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (7, 300, 1)]
    grads = [torch.randn(p.numel(), generator=g) * 10**i for i, p in enumerate(params)]
    pad = torch.ones(5)
    pad._zero_padding = True  # type: ignore[attr-defined]

    read = deepspeed.__version__
    monkeypatch.setattr(deepspeed, "__version__", "0.0.0")
    assert not engine_module.vectorise_zero_grad_norm() and optimizer.get_grad_norm_direct is loop
    monkeypatch.setattr(deepspeed, "__version__", read)
    assert engine_module.vectorise_zero_grad_norm()
    vectorised = optimizer.get_grad_norm_direct
    assert vectorised is not loop
    for case in (grads + [pad], [grads[0], torch.full((3,), float("nan")), grads[2]]):
        expected, got = loop(fake, case, params), vectorised(fake, case, params)
        assert got.dtype == expected.dtype and got.item() == expected.item()
    assert vectorised(fake, [torch.full((3,), float("inf"))], params[:1]).item() == -1.0


class _Partitions:
    """Stands for DeepSpeed's GatheredTensor (zero_to_fp32's lazy mode): a shape now, a tensor on
    `contiguous()`; counts the tensors alive at once."""

    alive: list[int] = [0, 0]  # now, most

    def __init__(self, value: torch.Tensor) -> None:
        self.value, self.shape = value, value.shape

    def contiguous(self) -> torch.Tensor:
        made = self.value.clone()
        _Partitions.alive[0] += 1
        _Partitions.alive[1] = max(_Partitions.alive)
        weakref.finalize(made, lambda: _Partitions.alive.__setitem__(0, _Partitions.alive[0] - 1))
        return made


def test_an_export_loads_the_consolidated_weights_one_tensor_at_a_time() -> None:
    """The export never holds the consolidated model beside the one it writes: each tensor is made
    from the partitions when it is copied in, then dropped; shapes are read without making any."""
    from trainer.engine import Weights, load_weights
    from trainer.tasks.diffusion.ema import full_ema

    source = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    weights = Weights({f"net.{k}": _Partitions(v) for k, v in source.state_dict().items()})
    assert weights.under("net.").shape("0.weight") == (3, 4) and _Partitions.alive[1] == 0
    assert set(full_ema(weights.under("net."), [])) == set() and _Partitions.alive[1] == 0
    target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    load_weights(target, weights.under("net."))
    assert _Partitions.alive[1] == 1
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(UserError, match=r"missing \['1.bias'\]"):
        load_weights(target, {k: v for k, v in source.state_dict().items() if k != "1.bias"})
    with pytest.raises(UserError, match="unexpected"):
        load_weights(target, {**source.state_dict(), "extra": torch.zeros(1)})
