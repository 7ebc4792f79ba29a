"""Prompt files → generation items with stable ids and seeds.

`.txt`: one prompt per line; blank lines and `#` comments are skipped. `.jsonl`: one object per line,
`prompt` required; optional `id`, `negative_prompt`, `seed`, `num_images`, `guidance_scale`, `steps`,
`width`, `height`. An item's id is given, or made from the file name, the line and the prompt; its
seed is given, or derived from the global seed and the id. Image k of an item is drawn from
derive_seed(item seed, k): the same image whatever the batch size, the number of ranks or the order.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from plumbing.errors import UserError
from plumbing.files import safe_name
from plumbing.seeds import derive_seed

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
    source: str  # file:line


@dataclass
class PromptSet:
    items: list[Item]
    skipped: list[dict[str, str]] = field(default_factory=list)  # bad lines recorded instead of fatal
    files: list[str] = field(default_factory=list)


def expand(patterns: list[str]) -> list[Path]:
    """Files and globs, in the order given (each glob sorted); a pattern that matches nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise UserError(f"prompts: {pattern!r} names no prompt file")
        files += [Path(m) for m in matches if Path(m) not in files]
    if not files:
        raise UserError("prompts: no prompt files given (prompts=[file.txt, …])")
    return files


def read_prompts(patterns: list[str], defaults: Defaults, skip_bad: bool = False) -> PromptSet:
    result = PromptSet([])
    seen: dict[str, str] = {}
    for path in expand(patterns):
        result.files.append(str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read prompts ({err})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            where = f"{path}:{lineno}"
            try:
                item = _parse(path, lineno, line, defaults)
            except UserError as err:
                if not skip_bad:
                    raise
                result.skipped.append({"line": where, "reason": str(err).split(": ", 1)[-1]})
                continue
            if item is None:
                continue
            if item.id in seen:
                raise UserError(f"{where}: id {item.id!r} is already used at {seen[item.id]}")
            seen[item.id] = where
            result.items.append(item)
    if not result.items:
        raise UserError(f"prompts: {', '.join(result.files)} hold no prompts")
    return result


def _parse(path: Path, lineno: int, line: str, defaults: Defaults) -> Item | None:
    where = f"{path}:{lineno}"
    stripped = line.strip()
    if path.suffix == ".jsonl":
        if not stripped:
            return None
        try:
            record: Any = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise UserError(f'{where}: expected a JSON object with a "prompt"')
        return _item(record, path, lineno, defaults)
    if not stripped or stripped.startswith("#"):
        return None
    return _item({"prompt": stripped}, path, lineno, defaults)


def _item(record: dict[str, Any], path: Path, lineno: int, defaults: Defaults) -> Item:
    where = f"{path}:{lineno}"
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
    if given is not None and (not given.strip() or safe_name(given) != given):
        raise UserError(f"{where}: id {given!r} must be letters, digits, '.', '_' or '-' (it names files)")
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:8]
    item_id = given or f"{safe_name(path.stem, 40)}-{lineno:05d}-{digest}"
    base = Item(
        **{**asdict(defaults), "seed": derive_seed(defaults.seed, item_id)},
        id=item_id,
        prompt=prompt.strip(),
        source=where,
    )
    return replace(base, **{k: v for k, v in values.items() if k != "id"})


def image_seed(item: Item, k: int) -> int:
    return derive_seed(item.seed, "image", k)
