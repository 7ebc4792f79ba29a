"""The demo's two judges (bench.caption_following, bench.prompt_following) are measured against the truth
before their verdicts on trained models are believed: words read from every caption template, pixels
read from true renders of the synthetic scenes at the sampler's resolution."""

from __future__ import annotations

import itertools
from pathlib import Path

from PIL import Image

from bench import caption_following, prompt_following
from core.presets import TinyConfig, TinyDiffusionConfig, build_diffusion
from data_prep.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, Scene


def test_every_caption_template_is_read_back_as_the_scene_it_describes() -> None:
    for colour, shape, position, background in itertools.product(COLOURS, SHAPES, POSITIONS, BACKGROUNDS):
        scene = Scene(colour, shape, position, background)
        for text in scene.captions():
            got = caption_following.attributes(text)
            want = {"colour": colour, "shape": shape, "position": position, "background": background}
            if text.startswith("There is"):  # the one template that names no background
                want["background"] = None
            assert got == want, text


def test_a_caption_naming_two_of_a_kind_names_none() -> None:
    got = caption_following.attributes("A red circle next to a blue square on a white background .")
    assert got["colour"] is None and got["shape"] is None and got["background"] == "white"
    assert got["position"] is None


def test_the_pixel_judge_reads_true_renders_at_the_sampler_resolution() -> None:
    scores = prompt_following.accuracy(*prompt_following.renders(32, 200))
    assert min(scores.values()) >= 0.95, scores


def test_the_pixel_judge_tells_each_shape_apart_and_finds_nothing_in_an_empty_picture() -> None:
    table = prompt_following.confusion(*prompt_following.renders(32, 200, seed=3))
    for shape, row in table.items():
        assert row[shape] >= 0.9 * sum(row.values()) > 0, (shape, row)
    empty = prompt_following.judge(Image.new("RGB", (32, 32), BACKGROUNDS["grey"]))
    assert empty == {"background": "grey", "colour": None, "position": None, "shape": None}


def test_the_vae_round_trip_gives_back_pictures_of_the_same_size(tmp_path: Path) -> None:
    build_diffusion(tmp_path / "tiny", "tiny", TinyDiffusionConfig(), TinyConfig())
    pictures, _ = prompt_following.renders(32, 3)
    back = prompt_following.round_trip(str(tmp_path / "tiny"), pictures)
    assert [(p.size, p.mode) for p in back] == [((32, 32), "RGB")] * 3
    assert back[0].tobytes() != pictures[0].tobytes()  # through a (random) VAE, not handed back
