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
import os
import queue
import tarfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

INDEX_VERSION = "v1.2"
_BLOCK = tarfile.BLOCKSIZE  # 512


def with_path(error: OSError, path: Path | str) -> OSError:
    """The same error naming ``path`` (a failed write on an open file names no file)."""
    if error.filename is None:
        return OSError(error.errno, error.strerror or str(error), str(path))
    return error


class _HashingFile:
    """A write-only file that knows its position and hashes what passes through.

    SHA-256 runs in a helper thread (hashlib releases the GIL on large buffers), so hashing
    overlaps with reading and writing instead of adding to them.
    """

    def __init__(self, raw):
        self.raw = raw
        self.pos = 0
        self._sha256 = hashlib.sha256()
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._hash, daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            self._sha256.update(chunk)

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self._chunks.put(data)
        self.pos += len(data)
        return len(data)

    def hexdigest(self) -> str:
        self._chunks.put(None)
        self._thread.join()
        return self._sha256.hexdigest()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def member_header(name: str, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file with fixed metadata.

    Built by hand because ``tarfile``'s general header code costs more than the copy of a
    whole JPEG. Names over 100 bytes fall back to ``tarfile``'s GNU long-name headers.
    """
    encoded = name.encode()
    if len(encoded) > 100 or size >= 8**11:
        return _tarinfo(name, size).tobuf(tarfile.GNU_FORMAT)
    header = bytearray(_BLOCK)
    header[: len(encoded)] = encoded
    header[100:124] = b"0000644\x000000000\x000000000\x00"  # mode, uid, gid
    header[124:136] = b"%011o\x00" % size
    header[136:148] = b"00000000000\x00"  # mtime 0
    header[148:156] = b" " * 8  # checksum field counts as spaces while summing
    header[156:157] = tarfile.REGTYPE
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


class ShardWriter:
    """Writes samples (lists of (extension, bytes)) to a tar, tracking the DALI index."""

    def __init__(self, path: Path, fsync: bool = True):
        self.path = path
        self._fsync = fsync
        self._raw = open(path, "wb")  # noqa: SIM115 -- held open across write() calls, closed by close()
        self._file = _HashingFile(self._raw)
        self.index_lines: list[str] = []

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        fields, chunks = [], []
        pos = self._file.pos
        for ext, data in members:
            name = f"{key}.{ext}"
            header = member_header(name, len(data))
            pos += len(header)
            fields.append(f"{ext} {pos} {len(data)} {name}")
            padding = -len(data) % _BLOCK
            chunks += (header, data, bytes(padding))
            pos += len(data) + padding
        try:
            self._file.write(b"".join(chunks))
        except OSError as e:  # e.g. ENOSPC: name the file, which a write error does not
            raise with_path(e, self.path) from None
        self.index_lines.append(" ".join(fields))

    def close(self) -> tuple[int, str]:
        """End the archive (two zero blocks), flush it to disk; returns (bytes, sha256 hex)."""
        try:
            self._file.write(bytes(2 * _BLOCK))
            self._raw.flush()
            if self._fsync:
                os.fsync(self._raw.fileno())
            self._raw.close()
        except OSError as e:
            raise with_path(e, self.path) from None
        return self._file.pos, self._file.hexdigest()

    def abort(self) -> None:
        """Stop without finishing the tar; never raises (the caller deletes the file)."""
        self._file.hexdigest()  # stop the hashing thread
        try:
            self._raw.close()
        except OSError:  # flushing the buffer failed again (a full disk): the file is discarded anyway
            pass

    def index_text(self) -> str:
        return index_text(self.index_lines)


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
        " ".join(f"{ext} {offset} {len(data)} {key}.{ext}" for ext, offset, data in members) for key, members in samples
    ]
    return index_text(lines)


def atomic_write(path: Path, data: bytes | str, fsync: bool = True) -> None:
    """Write to a hidden temporary file, fsync, then rename: readers never see half a file.

    A failure (a full disk, a read-only folder) raises OSError naming the file and leaves no
    temporary file behind.
    """
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise with_path(e, tmp) from None
