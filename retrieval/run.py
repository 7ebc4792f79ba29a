"""Caption images from a bank, or search images with queries: embed once, rank, write JSONL.

Outputs in out_dir: captions.jsonl or search.jsonl (one record per image / query, in input order),
parts/ (per-rank records, appended as they are made: a rerun skips what is done), summary.json
(counts, skipped images, hit rates when the data says which caption belongs to which image),
sheets/ (contact sheets) and config.yaml.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from core.clip import Embedder
from core.records import Records
from core.sheets import contact_sheet
from plumbing.config import save_config, to_dict
from plumbing.dist import DistInfo, barrier, destroy_process_group, init_process_group
from plumbing.errors import UserError
from plumbing.files import atomic_write_json, safe_name
from plumbing.logs import progress, setup_logging
from plumbing.watchdog import Watchdog
from retrieval.config import RetrievalConfig
from retrieval.embed import cached
from retrieval.sources import (
    ImageItem,
    ImageSet,
    Text,
    image_files,
    manifest_images,
    picture_of,
    read_texts,
)

log = logging.getLogger("retrieval")


def retrieve(cfg: RetrievalConfig) -> int:
    info = DistInfo.from_env()
    setup_logging(info.rank)
    watchdog = Watchdog.of_ranks(cfg.watchdog, info.rank, info.world_size)
    watchdog.arm("start-up", long=True)  # the bank's embedding, by rank 0 while the others wait, included
    device = init_process_group(info, cfg.watchdog.collective_s(cfg.watchdog.startup_s))
    try:
        return (caption if cfg.mode == "caption" else search)(cfg, info, device, watchdog)
    finally:
        watchdog.close()
        destroy_process_group()


def caption(cfg: RetrievalConfig, info: DistInfo, device: str, watchdog: Watchdog) -> int:
    out = Path(cfg.out_dir)
    embedder = Embedder(cfg.export, device)
    images = image_set(cfg)
    if cfg.limit:
        images.items = images.items[: cfg.limit]
    bank, bank_fp = read_texts([cfg.bank], cfg.bank_split, "bank")
    home = Path(cfg.cache_dir) if cfg.cache_dir else _home(Path(cfg.bank))
    texts = [t.text for t in bank]
    table, _ = shared_embeddings(
        home,
        "bank",
        embedder,
        bank_fp,
        lambda: (embed_texts(embedder, texts, cfg.batch_size), [t.id for t in bank]),
        info,
    )
    store = prepare(out, cfg, info, "image", "captions.jsonl")
    done = store.done()
    writer = store.writer(part_name(info))
    mine = [
        item
        for i, item in enumerate(images.items)
        if i % info.work_slice[1] == info.work_slice[0] and item.id not in done
    ]
    log.info(
        "%d images, %d already captioned; this process captions %d against %d captions",
        len(images.items),
        len(done.keys() & {i.id for i in images.items}),
        len(mine),
        len(bank),
    )
    bar, started = progress(len(mine), "caption", "img"), time.perf_counter()

    made = [0]  # for a hang report (a progress bar off a terminal counts nothing)

    def where() -> str:
        return f"{made[0]} of {len(mine)} images captioned"

    for chunk in watchdog.batches(chunks(images.pictures(mine), cfg.batch_size), where):
        records = [skipped(item) for item, picture in chunk if picture is None]
        good = [(item, picture) for item, picture in chunk if picture is not None]
        if good:
            scores = embedder.images([p for _, p in good]) @ table.t()
            for (item, _), row in zip(good, scores):
                top = ranked(row, cfg.top_k)
                records.append(
                    {
                        "image": item.id,
                        "source": item.source,
                        "own_caption": item.captions[0] if item.captions else "",
                        "top": [
                            {
                                "caption": bank[j].text,
                                "score": round(float(row[j]), 5),
                                "bank_id": bank[j].id,
                                "of_image": bank[j].image,
                            }
                            for j in top
                        ],
                    }
                )
        writer.append(records)
        bar.update(len(chunk))
        made[0] += len(chunk)
    bar.close()
    rate = Rate(len(mine), time.perf_counter() - started)
    return finish(
        rate,
        store,
        cfg,
        info,
        [i.id for i in images.items],
        "image",
        lambda rs: caption_summary(rs, images, bank),
        watchdog,
    )


def search(cfg: RetrievalConfig, info: DistInfo, device: str, watchdog: Watchdog) -> int:
    out = Path(cfg.out_dir)
    embedder = Embedder(cfg.export, device)
    images = image_set(cfg)
    queries, _ = read_texts(list(cfg.queries), cfg.bank_split, "queries")
    if cfg.limit:
        queries = queries[: cfg.limit]
    home = Path(cfg.cache_dir) if cfg.cache_dir else images.home

    def embed_all() -> tuple[torch.Tensor, list[str]]:
        rows, ids = [], []
        for chunk in chunks(images.pictures(images.items), cfg.batch_size):
            good = [(item, p) for item, p in chunk if p is not None]
            ids += [item.id for item, _ in good]
            if good:
                rows.append(embedder.images([p for _, p in good]))
        if not rows:
            raise UserError("images: none of them can be read")
        return torch.cat(rows), ids

    table, ids = shared_embeddings(home, "images", embedder, images.fingerprint, embed_all, info)
    by_id = {item.id: item for item in images.items}
    readable = [by_id[i] for i in ids]
    store = prepare(out, cfg, info, "query_id", "search.jsonl")
    done = store.done()
    writer = store.writer(part_name(info))
    mine = [
        q for i, q in enumerate(queries) if i % info.work_slice[1] == info.work_slice[0] and q.id not in done
    ]
    bar, started = progress(len(mine), "search", "query"), time.perf_counter()

    made = [0]

    def where() -> str:
        return f"{made[0]} of {len(mine)} queries searched"

    for chunk in watchdog.batches(chunks(iter(mine), cfg.batch_size), where):
        scores = embed_texts(embedder, [q.text for q in chunk], cfg.batch_size) @ table.t()
        found = []
        for query, row in zip(chunk, scores):
            top = ranked(row, cfg.top_k)
            found.append(
                {
                    "query_id": query.id,
                    "query": query.text,
                    "of_image": query.image,
                    "top": [
                        {
                            "image": readable[j].id,
                            "source": readable[j].source,
                            "score": round(float(row[j]), 5),
                        }
                        for j in top
                    ],
                }
            )
        writer.append(found)
        bar.update(len(chunk))
        made[0] += len(chunk)
    bar.close()
    rate = Rate(len(mine), time.perf_counter() - started)
    return finish(rate, store, cfg, info, [q.id for q in queries], "query_id", search_summary, watchdog)


# --------------------------------------------------------------------------- pieces


def image_set(cfg: RetrievalConfig) -> ImageSet:
    return manifest_images(cfg.manifest, cfg.split) if cfg.manifest else image_files(list(cfg.images))


def _home(bank: Path) -> Path:
    return bank if bank.is_dir() else bank.parent


def shared_embeddings(
    home: Path, what: str, embedder: Embedder, fingerprint: str, compute: Any, info: DistInfo
) -> tuple[torch.Tensor, list[str]]:
    """Computed once (by rank 0), cached in home/.retrieval-cache under the model's and the data's
    content hashes; the other ranks read the cache."""
    key = hashlib.sha256(
        f"{embedder.fingerprint}\0{fingerprint}\0{embedder.collate.max_length}".encode()
    ).hexdigest()[:16]
    path = home / ".retrieval-cache" / f"{what}-{key}.safetensors"
    result = cached(path, compute) if info.is_main else None
    barrier()
    return result if result is not None else cached(path, compute)


def embed_texts(embedder: Embedder, texts: list[str], batch: int) -> torch.Tensor:
    return torch.cat([embedder.texts(texts[i : i + batch]) for i in range(0, len(texts), batch)])


def ranked(row: torch.Tensor, k: int) -> list[int]:
    """The k best, ties in input order (the trainer's evaluation breaks them the same way)."""
    return row.argsort(descending=True, stable=True)[:k].tolist()


def chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def skipped(item: ImageItem) -> dict[str, Any]:
    return {"image": item.id, "source": item.source, "skipped": "cannot be read or decoded", "top": []}


def prepare(out: Path, cfg: RetrievalConfig, info: DistInfo, key: str, manifest: str) -> Records:
    """The output folder (its config written once) and its records, keyed by `key`."""
    if info.is_main:
        (out / "parts").mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    barrier()
    return Records(out, manifest, key=lambda r: r[key])


def part_name(info: DistInfo) -> str:
    return f"a{info.array_index:04d}-r{info.rank:04d}"


@dataclass(frozen=True)
class Rate:
    """This process's items of this run, and the seconds it spent on them (the bank's embedding aside)."""

    items: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


def finish(
    rate: Rate,
    store: Records,
    cfg: RetrievalConfig,
    info: DistInfo,
    order: list[str],
    key: str,
    summarise: Any,
    watchdog: Watchdog,
) -> int:
    watchdog.arm("wait for the other ranks")  # they have a batch or so left: the step's limit
    barrier()
    watchdog.arm("merge", long=True)
    if not info.is_main:
        return 0
    out = store.root
    merged = store.merge(order)
    summary = {
        "records": len(merged),
        "requested": len(order),
        **summarise(merged),
        f"{'images' if key == 'image' else 'queries'}_per_s": round(rate.per_s, 3),  # rank 0's, this run
        "config": to_dict(cfg),
    }
    atomic_write_json(out / "summary.json", summary)
    sheets(out, cfg, merged, key)
    for record in merged[: cfg.show]:
        print(describe(record, key))
    shown = {k: v for k, v in summary.items() if k not in ("config", "skipped")}
    print(f"{store.manifest}: {json.dumps(shown)}")
    return 0


def describe(record: dict[str, Any], key: str) -> str:
    if not record["top"]:
        return f"{record[key]}: {record.get('skipped', 'no result')}"
    best = record["top"][0]
    if key == "image":
        own = f"   (its own: {record['own_caption']!r})" if record.get("own_caption") else ""
        return f"{record['image']}: {best['caption']!r} ({best['score']:.3f}){own}"
    return f"{record['query']!r}: {best['image']} ({best['score']:.3f})"


def caption_summary(records: list[dict[str, Any]], images: ImageSet, bank: list[Text]) -> dict[str, Any]:
    skipped_items = [r["image"] for r in records if "skipped" in r]
    out: dict[str, Any] = {"skipped": skipped_items, "skipped_count": len(skipped_items)}
    owned = {t.image for t in bank if t.image}
    judged = [r for r in records if r["image"] in owned and "skipped" not in r]
    if judged:  # the bank says which captions belong to which image: hit rates at 1 and k
        out["top1_hit_rate"] = sum(r["top"][0]["of_image"] == r["image"] for r in judged) / len(judged)
        out["topk_hit_rate"] = sum(any(t["of_image"] == r["image"] for t in r["top"]) for r in judged) / len(
            judged
        )
        out["judged"] = len(judged)
    return out


def search_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    judged = [r for r in records if r["of_image"]]
    if not judged:
        return {}
    return {
        "top1_hit_rate": sum(r["top"][0]["image"] == r["of_image"] for r in judged if r["top"]) / len(judged),
        "topk_hit_rate": sum(any(t["image"] == r["of_image"] for t in r["top"]) for r in judged)
        / len(judged),
        "judged": len(judged),
    }


def sheets(out: Path, cfg: RetrievalConfig, records: list[dict[str, Any]], key: str) -> None:
    """Contact sheets: captioned images in groups of 16 (with the top caption), or a query's top images."""
    if not cfg.contact_sheets or not records:
        return
    folder = out / "sheets"
    if key == "image":
        groups = [records[i : i + 16] for i in range(0, len(records), 16)][: cfg.contact_sheets]
        for n, group in enumerate(groups):
            cells = [
                (_picture(r["source"], cfg), r["top"][0]["caption"] if r["top"] else r.get("skipped", ""))
                for r in group
            ]
            contact_sheet(folder / f"captions-{n:04d}.png", cells, cols=min(4, len(cells)))
    else:
        for r in records[: cfg.contact_sheets]:
            cells = [(_picture(t["source"], cfg), f"{t['score']:.3f}") for t in r["top"]]
            contact_sheet(
                folder / f"{safe_name(r['query_id'])}.png", cells, cols=min(4, len(cells)), title=r["query"]
            )


def _picture(source: str, cfg: RetrievalConfig) -> Image.Image | None:
    return picture_of(source, Path(cfg.manifest) if cfg.manifest else None, cfg.split)
