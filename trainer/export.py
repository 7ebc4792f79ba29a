"""`python -m trainer.export --checkpoint DIR --out DIR`: any ZeRO stage → fp32 Hugging Face folders.

The export holds: a CLIPModel folder (config, model.safetensors, tokenizer, preprocessor_config.json)
that `transformers.CLIPModel.from_pretrained` loads as it is; `text_encoder/` and `tokenizer/` that
`CLIPTextModel` / `CLIPTokenizer.from_pretrained` (and the sampler) load; `heads.safetensors` +
`finetuner.json` for `CLIPFineTuner.from_pretrained`; `config.yaml` (the run's resolved config) and
`export.json` (provenance and a content hash). No pickle anywhere.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

import yaml

from plumbing.config import config_from_dict
from plumbing.errors import UserError, run_cli
from plumbing.files import atomic_write_json, atomic_write_text, read_json, tree_digest
from plumbing.logs import setup_logging

log = logging.getLogger("trainer.export")


def export(checkpoint: Path | None, out: Path, overwrite: bool = False) -> Path:
    """Consolidate `checkpoint` into `out` (written beside it, then renamed into place)."""
    from trainer.checkpoint import STATE
    from trainer.config import TrainConfig
    from trainer.engine import consolidated_state_dict
    from trainer.model import build_finetuner, load_processors

    if checkpoint is None or not (checkpoint / STATE).is_file():
        raise UserError(f"{checkpoint}: not a complete trainer checkpoint (no {STATE})")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    payload = read_json(checkpoint / STATE)
    cfg = config_from_dict(TrainConfig, payload["config"], str(checkpoint / STATE))
    source = str(Path(cfg.run.dir) / "base-model") if cfg.model.preset == "tiny" else cfg.model.name
    model = build_finetuner(cfg.model, source)
    state = consolidated_state_dict(checkpoint, payload.get("param_groups"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "clip.logit_scale"]  # frozen, 0-dim, set from ours on save
    if missing or unexpected:
        raise UserError(
            f"{checkpoint}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    tokenizer, processor = load_processors(source)

    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, tokenizer, processor)
    atomic_write_text(staging / "config.yaml", yaml.safe_dump(payload["config"], sort_keys=False))
    info: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        **{k: payload["state"][k] for k in ("epoch", "step", "samples_seen")},
    }
    info["content_sha256"] = tree_digest(staging, "**/*.safetensors")
    atomic_write_json(staging / "export.json", info)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    log.info("exported %s → %s", checkpoint, out)
    return out


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
        setup_logging()
        export(args.checkpoint, args.out, args.overwrite)
        print(f"exported {args.checkpoint} → {args.out}")
        return 0

    return run_cli("trainer.export", run)


if __name__ == "__main__":
    raise SystemExit(main())
