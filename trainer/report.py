"""`python -m trainer.report RUN_DIR [RUN_DIR …]`: each run's evaluation before training and after,
from the trainer's own <run>/eval.jsonl (what `make demo` prints at the end)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from plumbing.errors import UserError, run_cli

# metric → how it prints: rates as percentages, losses and scores as numbers
SHOWN = {
    **{
        m: "{:8.1%}"
        for m in ("top1", "top5", "i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "i2t_R@10", "t2i_R@10")
    },
    "val_loss": "{:8.4f}",
    "r_precision": "{:8.1%}",
    "clip_score": "{:8.2f}",
    "reconstruction_mse": "{:8.4f}",
    "psnr": "{:8.2f}",
}


def table(runs: list[Path]) -> str:
    rows = [f"{'run':28s} {'metric':18s} {'before':>8s} {'after':>8s}  (step)"]
    for run in runs:
        path = run / "eval.jsonl"
        if not path.is_file():
            raise UserError(f"{path}: no evaluations yet (is {run} a trainer run folder?)")
        evals = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not evals:
            raise UserError(f"{path}: empty")
        first, last = min(evals, key=lambda e: e["step"]), max(evals, key=lambda e: e["step"])
        for metric, shape in SHOWN.items():
            if metric in first:
                before, after = shape.format(first[metric]), shape.format(last[metric])
                rows.append(
                    f"{run.name:28s} {metric:18s} {before} {after}  ({first['step']} → {last['step']})"
                )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2

    def run() -> int:
        print(table([Path(a) for a in args]))
        return 0

    return run_cli("trainer.report", run)


if __name__ == "__main__":
    raise SystemExit(main())
