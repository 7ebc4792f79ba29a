"""Benchmark: do the demo's pictures show what their prompts say? A pixel-level check, against chance.

    python -m bench.prompt_following [--model runs/demo-diffusion/export] [--prompts 90] [--out FILE]

Prompts in the demo's vocabulary (the synthetic Flickr8k set's colours, shapes, positions and
backgrounds), in combinations and phrasings drawn here, not taken from the training captions; the
sampler (`python -m sampler`, the real entry point) draws each; each picture is then judged from its
pixels alone: the background is the median colour of the border, the object the pixels far from it;
its colour is their median, its position their centroid, each the nearest of the synthetic set's
(data_prep/synthetic.py); its shape the one of the four, drawn as the synthetic set draws it and
fitted to the object's extent, that overlaps the object best. The same check on the same prompts drawn
by the random-init tiny preset is the chance baseline, and the judge is calibrated on 400 true renders
of the synthetic scenes at the sampler's resolution (how often it is right where the picture is), and
on the same renders passed through the model's VAE and back (the ceiling of what its U-Net can draw).
Targets (issue 19): background, colour and position each right in ≥ 90 % of the pictures, shape in
≥ 80 %. Writes bench/results/prompt_following-<cpu>.json.
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
from PIL import Image, ImageDraw

from bench.common import Target, machine, slug, write_results
from data_prep.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, draw_shape

ROOT = Path(__file__).resolve().parents[1]
ATTRIBUTES = ("background", "colour", "position", "shape")
BOUNDS = {"background": 0.9, "colour": 0.9, "position": 0.9, "shape": 0.8}  # issue 19
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


def prompts(n: int) -> list[tuple[str, dict[str, str]]]:
    """(prompt, what it asks for): every colour, shape, position and background, cycled against each other."""
    colours, positions, backgrounds = list(COLOURS), list(POSITIONS), list(BACKGROUNDS)
    out = []
    for i in range(n):
        want = {
            "colour": colours[i % len(colours)],
            "position": positions[i % len(positions)],
            "background": backgrounds[(i // len(colours)) % len(backgrounds)],
            "shape": SHAPES[(i // len(positions)) % len(SHAPES)],
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
    distance = np.sqrt(((x - background) ** 2).sum(-1))
    out["shape"] = _shape(mask, np.clip(distance / max(float(distance[mask].mean()), 1e-6), 0, 1))
    return out


def _shape(mask: np.ndarray, weight: np.ndarray) -> str:
    """The synthetic shape whose outline best fits the object: each of the four, drawn by the synthetic
    set's own `draw_shape` (at 4× resolution, then averaged down to the picture's pixels), sized to the
    object's extent and placed on its bounding box, and the one with the highest soft IoU against the
    object's pixels (`weight`: how far each pixel is from the background, 0..1) wins."""
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    best, score = SHAPES[0], -1.0
    for shape in SHAPES:
        template = _template(shape, box, mask.shape)
        iou = np.minimum(template, weight).sum() / max(np.maximum(template, weight).sum(), 1e-6)
        if iou > score:
            best, score = shape, iou
    return best


def _template(shape: str, box: tuple[int, int, int, int], size: tuple[int, int], k: int = 4) -> np.ndarray:
    """`shape` as the synthetic set draws it, its bounding box fitted to `box` (x0, y0, x1, y1)."""
    h, w = size
    half = max(box[2] - box[0], box[3] - box[1]) * k / 2
    probe = Image.new("L", (8 * k, 8 * k), 0)  # where the shape's box sits around its centre
    draw_shape(ImageDraw.Draw(probe), shape, 4 * k, 4 * k, 2 * k, 255)
    px0, py0, px1, py1 = probe.getbbox() or (0, 0, 8 * k, 8 * k)
    scale = half / (2 * k)
    cx = (box[0] + box[2]) * k / 2 - ((px0 + px1) / 2 - 4 * k) * scale
    cy = (box[1] + box[3]) * k / 2 - ((py0 + py1) / 2 - 4 * k) * scale
    big = Image.new("L", (w * k, h * k), 0)
    draw_shape(ImageDraw.Draw(big), shape, cx, cy, half, 255)
    return np.asarray(big.resize((w, h), Image.Resampling.BOX), np.float32) / 255


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


def renders(side: int, n: int, seed: int = 7) -> tuple[list[Image.Image], list[tuple[str, dict[str, str]]]]:
    """True pictures of `n` random scenes, drawn as `data_prep synthetic` draws them (its default sizes)
    and brought to `side` as the diffusion task's preprocessing does: the judge's own calibration."""
    import io

    from data_prep.config import SyntheticConfig
    from data_prep.synthetic import Scene, flickr_picture

    cfg, rng = SyntheticConfig(), np.random.default_rng(seed)
    pictures, items = [], []
    for _ in range(n):
        want = {
            "colour": str(rng.choice(list(COLOURS))),
            "shape": str(rng.choice(SHAPES)),
            "position": str(rng.choice(list(POSITIONS))),
            "background": str(rng.choice(list(BACKGROUNDS))),
        }
        jpeg = flickr_picture(Scene(**want), cfg.flickr_width, cfg.flickr_height, rng, cfg.flickr_object)
        picture = Image.open(io.BytesIO(jpeg)).convert("RGB")
        w, h = picture.size
        scale = side / min(w, h)
        picture = picture.resize(
            (max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BICUBIC
        )
        left, top = (picture.width - side) // 2, (picture.height - side) // 2
        pictures.append(picture.crop((left, top, left + side, top + side)))
        items.append(("", want))
    return pictures, items


def round_trip(model: str, pictures: list[Image.Image]) -> list[Image.Image]:
    """The pictures encoded and decoded by the model's own VAE (the latents' mean): what its U-Net
    could at best draw, so a shape the VAE loses is told apart from one the U-Net never learnt."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(model) / "vae").eval()
    x = torch.from_numpy(np.stack([np.asarray(p, np.float32) for p in pictures]) / 127.5 - 1)
    with torch.no_grad():
        y = vae.decode(vae.encode(x.permute(0, 3, 1, 2)).latent_dist.mode()).sample
    pixels = ((y.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
    return [Image.fromarray(p) for p in pixels]


def accuracy(pictures: list[Image.Image], items: list[tuple[str, dict[str, str]]]) -> dict[str, float]:
    hits = {a: 0 for a in ATTRIBUTES}
    for picture, (_, want) in zip(pictures, items):
        got = judge(picture)
        for a in ATTRIBUTES:
            hits[a] += got[a] == want[a]
    return {a: hits[a] / len(items) for a in ATTRIBUTES}


def confusion(
    pictures: list[Image.Image], items: list[tuple[str, dict[str, str]]]
) -> dict[str, dict[str, int]]:
    """For each shape the prompts ask for, how often the pictures were judged each shape ("none":
    no object found): where the shape misses go."""
    table = {s: {t: 0 for t in [*SHAPES, "none"]} for s in SHAPES}
    for picture, (_, want) in zip(pictures, items):
        table[want["shape"]][judge(picture)["shape"] or "none"] += 1
    return table


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
        pictures = draw(args.model, items, work / "trained", ["preset=''"])
        trained, shapes = accuracy(pictures, items), confusion(pictures, items)
        chance = accuracy(draw(str(work / "random-tiny"), items, work / "random", ["preset=tiny"]), items)
    side = pictures[0].width
    true_renders, scenes = renders(side, 400)
    truth = accuracy(true_renders, scenes)
    vae = accuracy(round_trip(args.model, true_renders), scenes)
    targets = [Target(f"{a} right (trained)", trained[a], BOUNDS[a]) for a in ATTRIBUTES]
    text = "\n".join(
        [
            f"{args.prompts} prompts in new combinations and phrasings, drawn by {args.model}, judged by pixels",
            f"  {'':12s} {'trained':>8s} {'random':>8s} {'judge on true renders':>22s} {'VAE round trip':>15s}",
            *[
                f"  {a:12s} {trained[a]:8.1%} {chance[a]:8.1%} {truth[a]:22.1%} {vae[a]:15.1%}"
                for a in ATTRIBUTES
            ],
            f"  (the judge on 400 true renders of the synthetic scenes at {side} px: how far its verdicts can be trusted;",
            "   the same renders through the model's VAE and back: the most its U-Net can draw)",
            "  shape asked → judged (trained): "
            + " | ".join(
                f"{want}: " + ", ".join(f"{got} {n}" for got, n in row.items() if n)
                for want, row in shapes.items()
            ),
            *[t.line() for t in targets],
        ]
    )
    print(text)
    name = f"prompt_following-{slug(machine()['cpu'])}"
    results = {
        "trained": trained,
        "random": chance,
        "judge_on_renders": truth,
        "vae_round_trip": vae,
        "trained_shapes": shapes,
    }
    print(f"wrote {write_results(name, results, targets, text, args.out)}")


if __name__ == "__main__":
    main()
