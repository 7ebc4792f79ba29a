"""plumbing/dist.py's collective helpers put their tensors on the backend's device: a pure choice,
checked here without a GPU by recording what the collectives receive."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from plumbing import dist as pd


def test_the_communication_device_follows_the_backend() -> None:
    assert pd.comm_device("gloo", 3) == "cpu"
    assert pd.comm_device("nccl", 1) == "cuda:1"
    assert pd.comm_device("cpu:gloo,cuda:nccl", 2) == "cuda:2"
    # GPUs get NCCL for tensors and gloo beside it, so that object collectives and CPU tensors work
    assert pd.backends_for(cuda=True) == "cpu:gloo,cuda:nccl"
    assert pd.backends_for(cuda=False) == "gloo"


class Seen(Exception):
    """Raised by a fake collective once it has recorded its arguments."""


@pytest.fixture
def two_ranks_on(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Two ranks whose communication device is "meta" (a stand-in for cuda:1): every fake collective
    records the device of its tensor, or the device_ids of a barrier, then stops the helper."""
    seen: list[object] = []

    def record(tensor: torch.Tensor, *args: object, **kwargs: object) -> None:
        seen.append(tensor.device.type)
        raise Seen

    def gather(parts: list[torch.Tensor], tensor: torch.Tensor, *args: object, **kwargs: object) -> None:
        record(tensor)

    def barrier(*args: object, device_ids: list[int] | None = None, **kwargs: object) -> None:
        seen.append(device_ids)

    monkeypatch.setattr(pd, "world_size", lambda: 2)
    monkeypatch.setattr(pd, "_COMM", pd._Comm("meta", 1))
    monkeypatch.setattr(dist, "all_reduce", record)
    monkeypatch.setattr(dist, "all_gather", gather)
    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    return seen


@pytest.mark.parametrize(
    "helper",
    [
        lambda: pd.all_sum([1.0, 2.0]),
        lambda: pd.all_max([1.0]),
        lambda: pd.all_min(torch.ones(2)),  # a CPU tensor is moved to the communication device
        lambda: pd.all_max_(torch.ones(2)),  # in place, but through the communication device
        lambda: pd.gather_rows(torch.ones(2, 3)),
        lambda: pd.gather_with_grad(torch.ones(2, 3, device="meta", requires_grad=True)),
    ],
    ids=["all_sum", "all_max", "all_min", "all_max_", "gather_rows", "gather_with_grad"],
)
def test_each_helper_sends_its_tensor_from_the_communication_device(
    two_ranks_on: list[object], helper
) -> None:
    with pytest.raises(Seen):
        helper()
    assert two_ranks_on == ["meta"]


def test_barrier_names_the_gpu_under_nccl(
    two_ranks_on: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pd, "_COMM", pd._Comm("cuda:1", 1))
    pd.barrier()
    monkeypatch.setattr(pd, "_COMM", pd._Comm("cpu", 0))
    pd.barrier()
    assert two_ranks_on == [[1], None]


def test_alone_the_helpers_do_nothing_but_return() -> None:
    assert pd.all_sum([1.0, 2.0]) == [1.0, 2.0]
    x = torch.ones(2, 3)
    assert pd.all_max_(x) is x
    assert pd.gather_rows(x) is x and pd.gather_with_grad(x) is x
    assert pd.broadcast_object("verdict") == "verdict" and pd.gather_objects(3) == [3]
    pd.barrier()


def test_gather_with_grad_sums_the_ranks_gradients_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ranks simulated: the backward all-reduces the gathered gradient, each rank keeps its rows."""
    monkeypatch.setattr(pd, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    other = torch.full((2, 3), 5.0)

    def all_gather(parts: list[torch.Tensor], tensor: torch.Tensor) -> None:
        parts[0].copy_(other)
        parts[1].copy_(tensor)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.mul_(2))  # the other rank sent the same gradient
    x = torch.ones(2, 3, requires_grad=True)
    out = pd.gather_with_grad(x)
    assert torch.equal(out[:2], other) and torch.equal(out[2:], x.detach())
    (out * torch.arange(12.0).view(4, 3)).sum().backward()
    assert torch.equal(x.grad, 2 * torch.arange(6.0, 12.0).view(2, 3))
