"""Bad input gets a one-line message, never a traceback: property-based over config overrides and
prompt lines, and byte-level damage to the official data formats."""

from __future__ import annotations

import json
import random
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep.cli import main as prep
from data_prep.config import PrepConfig
from plumbing.config import ConfigError, _from_flags, _load, load_config, walk_schema
from plumbing.errors import UserError
from retrieval.config import RetrievalConfig
from sampler.config import SampleConfig
from sampler.prompts import Defaults, read_prompts
from tests.formats import FlickrFixture, cifar_batches, write_cifar_folder, write_cifar_tarball
from trainer.config import TrainConfig

DEFAULTS = Defaults(
    seed=0, negative_prompt="", num_images=1, guidance_scale=5.0, steps=4, width=64, height=64
)
KEYS = sorted(
    {
        f"{prefix}.{name}" if prefix else name
        for schema in (TrainConfig, SampleConfig)
        for prefix, cls in walk_schema(schema)
        for name in cls.__dataclass_fields__
    }
)
VALUES = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**6), 10**6).map(str),
    st.sampled_from(
        ["true", "[1, 2]", "{a: 1}", "", "null", "'x'", "3.5", "[", "{", ":", "!!python/object:os.system"]
    ),
)


def one_line(err: BaseException) -> None:
    message = str(err)
    assert message and "\n" not in message and len(message) < 600, message


@settings(max_examples=300, deadline=None)
@given(
    key=st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=20)),
    value=VALUES,
    schema=st.sampled_from([TrainConfig, SampleConfig]),
)
def test_any_override_is_accepted_or_refused_in_one_line(key: str, value: str, schema: type) -> None:
    base = (
        ["train.objective=contrastive", "data.manifest=m", "run.dir=r"]
        if schema is TrainConfig
        else ["model=m", "prompts=[p.txt]", "out_dir=o"]
    )
    try:
        load_config(schema, None, [*base, f"{key}={value}"])
    except ConfigError as err:
        one_line(err)


BASES = {
    PrepConfig: {"dataset": "index", "out": "o", "index.shards": ["a/{0..3}.tar"], "progress": False},
    RetrievalConfig: {"mode": "caption", "export": "e", "out_dir": "o", "images": ["p/"], "bank": "b.txt"},
}


@settings(max_examples=300, deadline=None)
@given(
    schema=st.sampled_from([PrepConfig, RetrievalConfig]),
    data=st.data(),
    value=st.one_of(
        st.text(max_size=8),
        st.integers(-3, 2000),
        st.booleans(),
        st.floats(0, 2),
        st.lists(st.text(max_size=6), max_size=3),
        st.sampled_from(["???", "${X}", "\\${Y}", "csv", "index", "val", "1"]),
    ),
)
def test_flags_build_the_config_omegaconf_builds(schema: type, data: st.DataObject, value: object) -> None:
    """The command-line options' quick path (no YAML, no overrides) gives exactly the config OmegaConf
    gives, or leaves it to OmegaConf (which converts or refuses in one line)."""
    keys = sorted(
        f"{prefix}.{name}" if prefix else name
        for prefix, cls in walk_schema(schema)
        for name in cls.__dataclass_fields__
    )
    key = data.draw(st.one_of(st.sampled_from(keys), st.sampled_from(["nope", "index.nope", "shards"])))
    flags = {**BASES[schema], key: value}
    quick = _from_flags(schema, flags)
    if quick is not None:
        assert quick == _load(schema, None, (), flags)
    else:
        try:
            load_config(schema, None, (), flags)
        except ConfigError as err:
            one_line(err)


def test_typed_options_take_the_quick_path() -> None:
    for schema, flags in BASES.items():
        quick = _from_flags(schema, flags)
        assert quick is not None and quick == _load(schema, None, (), flags)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(
        st.one_of(
            st.text(max_size=40),
            st.dictionaries(
                st.sampled_from(
                    ["prompt", "id", "seed", "steps", "num_images", "width", "guidance_scale", "x"]
                ),
                st.one_of(
                    st.text(max_size=10),
                    st.integers(-5, 10**20),
                    st.floats(allow_nan=True),
                    st.booleans(),
                    st.none(),
                ),
                max_size=4,
            ).map(json.dumps),
        ),
        max_size=6,
    ),
    suffix=st.sampled_from([".txt", ".jsonl"]),
)
def test_any_prompt_file_is_read_or_refused_in_one_line(
    lines: list[str], suffix: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("p") / f"prompts{suffix}"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines), encoding="utf-8")
    try:
        result = read_prompts([str(path)], DEFAULTS)
        assert all(item.prompt.strip() and "/" not in item.id for item in result.items)
    except UserError as err:
        one_line(err)
        assert str(path) in str(err) or "prompts:" in str(err)


def run_prep(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = prep(argv)
    err = capsys.readouterr().err
    return code, err


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]


@pytest.mark.parametrize("seed", range(12))
def test_byte_flips_in_cifar_pickles_never_crash(
    seed: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_cifar_folder(tmp_path / "src", cifar_batches(rows=3))
    rng = random.Random(seed)
    victim = folder / rng.choice(["data_batch_1", "test_batch", "batches.meta"])
    data = bytearray(victim.read_bytes())
    for _ in range(rng.randint(1, 4)):
        position = (
            rng.randrange(min(len(data), 300)) if rng.random() < 0.7 else rng.randrange(len(data))
        )  # headers matter most
        data[position] ^= 1 << rng.randrange(8)
    victim.write_bytes(bytes(data))
    code, err = run_prep(
        ["cifar10", "--source", str(folder), "--no-verify", "--out", str(tmp_path / "out"), "--quiet"], capsys
    )
    if code:
        lines = errors(err)
        assert (
            code == 2
            and len(lines) == 1
            and lines[0].startswith("data_prep: error: ")
            and victim.name in lines[0]
        ), err


@pytest.mark.parametrize("seed", range(6))
def test_byte_flips_in_jpegs_are_kept_or_rejected_never_fatal(
    seed: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = FlickrFixture(n=10)
    rng = random.Random(seed)
    for name in rng.sample(fx.names, 4):
        data = bytearray(fx.images[name])
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        fx.images[name] = bytes(data)
    images, text = fx.write_zips(tmp_path)
    code, err = run_prep(
        ["flickr8k", "--images", str(images), "--captions", str(text), "--out", str(tmp_path / "out")], capsys
    )
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    kept = sum(s["num_samples"] for s in manifest["splits"].values())
    rejected = sum(len(s["rejected"]) for s in manifest["splits"].values())
    assert kept + rejected == sum(len(v) for v in fx.splits.values())  # every listed image accounted for


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.95])
def test_truncated_archives_are_one_line(
    cut: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = FlickrFixture()
    images, text = fx.write_zips(tmp_path)
    tarball = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz", cifar_batches(rows=20))
    for path in (images, text, tarball):
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    cases = [
        [
            "flickr8k",
            "--images",
            str(images),
            "--captions",
            str(fx.write_folders(tmp_path / "ok")[1]),
            "--out",
            str(tmp_path / "a"),
        ],
        [
            "flickr8k",
            "--images",
            str(tmp_path / "ok" / "Flicker8k_Dataset"),
            "--captions",
            str(text),
            "--out",
            str(tmp_path / "b"),
        ],
        ["cifar10", "--source", str(tarball), "--no-verify", "--out", str(tmp_path / "c")],
    ]
    for argv in cases:
        code, err = run_prep(argv, capsys)
        lines = errors(err)
        assert code == 2 and len(lines) == 1, (argv, err)


def test_duplicate_image_names_are_listed_not_fatal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fx = FlickrFixture()
    images, text = fx.write_zips(tmp_path)
    with zipfile.ZipFile(images, "a") as z:
        z.writestr(f"elsewhere/{fx.names[0]}", b"not the same picture")
    code, err = run_prep(
        ["flickr8k", "--images", str(images), "--captions", str(text), "--out", str(tmp_path / "out")], capsys
    )
    assert code == 0, err
    rejected = json.loads((tmp_path / "out" / "manifest.json").read_text())["rejected"]
    assert any(
        r["item"] == f"elsewhere/{fx.names[0]}" and "duplicate image name" in r["reason"] for r in rejected
    )
