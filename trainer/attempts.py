"""The record of a run's attempts, and what a restart makes of it.

A launch (one `launch/torchrun.sh`, one Slurm job) may run the trainer several times: torchrun restarts
its workers after a failure (`--max-restarts`), Slurm requeues the job. Each rank appends what happened
to `run.dir/attempts/rank-<R>.jsonl` (one writer per file, fsynced lines, core.records): rank 0 the
start of each attempt; every rank how its attempt ended, when it lives to say it — hung (its watchdog
fired), crashed, stopped on bad input, preempted, finished. An attempt whose ranks all died without a
word (SIGKILL, the OOM killer) is "lost".

A restart that would fail where the last ones did is refused in one line, before anything heavy: when
the last SAME_STEP_FAILURES failures of the launch happened at the same step, one more try would be
a third of the same (a stuck node, a batch that crashes the model, a divergence). Preemption is not a
failure and does not break the streak.

`python -m trainer.attempts --config FILE [key=value …]` prints the launch's outcome in one line (the
launch in the environment, else the newest recorded) and exits with its status (0 finished, 75 preempted, 124 hung, 1 crashed, 2 bad input): the launchers'
last word. With `--restart N` it says instead whether to run again (exit 0) or not (exit 1): Slurm's
requeue after a failure, at most N times.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.records import PartWriter
from plumbing.dist import DistInfo, launch_of
from plumbing.errors import EXIT_USAGE, UserError, one_line
from plumbing.watchdog import EXIT_HUNG, Hang
from trainer.checkpoint import TrainState
from trainer.loop import EXIT_PREEMPTED

log = logging.getLogger("trainer")

#: Failures at one step, in a row, after which a launch stops restarting.
SAME_STEP_FAILURES = 2
FAILED = ("hung", "crashed", "bad input", "lost")


@dataclass(frozen=True)
class Attempt:
    """One try of a launch, from every rank's records of it."""

    number: int  # the launch's restart count when it ran
    outcome: str  # "finished", "preempted", "hung", "crashed", "bad input", "refused", "lost"
    step: int | None  # the steps done when it ended (None: not known): a failure is in the next one
    code: int  # its exit status
    detail: str  # what the ranks said (the first hang or crash line of each)

    @property
    def failed(self) -> bool:
        return self.outcome in FAILED


class AttemptLog:
    """This rank's records of the current attempt, and the launch's earlier attempts."""

    def __init__(self, folder: Path, info: DistInfo) -> None:
        self.folder, self.info = folder, info
        self.writer = PartWriter(folder / f"rank-{info.rank:05d}.jsonl")
        self.ended = False
        self.state: TrainState | None = None  # the loop's, once the run has resumed: where it stands

    @property
    def step(self) -> int | None:
        return self.state.step if self.state is not None else None

    def write(self, event: str, step: int | None, **extra: Any) -> None:
        record = {"launch": self.info.launch, "attempt": self.info.attempt, "rank": self.info.rank}
        self.writer.append([{**record, "event": event, "step": step, "time": round(time.time(), 3), **extra}])

    def started(self) -> None:
        if not self.info.is_main:
            return
        self.write("start", None, world=self.info.world_size)
        earlier = [a for a in attempts(self.folder, self.info.launch) if a.number < self.info.attempt]
        if earlier:
            last = earlier[-1]
            log.warning(
                "restart %d of launch %s: attempt %d %s after step %s%s; resuming",
                self.info.attempt,
                self.info.launch,
                last.number,
                last.outcome,
                last.step,
                f" ({last.detail})" if last.detail else "",
            )

    def hung(self, hang: Hang) -> None:
        """The watchdog's record (from its thread, just before the rank exits EXIT_HUNG)."""
        self.ended = True
        detail = f"rank {hang.rank} {hang.doing} ({hang.where}), collective {hang.collective}"
        self.write("hung", self.step, code=EXIT_HUNG, detail=detail)

    def finished(self, code: int) -> None:
        self.ended = True
        self.write({0: "finished", EXIT_PREEMPTED: "preempted"}.get(code, "crashed"), self.step, code=code)

    def failed(self, err: BaseException) -> None:
        if self.ended:
            return
        self.ended = True
        usage = isinstance(err, UserError)
        text = one_line(err) if usage else f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        self.write(
            "bad input" if usage else "crashed", self.step, code=EXIT_USAGE if usage else 1, detail=text
        )

    def refuse(self, why: str) -> int:
        """Record the refusal, say it once per launch (rank 0), return the status of the failures."""
        earlier = attempts(self.folder, self.info.launch)
        failures = [a for a in earlier if a.failed]
        code = failures[-1].code if failures else 1
        if self.info.is_main and not any(a.outcome == "refused" for a in earlier):
            log.error("%s; the stacks and errors are in the log above; fix the cause, then run again", why)
        self.ended = True
        self.write("refused", failures[-1].step if failures else None, code=code, detail=why)
        return code

    def refusal(self) -> str | None:
        """Why this attempt must not run (a restart that would fail where the last ones did), or None."""
        if self.info.attempt == 0:
            return None
        earlier = [a for a in attempts(self.folder, self.info.launch) if a.number < self.info.attempt]
        return stuck(earlier)


def read_records(folder: Path, launch: str | None) -> list[dict[str, Any]]:
    """Every rank's records of `launch` (None: of every launch); a torn last line (a rank killed
    mid-write) is skipped."""
    records = []
    for part in sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []:
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if launch is None or record.get("launch") == launch:
                records.append(record)
    return records


def newest_launch(folder: Path) -> str:
    """The launch of the newest record (what a person asks about from a shell outside any launch)."""
    records = read_records(folder, None)
    return max(records, key=lambda r: r["time"])["launch"] if records else ""


def attempts(folder: Path, launch: str) -> list[Attempt]:
    """The launch's attempts in order, each judged from its ranks' records: any rank that hung makes it
    a hang (the others then fail waiting for it), else a crash, else what the ranks said."""
    by_number: dict[int, list[dict[str, Any]]] = {}
    for record in read_records(folder, launch):
        by_number.setdefault(int(record["attempt"]), []).append(record)
    out = []
    for number in sorted(by_number):
        ends = [r for r in by_number[number] if r["event"] != "start"]
        for outcome in ("refused", "hung", "bad input", "crashed", "preempted", "finished"):
            chosen = [r for r in ends if r["event"] == outcome]
            if chosen:
                break
        else:
            out.append(Attempt(number, "lost", None, 1, "no rank recorded an end (killed outright?)"))
            continue
        steps = [r["step"] for r in chosen if r.get("step") is not None]
        details = sorted({r["detail"] for r in chosen if r.get("detail")})
        code = int(chosen[0].get("code", 1))
        out.append(Attempt(number, outcome, min(steps) if steps else None, code, "; ".join(details)))
    return out


def stuck(earlier: list[Attempt]) -> str | None:
    """A line when the last SAME_STEP_FAILURES failures (preemptions aside) were at one step."""
    if earlier and earlier[-1].outcome == "refused":
        return earlier[-1].detail or "an earlier attempt of this launch refused to restart"
    streak = [a for a in earlier if a.outcome != "preempted"][-SAME_STEP_FAILURES:]
    if len(streak) < SAME_STEP_FAILURES or not all(a.failed for a in streak):
        return None
    steps = {a.step for a in streak}
    if len(steps) != 1 or None in steps:
        return None
    what = "; ".join(
        f"attempt {a.number} {a.outcome}" + (f" ({a.detail})" if a.detail else "") for a in streak
    )
    return f"failed {len(streak)} times in a row after step {steps.pop()} ({what}): not restarting"


def verdict(found: list[Attempt]) -> tuple[int, str]:
    """The launch's status and its one line."""
    if not found:
        return 1, "no attempt of this launch was recorded (did the trainer start?)"
    last = found[-1]
    failures = [a for a in found if a.failed]
    history = "; ".join(f"attempt {a.number} {a.outcome} after step {a.step}" for a in failures)
    restarts = f" after {len(found) - 1} restart(s) ({history})" if len(found) > 1 and history else ""
    if last.outcome == "finished":
        return 0, f"finished{restarts}"
    if last.outcome == "refused":
        gave_up = [a for a in found if a.failed][-1] if failures else last
        return gave_up.code, f"gave up: {last.detail}"
    detail = f": {last.detail}" if last.detail else ""
    line = f"{last.outcome} after step {last.step}{detail}{restarts}"
    if last.outcome == "hung":
        line += "; every live rank's report and stacks are in the log (how to read them: docs/RELIABILITY.md)"
    return last.code, line


def should_restart(found: list[Attempt], max_restarts: int) -> tuple[bool, str]:
    """Run again after this attempt? Only after a failure, at most `max_restarts` failures, not stuck."""
    if not found or not found[-1].failed:
        return False, ""
    used = sum(a.failed for a in found[:-1])
    if used >= max_restarts:
        return False, f"failed {used + 1} times; {max_restarts} restart(s) allowed"
    why = stuck(found)
    if why is not None:
        return False, why
    return (
        True,
        f"restart {used + 1} of {max_restarts} after attempt {found[-1].number} {found[-1].outcome} after step {found[-1].step}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.attempts", description=__doc__.split("\n\n")[-1])
    parser.add_argument("--config", type=Path)
    parser.add_argument(
        "--restart",
        type=int,
        default=-1,
        metavar="N",
        help="exit 0 when the launch should run again (at most N failures restarted)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)

    def run() -> int:
        from plumbing.config import load_config
        from trainer.config import TrainConfig
        from trainer.run import RunFolder

        cfg = load_config(TrainConfig, args.config, args.overrides)
        folder = RunFolder(Path(cfg.run.dir)).attempts
        found = attempts(folder, launch_of()[0] or newest_launch(folder))
        if args.restart >= 0:
            again, why = should_restart(found, args.restart)
            if why:
                print(f"trainer: {why}")
            return 0 if again else 1
        code, line = verdict(found)
        print(f"trainer: {line}")
        return code

    from plumbing.errors import run_cli

    return run_cli("trainer", run)


if __name__ == "__main__":
    raise SystemExit(main())
