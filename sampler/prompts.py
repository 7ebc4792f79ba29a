"""Prompt files → generation items with stable ids and seeds.

The files are read by kind (sampler.prompt_files: .txt, .jsonl, .csv/.tsv, COCO captions, a
data_prep split). `.jsonl` objects need `prompt` and may give `id`, `negative_prompt`, `seed`,
`num_images`, `guidance_scale`, `steps`, `width`, `height`; every other kind gives the prompt and
metadata (a table's other columns, a COCO image id, a sample's key and captions), which the item
carries into its records. An item's id is given; or fixed by its kind (a COCO image id, a shard key);
or made from the file name, the line or row number and the prompt. Ids are file-name safe and stay
the same on every read, so reruns, ranks and Slurm array tasks agree on them. An item's seed is
given, or derived from the global seed and the id. Image k of an item is drawn from
derive_seed(item seed, k): the same image whatever the batch size, the number of ranks or the order.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from plumbing.errors import UserError
from plumbing.files import safe_name
from plumbing.seeds import derive_seed
from sampler.prompt_files import KINDS, Options, Reference, Row, Source, rows

OPTIONAL = {
    "id": str,
    "negative_prompt": str,
    "seed": int,
    "num_images": int,
    "guidance_scale": float,
    "steps": int,
    "width": int,
    "height": int,
}


@dataclass(frozen=True)
class Defaults:
    """The settings every item has: from the config, unless its .jsonl line gives its own."""

    seed: int
    negative_prompt: str
    num_images: int
    guidance_scale: float
    steps: int
    width: int
    height: int


@dataclass(frozen=True)
class Item(Defaults):
    id: str
    prompt: str
    source: str  # file:line, or the COCO image / the split's sample
    meta: dict[str, Any] = field(default_factory=dict, hash=False)  # columns, image id, key, captions
    real: Reference | None = None  # the real image the prompt describes, when known


@dataclass
class PromptSet:
    items: list[Item]
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad lines recorded instead of fatal
    files: list[str] = field(default_factory=list)

    def columns(self) -> list[str]:
        """The metadata columns any item has, in the order first seen."""
        return list(dict.fromkeys(name for item in self.items for name in item.meta))


def expand(patterns: list[str]) -> list[Source]:
    """Files, globs and manifest splits (`manifest.json:test`), in the order given (each glob sorted);
    a pattern that matches nothing is an error."""
    sources: list[Source] = []
    for pattern in patterns:
        found = _sources(pattern)
        sources += [s for s in found if s not in sources]
    if not sources:
        raise UserError(f"prompts: no prompt files given (prompts=[file.txt, …]; one of {KINDS})")
    return sources


def _sources(pattern: str) -> list[Source]:
    if glob.has_magic(pattern):
        matches = sorted(glob.glob(pattern, recursive=True))
    else:
        matches = [pattern]
        head, _, split = pattern.rpartition(":")
        if not Path(pattern).exists() and head and split and Path(head).exists():
            return [Source(Path(head), split)]  # a data_prep manifest (or its folder) and a split
    if not matches or not all(Path(m).is_file() for m in matches):
        if Path(pattern).is_dir():
            raise UserError(
                f"prompts: {pattern!r} is a folder: name a file, a glob, or a manifest split (DIR:SPLIT)"
            )
        raise UserError(f"prompts: {pattern!r} names no prompt file")
    return [Source(Path(m)) for m in matches]


def read_prompts(
    patterns: list[str], defaults: Defaults, skip_bad: bool = False, options: Options | None = None
) -> PromptSet:
    result = PromptSet([])
    seen: dict[str, str] = {}
    for source in expand(patterns):
        result.files.append(str(source))
        for row in rows(source, options or Options()):
            try:
                item = _item(row, source.path, defaults)
            except UserError as err:
                if not skip_bad:
                    raise
                result.skipped.append({"line": row.where, "reason": str(err).removeprefix(f"{row.where}: ")})
                continue
            if item.id in seen:
                raise UserError(f"{row.where}: id {item.id!r} is already used at {seen[item.id]}")
            seen[item.id] = row.where
            result.items.append(item)
    if not result.items:
        raise UserError(f"prompts: {', '.join(result.files)} hold no prompts")
    return result


def _item(row: Row, path: Path, defaults: Defaults) -> Item:
    where, record = row.where, row.record
    if row.error:
        raise UserError(f"{where}: {row.error}")
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f'{where}: "prompt" must be a non-empty string')
    unknown = sorted(set(record) - {"prompt", *OPTIONAL})
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r} (known: prompt, {', '.join(OPTIONAL)})")
    values: dict[str, Any] = {}
    for key, kind in OPTIONAL.items():
        if key not in record:
            continue
        value = record[key]
        ok = (
            isinstance(value, kind)
            and not isinstance(value, bool)
            or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        )
        if not ok:
            raise UserError(f"{where}: {key!r} must be {kind.__name__}, got {value!r}")
        values[key] = float(value) if kind is float else value
    for key in ("num_images", "steps", "width", "height"):
        if key in values and values[key] < 1:
            raise UserError(f"{where}: {key!r} must be >= 1, got {values[key]}")
    given = values.get("id")
    if given is not None and (not given.strip() or safe_name(given, 120) != given):
        raise UserError(f"{where}: id {given!r} must be letters, digits, '.', '_' or '-' (it names files)")
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:8]
    item_id = given or f"{safe_name(path.stem, 40)}-{row.number:05d}-{digest}"
    base = Item(
        **{**asdict(defaults), "seed": derive_seed(defaults.seed, item_id)},
        id=item_id,
        prompt=prompt.strip(),
        source=where,
        meta=row.meta,
        real=row.real,
    )
    return replace(base, **{k: v for k, v in values.items() if k != "id"})


def image_seed(item: Item, k: int) -> int:
    return derive_seed(item.seed, "image", k)
