"""Benchmark: does the fine-tuned CLIP see every word of its captions? Captioning by attribute.

    python -m bench.caption_following [--export runs/demo-flickr8k/export]
        [--manifest data/demo/flickr8k/manifest.json] [--run runs/demo-flickr8k] [--out FILE]

Each test image of the demo's Flickr8k-format set is captioned by the real entry point
(`python -m retrieval caption … top_k=1`) with the best of the training split's captions; the chosen
caption's colour, shape, position and background words are compared with the image's own caption's.
Identical scenes share their captions, so an image's own captions are not needed to be right: the
attributes are. Chance is 1/6, 1/4, 1/5 and 1/3. Targets (issue 19): shape ≥ 0.9, the others ≥ 0.95.
With `--run`, the run's own final Recall@1 both ways (its eval.jsonl) is printed beside them: images
with identical captions cap those below 100 %. Writes bench/results/caption_following-<cpu>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import Target, machine, slug, write_results
from data_prep.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES

ROOT = Path(__file__).resolve().parents[1]
# Each attribute's words as the synthetic captions write them (data_prep/synthetic.py); positions by phrase.
WORDS = {
    "colour": {c: c for c in COLOURS},
    "shape": {s: s for s in SHAPES},
    "background": {b: b for b in BACKGROUNDS},
    "position": {
        "on the left": "left",
        "on the right": "right",
        "at the top": "top",
        "at the bottom": "bottom",
        "in the middle": "centre",
    },
}
CHANCE = {
    "colour": 1 / len(COLOURS),
    "shape": 1 / len(SHAPES),
    "position": 1 / len(POSITIONS),
    "background": 1 / 3,
}
BOUNDS = {"colour": 0.95, "shape": 0.9, "position": 0.95, "background": 0.95}


def attributes(caption: str) -> dict[str, str | None]:
    """The colour, shape, position and background a caption names (None where it names none or two)."""
    text = f" {caption.lower()} "
    out: dict[str, str | None] = {}
    for attribute, words in WORDS.items():
        found = {value for phrase, value in words.items() if f" {phrase} " in text}
        out[attribute] = found.pop() if len(found) == 1 else None
    return out


def caption(export: str, manifest: str, split: str, out: Path) -> list[dict]:
    """Every image of the split captioned with its best training caption, by the real command."""
    args = [
        sys.executable,
        "-m",
        "retrieval",
        "caption",
        "--export",
        export,
        "--manifest",
        manifest,
        "--split",
        split,
        "--bank",
        manifest,
        "--out",
        str(out),
        "top_k=1",
        "contact_sheets=0",
        f"cache_dir={out / 'cache'}",
    ]
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines() if line.strip()]


def accuracy(records: list[dict]) -> dict[str, float]:
    """Per attribute, the share of images whose chosen caption names it rightly, among the images whose
    chosen caption names it at all (one caption template in five leaves the background out: "There is
    a red circle on the left .")."""
    judged = [r for r in records if "skipped" not in r]
    hits, named = dict.fromkeys(WORDS, 0), dict.fromkeys(WORDS, 0)
    for r in judged:
        want, got = attributes(r["own_caption"]), attributes(r["top"][0]["caption"])
        for a in WORDS:
            named[a] += got[a] is not None
            hits[a] += got[a] is not None and got[a] == want[a]
    return {a: hits[a] / max(named[a], 1) for a in WORDS}


def recall(run: Path) -> dict[str, float]:
    lines = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines() if line.strip()]
    last = max(lines, key=lambda e: e["step"])
    return {k: last[k] for k in ("i2t_R@1", "t2i_R@1") if k in last}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export", default="runs/demo-flickr8k/export", help="a trainer CLIP export")
    parser.add_argument("--manifest", default="data/demo/flickr8k/manifest.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--run", default="", help="the CLIP's run folder: its final Recall@1 is printed too")
    parser.add_argument(
        "--out", default="", help="results file (default bench/results/caption_following-<cpu>.json)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = caption(args.export, args.manifest, args.split, Path(tmp) / "captions")
    scores = accuracy(records)
    recalls = recall(Path(args.run)) if args.run else {}
    targets = [Target(f"{a} right", scores[a], BOUNDS[a]) for a in WORDS]
    text = "\n".join(
        [
            f"{len(records)} {args.split} images captioned by {args.export} with the best training caption",
            f"  {'':12s} {'right':>8s} {'chance':>8s}",
            *[f"  {a:12s} {scores[a]:8.1%} {CHANCE[a]:8.1%}" for a in WORDS],
            *[f"  {k} (the run's last evaluation): {v:.1%}" for k, v in recalls.items()],
            *[t.line() for t in targets],
        ]
    )
    print(text)
    name = f"caption_following-{slug(machine()['cpu'])}"
    results = {"right": scores, "chance": CHANCE, "recall": recalls, "images": len(records)}
    print(f"wrote {write_results(name, results, targets, text, args.out)}")


if __name__ == "__main__":
    main()
