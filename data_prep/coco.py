"""Read COCO captions as the official release ships them: extracted or as the zips, side by side.

Layout (../shared/notes/formats.md): `annotations/captions_{train,val}2017.json` (inside
`annotations_trainval2017.zip`), images in `train2017/` and `val2017/` (inside `train2017.zip`,
`val2017.zip`). A captions JSON is `{"images": [{"id", "file_name", …}], "annotations": [{"id",
"image_id", "caption"}], …}`, 5–7 captions per image, some with stray spaces and newlines. The 2014
release has the same shape. Zip members are read in place, never extracted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from data_prep.images import MISSING, ImageRef, Resize, ignored_member, unsafe_member
from data_prep.samples import EMPTY_CAPTION, NO_CAPTION, ImageText, clean_caption, sample_key
from data_prep.shards import SourceInfo, SplitPlan, describe_source, folder_info, rejection, zip_info
from plumbing.errors import UserError

log = logging.getLogger("data_prep")

_CAPTIONS = re.compile(r"captions_(train|val)(\d{4})\.json")
SCHEMA = '{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}'


@dataclass
class CocoSource:
    splits: dict[str, SplitPlan]
    rejected: list[dict[str, str]]
    sources: dict[str, Any]


def read_coco(root: Path, year: str, resize: Resize) -> CocoSource:
    """Every captioned image of every split found under `root`, one sample per image with all its
    captions (in annotation-id order), images in image-id order."""
    if not root.is_dir():
        raise UserError(
            f"{root}: no such folder (expected the folder holding annotations/ or annotations_trainval2017.zip "
            "and train2017/ or train2017.zip)"
        )
    found = _caption_files(root)
    years = sorted({y for y, _ in found})
    if not years:
        raise UserError(
            f"{root}: no captions_train2017.json or captions_val2017.json in {root / 'annotations'} "
            "nor in annotations_trainval2017.zip"
        )
    if year and year not in years:
        raise UserError(f"{root}: has captions for {', '.join(years)}, not for year={year}")
    if not year:
        if len(years) > 1:
            raise UserError(f"{root}: has captions for {' and '.join(years)}: choose one with --year")
        year = years[0]
    splits: dict[str, SplitPlan] = {}
    rejected: list[dict[str, str]] = []
    sources: dict[str, Any] = {}
    for split in ("train", "val"):
        if (year, split) not in found:
            continue
        where, text, info = found[(year, split)]
        images, captions = _parse(where, text)
        refs, image_info = _image_index(root, f"{split}{year}", where)
        sources[f"captions_{split}"], sources[f"images_{split}"] = asdict(info), asdict(image_info)
        plan = SplitPlan([])
        for image_id, file_name in images:
            texts = []
            for annotation_id, caption in captions.pop(image_id, []):
                if caption:
                    texts.append(caption)
                else:
                    where_id = f"{where}: annotation {annotation_id}"
                    rejected.append(rejection(where_id, EMPTY_CAPTION, f"empty caption of image {image_id}"))
            name = PurePosixPath(file_name).name
            if not texts:
                plan.rejected.append(
                    rejection(f"{split}{year}/{file_name}", NO_CAPTION, "no non-empty caption")
                )
            elif name not in refs:
                plan.rejected.append(
                    rejection(
                        f"{split}{year}/{file_name}",
                        MISSING,
                        f"in {where} but not among the {split}{year} images",
                    )
                )
            else:
                item = f"{split}{year}/{file_name}"
                extra = (("image_id", image_id),)
                plan.samples.append(
                    ImageText(
                        sample_key(name),
                        item,
                        refs[name],
                        tuple(texts),
                        file_name,
                        split,
                        resize,
                        extra=extra,
                    )
                )
        for image_id in sorted(captions):
            rejected.append(
                rejection(
                    f"{where}: image_id {image_id}",
                    "unknown image",
                    "captions of an image id the file does not list",
                )
            )
        splits[split] = plan
    return CocoSource(splits, rejected, sources)


def _caption_files(root: Path) -> dict[tuple[str, str], tuple[str, bytes, SourceInfo]]:
    """(year, split) → (where, JSON bytes, info) from annotations/ (or root itself), else the
    annotations zips beside them."""
    found: dict[tuple[str, str], tuple[str, bytes, SourceInfo]] = {}
    for folder in (root / "annotations", root):
        for path in sorted(folder.glob("captions_*.json")) if folder.is_dir() else []:
            match = _CAPTIONS.fullmatch(path.name)
            if match:
                key = (match.group(2), match.group(1))
                found.setdefault(key, (str(path), path.read_bytes(), describe_source(path, ("sha256",))))
    for archive_path in sorted(root.glob("annotations_trainval*.zip")):
        info = None
        try:
            with zipfile.ZipFile(archive_path) as archive:
                for member in archive.infolist():
                    pure = PurePosixPath(member.filename)
                    match = _CAPTIONS.fullmatch(pure.name)
                    if match and not ignored_member(pure) and (match.group(2), match.group(1)) not in found:
                        where = f"{archive_path}:{member.filename}"
                        info = info or describe_source(archive_path, ("sha256",))  # once per zip (241 MB)
                        found[(match.group(2), match.group(1))] = (where, archive.read(member), info)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise UserError(f"{archive_path}: not a readable zip ({err}): download it again") from None
    return found


def _parse(where: str, text: bytes) -> tuple[list[tuple[int, str]], dict[int, list[tuple[int, str]]]]:
    """(image id, file name) in id order, and image id → its (annotation id, caption) in id order."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{where}: not valid JSON ({err}): download it again") from None
    try:
        images = sorted((int(i["id"]), str(i["file_name"])) for i in data["images"])
        ordered = sorted(data["annotations"], key=lambda a: int(a.get("id", 0)))
        captions: dict[int, list[tuple[int, str]]] = {}
        for a in ordered:
            captions.setdefault(int(a["image_id"]), []).append(
                (int(a.get("id", 0)), clean_caption(a["caption"]))
            )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(
            f"{where}: not COCO's captions schema {SCHEMA} (problem: {err!r}); instances_*.json and "
            "person_keypoints_*.json hold no captions: use captions_<split><year>.json"
        ) from None
    for image_id, file_name in images:
        if unsafe_member(file_name):
            raise UserError(f"{where}: image {image_id} has the unsafe file_name {file_name!r}")
    return images, captions


def _image_index(root: Path, folder_name: str, where: str) -> tuple[dict[str, ImageRef], SourceInfo]:
    """Image file name → where its bytes are: the extracted folder, else the official zip."""
    folder, archive_path = root / folder_name, root / f"{folder_name}.zip"
    if folder.is_dir():
        base = folder.resolve()
        with os.scandir(base) as entries:
            files = sorted((e.name, e.stat().st_size) for e in entries if e.is_file())
        refs = {
            name: ImageRef("", os.path.join(base, name)) for name, _ in files if not name.startswith("._")
        }
        return refs, folder_info(folder, files)
    if archive_path.is_file():
        try:
            with zipfile.ZipFile(archive_path) as archive:
                refs = {}
                for member in archive.infolist():
                    pure = PurePosixPath(member.filename)
                    if member.is_dir() or ignored_member(pure) or unsafe_member(member.filename):
                        continue
                    refs.setdefault(pure.name, ImageRef(str(archive_path.resolve()), member.filename))
                return refs, zip_info(archive_path, archive)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise UserError(f"{archive_path}: not a readable zip ({err}): download it again") from None
    raise UserError(f"{root}: no {folder_name}/ folder nor {folder_name}.zip for the images of {where}")
