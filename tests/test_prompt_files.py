"""Prompt files as people have them — PartiPrompts (.tsv), DrawBench (.csv), COCO captions (.json), a
data_prep split — read as what they are; files that are none of these refused in one line; ids stable
and file-name safe; summaries grouped by a column and scored against the real images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.manifest import load_manifest
from core.shards import captions_of, read_split
from plumbing.errors import UserError, one_line
from plumbing.files import safe_name
from sampler.evaluate import evaluate
from sampler.prompt_files import Options
from sampler.prompts import Defaults, read_prompts

DEFAULTS = Defaults(
    seed=0, negative_prompt="", num_images=1, guidance_scale=5.0, steps=1, width=64, height=64
)

# The real files' headers and quirks: google-research/parti PartiPrompts.tsv (no quoting: a prompt may
# start with a quote; empty Notes), DrawBench's CSV export (`Prompts,Category`, RFC 4180 quoting).
PARTI = (
    "Prompt\tCategory\tChallenge\tNote\n"
    "a shiba inu\tAnimals\tBasic\t\n"
    "a red cube\tIllustrations\tBasic\t\n"
    '"G I G G L E" painted in thick colorful lettering as graffiti\tIllustrations\tWriting & Symbols\t\n'
    "a portrait of a statue of Anubis, flying over the city of Mars. \tWorld Knowledge\tComplex\t\n"
    "a tiger\tAnimals\tBasic\tGLIDE\n"
)
DRAWBENCH = (
    "\ufeffPrompts,Category\r\n"
    "A red colored car.,Colors\r\n"
    '"A sign that says ""Hello, World"".",Text\r\n'
    '"A storefront with\nits name written on it.",Text\r\n'
)


def coco_file(path: Path) -> Path:
    """The schema of annotations/captions_val2017.json, with its stray spaces and newlines."""
    data = {
        "info": {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "x"}],
        "images": [
            {"license": 4, "file_name": "000000397133.jpg", "height": 427, "width": 640, "id": 397133},
            {"license": 1, "file_name": "000000037777.jpg", "height": 230, "width": 352, "id": 37777},
        ],
        "annotations": [
            {"image_id": 397133, "id": 370509, "caption": "A man is in a kitchen making pizzas."},
            {"image_id": 37777, "id": 1234, "caption": "The dining table near the kitchen has\na bowl. "},
            {"image_id": 397133, "id": 370584, "caption": " Man in apron standing on front of oven."},
        ],
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("prompt-files")
    (folder / "PartiPrompts.tsv").write_text(PARTI, encoding="utf-8")
    (folder / "drawbench.csv").write_bytes(DRAWBENCH.encode("utf-8"))
    return {
        "tsv": folder / "PartiPrompts.tsv",
        "csv": folder / "drawbench.csv",
        "coco": coco_file(folder / "captions_val2017.json"),
    }


def test_partiprompts_tsv_rows_keep_their_columns(files: dict[str, Path]) -> None:
    result = read_prompts([str(files["tsv"])], DEFAULTS)
    assert [i.prompt for i in result.items] == [
        "a shiba inu",
        "a red cube",
        '"G I G G L E" painted in thick colorful lettering as graffiti',  # quotes kept, as written
        "a portrait of a statue of Anubis, flying over the city of Mars.",
        "a tiger",
    ]
    assert result.items[2].meta == {"Category": "Illustrations", "Challenge": "Writing & Symbols", "Note": ""}
    assert result.items[4].meta["Note"] == "GLIDE" and result.items[4].source == f"{files['tsv']}:6"
    assert result.columns() == ["Category", "Challenge", "Note"]


def test_drawbench_csv_quotes_newlines_and_byte_order_mark(files: dict[str, Path], tmp_path: Path) -> None:
    result = read_prompts([str(files["csv"])], DEFAULTS)
    assert [(i.prompt, i.meta) for i in result.items] == [
        ("A red colored car.", {"Category": "Colors"}),
        ('A sign that says "Hello, World".', {"Category": "Text"}),
        ("A storefront with\nits name written on it.", {"Category": "Text"}),
    ]
    assert result.items[2].source == f"{files['csv']}:4"  # the line its row starts on
    chosen = read_prompts([str(files["csv"])], DEFAULTS, options=Options(prompt_column="Category"))
    assert [i.prompt for i in chosen.items] == ["Colors", "Text", "Text"]
    assert chosen.items[0].meta == {"Prompts": "A red colored car."}


def test_coco_captions_one_item_per_image_or_per_caption(files: dict[str, Path]) -> None:
    first = read_prompts([str(files["coco"])], DEFAULTS)
    assert [(i.id, i.prompt) for i in first.items] == [
        ("captions_val2017-000000397133", "A man is in a kitchen making pizzas."),
        ("captions_val2017-000000037777", "The dining table near the kitchen has a bowl."),
    ]
    assert first.items[0].meta == {
        "image_id": 397133,
        "file_name": "000000397133.jpg",
        "annotation_id": 370509,
    }
    every = read_prompts([str(files["coco"])], DEFAULTS, options=Options(all_captions=True))
    assert [(i.id, i.prompt) for i in every.items] == [
        ("captions_val2017-000000397133-000000370509", "A man is in a kitchen making pizzas."),
        ("captions_val2017-000000397133-000000370584", "Man in apron standing on front of oven."),
        ("captions_val2017-000000037777-000000001234", "The dining table near the kitchen has a bowl."),
    ]


def test_a_prepared_split_gives_its_samples_with_keys_captions_and_real_images(
    small_data: dict[str, Path],
) -> None:
    manifest = small_data["flickr8k"]
    result = read_prompts([f"{manifest}:test"], DEFAULTS)
    samples = list(read_split(load_manifest(manifest), "test"))
    assert len(result.items) == len(samples) == 48
    for item, sample in zip(result.items, samples):
        assert item.meta == {"key": sample["__key__"], "captions": captions_of(sample)}
        assert item.prompt == captions_of(sample)[0]
        assert item.real is not None and (item.real.split, item.real.key) == ("test", sample["__key__"])
        assert item.id == f"flickr8k-test-{sample['__key__']}"
    every = read_prompts([f"{manifest.parent}:test"], DEFAULTS, options=Options(all_captions=True))
    assert len(every.items) == sum(len(captions_of(s)) for s in samples)


def test_ids_are_stable_file_name_safe_and_unique_for_every_kind(
    files: dict[str, Path], small_data: dict[str, Path]
) -> None:
    sources = [str(files["tsv"]), str(files["csv"]), str(files["coco"]), f"{small_data['flickr8k']}:dev"]
    for options in (Options(), Options(all_captions=True)):
        first = read_prompts(sources, DEFAULTS, options=options)
        again = read_prompts(sources, DEFAULTS, options=options)
        assert [(i.id, i.seed) for i in first.items] == [(i.id, i.seed) for i in again.items]
        assert len({i.id for i in first.items}) == len(first.items)
        assert all(safe_name(i.id, 120) == i.id for i in first.items)


@pytest.mark.parametrize(
    "name, body, needle",
    [
        (
            "prompts.md",
            "a red circle\n",
            "cannot tell what kind of prompt file this is: expected .txt, .jsonl",
        ),
        ("PartiPrompts.txt", PARTI, ":1: looks like the header of a tab-separated table (Prompt | Category"),
        ("Flickr8k.token.txt", "1000268201_693b08cb0e.jpg#0\tA child in a pink dress .\n", ":1: holds a tab"),
        ("coco.json", '{"images": []}', "not a COCO captions file: expected"),
        ("manifest.json", '{"format_version": 1, "splits": {"test": {}}}', "name a split, e.g. "),
        ("plain.csv", "a red car,Colors\n", ":1: no prompt column in the header (a red car, Colors)"),
        ("short.tsv", "Prompt\tCategory\na cat\n", ":2: 1 fields, the header has 2"),
        ("quoted.csv", 'prompt\n"a "cat" here"\n', ":2: not a valid CSV line"),
    ],
)
def test_a_file_that_is_not_what_its_name_says_is_refused_in_one_line(
    tmp_path: Path, name: str, body: str, needle: str
) -> None:
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(UserError, match=None) as info:
        read_prompts([str(path)], DEFAULTS)
    message = one_line(info.value)
    assert message.startswith(str(path)) and needle in message, message


def test_a_missing_column_or_split_names_what_there_is(
    files: dict[str, Path], small_data: dict[str, Path]
) -> None:
    with pytest.raises(
        UserError, match=r"no column 'Caption' \(prompt_column\) in the header: Prompt, Category"
    ):
        read_prompts([str(files["tsv"])], DEFAULTS, options=Options(prompt_column="Caption"))
    with pytest.raises(UserError, match="no split 'val'"):
        read_prompts([f"{small_data['flickr8k']}:val"], DEFAULTS)


def test_bad_rows_are_skipped_with_skip_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.tsv"
    path.write_text("Prompt\tCategory\na cat\tAnimals\n\tAnimals\na dog\n")
    result = read_prompts([str(path)], DEFAULTS, skip_bad=True)
    assert [i.prompt for i in result.items] == ["a cat"]
    assert result.skipped == [
        {"line": f"{path}:3", "reason": '"prompt" must be a non-empty string'},
        {"line": f"{path}:4", "reason": "1 fields, the header has 2"},
    ]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.text(alphabet=st.sampled_from('ab ,\t"\n\r{}[]:prompt0'), max_size=60),
    suffix=st.sampled_from([".csv", ".tsv", ".json", ".txt"]),
)
def test_any_table_or_json_is_read_or_refused_in_one_line(
    body: str, suffix: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("p") / f"prompts{suffix}"
    path.write_text(body, encoding="utf-8")
    try:
        result = read_prompts([str(path)], DEFAULTS, skip_bad=True)
        assert all(i.prompt.strip() and safe_name(i.id, 120) == i.id for i in result.items)
    except UserError as err:
        assert str(path) in one_line(err) or "prompts:" in str(err)


def test_groups_count_and_average_the_records() -> None:
    records = [
        {"prompt": "a", "clip_score": 10.0, "meta": {"Category": "Animals"}},
        {"prompt": "b", "clip_score": 20.0, "meta": {"Category": "Animals"}},
        {"prompt": "c", "clip_score": 40.0, "meta": {"Category": "Food & Beverage"}},
        {"prompt": "d", "clip_score": 1.0},  # a .txt item beside the table
    ]
    summary = evaluate(Path("."), records, None, "Category")
    assert summary["clip_score"] == {"mean": 17.75, "min": 1.0, "max": 40.0}
    assert summary["groups"] == {
        "by": "Category",
        "values": {
            "Animals": {"images": 2, "clip_score": 15.0},
            "Food & Beverage": {"images": 1, "clip_score": 40.0},
            "(none)": {"images": 1, "clip_score": 1.0},
        },
    }
