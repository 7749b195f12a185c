"""The DALI loader: the shared host stage feeds ``fn.external_source``; the pixels are made on the GPU.

The host batches (``stream.py``, in the order of ``order.py``) bring each sample's JPEG and
``Window``; the graph (``dali_pipeline.py``, GPU or CPU operators) makes the images, paired with
the host batch's keys, labels and valid flags in order: the torch twin's batches but for the
resampling, and its state format. A sample that passes the host checks but does not decode fails
its batch's run: each sample of that batch is then decoded alone, the culprits replaced by the
order's rule (``SampleReader.batch(t, bad)``, as the twin replaces them) and the pipeline rebuilt.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from typing import Literal

import torch

from fastloc.data.config import LoaderConfig, Placement
from fastloc.data.dali_pipeline import INPUTS, PREFETCH, Spec, build_pipeline
from fastloc.data.samples import HostBatch, HostFailure
from fastloc.data.stream import EpochLoader, release


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """A uniform-shape DALI TensorList as a new torch tensor on ``device`` (a copy: DALI reuses its buffers)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    dense = tl.as_tensor()
    out = torch.empty(dense.shape(), dtype=to_torch_type[dense.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, out, cuda_stream=stream)
    return out


def error_reason(exc: BaseException, limit: int = 200) -> str:
    """The operator's message out of a DALI pipeline error (what follows 'encountered:'), on one line."""
    text = str(exc)
    found = re.search(r"encountered:\s*(.*?)(?:\n\s*Current pipeline object|$)", text, re.DOTALL)
    reason = " ".join((found.group(1) if found else text).split())
    return (reason[: limit - 3] + "...") if len(reason) > limit else reason or type(exc).__name__


class Feeder:
    """DALI's source: the host batches in order, known-bad samples replaced; remembers what is in
    flight. Kept apart from the loader so that pipeline and loader form no reference cycle (a
    cycle would be collected, pipeline and all, inside forked worker processes)."""

    def __init__(self, host: Iterator[HostBatch], reader, bad: dict[int, str]):
        self.host, self.reader, self.bad = host, reader, bad
        self.inflight: deque[HostBatch] = deque()  # fed to the pipeline, not yet output; oldest first
        self.refeed: deque[HostBatch] = deque()  # to feed before the host stream, after a rebuild
        self.retired: deque[HostBatch] = deque(maxlen=PREFETCH + 1)  # output, kept alive: DALI reads them in place
        self.failure: HostFailure | None = None  # the shards are broken: the loader raises it

    def __call__(self) -> tuple:
        host = self.refeed.popleft() if self.refeed else next(self.host)
        if isinstance(host, HostFailure):
            self.failure = host
            host.raise_()  # DALI passes it on to the loader's run
        if self.bad and not self.bad.keys().isdisjoint(host.g.tolist()):
            host = self.reader.batch(host.t, self.bad)
        self.inflight.append(host)
        return (host.jpegs(), *(host.windows[k] for k in INPUTS))


class DaliLoader(EpochLoader):
    """One epoch of ``Batch``es per iteration, for this rank; resumable with ``state_dict``."""

    pixels = False

    def __init__(self, cfg: LoaderConfig, placement: Placement, device: Literal["gpu", "cpu"] = "gpu"):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if not cfg.recipe.dali or cfg.recipe.views_per_sample != 1:
            raise ValueError(f"the DALI graph makes one view per sample of a DALI recipe, not {cfg.recipe!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("DaliLoader(device='gpu') needs CUDA; use device='cpu' for DALI's CPU-only mode")
        self.device = device
        self.device_id: int | None = torch.cuda.current_device() if device == "gpu" else None
        super().__init__(
            cfg, placement, torch.device("cpu") if device == "cpu" else torch.device("cuda", self.device_id)
        )
        self.spec = Spec(device=device, normalize=cfg.normalize, mean=tuple(cfg.mean), std=tuple(cfg.std))
        self.threads = max(1, int(cfg.threads))
        self.bad: dict[int, str] = {}  # global index -> why DALI cannot decode it
        self._pipe = None
        self._feeder: Feeder | None = None

    def close(self) -> None:
        if self._feeder is not None:  # stop the workers now: the pipeline (and its feeder) may live until a gc
            release(self._feeder.host)
            self._feeder.host = None
        self._pipe, self._feeder = None, None
        super().close()

    def _open(self, t: int) -> None:
        self._feeder = Feeder(self.host_batches(t), self.reader, self.bad)
        self._pipe = self._build()

    # ------------------------------------------------------------ the pipeline

    def _build(self):
        return build_pipeline(self.spec, self._feeder, self.cfg.batch_size, self.threads, self.device_id)

    def _run(self, pipe):
        if self.device == "gpu":  # outputs ordered on torch's current stream
            return pipe.run(torch.cuda.current_stream(self.torch_device))
        return pipe.run()

    def _next(self) -> tuple[HostBatch, torch.Tensor]:
        feeder = self._feeder
        while True:
            try:
                (images,) = self._run(self._pipe)
            except Exception as exc:
                if feeder.failure is not None:
                    self.close()
                    feeder.failure.raise_()
                self._recover(exc)
                continue
            host = feeder.inflight.popleft()
            feeder.retired.append(host)  # no_copy: its arrays may be read until later iterations are out
            return host, _to_torch(images, self.torch_device)

    # ------------------------------------------------------------ samples that do not decode

    def _recover(self, exc: BaseException) -> None:
        """Find the samples of the failed batch (the oldest in flight) that fail alone; rebuild."""
        feeder = self._feeder
        pending = list(feeder.inflight)
        found: dict[int, str] = {}
        for host in pending:  # the failed batch is the first; the others only if it shows nothing
            found = self._probe(host)
            if found:
                break
        if not found:
            names = ", ".join(pending[0].keys) if pending else "?"
            raise RuntimeError(
                f"{self.shards.root}: DALI pipeline failed at batch {pending[0].t if pending else '?'} ({names}) "
                f"and no sample fails alone: {error_reason(exc)}"
            ) from exc
        self.bad.update(found)
        feeder.refeed = deque([*pending, *feeder.refeed])
        feeder.inflight.clear()
        self._pipe = self._build()

    def _probe(self, host: HostBatch) -> dict[int, str]:
        """{global index: reason} of the samples of ``host`` that fail in a pipeline of their own."""
        found, pipe = {}, None
        jpegs = host.jpegs()
        for i, g in enumerate(host.g.tolist()):
            if g in self.bad or g in found:
                continue
            pipe = pipe or build_pipeline(self.spec, None, 1, 1, self.device_id, prefetch=1)
            pipe.feed_input("jpg", [jpegs[i]])
            for name in INPUTS:
                pipe.feed_input(name, host.windows[name][i : i + 1])
            try:
                self._run(pipe)
            except Exception as exc:
                found[g] = f"jpg does not decode ({self.device} DALI): {error_reason(exc)}"
                pipe = None  # a failed pipeline is rebuilt
        return found
