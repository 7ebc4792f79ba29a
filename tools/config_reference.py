"""Write docs/CONFIG.md from the typed configs (their field docstrings): `make docs`.
tests/test_docs.py fails when the file is out of date, so the reference cannot drift from the code."""

from __future__ import annotations

import sys
from pathlib import Path

from data_prep.config import PrepConfig
from plumbing.config import reference_markdown
from retrieval.config import RetrievalConfig
from sampler.config import SampleConfig
from trainer.config import TrainConfig

JOBS = [
    ("python -m data_prep — PrepConfig", PrepConfig),
    ("python -m trainer — TrainConfig", TrainConfig),
    ("python -m sampler — SampleConfig", SampleConfig),
    ("python -m retrieval — RetrievalConfig", RetrievalConfig),
]
HEADER = """# Config reference

What you can do here: look up any key of the four jobs' configs (data_prep, trainer, sampler,
retrieval): its type, its default and what it means.

Generated from the typed configs by `make docs` (tools/config_reference.py); do not edit by hand.
Every key can be set in the YAML file (`--config`) or on the command line as `key.sub=value`.
"""


def render() -> str:
    return HEADER + "\n" + "\n".join(reference_markdown(schema, title) for title, schema in JOBS)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/CONFIG.md")
    target.write_text(render())
    print(f"wrote {target}")
