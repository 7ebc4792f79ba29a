"""What every benchmark shares: targets judged met or missed, and a results file the script writes
itself (machine, versions, date, the command), never pasted by hand."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "deepspeed", "transformers", "diffusers", "webdataset")


@dataclass(frozen=True)
class Target:
    """A ratio and the bound it must reach: `at_least` (a speed-up) or at most (an overhead)."""

    name: str
    ratio: float
    bound: float
    at_least: bool = True
    note: str = ""
    """Printed after the verdict, e.g. the load average the two sides ran under."""

    @property
    def met(self) -> bool:
        return self.ratio >= self.bound if self.at_least else self.ratio <= self.bound

    def line(self) -> str:
        sign = ">=" if self.at_least else "<="
        verdict = "met" if self.met else "MISSED"
        note = f"   {self.note}" if self.note else ""
        return f"  {self.name:44s} {self.ratio:7.3f}   target {sign} {self.bound:<5g} {verdict:6s}{note}".rstrip()


def flickr8k_prep(raw: Path, out: Path, *settings: str, shard_size: int, workers: int = 1) -> list[list[str]]:
    """The two `python -m data_prep` commands (arguments after the module) that write a synthetic
    Flickr8k-format set under `raw` (`settings`: its `synthetic.*` sizes) and shard it into `out`."""
    tiny_cifar = ["synthetic.cifar_per_batch=10", "synthetic.cifar_test=10"]  # only Flickr8k is used
    files = ["--images", str(raw / "Flickr8k_Dataset.zip"), "--captions", str(raw / "Flickr8k_text.zip")]
    return [
        ["synthetic", "--out", str(raw), "--quiet", *settings, *tiny_cifar],
        [
            "flickr8k",
            *files,
            "--out",
            str(out),
            "--workers",
            str(workers),
            "--shard-size",
            str(shard_size),
            "--quiet",
        ],
    ]


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def slug(text: str) -> str:
    return "".join(c.lower() if c.isalnum() else "-" for c in text).strip("-").replace("--", "-")


def write_results(
    name: str, results: dict[str, Any], targets: list[Target], text: str, out: str = ""
) -> Path:
    """bench/results/<name>.json (or `out`): the results with their provenance, and the printed table."""
    now = datetime.datetime.now(datetime.timezone.utc)
    payload = {
        "benchmark": name,
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", *_argv()]),
        "machine": machine(),
        "versions": versions(),
        "targets": [
            {"name": t.name, "ratio": t.ratio, "bound": t.bound, "at_least": t.at_least, "met": t.met}
            | ({"note": t.note} if t.note else {})
            for t in targets
        ],
        "results": results,
        "table": text.splitlines(),
    }
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _argv() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return [spec.name if spec else sys.argv[0], *sys.argv[1:]]
