"""core/: the pieces the stages share give the same answers wherever they are used."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from core.clip import CLIPFineTuner, Embedder, HeadSpec, load_clip, load_processors
from core.manifest import FORMAT_VERSION, load_manifest
from core.preprocess import Collate, ImageTransform
from core.presets import TinyConfig, build_clip
from core.records import Records
from plumbing.errors import UserError
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer-export-shaped tiny CLIP with non-trivial MLP heads (as CLIPFineTuner saves it)."""
    root = tmp_path_factory.mktemp("export")
    build_clip(root / "base", "tiny", TinyConfig(image_size=64, patch_size=8))
    torch.manual_seed(1)
    clip = load_clip(str(root / "base"))
    model = CLIPFineTuner(clip, HeadSpec("mlp", 64, 48, 0))
    tokenizer, processor = load_processors(str(root / "base"))
    model.save_pretrained(root / "export", tokenizer, processor)
    return root / "export"


def pictures() -> list[Image.Image]:
    rng = random.Random(0)
    return [
        Image.new("RGB", (160 + 8 * i, 120), tuple(rng.randrange(256) for _ in range(3))) for i in range(3)
    ]


def test_sampler_retrieval_and_the_trainers_evaluation_embed_alike(export: Path) -> None:
    """The sampler's CLIP score and retrieval both use core.clip.Embedder; the trainer's evaluation
    runs the engine on its own eval preprocessing and collate. Same image, same text: same embedding."""
    from trainer.tasks.clip.tasks import ClipPrep

    embedder = Embedder(str(export), "cpu")
    texts = ["A red circle on the left on a black background .", "a cat"]
    # the trainer's way: its eval prep (in a loader worker) → its collate → the model's forward
    tokenizer, processor = load_processors(str(export))
    prep = ClipPrep(ImageTransform.of(processor, random_crop=True, hflip=True), ImageTransform.of(processor))
    samples = [
        prep({"key": str(i), "image": p, "text": "x"}, draw=i, train=False) for i, p in enumerate(pictures())
    ]
    collate = Collate(tokenizer, 32, False, processor)
    batch = collate(samples)
    assert batch["pixel_values"].dtype == torch.uint8  # a quarter of float32's bytes through the loader
    model = CLIPFineTuner.from_pretrained(export)
    tokens = Collate(tokenizer, 32, True, processor).tokenize(texts)
    with torch.no_grad():
        pixels = collate.normalise(batch["pixel_values"])  # on the model's device, as the task does
        image, text, _ = model(pixels, tokens["input_ids"], tokens["attention_mask"])
    assert torch.allclose(embedder.images(pictures()), image, atol=1e-5)
    assert torch.allclose(embedder.texts(texts), text, atol=1e-5)
    score = embedder.score(pictures()[:2], texts)
    assert score == pytest.approx([100 * max(0.0, float(image[i] @ text[i])) for i in range(2)], abs=1e-3)


def test_captions_padded_to_the_batch_embed_as_padded_to_the_maximum(export: Path) -> None:
    """Collate pads captions to the batch's longest: CLIP's causal text tower pools at the end token,
    so the embedding is the one of the full-length padding, with less work."""
    tokenizer, processor = load_processors(str(export))
    model = CLIPFineTuner.from_pretrained(export)
    texts = ["a red circle", "There is a blue square at the top on a white background ."]
    trimmed = Collate(tokenizer, 32, True, processor).tokenize(texts)
    full = Collate(tokenizer, 32, True, processor, trim=False).tokenize(texts)
    assert trimmed["input_ids"].shape[1] < full["input_ids"].shape[1] == 32
    with torch.no_grad():
        a = model.encode_text(trimmed["input_ids"], trimmed["attention_mask"])
        b = model.encode_text(full["input_ids"], full["attention_mask"])
    assert torch.allclose(a, b, atol=1e-6)


def test_a_plain_clip_folder_embeds_through_identity_heads(tmp_path: Path) -> None:
    build_clip(tmp_path / "clip", "tiny", TinyConfig())
    embedder = Embedder(str(tmp_path / "clip"), "cpu")
    clip = load_clip(str(tmp_path / "clip"))
    tokens = embedder.collate.tokenize(["a red circle"])
    with torch.no_grad():
        plain = torch.nn.functional.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)
    assert torch.allclose(embedder.texts(["a red circle"]), plain, atol=1e-6)
    with pytest.raises(UserError, match="not a trainer export .* nor a CLIP folder"):
        Embedder(str(tmp_path), "cpu")


def test_a_torn_last_line_is_discarded_and_redone(tmp_path: Path) -> None:
    records = Records(tmp_path, "out.jsonl", key=lambda r: r["id"])
    writer = records.writer("a0000-r0000")
    writer.append([{"id": "a"}, {"id": "b"}])
    with open(writer.path, "a") as f:
        f.write('{"id": "c", "half')  # killed mid-line
    assert set(records.done()) == {"a", "b"}
    records.writer("a0000-r0000").append([{"id": "c"}])  # the rerun redoes c on a fresh line
    assert [json.loads(line)["id"] for line in writer.path.read_text().splitlines()] == ["a", "b", "c"]
    assert [r["id"] for r in records.merge(["c", "a", "b", "d"])] == ["c", "a", "b"]
    assert (tmp_path / "out.jsonl").read_text().count("\n") == 3


def test_records_that_fail_their_check_are_not_done(tmp_path: Path) -> None:
    records = Records(tmp_path, "m.jsonl", key=lambda r: r["id"], check=lambda r: r["ok"])
    records.writer("p").append([{"id": 1, "ok": True}, {"id": 2, "ok": False}])
    assert list(records.done()) == [1]


def test_a_stale_record_sorting_last_never_hides_a_good_one(tmp_path: Path) -> None:
    """An item redone in part a0000-r0000 while an earlier layout's a0000-r0001 still holds its old,
    no longer valid record: the good one is done (else the item is redone on every rerun)."""
    records = Records(tmp_path, "m.jsonl", key=lambda r: r["id"], check=lambda r: r["ok"])
    records.writer("a0000-r0001").append([{"id": 1, "ok": False}])
    records.writer("a0000-r0000").append([{"id": 1, "ok": True, "new": True}])
    assert records.done()[1]["new"] and [r["id"] for r in records.merge([1])] == [1]


def test_a_manifest_of_another_format_version_is_one_line(tmp_path: Path) -> None:
    raw = {"format_version": FORMAT_VERSION + 1, "dataset": "x", "fingerprint": "f", "splits": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(
        UserError, match=rf"format_version {FORMAT_VERSION + 1}, this harness reads {FORMAT_VERSION}"
    ):
        load_manifest(tmp_path)
    raw.pop("format_version")
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="format_version None"):
        load_manifest(tmp_path / "manifest.json")


def test_a_preset_never_replaces_a_folder_it_did_not_build(tmp_path: Path) -> None:
    """preset=tiny with model= pointing at someone's model (an export, say) must not build over it."""
    from core.presets import TinyDiffusionConfig, build_diffusion

    mine = tmp_path / "export"
    mine.mkdir()
    (mine / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="exists and was not built by a preset"):
        build_diffusion(mine, "tiny", TinyDiffusionConfig(), TinyConfig())
    assert (mine / "model_index.json").read_text() == "{}"
    build_diffusion(tmp_path / "fresh", "tiny", TinyDiffusionConfig(), TinyConfig())
    build_diffusion(
        tmp_path / "fresh", "tiny", TinyDiffusionConfig(image_size=64), TinyConfig()
    )  # its own: rebuilt
    assert (tmp_path / "fresh" / "unet").is_dir()


def test_the_tiny_unets_attention_head_dim_is_its_number_of_heads() -> None:
    """diffusers reads UNet2DConditionModel's `attention_head_dim` as the number of heads; the preset's
    field documents that, and this holds diffusers to it (a change there would change the demo's U-Net)."""
    from diffusers.models.attention_processor import Attention

    from core.presets import TinyDiffusionConfig, tiny_unet

    cfg = TinyDiffusionConfig(
        unet_channels=[16, 32, 64], cross_attention=[False, True, True], attention_head_dim=8
    )
    attentions = [m for m in tiny_unet(cfg, 32).modules() if isinstance(m, Attention)]
    assert attentions and {m.heads for m in attentions} == {8}
    assert {m.inner_dim // m.heads for m in attentions} == {4, 8}  # widths 32 and 64


def test_exit_now_runs_atexit_handlers_flushes_and_keeps_the_code(tmp_path: Path) -> None:
    """The entry points end with plumbing.process.exit_now: what was written and registered still
    happens (a log file, stdout without a newline, an atexit handler), and the exit code is kept."""
    log_file = tmp_path / "run.log"
    code = (
        "import atexit, logging, sys\n"
        "from plumbing.process import exit_now\n"
        f"logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO)\n"
        "logging.info('logged')\n"
        "atexit.register(lambda: print(' and the handler ran', end=''))\n"
        "print('stdout', end='')\n"
        "exit_now(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "stdout and the handler ran"
    assert "logged" in log_file.read_text()


# --------------------------------------------------------------------------- pictures


def photo(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A photo-like JPEG (smooth shading, edges and some grain: what DCT scaling is made for)."""
    import io

    import numpy as np

    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    channels = [0.5 + 0.35 * np.sin(6 * x + 4 * y + c) * np.cos(5 * y - 2 * x * c) for c in range(3)]
    pixels = (
        np.stack(channels, axis=-1) + (x[..., None] > 0.6) * 0.2 + rng.normal(0, 0.02, (height, width, 3))
    )
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


TRANSFORMS = {
    "eval": ImageTransform(224, (224, 224)),
    "train": ImageTransform(224, (224, 224), random_crop=True, scale_min=0.8, hflip=True),
}


def opened(data: bytes) -> Image.Image:
    """What the loader's decode gives: the JPEG opened, not decoded (a transform may draft it)."""
    from core.shards import decode

    return decode({"__key__": "k", "jpg": data})["image"]


def test_one_resize_of_the_centre_box_gives_the_resized_images_centre_crop() -> None:
    """CLIPImageProcessor's way (the short side resized, then the centre cut) in one resize of the
    part of the source the crop comes from: the same pixels, at a fraction of the resize work."""
    import numpy as np

    source = Image.open(__import__("io").BytesIO(photo(640, 480))).convert("RGB")
    w, h = source.size
    scale = 224 / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    left, top = round((rw - 224) / 2), round((rh - 224) / 2)
    resized = source.resize((rw, rh), Image.Resampling.BICUBIC).crop((left, top, left + 224, top + 224))
    once = TRANSFORMS["eval"](source, random.Random(0)).permute(1, 2, 0).numpy()
    assert np.abs(once.astype(int) - np.asarray(resized, dtype=int)).max() <= 1


@pytest.mark.parametrize("side", ["eval", "train"])
@pytest.mark.parametrize("size", [(640, 480), (256, 256), (1024, 683)])
def test_a_reduced_jpeg_decode_gives_the_full_decodes_pixels_within_a_level_or_two(
    side: str, size: tuple[int, int]
) -> None:
    """The loader decodes a JPEG at the smallest DCT scale that keeps the crop's resolution (COCO's
    640×480 at 320×240 for CLIP's 224; a 256 px picture whole): the pixels are those of the full
    decode within a level or two (libjpeg's DCT scaling downsamples a little differently from a
    bicubic resize), for the centre and the random crops."""
    import numpy as np

    transform = TRANSFORMS[side]
    for seed in range(3):
        data = photo(*size, seed=seed)
        full = transform(opened(data).convert("RGB"), random.Random(seed)).numpy().astype(int)
        reduced = transform(opened(data), random.Random(seed)).numpy().astype(int)
        diff = np.abs(full - reduced)
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (seed, diff.mean())
    drafted = opened(photo(*size))
    drafted.draft(None, transform.plan(size, random.Random(0)).reduced(size))
    assert drafted.size == ((320, 240) if size == (640, 480) else (512, 342) if size[0] == 1024 else size)


def test_jpegs_decoded_on_the_device_give_the_workers_pixels_within_tolerance() -> None:
    """data.decode=gpu: the workers pass JPEG bytes and planned crops, the training process decodes
    the batch (here torchvision on the CPU, nvJPEG on a GPU) and crops there. Pixels as the workers'
    PIL path within rounding; a grey JPEG comes out RGB; a PNG is decoded by its worker; a JPEG that
    does not decode takes the first good picture and caption and is counted."""
    import io

    import numpy as np

    from core import jpeg

    png = io.BytesIO()
    Image.open(io.BytesIO(photo(300, 200, seed=4))).save(png, "PNG")
    broken = bytearray(photo(320, 240, seed=5))
    broken[400:2400] = bytes(2000)  # scan data wiped: the header parses, the end marker stays
    files = [photo(640, 480, 1), photo(256, 256, 2), photo(500, 375, 3, "L"), png.getvalue(), bytes(broken)]
    for side, transform in TRANSFORMS.items():
        samples, expected = [], []
        for i, data in enumerate(files):
            image, rng = opened(data), random.Random(i)
            if jpeg.deferrable(image, data):
                samples.append({"jpeg": (data, transform.plan(image.size, rng))})
            else:
                samples.append({"pixel_values": transform(image, rng)})
            expected.append(transform(opened(data).convert("RGB"), random.Random(i)) if i < 4 else None)
        assert ["jpeg" in s for s in samples] == [True, True, True, False, True]
        batch = {
            **jpeg.pack(samples, (224, 224)),
            "keys": [str(i) for i in range(5)],
            "skipped": 0,
            "input_ids": torch.arange(5)[:, None].repeat(1, 4),
        }
        pixels = jpeg.pixels(batch, "cpu")
        for i in range(4):
            diff = (pixels[i].int() - expected[i].int()).abs().float()
            assert diff.mean() < 0.5 and np.percentile(diff.numpy(), 99) <= 2, (side, i, diff.mean())
        assert torch.equal(pixels[4], pixels[0]) and torch.equal(batch["input_ids"][4], batch["input_ids"][0])
        assert batch["skipped"] == 1


@pytest.mark.parametrize(
    "data",
    [
        b'{"captions": ["a", "b"], "url": "x"}',
        b' {"a": 1}\n',
        b'\xef\xbb\xbf{"a": 1}',
        '{"a": "é"}'.encode("utf-16"),
        b'"\xed\xa0\x80"',
        b"NaN",
        b'{"a": ',
        b'{"a": 1} trailing',
        b'{"a": 1}{"b": 2}',
        b"",
        b"\xff\xfe\x00",
    ],
)
def test_a_json_member_reads_as_json_loads_reads_it(data: bytes) -> None:
    """core.shards.json_member: json.loads's value or its error, for every input (its fast path takes
    only what the C scanner reads whole)."""
    from core.shards import json_member

    try:
        want: object = ("value", repr(json.loads(data)))
    except ValueError as err:
        want = ("error", type(err))
    try:
        got: object = ("value", repr(json_member(data)))
    except ValueError as err:
        got = ("error", type(err))
    assert got == want
