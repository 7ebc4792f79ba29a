"""The sampler: equality with diffusers' own pipeline, per-image determinism, bulk runs that survive
kills, prompt-file errors, the fine-tuned text encoder swapped in, and prompt files by kind end to end
(the readers themselves: tests/test_prompt_files.py)."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.clip import Embedder
from core.manifest import load_manifest
from core.presets import TinyConfig, TinyDiffusionConfig, build_clip, build_diffusion
from core.shards import image_bytes, read_split
from plumbing.errors import UserError
from sampler.pipeline import SCHEDULERS, LatentDiffusion, Request, load_components
from sampler.prompts import Defaults, read_prompts
from tests.helpers import PY, ROOT, env, run, sampler_args, scalars, torchrun, trainer_args
from tests.test_prompt_files import PARTI

CLIP = TinyConfig(image_size=64, patch_size=8)  # the demo-flickr8k tiny CLIP
DEFAULTS = Defaults(
    seed=0, negative_prompt="", num_images=1, guidance_scale=5.0, steps=4, width=64, height=64
)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd") / "tiny-diffusion"
    build_diffusion(folder, "tiny", TinyDiffusionConfig(), CLIP)
    return folder


def sampler(out: Path, model: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run([PY, "-m", "sampler", *sampler_args(model, out, "steps=4", *overrides)], check=check)


def pixels(out: Path) -> dict[tuple[str, int], np.ndarray]:
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return {(r["id"], r["k"]): np.asarray(Image.open(out / r["file"])).astype(int) for r in records}


def assert_same_images(a: dict, b: dict) -> None:
    """Identical up to float summation order: batched CPU kernels sum in another order for another
    batch size, which moves a handful of values (4 of 36,864 here) by one level."""
    assert a.keys() == b.keys()
    for key in a:
        diff = np.abs(a[key] - b[key])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, key


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_images_equal_stable_diffusion_pipelines(tiny_sd: Path, scheduler: str) -> None:
    import diffusers
    from diffusers import StableDiffusionPipeline

    prompts, negatives, seeds = ["a red circle", "a blue square at the top"], ["", "red"], [11, 12]
    parts = load_components(str(tiny_sd), None, scheduler, "cpu", torch.float32)
    ours = LatentDiffusion(parts, "cpu", torch.float32)(
        Request(prompts, negatives, seeds, 6, 5.0, 64, 64)
    ).images
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd, safety_checker=None, requires_safety_checker=False
    )
    name, extra = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    reference = pipe(
        prompts,
        negative_prompt=negatives,
        generator=generators,
        num_inference_steps=6,
        guidance_scale=5.0,
        height=64,
        width=64,
        output_type="np",
    ).images
    assert np.array_equal(
        np.stack([np.asarray(im) for im in ours]), (reference * 255).round().astype(np.uint8)
    )


def test_same_images_whatever_the_batch_size_and_order(tiny_sd: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\n# a comment\na green cross\na blue square\n")
    shuffled = tmp_path / "shuffled.jsonl"
    lines = [
        {"id": f"p{i}", "prompt": p} for i, p in enumerate(["a red circle", "a green cross", "a blue square"])
    ]
    shuffled.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    reversed_file = tmp_path / "reversed.jsonl"
    reversed_file.write_text("\n".join(json.dumps(line) for line in reversed(lines)) + "\n")
    one, three = tmp_path / "b1", tmp_path / "b3"
    sampler(one, tiny_sd, f"prompts=[{prompts}]", "batch_size=1", "num_images=2")
    sampler(three, tiny_sd, f"prompts=[{prompts}]", "batch_size=3", "num_images=2")
    assert len(pixels(one)) == 6
    assert_same_images(pixels(one), pixels(three))
    a, b = tmp_path / "order-a", tmp_path / "order-b"
    sampler(a, tiny_sd, f"prompts=[{shuffled}]", "batch_size=2")
    sampler(b, tiny_sd, f"prompts=[{reversed_file}]", "batch_size=2")
    assert_same_images(pixels(a), pixels(b))


@pytest.mark.system
def test_same_images_on_one_and_two_ranks(tiny_sd: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(5)))
    single, double = tmp_path / "one", tmp_path / "two"
    sampler(single, tiny_sd, f"prompts=[{prompts}]", "batch_size=2")
    torchrun(
        2, sampler_args(tiny_sd, double, "steps=4", f"prompts=[{prompts}]", "batch_size=2"), module="sampler"
    )
    assert sorted(p.name for p in (double / "parts").iterdir()) == ["a0000-r0000.jsonl", "a0000-r0001.jsonl"]
    assert_same_images(pixels(single), pixels(double))


def test_killed_run_then_rerun_gives_exactly_the_requested_images(tiny_sd: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(12)))
    out = tmp_path / "out"
    args = [
        PY,
        "-m",
        "sampler",
        *sampler_args(tiny_sd, out, "steps=6", f"prompts=[{prompts}]", "batch_size=1"),
    ]
    proc = subprocess.Popen(args, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "images").is_dir() or len(list((out / "images").glob("*.png"))) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.jsonl").exists(), "finished before it was killed"
    run(args)
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 12 and len({(r["id"], r["k"]) for r in records}) == 12
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r["file"]).name for r in records)
    for r in records:
        assert r["sha256"] == hashlib.sha256((out / r["file"]).read_bytes()).hexdigest()
    rerun = run(args)  # nothing left to do: nothing is redone or duplicated
    assert "12 images requested, 12 already done" in rerun.stderr
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 12


def test_bad_prompt_lines_name_file_and_line(tmp_path: Path) -> None:
    txt, jsonl = tmp_path / "a.txt", tmp_path / "b.jsonl"
    txt.write_text("a fine prompt\n")
    cases = [  # (file body, the line at fault, what the message says)
        ('{"prompt": "x"}\n{"prompt": 3}\n', 2, '"prompt" must be a non-empty string'),
        ('{"prompt": "x"}\nnot json\n', 2, "not valid JSON"),
        ('{"prompt": "x", "steps": "many"}\n', 1, "'steps' must be int"),
        ('{"prompt": "x", "colour": "red"}\n', 1, "unknown key 'colour'"),
        ('{"prompt": "x", "id": "../../escape"}\n', 1, "must be letters, digits"),
        ('{"prompt": "x", "id": "same"}\n{"prompt": "y", "id": "same"}\n', 2, "id 'same' is already used at"),
        ('{"prompt": "x", "num_images": 0}\n', 1, "'num_images' must be >= 1"),
    ]
    for body, line, needle in cases:
        jsonl.write_text(body)
        with pytest.raises(UserError, match=needle) as info:
            read_prompts([str(txt), str(jsonl)], DEFAULTS)
        assert str(info.value).startswith(f"{jsonl}:{line}: ")
    jsonl.write_text('{"prompt": "x"}\nnot json\n{"prompt": "z"}\n')
    result = read_prompts([str(txt), str(jsonl)], DEFAULTS, skip_bad=True)
    assert [i.prompt for i in result.items] == ["a fine prompt", "x", "z"]
    assert result.skipped == [
        {"line": f"{jsonl}:2", "reason": "not valid JSON (Expecting value at column 1)"}
    ]
    with pytest.raises(UserError, match="names no prompt file"):
        read_prompts([str(tmp_path / "*.csv")], DEFAULTS)


def test_bad_prompt_line_stops_the_cli_with_one_line(tiny_sd: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prmpt": "typo"}\n')
    proc = sampler(tmp_path / "out", tiny_sd, f"prompts=[{bad}]", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"sampler: error: {bad}:2:"
    )
    ok = sampler(tmp_path / "out2", tiny_sd, f"prompts=[{bad}]", "skip_bad_lines=true")
    assert "1 of 1 images" in ok.stdout


def test_text_encoder_of_another_width_is_refused_with_the_pairing(tiny_sd: Path, tmp_path: Path) -> None:
    wide = tmp_path / "wide"
    build_diffusion(
        wide, "tiny", TinyDiffusionConfig(), TinyConfig(image_size=64, patch_size=8, text_width=48, heads=4)
    )
    with pytest.raises(UserError) as info:
        load_components(str(tiny_sd), str(wide), "ddim", "cpu", torch.float32)
    message = str(info.value)
    assert (
        "hidden size 48" in message
        and "cross-attends to 32" in message
        and "openai/clip-vit-large-patch14" in message
    )


@pytest.mark.system
def test_a_trainer_export_swaps_in_as_the_text_encoder(
    small_data: dict[str, Path], tiny_sd: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    torchrun(
        1,
        trainer_args(
            small_data["flickr8k"],
            run_dir,
            "train.max_steps=2",
            "train.batch_size=8",
            config="configs/demo-flickr8k.yaml",
        ),
    )
    export = run_dir / "export"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on the left\n")
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    sampler(base, tiny_sd, f"prompts=[{prompts}]")
    sampler(tuned, tiny_sd, f"prompts=[{prompts}]", f"text_encoder={export}", f"clip_score={export}")
    record = json.loads((tuned / "manifest.jsonl").read_text())
    assert record["text_encoder"]["path"] == str(export) and len(record["text_encoder"]["sha256"]) == 64
    assert 0 <= record["clip_score"] <= 100
    assert not np.array_equal(
        *[next(iter(pixels(d).values())) for d in (base, tuned)]
    )  # its states, not the base's
    summary = json.loads((tuned / "summary.json").read_text())
    assert summary["done"] == 1 and "clip_score" in summary
    assert (tuned / "contact_sheet.png").is_file() and list((tuned / "tensorboard").iterdir())


def test_eager_attention_and_webdataset_output(tiny_sd: Path, tmp_path: Path) -> None:
    import webdataset as wds

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    sdpa, eager = tmp_path / "sdpa", tmp_path / "eager"
    sampler(sdpa, tiny_sd, f"prompts=[{prompts}]", "webdataset=true")
    sampler(eager, tiny_sd, f"prompts=[{prompts}]", "attention=eager")
    assert_same_images(pixels(sdpa), pixels(eager))
    samples = list(
        wds.WebDataset([str(p) for p in sorted((sdpa / "shards").glob("*.tar"))], shardshuffle=False)
    )
    assert len(samples) == 2
    for sample in samples:
        record = json.loads(sample["json"])
        assert sample["png"] == (sdpa / record["file"]).read_bytes()


# --------------------------------------------------------------------------- prompt files by kind, end to end


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny CLIP folder: enough to score pictures (clip_score=…) with the real embedder."""
    folder = tmp_path_factory.mktemp("clip") / "clip"
    build_clip(folder, "tiny", CLIP)
    return folder


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.smoke
def test_partiprompts_summary_groups_by_category(tiny_sd: Path, tiny_clip: Path, tmp_path: Path) -> None:
    tsv, out = tmp_path / "PartiPrompts.tsv", tmp_path / "out"
    tsv.write_text(PARTI)
    args = sampler_args(tiny_sd, out, "steps=1", f"prompts=[{tsv}]", f"clip_score={tiny_clip}")
    refused = run([PY, "-m", "sampler", *args, "group_by=Categroy"], check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "sampler: error: group_by='Categroy': no prompt has that column "
        "(the prompts' columns: Category, Challenge, Note)"
    )
    run([PY, "-m", "sampler", *args, "group_by=Category", "num_images=2"])
    records = records_of(out)
    assert len(records) == 10 and records[4]["meta"]["Category"] == "Illustrations"
    summary = json.loads((out / "summary.json").read_text())
    groups = summary["groups"]["values"]
    assert list(groups) == ["Animals", "Illustrations", "World Knowledge"]
    for name, entry in groups.items():
        mine = [r["clip_score"] for r in records if r["meta"]["Category"] == name]
        assert entry["images"] == len(mine) and entry["clip_score"] == pytest.approx(sum(mine) / len(mine))
        assert 0 <= entry["r_precision"] <= 1
    weighted = sum(g["images"] * g["r_precision"] for g in groups.values()) / len(records)
    assert weighted == pytest.approx(summary["r_precision"])
    tensorboard = scalars(out / "tensorboard", "groups/clip_score/World Knowledge")
    assert tensorboard[0] == pytest.approx(groups["World Knowledge"]["clip_score"])


@pytest.mark.smoke
def test_a_split_killed_and_rerun_as_two_array_tasks_is_scored_against_its_real_images(
    small_data: dict[str, Path], tiny_sd: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    manifest, out = small_data["flickr8k"], tmp_path / "out"
    args = [
        PY,
        "-m",
        "sampler",
        *sampler_args(
            tiny_sd, out, "steps=2", f"prompts=[{manifest}:test]", "batch_size=1", "tensorboard=false"
        ),
    ]
    proc = subprocess.Popen(args, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "images").is_dir() or len(list((out / "images").glob("*.png"))) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.jsonl").exists(), "finished before it was killed"
    # The rest, as a Slurm array of two makes it; the last task to finish merges and scores them all.
    run(args, SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="2")
    run([*args, f"clip_score={tiny_clip}"], SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="2")
    records = records_of(out)
    keys = [s["__key__"] for s in read_split(load_manifest(manifest), "test")]
    assert sorted(r["meta"]["key"] for r in records) == sorted(keys)  # one record per sample
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r["file"]).name for r in records)
    summary = json.loads((out / "summary.json").read_text())
    real = summary["real_image"]
    assert real["compared"] == 48 and real["missing"] == [] and 0 <= real["r_precision"] <= 1
    # Each picture against its own real photo, recomputed here from the files.
    embedder = Embedder(str(tiny_clip), "cpu")
    photos = {s["__key__"]: image_bytes(s) for s in read_split(load_manifest(manifest), "test")}
    made = embedder.images([Image.open(out / r["file"]) for r in records])
    truth = embedder.images([Image.open(io.BytesIO(photos[r["meta"]["key"]])) for r in records])
    cosines = (made * truth).sum(-1)
    assert real["similarity"]["mean"] == pytest.approx(float(cosines.mean()), abs=1e-5)
    assert real["similarity"]["min"] == pytest.approx(float(cosines.min()), abs=1e-5)
    hits = (made @ truth.t()).argmax(dim=1) == torch.arange(len(records))
    assert real["r_precision"] == pytest.approx(float(hits.float().mean()))
