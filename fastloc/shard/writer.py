"""Write one shard: read its samples, encode them, and publish tar + index atomically.

Order of publication, so that an interruption at any point leaves nothing half-visible:
tar to a hidden ``.NAME.tar.partial`` (fsynced), index file (atomic), the shard's record in the
work folder (atomic), and last the rename of the tar to its final name. A shard counts as done
on resume only when both its tar and its record exist.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastloc.shard.config import ConvertConfig
from fastloc.shard.encode import encode_label, prepare_image
from fastloc.shard.errors import SampleError
from fastloc.shard.manifest import index_name
from fastloc.shard.plan import ShardPlan
from fastloc.shard.sources.base import Sample, Source, SourceInfo
from fastloc.shard.tario import ShardWriter, atomic_write

WORK_DIR = ".fastloc-work"


@dataclass
class ShardRecord:
    """What one finished shard holds: the manifest and the report are built from these."""

    name: str
    index: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    reencoded: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @classmethod
    def load(cls, path: Path) -> ShardRecord:
        data = json.loads(path.read_text())
        data["reencoded"] = [tuple(x) for x in data["reencoded"]]
        data["skipped"] = [tuple(x) for x in data["skipped"]]
        return cls(**data)


class StrictStop(SampleError):
    """A bad sample under --strict: ends the whole conversion."""


def record_path(split_dir: Path, name: str) -> Path:
    return split_dir / WORK_DIR / f"{name}.json"


def partial_path(split_dir: Path, name: str) -> Path:
    return split_dir / f".{name}.partial"


def encode_sample(sample: Sample, info: SourceInfo, cfg: ConvertConfig) -> tuple[list[tuple[str, bytes]], str | None]:
    """The tar members of one sample, in fixed order: jpg, seg.png, cls, txt, json."""
    image = prepare_image(
        sample.source,
        sample.jpg,
        sample.pixels,
        check=cfg.check,
        keep_progressive=cfg.keep_progressive,
        quality=cfg.reencode_quality,
        max_pixels=cfg.max_pixels,
    )
    members = [("jpg", image.data)]
    if info.has_label:
        if sample.label is None:
            raise SampleError(sample.source, "no label map")
        size = (image.width, image.height)
        where = sample.label_source or sample.source
        members.append(
            ("seg.png", encode_label(where, sample.label, info.num_classes, size, info.label_encoding.get("ignore")))
        )
    if info.has_cls:
        if sample.cls is None or not 0 <= sample.cls < info.num_classes:
            raise SampleError(sample.source, f"class index {sample.cls} outside [0, {info.num_classes})")
        members.append(("cls", str(int(sample.cls)).encode()))
    if info.has_txt:
        members.append(("txt", (sample.txt or "").encode("utf-8")))
    meta = {
        **sample.meta,
        "key": sample.key,
        "source": sample.source,
        "width": image.width,
        "height": image.height,
        "reencoded": image.reencoded,
        "crc32": {ext: zlib.crc32(data) for ext, data in members},
    }
    members.append(("json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")))
    return members, image.reencoded


def write_shard(
    plan: ShardPlan,
    source: Source,
    info: SourceInfo,
    cfg: ConvertConfig,
    split_dir: Path,
    tick: Callable[[int], None],
) -> ShardRecord:
    """Convert the samples of one shard; returns its record once the tar is published."""
    record = ShardRecord(plan.name, index_name(plan.name))
    partial = partial_path(split_dir, plan.name)
    writer = ShardWriter(partial, fsync=cfg.fsync)
    try:
        for item in plan.items:
            try:
                sample = source.load(item)
                members, reencoded = encode_sample(sample, info, cfg)
            except SampleError as error:
                if cfg.strict:
                    raise StrictStop(error.path, error.reason) from None
                record.skipped.append((error.path, error.reason))
                tick(1)
                continue
            writer.write(item.key, members)
            record.samples += 1
            if reencoded:
                record.reencoded.append((sample.source, reencoded))
            tick(1)
        record.bytes, record.sha256 = writer.close()
    except BaseException:
        writer.abort()
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass  # the error being raised says more
        raise
    if record.samples == 0:  # every sample was bad: publish nothing but the record
        partial.unlink()
    else:
        atomic_write(split_dir / record.index, writer.index_text(), cfg.fsync)
    atomic_write(record_path(split_dir, plan.name), json.dumps(asdict(record)), cfg.fsync)
    if record.samples:
        os.replace(partial, split_dir / plan.name)
    return record


class Ticker:
    """Batches per-sample progress ticks so workers message the parent a few times a second."""

    def __init__(self, send: Callable[[int], None], every: float = 0.2):
        self.send, self.every, self.count, self.last = send, every, 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.flush()
            self.last = now

    def flush(self) -> None:
        if self.count:
            self.send(self.count)
            self.count = 0
