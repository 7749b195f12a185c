"""``python -m fastloc.bench kernels``: the Triton kernels against their torch references.

Both kernels are memory-bound, so each row reports the bytes the op must move (each input read
once, each output written once), the achieved GB/s and its share of this device's copy
bandwidth, measured in the same run (a large device-to-device copy, bytes read + written).
Contenders: the Triton kernel (CUDA only: elsewhere its rows are listed as missing, with the
reason), the eager torch reference, ``torch.compile`` of the reference, and for pooling the
original per-patch ``torch.unique`` loop of Patch-Seg.
Aims on an H100: >= 80% of copy bandwidth and >= 5x over the eager reference.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from fastloc.bench.common import (
    MissingRow,
    at_least,
    check_paths,
    cuda_missing_reason,
    flag,
    print_table,
    write_results,
)
from fastloc.cli import flowing_help, require
from fastloc.kernels.label_pool import label_pool_loop, label_pool_reference, label_pool_triton
from fastloc.kernels.patch_mask import patch_mask_reference, patch_mask_triton

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet (timm's default)
MAX_CLASSES = 256  # the label maps are uint8


@flowing_help
@dataclass(frozen=True, kw_only=True)
class KernelBench:
    """Triton masking and label-pooling kernels vs eager / compiled torch references."""

    batch: int = 256
    """Images (masking) and label maps (pooling) per call."""

    size: int = 224
    """Image and label map side in pixels."""

    masks: int = 3
    """Masks per image (MaskEmbed: a random mask, its complement, all-ones)."""

    mask_patch: int = 16
    """Patch size of the masking benchmark (at most --size)."""

    pool_patch: int = 16
    """Patch size of the pooling benchmark (at most --size)."""

    classes: int = 183
    """Classes of the pooling benchmark (COCO-Stuff); at most 256 (the label maps are uint8)."""

    reduction: Literal["union", "majority", "global-union"] = "union"
    """Pooling reduction (Patch-Seg's multi-label, multi-class or image-level labels)."""

    loop_batch: int = 8
    """Label maps timed with the per-patch torch.unique loop (it is slow); scaled to --batch."""

    repeats: int = 20
    """Timed calls per row on a GPU (after warm-up); a CPU takes max(3, repeats // 5)."""

    device: str = "auto"
    """cuda, cpu, or auto (cuda when available)."""

    out: Path | None = None
    """JSON results path (default: runs/bench/kernels-DATE.json)."""

    def validate(self) -> None:
        """A ``BadValue`` for the first option out of its range, before any work."""
        at_least(self, 1, "batch", "size", "masks", "mask_patch", "pool_patch", "classes", "loop_batch", "repeats")
        for field in ("mask_patch", "pool_patch"):
            value = getattr(self, field)
            require(value <= self.size, flag(field), value, f"must fit the image once (at most --size {self.size})")
        rule = f"must be between 1 and {MAX_CLASSES} (the label maps are uint8)"
        require(self.classes <= MAX_CLASSES, "--classes", self.classes, rule)
        _check_device(self.device)
        check_paths(self.out)


def _check_device(name: str) -> None:
    """--device: cuda, cuda:N, cpu or auto; a CUDA device only where torch sees it."""
    known = name in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", name) is not None
    require(known, "--device", name, "must be cuda, cpu or auto (cuda when available)")
    if name.startswith("cuda"):
        index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
        require(index < count, "--device", name, f"needs a CUDA device that torch sees (it sees {count})")


def run(cfg: KernelBench, command: str) -> Path:
    # torch.compile(label_pool_reference) graph-breaks at the value check, by design: keep it quiet
    torch._logging.set_logs(dynamo=logging.ERROR)
    device = _pick_device(cfg.device)
    repeats = cfg.repeats if device.type == "cuda" else max(3, cfg.repeats // 5)
    gen = torch.Generator(device="cpu").manual_seed(0)
    copy_gbs, copy_times = _copy_bandwidth(device, repeats)
    rows: list[dict[str, Any]] = []
    missing: list[MissingRow] = []
    triton_reason = _triton_missing_reason(device)

    # --- masking: uint8 images -> M masked, normalized bf16 copies
    b, s, m, p = cfg.batch, cfg.size, cfg.masks, cfg.mask_patch
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=gen).to(device)
    keep = (torch.rand(b, m, (s // p) ** 2, generator=gen) < 0.5).to(device)
    args = (images, keep, MEAN, STD, p, torch.bfloat16)
    mask_bytes = images.numel() + keep.numel() + b * m * 3 * s * s * 2
    contenders = {
        "triton": patch_mask_triton,
        "eager reference": patch_mask_reference,
        "torch.compile(reference)": torch.compile(patch_mask_reference),
    }
    for name, fn in contenders.items():
        if name == "triton" and triton_reason:
            missing.append(MissingRow(f"patch_mask / {name}", triton_reason))
            continue
        rows.append(_row("patch_mask", name, fn, args, mask_bytes, device, repeats, copy_gbs))

    # --- label pooling: uint8 label maps -> per-patch multi-hot
    p, c = cfg.pool_patch, cfg.classes
    labels = torch.randint(0, c, (b, s, s), dtype=torch.uint8, generator=gen).to(device)
    args = (labels, p, c, cfg.reduction)
    n = (s // p) ** 2
    out_bytes = {"union": b * n * c * 4, "majority": b * n * 8, "global-union": b * c * 4}[cfg.reduction]
    pool_bytes = labels.numel() + out_bytes
    contenders = {
        "triton": label_pool_triton,
        "eager reference": label_pool_reference,
        "torch.compile(reference)": torch.compile(label_pool_reference),
    }
    for name, fn in contenders.items():
        if name == "triton" and triton_reason:
            missing.append(MissingRow(f"label_pool / {name}", triton_reason))
            continue
        rows.append(_row("label_pool", name, fn, args, pool_bytes, device, repeats, copy_gbs))
    few = labels[: cfg.loop_batch].cpu()
    loop_args = (few, p, c, cfg.reduction)
    scale = b / len(few)
    loop_name = "per-patch torch.unique loop (original)"
    cpu = torch.device("cpu")
    rows.append(_row("label_pool", loop_name, label_pool_loop, loop_args, pool_bytes, cpu, 1, copy_gbs, scale))

    for op in ("patch_mask", "label_pool"):
        eager = next(r["best_ms"] for r in rows if r["op"] == op and r["impl"] == "eager reference")
        for r in rows:
            if r["op"] == op:
                r["speedup_vs_eager"] = eager / r["best_ms"]
    print(f"device: {_device_name(device)}; copy bandwidth {copy_gbs:,.0f} GB/s (read + write)")
    print_table(rows, ["op", "impl", "best_ms", "GB_per_s", "of_copy_bw", "speedup_vs_eager"], missing)
    payload = {
        "config": {k: str(v) for k, v in cfg.__dict__.items()},
        "device_used": _device_name(device),
        "copy_bandwidth_GBps": copy_gbs,
        "copy_times_s": copy_times,
        "rows": rows,
    }
    return write_results("kernels", cfg.out, command, payload, missing)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _triton_missing_reason(device: torch.device) -> str | None:
    """Why the Triton rows cannot be timed on ``device`` (compiled Triton runs on CUDA only)."""
    if device.type == "cuda":
        return None
    return cuda_missing_reason() or "Triton kernels run on CUDA only; --device cpu was given"


def _row(op, impl, fn, args, nbytes, device, repeats, copy_gbs, scale=1.0) -> dict[str, Any]:
    times = [t * scale for t in _time(fn, args, device, repeats)]
    best = min(times)
    gbs = nbytes / best / 1e9
    return {
        "op": op,
        "impl": impl,
        "bytes": nbytes,
        "best_ms": best * 1e3,
        "GB_per_s": gbs,
        "of_copy_bw": gbs / copy_gbs,
        "times_s": times,
        "scaled_from_subset": scale != 1.0,
    }


def _time(fn, args, device: torch.device, repeats: int) -> list[float]:
    """Seconds per call: CUDA events on a GPU, wall clock on a CPU; one untimed warm-up call."""
    fn(*args)
    if device.type != "cuda":
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*args)
            out.append(time.perf_counter() - start)
        return out
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def _copy_bandwidth(device: torch.device, repeats: int) -> tuple[float, list[float]]:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    numel = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(numel, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = _time(dst.copy_, (src,), device, repeats)
    return 2 * numel / min(times) / 1e9, times


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from fastloc.bench.common import device as describe

    return f"CPU: {describe()['cpu']} ({describe()['cores']} cores)"
