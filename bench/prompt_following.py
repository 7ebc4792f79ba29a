"""Benchmark: do the demo's pictures show what their prompts say? A pixel-level check, against chance.

    python -m bench.prompt_following [--model runs/demo-diffusion/export] [--prompts 90] [--out FILE]

Prompts in the demo's vocabulary (the synthetic Flickr8k set's colours, shapes, positions and
backgrounds), in combinations and phrasings drawn here, not taken from the training captions; the
sampler (`python -m sampler`, the real entry point) draws each; each picture is then judged from its
pixels alone: the background is the median colour of the border, the object the pixels far from it;
its colour is their median, its position their centroid, each the nearest of the synthetic set's
(data_prep/synthetic.py). The same check on the same prompts drawn by the random-init tiny preset is
the chance baseline. Targets: background, colour and position each right in ≥ 80 % of the pictures.
Writes bench/results/prompt_following-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import Target, machine, slug, write_results
from data_prep.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES

ROOT = Path(__file__).resolve().parents[1]
ATTRIBUTES = ("background", "colour", "position", "shape")
# The demo's vocabulary is its captions' words (data_prep/synthetic.py): these places, and the phrasings
# below recombine those words in orders and forms no caption has (the tiny text encoder never saw a
# word like "centre" or "near": its embedding is still random).
PLACES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the middle",
}
PHRASINGS = [
    "On a {bg} background , {a_c} {s} {p} .",
    "{A_c} {s} {p} , {bg} backdrop .",
    "a {bg} picture with {a_c} {s} {p}",  # lower case, no final dot
    "{A_c} {s} sits {p} of a {bg} scene .",
    "{A_c} {s} {p} , {bg} background .",
    "There is {a_c} {s} {p} on a {bg} background",
]


def prompts(n: int, seed: int = 123) -> list[tuple[str, dict[str, str]]]:
    """(prompt, what it asks for): every colour, position and background, cycled against each other."""
    rng = np.random.default_rng(seed)
    colours, positions, backgrounds = list(COLOURS), list(POSITIONS), list(BACKGROUNDS)
    out = []
    for i in range(n):
        want = {
            "colour": colours[i % len(colours)],
            "position": positions[i % len(positions)],
            "background": backgrounds[(i // len(colours)) % len(backgrounds)],
            "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        }
        article = "an" if want["colour"][0] in "aeiou" else "a"
        place = PLACES[want["position"]]
        text = PHRASINGS[i % len(PHRASINGS)].format(
            a_c=f"{article} {want['colour']}",
            A_c=f"{article.capitalize()} {want['colour']}",
            C=want["colour"].capitalize(),
            s=want["shape"],
            p=place,
            bg=want["background"],
        )
        out.append((text, want))
    return out


def _nearest(table: dict[str, tuple[float, ...]], value: np.ndarray) -> str:
    names = list(table)
    return names[int(np.argmin([((np.asarray(table[n], np.float32) - value) ** 2).sum() for n in names]))]


def judge(picture: Image.Image) -> dict[str, str | None]:
    """Background, object colour, position and a crude shape, from the pixels alone."""
    x = np.asarray(picture.convert("RGB"), np.float32)
    h, w, _ = x.shape
    b = max(1, h // 16)
    border = np.concatenate(
        [x[:b].reshape(-1, 3), x[-b:].reshape(-1, 3), x[:, :b].reshape(-1, 3), x[:, -b:].reshape(-1, 3)]
    )
    background = np.median(border, 0)
    mask = np.sqrt(((x - background) ** 2).sum(-1)) > 60
    out: dict[str, str | None] = {
        "background": _nearest(BACKGROUNDS, background),
        "colour": None,
        "position": None,
        "shape": None,
    }
    if mask.sum() < max(2, h * w // 400):
        return out
    ys, xs = np.nonzero(mask)
    out["colour"] = _nearest(COLOURS, np.median(x[mask], 0))
    out["position"] = _nearest(POSITIONS, np.array([(xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h]))
    out["shape"] = _shape(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    return out


def _shape(box: np.ndarray) -> str:
    """Fill of the bounding box: a square fills it, a cross leaves its corners, a triangle is wider below."""
    h, w = box.shape
    fill = box.mean()
    q = (max(1, h // 4), max(1, w // 4))
    corners = np.mean(
        [
            box[: q[0], : q[1]].mean(),
            box[: q[0], -q[1] :].mean(),
            box[-q[0] :, : q[1]].mean(),
            box[-q[0] :, -q[1] :].mean(),
        ]
    )
    if fill > 0.85:
        return "square"
    if corners < 0.15 and fill < 0.62:
        return "cross"
    if box[-max(1, h // 3) :].mean() > 1.6 * box[: max(1, h // 3)].mean():
        return "triangle"
    return "circle"


def draw(
    model: str, items: list[tuple[str, dict[str, str]]], out: Path, extra: list[str]
) -> list[Image.Image]:
    """The prompts drawn by the real sampler command, in order."""
    prompt_file = out / "prompts.jsonl"
    prompt_file.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"id": f"p{i:04d}", "prompt": text}) for i, (text, _) in enumerate(items)]
    prompt_file.write_text("\n".join(lines) + "\n")
    args = [
        sys.executable,
        "-m",
        "sampler",
        "--config",
        str(ROOT / "configs/sample.yaml"),
        f"model={model}",
        f"prompts=[{prompt_file}]",
        f"out_dir={out / 'samples'}",
        "contact_sheet=24",
        "tensorboard=false",
        *extra,
    ]
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True, text=True)
    return [Image.open(out / "samples" / "images" / f"p{i:04d}_0.png") for i in range(len(items))]


def accuracy(pictures: list[Image.Image], items: list[tuple[str, dict[str, str]]]) -> dict[str, float]:
    hits = {a: 0 for a in ATTRIBUTES}
    for picture, (_, want) in zip(pictures, items):
        got = judge(picture)
        for a in ATTRIBUTES:
            hits[a] += got[a] == want[a]
    return {a: hits[a] / len(items) for a in ATTRIBUTES}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="runs/demo-diffusion/export", help="a diffusers folder (make demo's export)"
    )
    parser.add_argument("--prompts", type=int, default=90)
    parser.add_argument(
        "--keep", default="", help="keep the pictures (and their contact sheet) in this folder"
    )
    parser.add_argument(
        "--out", default="", help="results file (default bench/results/prompt_following-<cpu>.json)"
    )
    args = parser.parse_args()
    items = prompts(args.prompts)
    if re.search(r"\s", args.model):
        raise SystemExit("bench.prompt_following: --model must be a path without spaces")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        trained = accuracy(draw(args.model, items, work / "trained", ["preset=''"]), items)
        chance = accuracy(draw(str(work / "random-tiny"), items, work / "random", ["preset=tiny"]), items)
    targets = [Target(f"{a} right (trained)", trained[a], 0.8) for a in ("background", "colour", "position")]
    text = "\n".join(
        [
            f"{args.prompts} prompts in new combinations and phrasings, drawn by {args.model}, judged by pixels",
            f"  {'':12s} {'trained':>8s} {'random':>8s}",
            *[f"  {a:12s} {trained[a]:8.1%} {chance[a]:8.1%}" for a in ATTRIBUTES],
            *[t.line() for t in targets],
        ]
    )
    print(text)
    name = f"prompt_following-{slug(machine()['cpu'])}"
    print(f"wrote {write_results(name, {'trained': trained, 'random': chance}, targets, text, args.out)}")


if __name__ == "__main__":
    main()
