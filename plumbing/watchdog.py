"""The watchdog: a step, a loader batch or a longer phase (start-up, checkpoint, evaluation, export) that
does not end in time ends the job as hung, loudly.

Each rank runs one thread that sleeps until the armed deadline. The loop arms it before every loader
batch and every step (two attribute writes); when a deadline passes, the thread writes a report to the
rank's stderr (and rank 0's train.log): what it was doing and for how long, the collective its main
thread is in and how many the process group has issued (ranks that issued fewer are behind), its loader
workers and their state (T: stopped), and every thread's Python stack. Then it records the hang (a
callback: the trainer's attempts record), kills its own child processes (loader workers ignore SIGTERM
by design) and exits EXIT_HUNG without running anything else: a hung rank cannot be trusted to finish
a checkpoint, and checkpoints are written under a partial name until whole.

Why a thread is enough (measured here with py-spy, 2 CPU ranks under gloo): a rank whose peer was
SIGSTOPped waits in c10d::Work::wait, which pybind releases the GIL for (`call_guard<gil_scoped_release>`);
a rank whose loader worker was SIGSTOPped waits in the DataLoader's queue get, a Python lock wait. In
both the watchdog thread runs. A rank frozen inside C code that keeps the GIL would starve its own
watchdog, but its peers then wait in their next collective with the GIL released, and their watchdogs
end the job (torchrun and srun then kill every rank, that one included).

Collective timeouts follow the watchdog (`plumbing.dist.set_collective_timeout`): long until the first
step and during the long phases, short once steps run (torchtitan's init_timeout_seconds /
train_timeout_seconds), always longer than the watchdog's own limit, so that the watchdog speaks first
and c10d's timeout is only the backstop.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

from plumbing.config import require
from plumbing.dist import collective_now, set_collective_timeout

T = TypeVar("T")

#: `kill -USR2 <pid>` makes a rank or a loader worker write every thread's stack to its stderr
#: (faulthandler, from a C signal handler: also while a thread holds the GIL); the watchdog asks its
#: loader workers so before it kills them.
STACKS_SIGNAL = signal.SIGUSR2

#: Exit status of a rank (and, through the launchers, of a job) that hung: coreutils `timeout`'s
#: "timed out", told apart from a crash (1), bad input (2) and preemption (75).
EXIT_HUNG = 124


@dataclass
class WatchdogConfig:
    step_s: float = 120.0
    """A step or a loader batch that takes longer than this (or step_factor × the median step, if longer) ends the job as hung: every rank's stacks to its log, exit 124 (0: no watchdog)."""
    step_factor: float = 50.0
    """The step limit grows to this many times the median step so far, so that a slow recipe gets a limit in proportion to its step time."""
    startup_s: float = 1800.0
    """The limit for what is not a step: start-up until the first step (model download, checkpoint load and conversion), checkpoints, evaluation, export."""

    def __post_init__(self) -> None:
        require(self.step_s >= 0, self, "step_s", "seconds >= 0 (0: no watchdog)")
        require(self.step_factor >= 1, self, "step_factor", "a factor >= 1")
        require(self.startup_s > 0, self, "startup_s", "seconds > 0")

    @property
    def enabled(self) -> bool:
        return self.step_s > 0

    def collective_s(self, limit: float) -> float:
        """The c10d timeout that goes with a watchdog limit: longer, so that the watchdog speaks first."""
        return 1.5 * limit + 30


@dataclass(frozen=True)
class Hang:
    """What a rank was doing when its watchdog fired."""

    rank: int
    kind: str  # "step", "loader batch", "checkpoint", …
    where: str  # e.g. "step 12 (epoch 1, micro-batch 4)"
    waited_s: float
    limit_s: float
    collective: str  # the collective the main thread is in, or "none"
    issued: int  # collectives this rank's process group issued (-1: unknown)

    @property
    def doing(self) -> str:
        return PHRASES.get(self.kind, f"in {self.kind}")


class Watchdog:
    """One rank's watchdog. `arm` before each loader batch and step, `phase` around the long ones."""

    def __init__(
        self,
        cfg: WatchdogConfig,
        rank: int,
        log_file: Path | None = None,
        on_hang: Callable[[Hang], None] | None = None,
    ) -> None:
        self.cfg, self.rank, self.log_file, self.on_hang = cfg, rank, log_file, on_hang
        self._armed: _Armed | None = None
        self._cycles: list[float] = []  # durations of recent step cycles (loader batch + step), sorted
        self._recent: list[float] = []  # the same, oldest first (to drop from the sorted list)
        self._cycle_start = 0.0
        self._stepped = False  # a step has run: a new loader's first batch gets the step limit
        self._step_limit = cfg.step_s
        self._collective_s = 0.0
        self._wake = threading.Event()
        self._closed = False
        self._fired = threading.Event()
        self._thread: threading.Thread | None = None
        if cfg.enabled:
            stacks_on_request()
            atexit.register(self._hold_exit)
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()

    @classmethod
    def of_ranks(cls, cfg: WatchdogConfig, rank: int, world: int) -> Watchdog:
        """A bulk job's watchdog (sampler, retrieval): on when it runs on several ranks, where one
        stuck rank keeps the others waiting; alone, a slow batch is only slow."""
        return cls(cfg if world > 1 else WatchdogConfig(step_s=0), rank)

    # ------------------------------------------------------------------ the loop's side (cheap)

    def arm(self, kind: str, where: Callable[[], str] | None = None, long: bool = False) -> None:
        """From now, `kind` (described by `where()` if it fires) must end within the step limit, or
        `startup_s` when `long`. Two attribute writes and a clock read: called twice per micro-step."""
        if self._thread is None:
            return
        limit = self.cfg.startup_s if long else self._step_limit
        self._armed = _Armed(time.monotonic(), limit, long, kind, where)
        self._follow(limit)

    def batches(self, items: Iterable[T], where: Callable[[], str]) -> Iterator[T]:
        """`items` (a loader's batches), with the wait for each armed as a "loader batch" and what the
        caller does with it until it asks for the next as a "step"; the step limit learns from these."""
        if self._thread is None:
            yield from items
            return
        source, first = iter(items), True
        self._cycle_start = 0.0  # the time between two loaders (an epoch's end) is not a step's
        while True:
            self._cycle_done()
            # The run's first loader starts its workers, fills their shuffle buffers and, resumed, skips
            # what was trained, all before the first step: the long limit. Every later loader (one an
            # epoch) gets the step limit: a worker that hangs as it starts (forked while another thread
            # of its rank held a lock it needs: the suspect of the demo's one hang, issue 19) is then
            # reported by its own rank, with the worker's stack, not left to the peers' reports alone.
            self.arm(
                "first loader batch" if first else "loader batch", where, long=first and not self._stepped
            )
            first = False
            try:
                item = next(source)
            except StopIteration:
                return
            self.arm("step", where)
            yield item
            self._stepped = True

    @contextlib.contextmanager
    def phase(self, kind: str, where: Callable[[], str] | None = None) -> Iterator[None]:
        """A long phase (checkpoint, evaluation, export): `startup_s` to end; the step limit after."""
        self.arm(kind, where, long=True)
        try:
            yield
        finally:
            self.arm("step", where)
            self._cycle_start = 0.0  # the phase's time is not a step's

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    # ------------------------------------------------------------------ the limit

    def _cycle_done(self) -> None:
        """One loader batch + step cycle ended: learn its duration (the median of the last 101)."""
        now = time.monotonic()
        if self._cycle_start:
            took = now - self._cycle_start
            self._recent.append(took)
            bisect.insort(self._cycles, took)
            if len(self._recent) > 101:
                self._cycles.pop(bisect.bisect_left(self._cycles, self._recent.pop(0)))
            median = self._cycles[len(self._cycles) // 2]
            self._step_limit = max(self.cfg.step_s, self.cfg.step_factor * median)
        self._cycle_start = now

    def _follow(self, limit: float) -> None:
        """Keep the c10d timeout above the watchdog's limit (set again only when it moves by > 10 %)."""
        want = self.cfg.collective_s(limit)
        if abs(want - self._collective_s) > 0.1 * want:
            set_collective_timeout(want)
            self._collective_s = want

    # ------------------------------------------------------------------ the watching thread

    def _watch(self) -> None:
        while not self._closed:
            armed = self._armed
            if armed is None:
                self._wake.wait(1.0)
                continue
            left = armed.start + armed.limit - time.monotonic()
            if left > 0:
                self._wake.wait(min(left, 1.0))
                continue
            if self._armed is armed and not self._closed:
                waited = time.monotonic() - armed.start
                where = _describe(armed.where)
                self._fire(
                    Hang(self.rank, armed.kind, where, waited, armed.limit, *collective_now()), armed.long
                )

    def _hold_exit(self) -> None:
        """At exit (atexit; plumbing.process.exit_now runs it too): once the watchdog fired, the process
        ends as hung, by the watchdog's thread, even when the main thread's wait ended in an error
        meanwhile (a peer that exited first)."""
        if self._fired.is_set():
            time.sleep(60)  # the watchdog's thread exits the process long before
            os._exit(EXIT_HUNG)

    def _fire(self, hang: Hang, long: bool) -> None:
        """Report, record, kill this rank's children, exit EXIT_HUNG. Written with os.write, not through
        logging: the main thread may hold a logging lock (a write stuck on a dead file system)."""
        self._fired.set()
        try:
            self._report(hang, long)
        finally:
            os._exit(EXIT_HUNG)

    def _report(self, hang: Hang, long: bool) -> None:
        key = "watchdog.startup_s" if long else "watchdog.step_s, step_factor"
        issued = f"; collectives issued by this rank: {hang.issued}" if hang.issued >= 0 else ""
        lines = [
            f"hung: rank {hang.rank} spent {hang.waited_s:.0f} s {hang.doing}{' (' + hang.where + ')' if hang.where else ''}, "
            f"limit {hang.limit_s:.0f} s ({key}); collective: {hang.collective}{issued}",
            *children_report(),
            *stacks(),
            f"hung: rank {hang.rank} exits {EXIT_HUNG}; ranks that printed no such report did not run their watchdog "
            "(stopped, killed, or frozen): start there",
        ]
        report("".join(f"{_stamp()} E [watchdog r{hang.rank}] {line}\n" for line in lines), self.log_file)
        with contextlib.suppress(Exception):
            if self.on_hang is not None:
                self.on_hang(hang)
        kill_children()
        # The other live ranks' watchdogs fire within about a second of this one (the same limit,
        # armed at the same collective): let them write their reports before this exit breaks the
        # collective they wait in (they would report a lost peer instead).
        time.sleep(PEERS_GRACE_S)


PEERS_GRACE_S = 2.0

PHRASES = {
    "step": "in a step",
    "loader batch": "waiting for a loader batch",
    "first loader batch": "waiting for a new loader's first batch",
    "wait for the other ranks": "waiting for the other ranks to finish their share",
}


class _Armed(NamedTuple):
    start: float
    limit: float
    long: bool
    kind: str
    where: Callable[[], str] | None


def _describe(where: Callable[[], str] | None) -> str:
    try:
        return where() if where is not None else ""
    except Exception as err:  # a description must never stop the report
        return f"(not described: {err})"


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


def report(text: str, log_file: Path | None) -> None:
    """`text` to stderr and appended to `log_file`, each with one unbuffered write."""
    data = text.encode("utf-8", "replace")
    with contextlib.suppress(OSError):
        os.write(sys.stderr.fileno(), data)
    if log_file is not None:
        with contextlib.suppress(OSError):
            fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)


def stacks() -> list[str]:
    """Every Python thread's stack, most recent call last, the main thread first."""
    frames = sys._current_frames()
    threads = sorted(threading.enumerate(), key=lambda t: t is not threading.main_thread())
    out = []
    for thread in threads:
        frame = frames.get(thread.ident or -1)
        if frame is None or thread is threading.current_thread():
            continue
        out.append(
            f"thread {thread.name!r} ({'daemon' if thread.daemon else 'main' if thread is threading.main_thread() else 'thread'}):"
        )
        out += [line.rstrip() for entry in traceback.format_stack(frame) for line in entry.splitlines()]
    return out


def children_report() -> list[str]:
    """This process's children (loader workers) with their state: a T (stopped) or D (waiting on a
    device or file system) is the likely culprit of a wait for a batch."""
    import psutil

    lines = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = " ".join(" ".join(child.cmdline()).split())[:100] or child.name()
            lines.append(f"child process {child.pid} ({command}): state {child.status()}")
    return lines or ["no child processes"]


def stacks_on_request() -> None:
    """Write every thread's stack to stderr on STACKS_SIGNAL (for this process and the children it forks)."""
    faulthandler.register(STACKS_SIGNAL, file=sys.stderr, all_threads=True)


def kill_children() -> None:
    """Ask every descendant for its stacks, then SIGKILL it (a stopped process dies of SIGKILL too and
    cannot answer; loader workers ignore SIGTERM)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.send_signal(STACKS_SIGNAL)
    if children:
        time.sleep(1.0)  # faulthandler writes from the signal handler: a running worker answers at once
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.send_signal(signal.SIGKILL)
