"""What only the DALI loader does: its graph's pixels against PIL's, its recovery from samples that
pass the host checks but do not decode, and (gpu) the GPU placement against the CPU one."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from loader_data import mean_image_difference, run_epochs, same_samples, spoil
from PIL import Image

from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.dali_loader import DaliLoader, error_reason
from fastloc.data.dali_pipeline import INPUTS, Spec, build_pipeline
from fastloc.data.recipes import RECIPES, CentreSquare, Rkrc, RkrcDraw, Rrc, RrcDraw
from fastloc.data.samples import SkippedSampleWarning, window_arrays

S = 32


def config(root, **kw) -> LoaderConfig:
    return LoaderConfig(**{"shards": root, "batch_size": 8, "size": S, "workers": 2, "threads": 2, **kw})


def _scene(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    pixels = np.stack([128 + 90 * np.sin(x / 3.1), 128 + 90 * np.cos(y / 2.3), (7 * x + 3 * y) % 256], -1)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95, subsampling=0)
    return out.getvalue()


def test_the_graph_makes_the_recipes_pixels():
    """Windows fed by hand (ties of the unzoomed size, reflect padding on either side, flips,
    bilinear and bicubic, rrc crops, eval squares): DALI's CPU decode and resize against PIL's."""
    pipe = build_pipeline(Spec("cpu", False, (0.0,) * 3, (1.0,) * 3), None, 1, 1, None, prefetch=1)
    rng = np.random.default_rng(1)
    worst = []
    for trial in range(45):
        h, w = (int(v) for v in rng.integers(6, 90, 2))
        if trial < 4:
            h, w = [(64, 90), (90, 64), (2 * S, 2 * S + 1), (S + 1, 3 * S)][trial]
        jpg = _jpeg(_scene(h, w))
        pil = Image.open(io.BytesIO(jpg)).convert("RGB")
        interp, flip = ["bilinear", "bicubic"][trial % 2], bool(trial % 3 == 0)
        if trial % 3 == 0 or trial < 4:
            f = 1.0 / math.sqrt(float(rng.uniform(0.08, 1.0))) if trial % 2 else 1.0
            s = math.sqrt(3 / 4) if trial % 5 == 1 else (math.sqrt(4 / 3) if trial % 5 == 2 else 1.0)
            draw = RkrcDraw(f / s, f * s, interp, flip)
            window, expect = Rkrc().window(h, w, S, draw), Rkrc().image(pil, S, draw)
        elif trial % 3 == 1:
            ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
            draw = RrcDraw(int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw, interp, flip)
            window, expect = Rrc().window(h, w, S, draw), Rrc().image(pil, S, draw)
        else:
            window, expect = CentreSquare().window(h, w, S, None), CentreSquare().image(pil, S, None)
        arrays = window_arrays([window])
        pipe.feed_input("jpg", [np.frombuffer(jpg, np.uint8)])
        for name in INPUTS:
            pipe.feed_input(name, arrays[name])
        (out,) = pipe.run()
        image = np.asarray(out.as_tensor())[0]  # [3, S, S]
        worst.append(np.abs(image.astype(int) - expect.numpy().astype(int)).mean())
    assert max(worst) < 2.0 and np.mean(worst) < 1.0


def test_samples_that_do_not_decode_are_found_once(synthetic_copy):
    """A JPEG with zeroed sampling factors passes the host's header check; DALI's run fails, the
    loader finds it alone, remembers it, and the next epoch replaces it without a failure."""
    spoil(synthetic_copy, 21, "sampling")
    spoil(synthetic_copy, 5, "zeros")  # the header check: never reaches DALI
    loader = DaliLoader(config(synthetic_copy, recipe=Rkrc(), seed=3), SOLO, device="cpu")
    with pytest.warns(SkippedSampleWarning):
        first = run_epochs(loader, 1)
    assert list(loader.bad) == [21] and "does not decode (cpu DALI)" in loader.bad[21]
    builds = []
    loader._build = lambda original=loader._build: builds.append(1) or original()
    again = run_epochs(loader, 2)[5:]
    assert builds == [1]  # the second epoch: one pipeline, no failure
    assert len(first) == len(again) == 5 and all(len(b) == 8 for b in first + again)
    assert sum(int((~b.valid).sum()) for b in first + again) == 4  # two replacements per epoch


def test_error_reason_is_the_operator_message():
    text = (
        "Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,\nwhich was used in "
        "the pipeline definition with the following traceback:\n\n  File x\n\nencountered:\n\nBogus sampling "
        "factors\n   in jpeg\nCurrent pipeline object is no longer valid."
    )
    assert error_reason(RuntimeError(text)) == "Bogus sampling factors in jpeg"
    assert error_reason(RuntimeError("x" * 500)).endswith("...") and len(error_reason(RuntimeError("x" * 500))) == 200


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["eval", "rkrc"])
def test_gpu_pipeline_matches_the_cpu_pipeline(synthetic, recipe):
    """device='gpu' (nvJPEG, GPU resize/pad/normalize): CUDA batches with the CPU pipeline's keys,
    labels, classes and valid flags, images within the decoders' tolerance."""
    cfg = config(synthetic, recipe=RECIPES[recipe](), normalize=False)
    gpu = [b.to("cpu") for b in run_epochs(DaliLoader(cfg, SOLO, device="gpu"), 2)]
    cpu = run_epochs(DaliLoader(cfg, SOLO, device="cpu"), 2)
    assert len(gpu) == len(cpu) == 10 and same_samples(gpu, cpu)
    assert mean_image_difference(gpu, cpu) < 3.0
    batch = next(iter(DaliLoader(config(synthetic, recipe=RECIPES["eval"]()), SOLO, device="gpu")))
    assert batch.images.is_cuda and batch.images.dtype == torch.float32 and batch.labels.is_cuda and batch.valid.is_cuda
