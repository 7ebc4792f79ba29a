"""`sample(cfg)`: plan the images, skip those already made, generate this process's share in batches,
save each one, merge the manifest. Under torchrun/srun each rank takes every n-th image; a Slurm
array task takes its slice of those; any of them may be killed and rerun."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from core.clip import Embedder
from core.presets import build_diffusion, is_built
from plumbing.config import save_config, to_dict
from plumbing.dist import DistInfo, barrier, destroy_process_group, init_process_group
from plumbing.errors import UserError
from plumbing.files import atomic_write_json, tree_digest
from plumbing.logs import progress, setup_logging
from plumbing.watchdog import Watchdog
from sampler.config import SampleConfig
from sampler.evaluate import evaluate, groups_table, scalars
from sampler.output import OutputFolder
from sampler.pipeline import LatentDiffusion, Request, load_components, resolve_dtype
from sampler.prompt_files import Options
from sampler.prompts import Defaults, Item, image_seed, read_prompts

log = logging.getLogger("sampler")


@dataclass(frozen=True)
class Job:
    item: Item
    k: int
    seed: int

    @property
    def key(self) -> tuple[str, int]:
        return self.item.id, self.k

    @property
    def settings(self) -> tuple[int, float, int, int]:
        """Images that agree on these can share a forward pass."""
        return self.item.steps, self.item.guidance_scale, self.item.height, self.item.width


def sample(cfg: SampleConfig) -> int:
    info = DistInfo.from_env()
    setup_logging(info.rank)
    watchdog = Watchdog.of_ranks(cfg.watchdog, info.rank, info.world_size)
    watchdog.arm("start-up", long=True)
    device = init_process_group(info, cfg.watchdog.collective_s(cfg.watchdog.startup_s))
    try:
        return _sample(cfg, info, device, watchdog)
    finally:
        watchdog.close()
        destroy_process_group()


def _sample(cfg: SampleConfig, info: DistInfo, device: str, watchdog: Watchdog) -> int:
    out = OutputFolder(Path(cfg.out_dir))
    model = ensure_model(cfg, info)
    dtype = resolve_dtype(cfg.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    parts = load_components(model, cfg.text_encoder or None, cfg.scheduler, device, dtype)
    if cfg.attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        parts.unet.set_attn_processor(AttnProcessor())
    if cfg.compile:
        parts = type(parts)(
            parts.tokenizer, parts.text_encoder, torch.compile(parts.unet), parts.vae, parts.scheduler
        )
    pipe = LatentDiffusion(parts, device, dtype)
    size = pipe.default_size
    defaults = Defaults(
        cfg.seed,
        cfg.negative_prompt,
        cfg.num_images,
        cfg.guidance_scale,
        cfg.steps,
        cfg.height or size,
        cfg.width or size,
    )
    options = Options(cfg.prompt_column, all_captions=cfg.captions == "all")
    prompts = read_prompts(list(cfg.prompts), defaults, cfg.skip_bad_lines, options)
    if cfg.group_by and cfg.group_by not in prompts.columns():
        columns = ", ".join(prompts.columns()) or "none: .txt and .jsonl items have no metadata"
        raise UserError(
            f"group_by={cfg.group_by!r}: no prompt has that column (the prompts' columns: {columns})"
        )
    for bad in prompts.skipped:
        log.warning("skipped %s: %s", bad["line"], bad["reason"])
    jobs = [Job(item, k, image_seed(item, k)) for item in prompts.items for k in range(item.num_images)]
    if info.is_main:
        out.prepare()
        save_config(cfg, out.root / "config.yaml")
    barrier()

    records = out.records
    done = records.done()
    index, count = info.work_slice
    mine = [
        job for i, job in enumerate(sorted(jobs, key=lambda j: (j.settings, j.key))) if i % count == index
    ]
    todo = [job for job in mine if job.key not in done]
    log.info(
        "%d images requested, %d already done; this process (%d of %d) makes %d",
        len(jobs),
        len(jobs) - sum(j.key not in done for j in jobs),
        index + 1,
        count,
        len(todo),
    )
    provenance = describe_models(model, cfg)
    scorer = Embedder(cfg.clip_score, device) if cfg.clip_score else None
    writer = records.writer(f"a{info.array_index:04d}-r{info.rank:04d}")
    bar = progress(len(todo), "sample", "img", enabled=True)

    made = [0]  # images made so far, for a hang report (a progress bar off a terminal counts nothing)

    def where() -> str:
        return f"{made[0]} of {len(todo)} images made"

    for batch in watchdog.batches(batches(todo, cfg.batch_size), where):  # each batch in time
        first = batch[0].item
        request = Request(
            [j.item.prompt for j in batch],
            [j.item.negative_prompt for j in batch],
            [j.seed for j in batch],
            first.steps,
            first.guidance_scale,
            first.height,
            first.width,
        )
        result = pipe(request)
        scores = scorer.score(result.images, request.prompts) if scorer else [None] * len(batch)
        for job, image, score in zip(batch, result.images, scores):
            path = out.image_path(job.item.id, job.k)
            digest = out.save_image(image, path)  # 6. save: the image first, its record after
            seconds = result.seconds / len(batch)
            writer.append([record(job, path, out.root, digest, seconds, cfg, dtype_name, provenance, score)])
        bar.update(len(batch))
        made[0] += len(batch)
    bar.close()

    watchdog.arm("wait for the other ranks", where)  # they have a batch or so left: the step's limit
    barrier()
    watchdog.arm("merge", long=True)
    if info.rank == 0:  # every array task merges what exists; the last one to finish sees it all
        merged = records.merge(sorted(job.key for job in jobs))
        finish(out, merged, cfg, len(jobs), prompts.skipped, scorer)
    return 0


def batches(jobs: list[Any], size: int) -> list[list[Any]]:
    """Consecutive jobs with equal settings, at most `size` together."""
    groups: dict[tuple, list[Any]] = defaultdict(list)
    for job in jobs:
        groups[job.settings].append(job)
    return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]


def record(
    job: Job,
    path: Path,
    root: Path,
    digest: str,
    seconds: float,
    cfg: SampleConfig,
    dtype: str,
    provenance: dict[str, Any],
    score: float | None,
) -> dict[str, Any]:
    item = job.item
    out: dict[str, Any] = {
        "id": item.id,
        "k": job.k,
        "prompt": item.prompt,
        "negative_prompt": item.negative_prompt,
        "seed": job.seed,
        "item_seed": item.seed,
        "steps": item.steps,
        "guidance_scale": item.guidance_scale,
        "width": item.width,
        "height": item.height,
        "scheduler": cfg.scheduler,
        "dtype": dtype,
        "source": item.source,
        "file": path.relative_to(root.resolve()).as_posix(),
        "sha256": digest,
        "seconds": round(seconds, 4),
        **provenance,
    }
    if item.meta:
        out["meta"] = item.meta
    if item.real is not None:
        out["real_image"] = asdict(item.real)
    if score is not None:
        out["clip_score"] = round(score, 4)
    return out


def ensure_model(cfg: SampleConfig, info: DistInfo) -> str:
    """The model folder; a preset is built there once (rank 0), whole or not at all."""
    if not cfg.preset:
        return cfg.model
    folder = Path(cfg.model)
    if info.is_main and not is_built(folder, cfg.preset, cfg.tiny, cfg.tiny_clip):
        build_diffusion(folder, cfg.preset, cfg.tiny, cfg.tiny_clip)
    barrier()
    return str(folder)


def describe_models(model: str, cfg: SampleConfig) -> dict[str, Any]:
    """Paths and content hashes of the weights that made the images."""
    out: dict[str, Any] = {"model": {"path": model, "sha256": _digest(model)}}
    if cfg.text_encoder:
        out["text_encoder"] = {"path": cfg.text_encoder, "sha256": _digest(cfg.text_encoder)}
    return out


def _digest(path: str) -> str:
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, local_files_only=True))
    return tree_digest(folder, "**/*.safetensors")


def finish(
    out: OutputFolder,
    merged: list[dict[str, Any]],
    cfg: SampleConfig,
    requested: int,
    skipped: list[dict[str, str]],
    scorer: Embedder | None,
) -> None:
    sheet = out.contact_sheet(merged, cfg.contact_sheet)
    if cfg.webdataset and merged:
        out.shards(merged)
    seconds = sum(r["seconds"] for r in merged)  # in the pipeline: saving and scoring aside
    summary = {
        "requested": requested,
        "done": len(merged),
        "images_per_s": round(len(merged) / seconds, 4) if seconds else 0.0,
        "skipped_lines": skipped,
        **evaluate(out.root, merged, scorer, cfg.group_by),
        "config": to_dict(cfg),
    }
    if cfg.tensorboard and merged:
        tensorboard(out, merged, sheet, summary)
    atomic_write_json(out.root / "summary.json", summary)
    print(report(out, merged, requested, sheet, summary))


def tensorboard(out: OutputFolder, merged: list[dict[str, Any]], sheet: Path | None, summary: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out.root / "tensorboard"))
    if sheet:
        writer.add_image("contact_sheet", np.asarray(Image.open(sheet).convert("RGB")), 0, dataformats="HWC")
    for r in merged[:16]:
        writer.add_image(
            f"images/{r['id']}_{r['k']}",
            np.asarray(Image.open(out.root / r["file"]).convert("RGB")),
            0,
            dataformats="HWC",
        )
    for tag, value in scalars(summary).items():
        writer.add_scalar(tag, value, 0)
    if "groups" in summary:
        writer.add_text("groups", groups_table(summary), 0)
    writer.close()


def report(
    out: OutputFolder, merged: list[dict[str, Any]], requested: int, sheet: Path | None, summary: dict
) -> str:
    line = f"{len(merged)} of {requested} images in {out.images}; manifest {out.root / 'manifest.jsonl'}"
    if sheet:
        line += f"; contact sheet {sheet}"
    if "clip_score" in summary:
        line += f"; mean CLIP score {summary['clip_score']['mean']:.2f}"
    if summary.get("r_precision") is not None:
        line += f"; CLIP R-precision {summary['r_precision']:.1%} among {len({r['prompt'] for r in merged})} prompts"
    real = summary.get("real_image", {})
    if real.get("similarity"):
        line += f"; CLIP similarity to the real images {real['similarity']['mean']:.3f}"
    if "groups" in summary:
        line += f"; {len(summary['groups']['values'])} groups by {summary['groups']['by']} in summary.json"
    return line
