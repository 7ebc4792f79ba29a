"""Contact sheets: a grid of pictures, each with a caption under it, written as one PNG."""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from plumbing.files import atomic_write_bytes

LINE = 11  # pixels per line of PIL's default bitmap font


def contact_sheet(
    path: Path,
    cells: list[tuple[Image.Image | None, str]],
    side: int = 128,
    cols: int = 0,
    lines: int = 2,
    title: str = "",
) -> Path:
    """Each picture scaled to fit `side`×`side` (small ones enlarged without smoothing, so their pixels
    stay visible), its text wrapped under it in up to `lines` lines; `cols` 0 makes a square-ish grid.
    A missing picture leaves its cell blank."""
    cols = cols or math.ceil(math.sqrt(len(cells)))
    rows = math.ceil(len(cells) / cols)
    label = lines * LINE + 2
    top = LINE + 4 if title else 0
    sheet = Image.new("RGB", (cols * side, top + rows * (side + label)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 2), title[: side * cols // 6], fill="black")
    width = max(4, side // 6)  # characters of the default font that fit a cell
    for i, (picture, text) in enumerate(cells):
        x, y = (i % cols) * side, top + (i // cols) * (side + label)
        if picture is not None:
            fitted = _fit(picture.convert("RGB"), side)
            sheet.paste(fitted, (x + (side - fitted.width) // 2, y + (side - fitted.height) // 2))
        for n, line in enumerate(textwrap.wrap(text, width)[:lines]):
            draw.text((x + 2, y + side + 1 + n * LINE), line, fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _fit(picture: Image.Image, side: int) -> Image.Image:
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    smooth = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    return picture.resize(size, smooth)
