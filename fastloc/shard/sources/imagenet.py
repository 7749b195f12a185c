"""ImageNet-style classification sets: one folder or one tar per class.

Class folders (ImageNet-1k, ImageNet-21K-P ``imagenet21k_{train,val}/``)::

    SRC/<wnid>/*.JPEG          any image suffix (jpeg, jpg, png, webp, ...), case-insensitive

One tar per class (the ImageNet-21k winter21 release, unpacked once)::

    SRC/<wnid>.tar             uncompressed; the images are its members

Tar members are listed once in ``items()`` and then read directly at their data offset, so no tar
is unpacked. The class index is the position in ``--class-list`` when given, else in the sorted
wnids found on disk. ``--class-list imagenet100`` names a list shipped with fastloc (imagenet100.txt
beside this module: CMC's ImageNet-100, the set Leopart trains on) and selects: classes it does not
name are skipped and reported, so one command turns ImageNet-1k into ImageNet-100 shards. A user's
list selects the same way only with ``--only-listed``; without it every class on disk must be listed.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Literal

from fastloc.cli import flowing_help
from fastloc.shard.config import ConvertConfig
from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.sources.base import Item, Sample, SourceInfo, sanitize_key
from fastloc.shard.sources.files import check_unique_keys, file_size, read_bytes, scan_folder

# Images the writer can decode (and re-encode when they are not JPEG).
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CLS_ENCODING = "ASCII decimal class index into classes"
# --class-list names -> files shipped in this package (pyproject.toml's package-data). A built-in
# list names a subset of the classes on disk and selects it; the output folder takes its name.
BUILTIN_CLASS_LISTS = {"imagenet100": "imagenet100.txt"}


@flowing_help
@dataclass(frozen=True, kw_only=True)
class ImagenetConfig(ConvertConfig):
    """Convert an ImageNet-style classification set (ImageNet-1k, ImageNet-21K-P, the ImageNet-21k
    winter21 release): one folder or one uncompressed tar per class, named by its WordNet id.
    Samples carry the image and its class index (`cls`)."""

    src: Path
    """Folder holding the classes: SRC/<wnid>/ image folders, or SRC/<wnid>.tar files."""

    split: str = "train"
    """Split name of the output (train, val, ...); it only names the output folder."""

    class_list: Path | None = None
    """Text file fixing the class order: one wnid per line, optionally followed by whitespace and
    a human-readable name; the class index is the entry's position (0-based, blank lines and lines
    starting with # ignored). Every class found on disk must be listed (unless --only-listed);
    listed classes may have no images. Or a built-in list, used when no file of that name exists:
    imagenet100 (CMC's ImageNet-100, as Leopart trains on it), which selects its 100 classes from
    an ImageNet-1k folder, skips the others, and names the output folder imagenet100 (unless
    --name). Default: the sorted wnids found on disk."""

    only_listed: bool = False
    """Convert only the classes --class-list names; classes found on disk that it does not name are
    skipped and reported (the final report, the manifest's source.skipped_classes), not an error.
    Built-in lists always select this way."""

    layout: Literal["auto", "folders", "tars"] = "auto"
    """folders: SRC/<wnid>/*.JPEG; tars: SRC/<wnid>.tar; auto: whichever of the two SRC holds."""

    def source(self) -> ImagenetSource:
        return ImagenetSource(
            src=self.src,
            split=self.split,
            class_list=self.class_list,
            layout=self.layout,
            only_listed=self.only_listed,
        )

    def validate(self) -> None:
        super().validate()
        if self.only_listed and self.class_list is None:
            raise ConversionError("--only-listed needs --class-list (the classes to convert)")


def resolve_class_list(class_list: Path | str) -> tuple[Path, str | None]:
    """The file a --class-list value names and, for a built-in list, its name (else None).

    A file of that name wins over a built-in list, so a user's own imagenet100 file is read as
    theirs (with the user's-list rule)."""
    path = Path(class_list)
    name = str(class_list)
    if path.exists() or name not in BUILTIN_CLASS_LISTS:
        return path, None
    return Path(str(resources.files(__package__).joinpath(BUILTIN_CLASS_LISTS[name]))), name


def read_class_list(path: Path) -> tuple[list[str], list[str | None]]:
    """wnids and names (None where a line gives no name) of a class-list file, in file order."""
    if not path.is_file():
        raise ConversionError(f"{path}: class list not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: cannot read the class list: {e}") from None
    wnids: list[str] = []
    names: list[str | None] = []
    first_line: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.strip().split(maxsplit=1)
        if not fields or fields[0].startswith("#"):  # blank or a comment (no wnid starts with #)
            continue
        wnid = fields[0]
        if wnid in first_line:
            first = first_line[wnid]
            raise ConversionError(f"{path}:{line_no}: duplicate class {wnid!r} (first on line {first})")
        first_line[wnid] = line_no
        wnids.append(wnid)
        names.append(fields[1].strip() if len(fields) > 1 else None)
    if not wnids:
        raise ConversionError(f"{path}: the class list is empty")
    return wnids, names


def detect_layout(src: Path) -> Literal["folders", "tars"]:
    """folders when SRC holds class folders, tars when it holds *.tar files; both or neither is an error."""
    dirs, tars = _class_dirs(src), _class_tars(src)
    if dirs and tars:
        raise ConversionError(
            f"{src}: holds both class folders ({len(dirs)}) and .tar files ({len(tars)}); "
            "pass --layout folders or --layout tars"
        )
    if not dirs and not tars:
        raise ConversionError(f"{src}: no class folders (<wnid>/) and no class tars (<wnid>.tar) found")
    return "folders" if dirs else "tars"


class ImagenetSource:
    """Reads images and class indices from class folders or per-class tars; see the module docstring."""

    def __init__(
        self,
        src: Path,
        split: str = "train",
        class_list: Path | str | None = None,
        layout: Literal["auto", "folders", "tars"] = "auto",
        only_listed: bool = False,
    ):
        self.src = Path(src)
        if not self.src.is_dir():
            raise ConversionError(f"{self.src}: ImageNet source folder not found")
        if layout not in ("auto", "folders", "tars"):
            raise ConversionError(f"unknown ImageNet layout {layout!r}")
        self.split = split
        self.class_list, self.builtin = (None, None) if class_list is None else resolve_class_list(class_list)
        self.only_listed = only_listed or self.builtin is not None  # a built-in list always selects
        if self.only_listed and self.class_list is None:
            raise ConversionError("only_listed needs a class list (the classes to convert)")
        self.layout = detect_layout(self.src) if layout == "auto" else layout
        self._classes: tuple[list[str], list[str | None]] | None = None
        self._items: list[Item] | None = None
        self._incomplete_tars: dict[str, str] = {}  # tar -> why its listing stopped early
        self._unlisted: dict[str, str] = {}  # bad links and unreadable folders -> why
        self._selection: dict[str, object] = {}  # with only_listed: the list, the classes skipped and missing

    # ---- the Source protocol ----

    def info(self) -> SourceInfo:
        wnids, names = self._class_table()
        self.items()  # lists every tar once, so that tars whose listing stopped early are recorded
        extra = {"layout": self.layout, "cls": CLS_ENCODING, "wnids": wnids, "names": names, **self._selection}
        inputs = [self.src] + ([self.class_list] if self.class_list is not None else [])
        return SourceInfo(
            dataset=self.builtin or "imagenet",
            split=self.split,
            source=os.path.abspath(self.src),
            classes=list(wnids),
            has_cls=True,
            label_encoding={},
            extra=extra,
            unreachable=sorted({**self._incomplete_tars, **self._unlisted, **self._skipped_note()}.items()),
            inputs=tuple(os.path.abspath(p) for p in inputs),
        )

    def items(self) -> list[Item]:
        if self._items is None:
            wnids, _ = self._class_table()
            items: list[Item] = []
            for cls, wnid in enumerate(wnids):
                if self.layout == "folders":
                    items += self._folder_items(wnid, cls)
                else:
                    items += self._tar_items(wnid, cls)
            check_unique_keys(items, lambda item: _source_name(item.ref))
            self._items = items
        return self._items

    def load(self, item: Item) -> Sample:
        if len(item.ref) == 3:  # (path, wnid, cls): a file in a class folder
            path, wnid, cls = item.ref
            data = read_bytes(path)
        else:  # (tar, member, offset, size, wnid, cls): a member of a class tar
            tar, member, offset, size, wnid, cls = item.ref
            data = _read_member(tar, member, offset, size)
        return Sample(key=item.key, source=_source_name(item.ref), jpg=data, cls=cls, meta={"wnid": wnid})

    # ---- class table ----

    def _class_table(self) -> tuple[list[str], list[str | None]]:
        if self._classes is None:
            for entry in _root_entries(self.src):
                if entry.kind == "bad":  # a broken or looping link: neither a class folder nor a tar
                    self._unlisted[entry.path] = f"not a class folder or tar: {entry.problem}"
            found = _class_dirs(self.src) if self.layout == "folders" else _class_tars(self.src)
            if not found:
                kind = "class folders (<wnid>/)" if self.layout == "folders" else "class tars (<wnid>.tar)"
                raise ConversionError(f"{self.src}: no {kind} found")
            if self.class_list is None:
                wnids = sorted(found)
                names: list[str | None] = [None] * len(wnids)
            else:
                wnids, names = read_class_list(self.class_list)
                unlisted = sorted(set(found) - set(wnids))
                if self.only_listed:
                    self._select(found, wnids, unlisted)
                elif unlisted:
                    raise ConversionError(
                        f"{len(unlisted)} classes found in {self.src} are not in the class list "
                        f"{self.class_list}: {_shown(unlisted)} (--only-listed converts only the listed ones)"
                    )
            self._classes = (wnids, names)
        return self._classes

    def _select(self, found: list[str], wnids: list[str], unlisted: list[str]) -> None:
        """Record what an only_listed conversion skips and misses; no listed class on disk is an error."""
        if len(unlisted) == len(found):
            raise ConversionError(
                f"none of the {len(found)} classes found in {self.src} is in the class list "
                f"{self.builtin or self.class_list}: {_shown(unlisted)}"
            )
        on_disk = set(found)
        self._selection = {
            "class_list": self.builtin or os.path.abspath(self.class_list),
            "skipped_classes": unlisted,  # on disk, not listed: not converted
            "missing_classes": [w for w in wnids if w not in on_disk],  # listed, nothing on disk
        }

    def _skipped_note(self) -> dict[str, str]:
        """One report line for the classes an only_listed conversion skips (the converter prints
        ``unreachable`` entries in its summary; the full list is in the manifest's source)."""
        skipped = self._selection.get("skipped_classes")
        if not skipped:
            return {}
        why = (
            f"{len(skipped)} classes not in the class list {self._selection['class_list']} skipped "
            f"(not converted; all in the manifest's source.skipped_classes): {_shown(skipped)}"
        )
        return {str(self.src): why}

    # ---- listing ----

    def _folder_items(self, wnid: str, cls: int) -> list[Item]:
        folder = self.src / wnid
        if not folder.is_dir():
            return []  # a listed class without images
        try:
            entries = scan_folder(folder)
        except OSError as e:
            self._unlisted[str(folder)] = f"cannot list the class folder: {e.strerror or e}"
            return []
        # a broken or looping link stays in the plan (size 0) so that load() reports it
        files = [(e.name, e.path, file_size(e.path)) for e in entries if _is_image_name(e.name) and e.kind != "dir"]
        return [Item(key=_key(wnid, name), size=size, ref=(path, wnid, cls)) for name, path, size in files]

    def _tar_items(self, wnid: str, cls: int) -> list[Item]:
        tar = self.src / f"{wnid}.tar"
        if not tar.is_file():
            return []  # a listed class without images
        tar_path = str(tar)
        members = []
        try:
            with tarfile.open(tar_path, mode="r:") as tf:  # uncompressed only: members are read at offsets
                try:
                    for m in tf:
                        if m.isfile() and not m.issparse() and _is_image_name(m.name):
                            members.append((m.name, m.offset_data, m.size))
                except (tarfile.TarError, OSError, EOFError) as e:
                    # A truncated or damaged tail: keep the members listed so far. One cut short
                    # fails in load() with its own name; the rest of the tar is unreachable.
                    self._incomplete_tars[tar_path] = f"listing stopped after {len(members)} members: {e}"
                else:
                    # tarfile ends quietly at a header cut short: a complete tar has an
                    # end-of-archive block where the listing stopped
                    if os.path.getsize(tar_path) < tf.offset + tarfile.BLOCKSIZE:
                        self._incomplete_tars[tar_path] = (
                            f"no end-of-archive block after {len(members)} members: the tar may be truncated"
                        )
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ConversionError(f"{tar}: cannot read as an uncompressed tar: {e}") from None
        members.sort()
        return [
            Item(
                key=_key(wnid, PurePosixPath(name).name),
                size=size,
                ref=(tar_path, name, offset, size, wnid, cls),
            )
            for name, offset, size in members
        ]


def _root_entries(src: Path):
    """The visible entries of the source folder, classified (links that loop are 'bad', not errors)."""
    try:
        return [e for e in scan_folder(src) if not e.name.startswith(".")]
    except OSError as e:
        raise ConversionError(f"{src}: cannot list the source folder: {e.strerror or e}") from None


def _class_dirs(src: Path) -> list[str]:
    return [e.name for e in _root_entries(src) if e.kind == "dir"]


def _class_tars(src: Path) -> list[str]:
    return [e.name[: -len(".tar")] for e in _root_entries(src) if e.kind == "file" and e.name.endswith(".tar")]


def _shown(wnids: list[str], count: int = 5) -> str:
    """The first ``count`` wnids, then ', ...' when there are more."""
    return ", ".join(wnids[:count]) + (", ..." if len(wnids) > count else "")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _key(wnid: str, filename: str) -> str:
    """The file stem, prefixed with the wnid unless it already starts with it (n01440764_10026)."""
    stem = os.path.splitext(filename)[0]
    if stem != wnid and not stem.startswith(f"{wnid}_"):
        stem = f"{wnid}_{stem}"
    return sanitize_key(stem)


def _source_name(ref: tuple) -> str:
    return ref[0] if len(ref) == 3 else f"{ref[0]}::{ref[1]}"


def _read_member(tar: str, member: str, offset: int, size: int) -> bytes:
    where = f"{tar}::{member}"
    try:
        with open(tar, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as e:
        raise SampleError(where, f"cannot read: {e.strerror or e}") from None
    if len(data) < size:
        raise SampleError(where, f"truncated tar: member has {size} bytes, only {len(data)} present")
    if not data:
        raise SampleError(where, "empty file (0 bytes)")
    return data
