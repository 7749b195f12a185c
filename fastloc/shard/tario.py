"""Deterministic WebDataset tars and their DALI index files.

Tars are plain POSIX ustar with fixed metadata (mtime 0, uid/gid 0, mode 0644), so the same
samples always give the same bytes and the same SHA-256. The index is the ``wds2idx`` format
that ``fn.readers.webdataset(index_paths=...)`` reads::

    v1.2 <num_samples>
    <ext> <data_offset> <size> <member_name> [<ext> <data_offset> <size> <member_name> ...]

one line per sample, one group of four fields per member, offsets of the member's data (not
its header) from the start of the tar.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

INDEX_VERSION = "v1.2"
_BLOCK = tarfile.BLOCKSIZE  # 512


class _HashingFile:
    """A write-only file that hashes what passes through and knows its position."""

    def __init__(self, raw):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.pos = 0

    def write(self, data) -> int:
        self.raw.write(data)
        self.sha256.update(data)
        self.pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self.pos


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes samples (lists of (extension, bytes)) to a tar, tracking the DALI index."""

    def __init__(self, path: Path):
        self._raw = open(path, "wb")
        self._file = _HashingFile(self._raw)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self.index_lines: list[str] = []

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        fields = []
        for ext, data in members:
            name = f"{key}.{ext}"
            header_at = self._file.pos
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            # GNU format writes extra header blocks for names over 100 bytes: the data sits
            # right before its padded end, which is where the file position is now.
            data_at = self._file.pos - _padded(len(data))
            assert data_at >= header_at + _BLOCK
            fields.append(f"{ext} {data_at} {len(data)} {name}")
        self.index_lines.append(" ".join(fields))

    def close(self) -> tuple[int, str]:
        """Finish the tar, flush it to disk; returns (bytes, sha256 hex)."""
        self._tar.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        return self._file.pos, self._file.sha256.hexdigest()

    def abort(self) -> None:
        self._raw.close()

    def index_text(self) -> str:
        return index_text(self.index_lines)


def _padded(size: int) -> int:
    return (size + _BLOCK - 1) // _BLOCK * _BLOCK


def index_text(lines: list[str]) -> str:
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def iter_samples(path: Path) -> Iterator[tuple[str, list[tuple[str, int, bytes]]]]:
    """(key, [(ext, data_offset, bytes), ...]) for each sample of a tar, in order."""
    with tarfile.open(path, mode="r:") as tar:
        key, members = None, []
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_name(member.name)
            if k != key and members:
                yield key, members
                members = []
            key = k
            data = tar.extractfile(member).read()
            members.append((ext, member.offset_data, data))
        if members:
            yield key, members


def build_index(samples: Iterable[tuple[str, list[tuple[str, int, bytes]]]]) -> str:
    """The index text of a tar from its samples (as ``iter_samples`` yields them)."""
    lines = [
        " ".join(f"{ext} {offset} {len(data)} {key}.{ext}" for ext, offset, data in members)
        for key, members in samples
    ]
    return index_text(lines)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a hidden temporary file, fsync, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
