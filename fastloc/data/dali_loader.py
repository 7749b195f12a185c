"""The DALI loader: ``fn.readers.webdataset`` over the shards; decoding and both recipes on the GPU.

One pipeline definition, two placements (``DaliLoader(cfg, device=...)``):

- ``device="gpu"``: JPEGs decode with ``fn.decoders.image(device="mixed")`` (nvJPEG; the
  hardware engines take part of the load; ``decoders.image_slice`` decodes only the window for
  RandomResizedCrop); resize, reflect pad, flip and normalization run on the GPU and batches come
  out as CUDA tensors. On the CPU stay the reader, the per-sample parameters (random draws,
  sizes, ROIs), the label PNG decode and the label gather (below), moved to the GPU at the end.
- ``device="cpu"``: the same graph with CPU operators (DALI's CPU-only mode, ``device_id=None``):
  how the tests run it.

**Reading order** (one pipeline per epoch, so the order depends only on seed, epoch, rank and
world size; ``epoch_tar_order``, ``rank_range``):

1. Tars: with ``shuffle`` permuted by ``numpy.random.default_rng([seed, epoch])`` (the same on
   every rank); without, manifest order.
2. Ranks: DALI's ``shard_id=rank, num_shards=world_size`` gives rank ``r`` the contiguous
   samples ``[floor(r N / k), floor((r + 1) N / k))`` of that concatenated list: every sample
   of an epoch belongs to exactly one rank, and a rank's share changes with the tar order.
3. Within a rank: read in tar order into a buffer of ``SHUFFLE_BUFFER`` samples and drawn from
   it at random (``random_shuffle``, seeded by (seed, epoch, rank)); the converter shuffled the
   samples globally, so a local buffer is enough. Without ``shuffle``: tar order.
4. Remainder, as in the torch twin (``order.py``): every rank yields ``n = N // world_size``
   samples, so all ranks run the same number of batches; a rank whose range holds ``n + 1``
   drops the last sample it reads (with shuffling, another one every epoch). ``drop_last``
   drops each rank's last ``n mod batch_size`` too; otherwise the last batch is short. Each
   sample is seen at most once per epoch, and exactly once when nothing is dropped. The reader
   pads the end of a rank's share (``pad_last_batch``): no batch reaches into the next epoch.

The torch twin reads a global permutation by index, which DALI's streaming reader cannot, so
the two loaders share the counts, the ``Batch`` contract and the per-sample transforms, not
the order.

**Recipes.** Geometry is computed once per sample as DALI data nodes (float64) and applied to
the image and the label map alike:

- ``eval`` (Patch-Seg): largest centre square (floor offsets) as the ``fn.resize`` ROI, S x S,
  bilinear with antialias.
- ``train``, ``kind="rkrc"`` (MaskEmbed: timm ``ResizeKeepRatio`` + ``CenterCropOrPad``):
  ``rkrc_geometry`` (sizes and crop offsets rounded half to even as Python does); ``fn.resize``
  computes only the kept window (its ROI: the same pixels as resizing everything and cropping,
  within one grey level); short sides are reflect-padded (edge not repeated, torchvision's
  ``reflect``) with ``fn.slice`` + ``fn.flip`` + ``fn.cat``; the interpolation is drawn per
  sample (``interp_type`` as a per-sample argument); horizontal flip by a coin
  (``crop_mirror_normalize(mirror=...)``).
- ``train``, ``kind="rrc"``: ``fn.random_crop_generator`` (torchvision's algorithm) draws the
  window, the image decodes only that window and is resized to S x S.

Label maps are never interpolated: ``fn.python_function`` gathers them with PIL's NEAREST
tables (the twin's ``transforms.pil_nearest_indices``), so they equal PIL's and the twin's
exactly. DALI's own ``INTERP_NN`` samples ``floor((i + 0.5) in / out)``; PIL accumulates that
coordinate in float64 and lands one pixel lower at some exact ties (e.g. 36 -> 33), and through
a float32 ROI DALI itself can land either side of a tie, so no ``fn.resize`` setting reproduces
PIL. The gather touches only the S x S output pixels, on the CPU where the PNG was decoded.

Images leave through ``fn.crop_mirror_normalize``: (x - 255 mean) / (255 std), CHW float32, or
CHW uint8 when ``cfg.normalize`` is False.

**Resumption.** ``state_dict()`` holds the epoch and position (plain ints, the twin's format and
fingerprint) plus, mid-epoch, this rank's DALI pipeline checkpoint (``enable_checkpointing``:
reader position, shuffle buffer and random operator states) as the ASCII string
``dali_rank{r}``. The ranks' dicts merge into one (``dict.update``; the shared keys agree). A
restore without this rank's checkpoint rebuilds the epoch and runs ``position`` batches
(correct, but it decodes them).

**Corrupt samples.** A decode error aborts a DALI pipeline. The loader then reads the failing
batch's keys (a reader-only pipeline with the same arguments, ``build_keys_pipeline``), runs the
recipe on each of those samples alone to find the culprit(s), writes a patched copy of that
shard's index in which their members point at another sample of the same tar (the name kept,
so the order is unchanged), rebuilds the pipeline from its last checkpoint (at most
``CHECKPOINT_EVERY`` batches back) and leaves them out of their batch, which comes out shorter.
Each is counted in ``skipped`` every time it is met and warned about once
(``SkippedSampleWarning``, naming shard and key). A label map of the wrong size or type, or a
``cls`` that is not a class index, is left out the same way without a rebuild. A missing or
truncated shard or index is a ``ShardError`` when the loader is built (``order.open_shards``).
"""

from __future__ import annotations

import base64
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fastloc.data.batch import Batch
from fastloc.data.config import LoaderConfig
from fastloc.data.dali_pipeline import (
    ReaderArgs,
    Spec,
    build_keys_pipeline,
    build_pipeline,
    build_probe_pipeline,
    check_reflect_pad,
    combine_seed,
    epoch_tar_order,
)  # fmt: skip
from fastloc.data.order import (
    EpochLoader,
    EpochPlan,
    LoaderState,
    ShardSet,
    open_shards,
    shard_index,
    warn_skipped,
)  # fmt: skip
from fastloc.shard.tario import split_name


CHECKPOINT_EVERY = 16  # batches between the pipeline checkpoints a corrupt-sample recovery restarts from


# ---------------------------------------------------------------- host side


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A uniform-shape DALI TensorList as a new torch tensor on ``device`` (a copy: DALI reuses its buffers)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tl.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out


def _text(tl, i: int) -> str:
    return bytes(np.asarray(tl.at(i))).decode("utf-8", "replace")


def parse_source_info(info: str) -> tuple[str, str]:
    """'dir/x.tar:offset:key.ext' -> (tar file name, sample key)."""
    path, _, member = info.rsplit(":", 2)
    return Path(path).name, split_name(member)[0]


def _error_reason(exc: BaseException, limit: int = 200) -> str:
    """The operator's message out of a DALI pipeline error (what follows 'encountered:'), on one line."""
    text = str(exc)
    found = re.search(r"encountered:\s*(.*?)(?:\n\s*Current pipeline object|$)", text, re.DOTALL)
    reason = " ".join((found.group(1) if found else text).split())
    return (reason[: limit - 3] + "...") if len(reason) > limit else reason or type(exc).__name__


class _Probe:
    """Runs the loader's recipe on single samples read from the tars (original bytes): the
    pipeline is built once and rebuilt after each failure (a failed DALI pipeline is done)."""

    def __init__(self, loader: DaliLoader):
        self.loader = loader
        self.spec = loader._spec_for(loader.state.epoch)
        self.exts = ["jpg"] + (["seg.png"] if loader.has_labels else [])
        self.pipes: dict[tuple[str, ...], Any] = {}

    def _run(self, exts: tuple[str, ...], data: dict[str, bytes]) -> str | None:
        try:
            if exts not in self.pipes:
                spec = self.spec if "seg.png" in exts else replace(self.spec, label_dtype=None)
                self.pipes[exts] = build_probe_pipeline(spec, list(exts), self.loader.device_id)
            pipe = self.pipes[exts]
            for e in exts:
                pipe.feed_input(e, [np.frombuffer(data[e], dtype=np.uint8)])
            pipe.run()
        except Exception as exc:  # noqa: BLE001 -- any operator may be the one that fails
            self.pipes.pop(exts, None)
            return _error_reason(exc)
        return None

    def fails(self, shard: str, key: str) -> str | None:
        """None when the sample passes alone; else which member fails and DALI's message."""
        shards = self.loader.shards
        i = next(j for j, t in enumerate(shards.tars) if t.name == shard)
        entry = shards.manifest["shards"][i]
        index = shard_index(str(shards.indexes[i]), entry["samples"], entry["bytes"], shards.stamps[i])
        j = int(np.flatnonzero(index.keys == key)[0])
        _, _, data = shards.read(int(shards.starts[i]) + j, tuple(self.exts))
        reason = self._run(tuple(self.exts), data)
        if reason is None:
            return None
        if len(self.exts) > 1 and self._run(("jpg",), data) is None:
            return f"seg.png does not decode: {reason}"
        return f"jpg does not decode: {reason}"


class DaliLoader(EpochLoader):
    """One epoch of ``Batch``es per iteration, for this rank; resumable with ``state_dict``.

    Same interface as ``TorchLoader``: ``epoch``, ``len()``, ``set_epoch``, ``state_dict``,
    ``load_state_dict``, ``skipped`` and ``skipped_samples``.
    """

    def __init__(self, cfg: LoaderConfig, device: Literal["gpu", "cpu"] = "gpu"):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if cfg.recipe not in ("train", "eval"):
            raise ValueError(f"unknown recipe {cfg.recipe!r}")
        self.cfg, self.device = cfg, device
        self.shards: ShardSet = open_shards(cfg.shards)  # ShardError now for missing or truncated shards
        manifest = self.shards.manifest
        self.has_labels = bool(cfg.labels and manifest.get("label") and "seg.png" in manifest["keys"])
        self.has_cls = bool(manifest.get("cls") and "cls" in manifest["keys"])
        self.num_classes = int(manifest["num_classes"])
        label_dtype = str(manifest["label"]["dtype"]) if self.has_labels else None
        if label_dtype not in (None, "uint8", "uint16"):
            raise ValueError(f"{cfg.shards}: label dtype {label_dtype!r} is neither uint8 nor uint16")
        self.plan = EpochPlan(num_samples=self.shards.num_samples, batch_size=cfg.batch_size, seed=cfg.seed,
                              shuffle=cfg.shuffle, rank=cfg.rank, world_size=cfg.world_size, drop_last=cfg.drop_last)  # fmt: skip
        if device == "gpu":
            if not torch.cuda.is_available():
                raise RuntimeError("DaliLoader(device='gpu') needs CUDA; use device='cpu' for DALI's CPU-only mode")
            self.device_id: int | None = torch.cuda.current_device()
            self.torch_device = torch.device("cuda", self.device_id)
        else:
            self.device_id, self.torch_device = None, torch.device("cpu")
        if cfg.recipe == "train" and cfg.train.kind == "rkrc":
            check_reflect_pad(cfg.train, cfg.size)
        self.threads = max(1, int(cfg.workers))
        self._spec = Spec(device=device, recipe=cfg.recipe, size=cfg.size, train=cfg.train, normalize=cfg.normalize,
                          mean=tuple(cfg.mean), std=tuple(cfg.std), label_dtype=label_dtype, cls=self.has_cls,
                          seeds=())  # fmt: skip
        self.state = LoaderState()
        self.skipped = 0  # skip events (a bad sample counts again in every epoch that reads it)
        self.skipped_samples: dict[tuple[str, str], str] = {}  # (shard, key) -> reason, each warned once
        self._bad: dict[str, dict[str, str]] = {}  # tar name -> {key: reason}: patched out of the index
        self._patch_dir: Path | None = None
        self._pipe = None
        self._pipe_at: tuple[int, int] | None = None  # (epoch, position) of the live pipeline's next batch
        self._mark: tuple[int, int, bytes | None] | None = None  # last (epoch, position, checkpoint) to rebuild from
        self._restore: tuple[int, int, bytes] | None = None  # a loaded checkpoint, not yet used

    # ------------------------------------------------------------ the public interface

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position and fingerprint (ints) plus ``dali_rank{r}``: this rank's pipeline
        checkpoint (ASCII), when mid-epoch. Safe for ``torch.load(weights_only=True)``."""
        state = super().state_dict()
        checkpoint = None
        at = (self.state.epoch, self.state.position)
        if 0 < self.state.position < len(self.plan):
            if self._pipe is not None and self._pipe_at == at:
                checkpoint = self._pipe.checkpoint()
            elif self._restore is not None and self._restore[:2] == at:
                checkpoint = self._restore[2]
        if checkpoint is not None:
            state[self._checkpoint_key] = base64.b64encode(checkpoint).decode("ascii")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (epoch, position); this rank's DALI checkpoint is used when present."""
        super().load_state_dict(state)
        self._close()
        encoded = state.get(self._checkpoint_key)
        at = (self.state.epoch, self.state.position)
        self._restore = (*at, base64.b64decode(encoded)) if encoded and self.state.position > 0 else None

    def close(self) -> None:
        """Release the pipeline and the patched index files."""
        self._close()
        if self._patch_dir is not None:
            shutil.rmtree(self._patch_dir, ignore_errors=True)
            self._patch_dir = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 -- at interpreter shutdown modules may be gone
            pass

    def __iter__(self) -> Iterator[Batch]:
        epoch, n, b = self.state.epoch, len(self.plan), self.cfg.batch_size
        per_rank = self.shards.num_samples // self.cfg.world_size
        while self.state.position < n:
            pipe = self._pipeline(epoch, self.state.position)
            at = self._pipe_at[1]  # < position while catching up after a rebuild
            if at - self._mark[1] >= CHECKPOINT_EVERY:
                self._mark = (epoch, at, pipe.checkpoint())
            try:
                if self.device == "gpu":  # GPU outputs ordered on torch's current stream
                    outputs = pipe.run(torch.cuda.current_stream(self.torch_device))
                else:
                    outputs = pipe.run()
            except Exception as exc:  # noqa: BLE001 -- a sample that does not decode aborts the pipeline
                self._recover(epoch, at, exc)
                continue
            self._pipe_at = (epoch, at + 1)
            if at < self.state.position:
                continue
            self.state.position += 1  # counted when handed over: a checkpoint taken now resumes after it
            batch = self._batch(outputs, min(b, per_rank - at * b))
            if batch is not None:
                yield batch
        self._close()
        self.state = LoaderState(epoch + 1, 0)

    # ------------------------------------------------------------ pipelines

    @property
    def _checkpoint_key(self) -> str:
        return f"dali_rank{self.cfg.rank}"

    def _reader(self, epoch: int) -> ReaderArgs:
        cfg = self.cfg
        order = epoch_tar_order(len(self.shards.tars), cfg.seed, epoch, cfg.shuffle)
        paths = tuple(str(self.shards.tars[i]) for i in order)
        index_paths = tuple(self._index_path(i) for i in order)
        return ReaderArgs(paths, index_paths, cfg.rank, cfg.world_size, cfg.shuffle, combine_seed(cfg.seed, epoch, cfg.rank, 0))

    def _spec_for(self, epoch: int) -> Spec:
        return replace(self._spec, seeds=tuple(combine_seed(self.cfg.seed, epoch, self.cfg.rank, k) for k in range(1, 9)))

    def _build(self, epoch: int, checkpoint: bytes | None = None):
        return build_pipeline(self._spec_for(epoch), self._reader(epoch), self.cfg.batch_size, self.threads,
                              self.device_id, checkpoint)  # fmt: skip

    def _pipeline(self, epoch: int, position: int):
        """The live pipeline if it is at (epoch, p <= position); else one built at the latest
        usable checkpoint (a loaded one, or the last mark) or at the epoch's start. The caller
        runs it forward to ``position``."""
        if self._pipe is not None and self._pipe_at[0] == epoch and self._pipe_at[1] <= position:
            return self._pipe
        self._close()
        pipe, start = None, 0
        for source in (self._restore, self._mark):
            if source is not None and source[0] == epoch and 0 < source[1] <= position and source[2] is not None:
                try:
                    pipe, start = self._build(epoch, source[2]), source[1]
                    break
                except Exception as exc:  # noqa: BLE001 -- e.g. saved by another pipeline definition
                    warnings.warn(f"DALI checkpoint not usable ({_error_reason(exc)}); re-reading the epoch", stacklevel=3)
        if pipe is None:
            pipe = self._build(epoch)
        self._restore = None
        self._pipe, self._pipe_at = pipe, (epoch, start)
        if self._mark is None or self._mark[:2] != (epoch, start):
            self._mark = (epoch, start, pipe.checkpoint() if start else None)
        return pipe

    def _close(self) -> None:
        self._pipe, self._pipe_at = None, None  # DALI frees the pipeline with its last reference

    # ------------------------------------------------------------ batches

    def _batch(self, outputs, valid: int) -> Batch | None:
        """The first ``valid`` samples of a pipeline run (the rest is the reader's padding) as a
        ``Batch``, without the samples that must be left out."""
        outs = list(outputs)
        images = outs.pop(0)
        labels = outs.pop(0) if self.has_labels else None
        cls = outs.pop(0) if self.has_cls else None
        info, hw = outs.pop(0), np.asarray(outs.pop(0).as_tensor())  # hw: [B, 2] decoded image sizes
        if self.has_labels:
            label_hw, png = np.asarray(outs.pop(0).as_tensor()), np.asarray(outs.pop(0).as_tensor())  # [B, 2] each
        keep, keys, classes = [], [], []
        for i in range(valid):
            shard, key = parse_source_info(_text(info, i))
            reason = self._bad.get(shard, {}).get(key)
            number = _text(cls, i).strip() if cls is not None else "0"
            if reason is None and (not number.isdigit() or int(number) >= self.num_classes):
                reason = f"cls {number!r} is not a class index"
            if reason is None and self.has_labels:
                reason = self._label_problem(hw[i], label_hw[i], png[i])
            if reason is not None:
                self._note(shard, key, reason)
                continue
            keep.append(i)
            keys.append(key)
            classes.append(int(number))
        if not keep:
            return None
        image_t = _to_torch(images, self.torch_device)  # [B, 3, S, S] (B = the pipeline's batch size)
        label_t = None if labels is None else _to_torch(labels, self.torch_device)[..., 0]  # [B, S, S]
        if len(keep) != image_t.shape[0]:  # a short last batch, or samples left out
            select = torch.tensor(keep, device=self.torch_device)
            image_t = image_t.index_select(0, select)
            label_t = None if label_t is None else label_t.index_select(0, select)
        label_t = None if label_t is None else label_t.to(torch.int64)
        cls_t = torch.tensor(classes, dtype=torch.int64).to(self.torch_device, non_blocking=True) if cls is not None else None
        return Batch(images=image_t, labels=label_t, cls=cls_t, keys=keys)

    def _label_problem(self, image_hw: np.ndarray, label_hw: np.ndarray, png: np.ndarray) -> str | None:
        """Why a decoded label map cannot serve its image (wrong PNG type, other size), or None."""
        depth, colour = int(png[0]), int(png[1])
        want = 16 if self._spec.label_dtype == "uint16" else 8
        if depth != want or colour != 0:
            return f"seg.png is a {depth}-bit PNG of colour type {colour}, expected {want}-bit grayscale"
        if image_hw.tolist() != label_hw.tolist():
            return f"seg.png is {label_hw[1]}x{label_hw[0]} but the image is {image_hw[1]}x{image_hw[0]}"
        return None

    def _note(self, shard: str, key: str, reason: str) -> None:
        self.skipped += 1
        if (shard, key) not in self.skipped_samples:
            self.skipped_samples[(shard, key)] = reason
            warn_skipped(shard, key, reason)

    # ------------------------------------------------------------ corrupt samples

    def _index_path(self, shard: int) -> str:
        tar = self.shards.tars[shard].name
        if tar in self._bad and self._patch_dir is not None:
            return str(self._patch_dir / self.shards.indexes[shard].name)
        return str(self.shards.indexes[shard])

    def _recover(self, epoch: int, position: int, exc: BaseException) -> None:
        """Find the sample(s) of batch ``position`` that fail alone, patch them out, or re-raise."""
        self._close()
        keys = list(dict.fromkeys(self._batch_keys(self._reader(epoch), position)))
        probe = _Probe(self)
        found = {(s, k): r for s, k in keys if k not in self._bad.get(s, {}) and (r := probe.fails(s, k)) is not None}
        if not found:
            names = ", ".join(f"{s}:{k}" for s, k in keys)
            raise RuntimeError(f"DALI pipeline failed at epoch {epoch}, batch {position} ({names}), "
                               f"and no single sample fails alone: {_error_reason(exc)}") from exc  # fmt: skip
        for (shard, key), reason in found.items():
            self._bad.setdefault(shard, {})[key] = reason
        for shard in {s for s, _ in found}:
            self._write_patched_index(shard)

    def _batch_keys(self, reader: ReaderArgs, position: int) -> list[tuple[str, str]]:
        """(shard, key) of every sample of batch ``position``: a reader-only pipeline of the same
        arguments reads the smallest member up to that batch (no decoding)."""
        keys = self.shards.manifest["keys"]
        ext = next((e for e in ("cls", "json", "txt") if e in keys), "jpg")
        pipe = build_keys_pipeline(reader, ext, self.cfg.batch_size, self.threads)
        for _ in range(position):
            pipe.run()
        (info,) = pipe.run()
        return [parse_source_info(_text(info, i)) for i in range(self.cfg.batch_size)]

    def _write_patched_index(self, shard: str) -> None:
        """A copy of the shard's index whose bad samples point at a good sample's members."""
        i = next(j for j, t in enumerate(self.shards.tars) if t.name == shard)
        bad = self._bad[shard]
        lines = self.shards.indexes[i].read_text().splitlines()
        rows = [line.split() for line in lines[1:]]
        donor = next((r for r in rows if split_name(r[3])[0] not in bad), None)
        if donor is None:
            raise RuntimeError(f"{shard}: every sample fails to decode ({next(iter(bad.values()))})")
        for r in rows:
            if split_name(r[3])[0] in bad:
                for g in range(0, len(r), 4):  # keep ext and member name, borrow offset and size
                    r[g + 1], r[g + 2] = donor[g + 1], donor[g + 2]
        if self._patch_dir is None:
            self._patch_dir = Path(tempfile.mkdtemp(prefix="fastloc-dali-idx-"))
        path = self._patch_dir / self.shards.indexes[i].name
        path.write_text("\n".join([lines[0], *(" ".join(r) for r in rows)]) + "\n")
