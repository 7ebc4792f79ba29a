"""What a finished job's summary says of its pictures, from one CLIP embedding of each
(core.clip.Embedder, the embedder of the trainer's evaluation):

- CLIP score: recorded per image as it was made (CLIPScore, Hessel et al. 2021); here its mean, min, max.
- R-precision: a picture counts when its own prompt is the most similar to it of all the job's
  distinct prompts (Park et al. 2021, R = 1).
- Real images (items of a data_prep split): the cosine of the picture's and its real image's CLIP image
  embeddings (DreamBooth's CLIP-I, Ruiz et al. 2023), and the real-image R-precision: its own real
  image the most similar of all the job's distinct real images.
- Groups (`group_by`): per value of a metadata column, the images and the means of the same
  per-picture numbers, so the groups stand on one footing and average to the whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from core.clip import Embedder, ranked_first
from core.manifest import load_manifest
from core.records import Record
from core.shards import image_bytes, read_split, rgb_or_none

CHUNK = 64  # pictures opened and embedded at a time: memory stays flat however many there are
NO_VALUE = "(none)"  # the group of records without the column (a .txt beside a .tsv)

PerImage = list[float | None]


def evaluate(root: Path, records: list[Record], scorer: Embedder | None, group_by: str) -> dict[str, Any]:
    """The summary's scores: overall, and per value of `group_by` when it is set."""
    clip: PerImage = [r.get("clip_score") for r in records]
    hits: PerImage = [None] * len(records)
    similarity: PerImage = [None] * len(records)
    real_hits: PerImage = [None] * len(records)
    out: dict[str, Any] = {}
    if scorer is not None and records:
        pictures = _embed(scorer, (Image.open(root / r["file"]) for r in records))
        hits = _prompt_hits(scorer, pictures, [r["prompt"] for r in records])
        similarity, real_hits, missing = _against_real(scorer, pictures, records)
        if any(s is not None for s in similarity) or missing:
            out["real_image"] = {
                "similarity": _stats(similarity),
                "r_precision": _mean(real_hits),
                "compared": sum(s is not None for s in similarity),
                "missing": missing,
            }
    if any(c is not None for c in clip):
        out["clip_score"] = _stats(clip)
    if any(h is not None for h in hits):
        out["r_precision"] = _mean(hits)
    if group_by:
        out["groups"] = {"by": group_by, "values": _groups(records, group_by, clip, hits, similarity)}
    return out


def scalars(summary: dict[str, Any]) -> dict[str, float]:
    """TensorBoard tags and values of a summary: the overall scores and each group's."""
    out: dict[str, float] = {}
    if "clip_score" in summary:
        out["summary/clip_score"] = summary["clip_score"]["mean"]
    if summary.get("r_precision") is not None:
        out["summary/r_precision"] = summary["r_precision"]
    real = summary.get("real_image", {})
    if real.get("similarity"):
        out["summary/real_image_similarity"] = real["similarity"]["mean"]
    if real.get("r_precision") is not None:
        out["summary/real_image_r_precision"] = real["r_precision"]
    groups = summary.get("groups", {})
    for value, entry in groups.get("values", {}).items():
        for metric, number in entry.items():
            if number is not None:
                # One chart per group value under groups/<metric>/; "/" in a value would nest deeper.
                out[f"groups/{metric}/{value.replace('/', '∕')}"] = float(number)
    return out


def groups_table(summary: dict[str, Any]) -> str:
    """The groups as a Markdown table (TensorBoard's text tab shows it as one)."""
    groups = summary["groups"]
    metrics = list(dict.fromkeys(m for entry in groups["values"].values() for m in entry))
    lines = [f"| {groups['by']} | {' | '.join(metrics)} |", "|---" * (len(metrics) + 1) + "|"]
    for value, entry in groups["values"].items():
        cells = [_cell(entry.get(m)) for m in metrics]
        lines.append(f"| {value} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _cell(number: float | None) -> str:
    return "" if number is None else f"{number:.4g}"


def _embed(scorer: Embedder, pictures: Iterator[Image.Image]) -> torch.Tensor:
    """Embeddings of the pictures, CHUNK at a time (never all of them open at once)."""
    parts, chunk = [], []
    for picture in pictures:
        chunk.append(picture.convert("RGB"))
        if len(chunk) == CHUNK:
            parts.append(scorer.images(chunk))
            chunk = []
    if chunk:
        parts.append(scorer.images(chunk))
    return torch.cat(parts)


def _prompt_hits(scorer: Embedder, pictures: torch.Tensor, prompts: list[str]) -> PerImage:
    index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    if len(index) < 2:  # one prompt: nothing to rank it against
        return [None] * len(prompts)
    own = torch.tensor([index[p] for p in prompts])
    return [float(h) for h in ranked_first(pictures, scorer.texts(list(index)), own).tolist()]


def _against_real(
    scorer: Embedder, pictures: torch.Tensor, records: list[Record]
) -> tuple[PerImage, PerImage, list[str]]:
    """Per record: the cosine with its real image and the real-image R-precision hit (None without
    one); and the real images named but not found or not decodable."""
    wanted: dict[tuple[str, str], set[str]] = {}
    for r in records:
        if "real_image" in r:
            ref = r["real_image"]
            wanted.setdefault((ref["manifest"], ref["split"]), set()).add(ref["key"])
    found: dict[tuple[str, str, str], torch.Tensor] = {}
    for (manifest, split), keys in wanted.items():
        found.update(_real_embeddings(scorer, manifest, split, keys))
    names = [_ref(r) for r in records]
    missing = sorted({":".join(n) for n in names if n is not None and n not in found})
    similarity: PerImage = [None] * len(records)
    hits: PerImage = [None] * len(records)
    known = [i for i, n in enumerate(names) if n in found]
    if not known:
        return similarity, hits, missing
    candidates = list(dict.fromkeys(names[i] for i in known))
    index = {n: j for j, n in enumerate(candidates)}
    real = torch.stack([found[n] for n in candidates])
    mine = pictures[known]
    own = torch.tensor([index[names[i]] for i in known])
    cosines = (mine * real[own]).sum(-1).tolist()  # normalised embeddings: the dot product is the cosine
    first = ranked_first(mine, real, own).tolist() if len(candidates) > 1 else None
    for j, i in enumerate(known):
        similarity[i] = cosines[j]
        hits[i] = float(first[j]) if first is not None else None
    return similarity, hits, missing


def _ref(record: Record) -> tuple[str, str, str] | None:
    ref = record.get("real_image")
    return (ref["manifest"], ref["split"], ref["key"]) if ref else None


def _real_embeddings(
    scorer: Embedder, manifest: str, split: str, keys: set[str]
) -> dict[tuple[str, str, str], torch.Tensor]:
    """The wanted samples' images of a prepared split, read in one pass with core's shard reader."""
    found: list[tuple[str, Image.Image]] = []
    for sample in read_split(load_manifest(Path(manifest)), split):
        if sample["__key__"] in keys:
            picture = rgb_or_none(image_bytes(sample) or b"")
            if picture is not None:
                found.append((sample["__key__"], picture))
    if not found:
        return {}
    embeddings = _embed(scorer, (picture for _, picture in found))
    return {(manifest, split, key): e for (key, _), e in zip(found, embeddings)}


def _groups(
    records: list[Record], column: str, clip: PerImage, hits: PerImage, similarity: PerImage
) -> dict[str, dict[str, Any]]:
    members: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        value = r.get("meta", {}).get(column)
        members.setdefault(NO_VALUE if value is None else str(value), []).append(i)
    out: dict[str, dict[str, Any]] = {}
    for value, index in members.items():
        entry: dict[str, Any] = {"images": len(index)}
        for name, numbers in (
            ("clip_score", clip),
            ("r_precision", hits),
            ("real_image_similarity", similarity),
        ):
            mean = _mean([numbers[i] for i in index])
            if mean is not None:
                entry[name] = mean
        out[value] = entry
    return out


def _mean(numbers: PerImage) -> float | None:
    known = [n for n in numbers if n is not None]
    return sum(known) / len(known) if known else None


def _stats(numbers: PerImage) -> dict[str, float] | None:
    known = [n for n in numbers if n is not None]
    return {"mean": sum(known) / len(known), "min": min(known), "max": max(known)} if known else None
