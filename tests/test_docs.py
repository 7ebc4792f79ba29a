"""The README and the pages under docs/ tell the truth: every command they show is valid as written,
every relative link resolves, the README stays a front door, and docs/CONFIG.md is what the typed
configs generate."""

from __future__ import annotations

import csv
import dataclasses
import re
import shlex
import shutil
import subprocess
import tarfile
import typing
import zipfile
from pathlib import Path

import pytest

from plumbing.config import field_docs, walk_schema
from tests.formats import write_readme_examples
from tests.helpers import PY, ROOT, env, run
from tests.http_server import ShardServer
from tools.config_reference import JOBS, render

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FRONT_DOOR_LINES = 250  # issue 33: a newcomer reads it in five minutes; the manual is under docs/


def test_config_reference_is_up_to_date() -> None:
    assert (ROOT / "docs" / "CONFIG.md").read_text() == render(), "run `make docs`"


def test_every_config_field_has_a_docstring() -> None:
    for _, schema in JOBS:
        for prefix, cls in walk_schema(schema):
            docs, hints = field_docs(cls), typing.get_type_hints(cls)
            undocumented = [
                f.name
                for f in dataclasses.fields(cls)
                if f.name not in docs and not dataclasses.is_dataclass(hints[f.name])
            ]
            assert not undocumented, f"{prefix or cls.__name__}: {undocumented}"


def shown_commands(pages: list[Path]) -> list[str]:
    """Every command line in the pages' bash blocks (comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", "".join(p.read_text() for p in pages), re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return list(dict.fromkeys(commands))  # the README repeats some of the pages' lines


COMMANDS = shown_commands(PAGES)
LAUNCHED = (
    "python -m trainer",
    "python -m sampler",
    "python -m retrieval",
    "CONFIG=",
    "launch/",
    "DRY_RUN=",
    "sbatch",
    "torchrun",
)


def test_the_readme_shows_the_commands_users_need() -> None:
    """The front door: the two commands and one block for each use; the docs the rest."""
    front = " ".join(shown_commands([README]))
    for needle in (
        "make demo",
        "make test",
        "python -m data_prep flickr8k",
        "launch/torchrun.sh",
        "sbatch launch/flickr8k.sbatch",
        "tensorboard --logdir",
        "python -m sampler",
        "python -m retrieval caption",
    ):
        assert needle in front, f"README.md: {needle}"
    everywhere = " ".join(COMMANDS)
    for needle in (
        "python -m data_prep cifar10",
        "python -m data_prep synthetic",
        "sbatch launch/cifar10.sbatch",
    ):
        assert needle in everywhere, needle


def test_the_readme_is_a_front_door_and_each_page_says_what_it_is_for() -> None:
    lines = README.read_text().count("\n")
    assert lines <= FRONT_DOOR_LINES, f"README.md has {lines} lines: move the detail to a page under docs/"
    for page in PAGES[1:]:
        head = page.read_text().split("\n\n")[1]
        assert head.startswith("What you can do here:"), f"{page.name} starts with {head[:60]!r}"
    linked = set(re.findall(r"\]\(docs/([A-Z-]+\.md)\)", README.read_text()))
    assert linked == {p.name for p in PAGES[1:]}, "every page under docs/ is linked from the README"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page: Path) -> None:
    """Links to files (and to headings, `page.md#anchor`) that a reader clicks on GitHub."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s):, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link {target} names no file"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: link {target} names no heading of {file.name}"


JOB_OUTPUTS = ("data", "runs", "samples", "captions", "logs")  # .gitignore: what jobs make


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout as a fresh clone sees it: every entry of the repository but what jobs made in it
    (a checkout that ran part of `make demo` holds data/ without runs/, and a dry run rightly asks for
    the export the config names)."""
    view = tmp_path_factory.mktemp("clone")
    for entry in ROOT.iterdir():
        if entry.name not in JOB_OUTPUTS:
            (view / entry.name).symlink_to(entry)
    return view


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith(LAUNCHED)])
def test_shown_training_and_sampling_commands_are_valid(command: str, fresh_clone: Path) -> None:
    """Each is checked without training: configs and overrides resolve (--print-config) and the launch
    scripts print what they would run (DRY_RUN=1), so a renamed key or file breaks this test. They run
    as on a fresh clone, whatever data/ and runs/ this checkout holds."""
    words = shlex.split(command)
    variables: dict[str, str] = {}
    while re.match(r"^[A-Z_]+=", words[0]):
        key, _, value = words.pop(0).partition("=")
        variables[key] = value
    variables["DRY_RUN"] = "1"
    if words[0] == "bash":
        words = words[1:]
    if words[0] == "sbatch":
        words = [next(w for w in words if w.endswith(".sbatch"))]
    if words[0].startswith("launch/"):
        proc = run(["bash", *words], cwd=fresh_clone, **{"PYTHON": PY, **variables})
        assert "would run:" in proc.stdout
        return
    if words[0] == "torchrun":
        words = ["python", *words[words.index("-m") :]]
    assert words[:2] == ["python", "-m"], command
    rest: list[str] = []
    skip = False
    for word in words[3:]:
        if skip or word == "--check":
            skip = False
            continue
        if word == "--world-size":
            skip = True
            continue
        rest.append(word)
    proc = run([PY, "-m", words[2], *rest, "--print-config"], cwd=fresh_clone, **variables)
    assert proc.stdout.strip()


def test_shown_data_prep_commands_run_on_files_in_the_official_formats(tmp_path: Path) -> None:
    """The data_prep commands, run as written in a folder holding the official file names (the
    synthetic set, so the official-MD5 check must refuse the CIFAR archive: it is not the real one)."""
    raw = tmp_path / "raw"
    small = [
        "synthetic.cifar_per_batch=20",
        "synthetic.cifar_test=20",
        "synthetic.flickr_train=12",
        "synthetic.flickr_dev=4",
        "synthetic.flickr_test=4",
    ]
    run([PY, "-m", "data_prep", "synthetic", "--out", str(raw), *small])
    work = tmp_path / "work"
    work.mkdir()
    write_readme_examples(work)  # the COCO folders, table, imagefolder and shards the docs' lines name
    for name in ("cifar-10-python.tar.gz", "Flickr8k_Dataset.zip", "Flickr8k_text.zip"):
        shutil.copy(raw / name, work / name)
    with tarfile.open(work / "cifar-10-python.tar.gz") as tar:
        tar.extractall(work, filter="data")
    with zipfile.ZipFile(work / "Flickr8k_Dataset.zip") as z:
        z.extractall(work)
    with zipfile.ZipFile(work / "Flickr8k_text.zip") as z:
        z.extractall(work / "Flickr8k_text")
    (work / "Images").symlink_to(work / "Flicker8k_Dataset")
    with open(work / "captions.txt", "w", newline="") as f:  # Kaggle's CSV
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for line in (work / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
            key, caption = line.split("\t")
            writer.writerow([key.split("#")[0], caption])
    with ShardServer(work / "laion", port=8765):  # the shown shards at a URL
        for command in [c for c in COMMANDS if c.startswith("python -m data_prep")]:
            shutil.rmtree(work / "data", ignore_errors=True)  # the lines are alternatives, each alone
            words = shlex.split(command)
            proc = subprocess.run(
                [PY, *words[1:]], cwd=work, env=env(), capture_output=True, text=True, timeout=600
            )
            if words[3] == "cifar10":
                assert proc.returncode == 2 and "is not the official" in proc.stderr, command
            else:
                assert proc.returncode == 0, (command, proc.stderr[-2000:])
