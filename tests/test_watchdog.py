"""The watchdog, the record of attempts and the restart rules, in one process or small subprocesses
(the faults from outside, on 2 ranks and on Slurm, are in test_reliability.py and test_launch.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from plumbing.dist import DistInfo
from plumbing.watchdog import EXIT_HUNG, Hang, Watchdog, WatchdogConfig
from tests.helpers import PY, ROOT, env
from trainer.attempts import Attempt, AttemptLog, attempts, should_restart, stuck, verdict
from trainer.checkpoint import TrainState

STUCK = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    from pathlib import Path
    from plumbing.watchdog import Watchdog, WatchdogConfig

    worker = os.fork()
    if worker == 0:
        time.sleep(600)
        os._exit(0)
    os.kill(worker, signal.SIGSTOP)  # a loader worker that stopped delivering
    print(worker, flush=True)
    record = Path(sys.argv[1])
    dog = Watchdog(WatchdogConfig(step_s=1.0), 3, log_file=record.with_suffix(".log"),
                   on_hang=lambda hang: record.write_text(repr(hang)))

    def waiting_for_the_batch():
        threading.Event().wait()

    dog.arm("loader batch", lambda: "step 7, epoch 1, micro-batch 7 of 8")
    waiting_for_the_batch()
    """
)


@pytest.mark.smoke
def test_a_stuck_wait_is_reported_with_every_stack_and_ends_with_its_children(tmp_path: Path) -> None:
    record = tmp_path / "hang.txt"
    started = time.monotonic()
    proc = subprocess.run(
        [PY, "-c", STUCK, str(record)], env=env(), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    took = time.monotonic() - started
    assert proc.returncode == EXIT_HUNG, proc.stderr
    worker = int(proc.stdout.split()[0])
    report = proc.stderr
    first = report.splitlines()[0]
    assert "hung: rank 3 spent 1 s waiting for a loader batch (step 7, epoch 1, micro-batch 7 of 8)" in first
    assert "collective: none" in first and "watchdog.step_s" in first
    assert f"child process {worker}" in report and "state stopped" in report  # the culprit, named
    assert "waiting_for_the_batch" in report and "thread 'MainThread' (main)" in report
    assert report in (tmp_path / "hang.log").read_text()  # the same report in the log file
    assert "kind='loader batch'" in record.read_text()  # recorded before exiting
    assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
    assert took < 30


def test_the_step_limit_follows_the_median_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe whose steps take 3 s gets 50 × 3 s, not the 120 s floor; a step much slower than the
    median is still caught; the c10d timeout always stays above the watchdog's limit."""
    import plumbing.watchdog as wd

    clock = [0.0]
    timeouts: list[float] = []
    monkeypatch.setattr(wd.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(wd, "set_collective_timeout", timeouts.append)
    monkeypatch.setattr(Watchdog, "_watch", lambda self: None)  # this clock would make it fire
    dog = Watchdog(WatchdogConfig(step_s=120, step_factor=50), 0)
    try:
        steps = dog.batches(range(30), lambda: "")
        for i in steps:
            armed = dog._armed
            assert armed is not None and armed.kind == "step"
            clock[0] += 3.0 if i != 10 else 1000.0  # one slow step among them (a checkpoint, say)
        limits = {round(dog._step_limit)}
        assert limits == {150}  # 50 × the median 3 s, the outlier ignored
        assert timeouts[-1] == WatchdogConfig().collective_s(150) and timeouts[
            0
        ] == WatchdogConfig().collective_s(
            WatchdogConfig().startup_s
        )  # the first batch of a loader gets the long limit
    finally:
        dog.close()


def test_a_later_loaders_first_batch_is_watched_with_the_step_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's first loader gets the long limit (workers start, shuffle buffers fill, a resume skips);
    each epoch's new loader after it the step limit, so that a worker hanging as it starts is reported
    by its own rank within minutes, not after `startup_s` when its peers have long reported."""
    import plumbing.watchdog as wd

    monkeypatch.setattr(wd, "set_collective_timeout", lambda seconds: None)
    monkeypatch.setattr(Watchdog, "_watch", lambda self: None)
    dog = Watchdog(WatchdogConfig(step_s=120, startup_s=1800), 0)
    waits: list[tuple[str, float]] = []

    def loader(batches: int):  # records what the watchdog armed while the rank waits for each batch
        for i in range(batches):
            armed = dog._armed
            assert armed is not None
            waits.append((armed.kind, armed.limit))
            yield i

    try:
        for _epoch in range(3):
            for _ in dog.batches(loader(2), lambda: ""):
                pass
    finally:
        dog.close()
    assert waits[:2] == [("first loader batch", 1800), ("loader batch", 120)]
    assert waits[2:] == [("first loader batch", 120), ("loader batch", 120)] * 2


def test_a_helper_process_dies_with_its_parent(tmp_path: Path) -> None:
    """A loader worker (it ignores SIGTERM) of a rank killed outright does not live on."""
    script = textwrap.dedent(
        """
        import os, signal, time
        from plumbing.process import die_with_parent
        parent = os.getpid()
        child = os.fork()
        if child == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            die_with_parent(parent)
            time.sleep(600)
            os._exit(0)
        print(child, flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([PY, "-c", script], env=env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    time.sleep(0.5)  # the child has set its death signal
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the helper outlived its parent"
        time.sleep(0.05)


# --------------------------------------------------------------------------- attempts and restarts


def launch(tmp_path: Path, attempt: int, rank: int = 0, world: int = 2) -> AttemptLog:
    info = DistInfo(
        rank, world, rank, world, 0, 1, "127.0.0.1", 0, "torchrun", "n", launch="L", attempt=attempt
    )
    return AttemptLog(tmp_path / "attempts", info)


def hang(rank: int) -> Hang:
    return Hang(rank, "step", "step 12", 60.0, 60.0, "all_reduce(torch.float32[8])", 40)


def test_attempts_are_judged_from_every_ranks_records(tmp_path: Path) -> None:
    state = TrainState(step=11)
    first = launch(tmp_path, 0)
    first.started()
    first.state = state
    first.hung(hang(0))  # rank 1 was stopped: it says nothing
    second = [launch(tmp_path, 1, rank) for rank in (0, 1)]
    second[0].started()  # then both ranks killed outright: lost
    third = [launch(tmp_path, 2, rank) for rank in (0, 1)]
    third[0].started()
    for log in third:
        log.state = state
        log.failed(RuntimeError("Connection closed by peer"))
    found = attempts(tmp_path / "attempts", "L")
    assert [(a.number, a.outcome, a.step) for a in found] == [
        (0, "hung", 11),
        (1, "lost", None),
        (2, "crashed", 11),
    ]
    assert found[0].code == EXIT_HUNG and "all_reduce" in found[0].detail
    assert attempts(tmp_path / "attempts", "another launch") == []


def outcome(number: int, what: str, step: int | None, code: int = 1) -> Attempt:
    return Attempt(number, what, step, code, "")


def test_restarts_stop_when_the_same_step_fails_again_and_preemption_is_not_a_failure() -> None:
    hung = [outcome(0, "hung", 57, EXIT_HUNG), outcome(1, "hung", 57, EXIT_HUNG)]
    assert "failed 2 times in a row after step 57" in (stuck(hung) or "")
    moving = [outcome(0, "hung", 57, EXIT_HUNG), outcome(1, "crashed", 83)]
    assert stuck(moving) is None
    assert should_restart(moving, 3)[0]
    assert not should_restart(moving, 1)[0]
    preempted = [outcome(0, "hung", 57), outcome(1, "preempted", 60, 75), outcome(2, "preempted", 70, 75)]
    assert should_restart(preempted[:1], 1)[0]
    assert not should_restart(preempted, 1)[0]  # the last one was not a failure
    again = [*preempted, outcome(3, "crashed", 90)]
    assert should_restart(again, 2)[0]  # one failure used of two: preemptions free
    assert not should_restart(hung, 3)[0]
    assert verdict(hung)[0] == EXIT_HUNG
    code, line = verdict([outcome(0, "hung", 57, EXIT_HUNG), outcome(1, "finished", 90, 0)])
    assert code == 0 and line == "finished after 1 restart(s) (attempt 0 hung after step 57)"


def test_a_restart_at_the_step_that_failed_twice_is_refused_once_in_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = TrainState(step=57)
    for number in (0, 1):
        log = launch(tmp_path, number)
        log.started()
        log.state = state
        log.hung(hang(0))
    third = launch(tmp_path, 2)
    why = third.refusal()
    assert why is not None and why.startswith("failed 2 times in a row after step 57")
    assert third.refuse(why) == EXIT_HUNG
    fourth = launch(tmp_path, 3)  # torchrun restarts once more: refused again, silently
    assert fourth.refuse(fourth.refusal() or "") == EXIT_HUNG
    said = [r.getMessage() for r in caplog.records if "failed 2 times" in r.getMessage()]
    assert len(said) == 1
    code, line = verdict(attempts(tmp_path / "attempts", "L"))
    assert code == EXIT_HUNG and line.startswith("gave up: failed 2 times in a row after step 57")


def test_run_requeued_puts_a_failed_slurm_job_back_at_most_max_restarts_times(tmp_path: Path) -> None:
    """launch/_requeue.sh (sample.sbatch, prep.sbatch) against a stand-in `scontrol`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n')
    (bin_dir / "scontrol").chmod(0o755)
    script = f"source {ROOT}/launch/_requeue.sh; run_requeued sh -c 'exit $CODE'"
    extra = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "42",
        "RESTARTS_DIR": str(tmp_path / "r"),
    }

    def job(code: int) -> int:
        return subprocess.run(
            ["bash", "-c", script], env=env(CODE=str(code), MAX_RESTARTS="2", **extra)
        ).returncode

    assert job(0) == 0 and job(2) == 2  # finished; bad input is not retried
    assert [job(EXIT_HUNG), job(1), job(EXIT_HUNG)] == [0, 0, EXIT_HUNG]  # requeued twice, then its status
    assert (tmp_path / "calls").read_text().splitlines() == ["requeue 42", "requeue 42"]


@pytest.mark.smoke
def test_loader_workers_start_from_the_ranks_fork_server_quiet_to_stop_signals(tmp_path: Path) -> None:
    """A rank's loader workers are forked from its fork server, started before the model is built:
    not from the rank (no copy of its pages, no lock another thread of it held), deaf to the TERM and
    USR1 Slurm sends the whole step (the rank answers them), and gone when the rank is killed."""
    script = textwrap.dedent(
        """
        import json, os, signal, threading
        import tests.helpers as helpers
        from trainer.data import batches_of, loader, loader_server
        server = loader_server(1, helpers.WhoServes())
        helpers.BALLAST = bytearray(50 << 20)  # the rank's memory after the server started
        threading.Thread(target=threading.Event().wait, daemon=True).start()  # a rank has threads
        got = [b for b in batches_of(loader(helpers.WhoServes(), 1, False, server))]
        live = iter(loader(helpers.WhoServes(), 1, False, server))  # a worker running when the rank is killed
        next(live)
        term = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        print(json.dumps({"server": server, "batches": got, "rank_hears_term": term}), flush=True)
        threading.Event().wait()
        """
    )
    proc = subprocess.Popen([PY, "-c", script], env=env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        said = json.loads(proc.stdout.readline())
        family = psutil.Process(proc.pid).children(recursive=True)
        # read while the rank lives: once it is killed, its orphans are re-parented
        parents = [p.ppid() for p in family]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert said["rank_hears_term"], "starting the server left the rank deaf to SIGTERM"
    [batch] = said["batches"]
    assert batch["ppid"] == said["server"] != proc.pid and batch["term_quiet"] and not batch["has_ballast"]
    assert any(p.pid == said["server"] for p in family)
    assert parents.count(said["server"]) == 1  # the live loader's worker
    deadline = time.time() + 10  # the server ends with its rank (its workers with it: PDEATHSIG)
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        assert time.time() < deadline, "the rank's fork server outlived it"
        time.sleep(0.05)
