"""`python -m trainer.export --checkpoint DIR --out DIR`: any ZeRO stage → the task's export folder.

A CLIP run's export holds: a CLIPModel folder (config, model.safetensors, tokenizer,
preprocessor_config.json) that `transformers.CLIPModel.from_pretrained` loads as it is; `text_encoder/`
and `tokenizer/` that `CLIPTextModel` / `CLIPTokenizer.from_pretrained` (and the sampler) load;
`heads.safetensors` + `finetuner.json` for `core.clip.CLIPFineTuner.from_pretrained`. Every export also
has `config.yaml` (the run's resolved config) and `export.json` (provenance and a content hash). No
pickle anywhere. At the end of a run the export is also compared with the live engine's parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from plumbing.config import config_from_dict
from plumbing.dist import DistInfo
from plumbing.errors import UserError, run_cli
from plumbing.files import (
    atomic_write_json,
    atomic_write_text,
    is_write_error,
    read_json,
    tree_digest,
    write_failed,
)
from plumbing.logs import setup_logging
from trainer.checkpoint import STATE, extra_states
from trainer.engine import Engine, consolidated_state_dict, live_weights
from trainer.tasks.base import Task

log = logging.getLogger("trainer.export")


def export(checkpoint: Path | None, out: Path, task: Task, overwrite: bool = True) -> Path:
    """Consolidate `checkpoint` into `out` (written beside it, then renamed into place)."""
    if checkpoint is None or not (checkpoint / STATE).is_file():
        raise UserError(f"{checkpoint}: not a complete trainer checkpoint (no {STATE})")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    payload = read_json(checkpoint / STATE)
    weights = consolidated_state_dict(checkpoint, payload.get("param_groups"))
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        task.export(weights, extra_states(checkpoint), staging)
    except UserError as err:
        raise UserError(f"{checkpoint}: {err}") from None
    except (OSError, RuntimeError) as err:  # a full disk: the old export, if any, is untouched
        if not is_write_error(err):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise write_failed(out, err, then="the checkpoint is kept; free space and export it again") from None
    atomic_write_text(staging / "config.yaml", yaml.safe_dump(payload["config"], sort_keys=False))
    info: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        **{k: payload["state"][k] for k in ("epoch", "step", "samples_seen")},
        "content_sha256": tree_digest(staging, "**/*.safetensors"),
    }
    atomic_write_json(staging / "export.json", info)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    log.info("exported %s → %s", checkpoint, out)
    return out


def live_digests(engine: Engine, task: Task, is_main: bool) -> dict[str, str]:
    """What the export must hold, as fingerprints of the live engine's fp32 parameters: each is
    gathered whole in turn (a collective under ZeRO 1-3: every rank iterates), rank 0 keeps the
    digest of what the task expects the export to hold for it, and the tensor is dropped. No rank
    ever holds a second whole model for the check."""
    out = {}
    for name, tensor in live_weights(engine):
        want = task.expected_export(name, tensor) if is_main else None
        if want is not None:
            out[name] = digest(want)
    return out


def verify_export(digests: dict[str, str], task: Task, out: Path) -> None:
    """The export, read back, holds exactly (byte for byte) the tensors whose fingerprints
    `live_digests` took from the trained engine. A difference is a bug in consolidation: the run fails."""
    got = task.exported(out)
    missing = sorted(set(digests) - set(got))
    differ = [k for k in digests if k in got and digest(got[k]) != digests[k]]
    if missing or differ:
        raise RuntimeError(
            f"{out} differs from the trained model: missing {missing[:3]}, different {differ[:3]}"
        )
    log.info("export verified: its %d tensors equal the live engine's", len(digests))


def digest(tensor: torch.Tensor) -> str:
    """A fingerprint of a tensor's values in fp32 (blake2b of its bytes, read in place)."""
    data = tensor.detach().float().cpu().contiguous()
    return hashlib.blake2b(data.reshape(-1).numpy().data, digest_size=16).hexdigest() + str(tuple(data.shape))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="a checkpoint folder (runs/<name>/checkpoints/step-…)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the export folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    args = parser.parse_args(argv)

    def run() -> int:
        from trainer.config import TrainConfig
        from trainer.run import RunFolder
        from trainer.tasks import make_task

        setup_logging()
        if not (args.checkpoint / STATE).is_file():
            raise UserError(f"{args.checkpoint}: not a complete trainer checkpoint (no {STATE})")
        cfg = config_from_dict(
            TrainConfig, read_json(args.checkpoint / STATE)["config"], str(args.checkpoint / STATE)
        )
        # The checkpoint's own run folder (<run>/checkpoints/<tag>), wherever the run was moved to.
        task = make_task(
            cfg, RunFolder(args.checkpoint.resolve().parent.parent), DistInfo.from_env({}), "cpu"
        )
        export(args.checkpoint, args.out, task, args.overwrite)
        print(f"exported {args.checkpoint} → {args.out}")
        return 0

    return run_cli("trainer.export", run)


if __name__ == "__main__":
    raise SystemExit(main())
