"""``python -m fastloc.probe zeroshot``'s config: the benchmark, the method whose knobs it takes, the
readout, the paired text tower, and overrides of single knobs (each recorded beside the harness's
value in result.json).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import tyro

from fastloc.cli import flowing_help, require
from fastloc.probe.config import at_least, positive
from fastloc.probe.dense.config import DenseConfig
from fastloc.probe.zeroshot.decide import BENCHMARKS, METHODS, Benchmark, Settings, _benchmark

MANIFEST = "manifest"  # not one of the harness's benchmarks: the shard set's own class names


@flowing_help
@dataclass(frozen=True, kw_only=True)
class ZeroShotConfig(DenseConfig):
    """Training-free zero-shot segmentation (the SCLIP / ClearCLIP / NACLIP harness): each
    evaluation image at full resolution, its patch tokens read out against the class names'
    text embeddings (80 templates), mIoU as mmseg computes it (dataset-level counts, nanmean)."""

    PROTOCOL = "zeroshot"

    backbone: str = "clip-vit-b"
    """A registered backbone with a paired text tower (clip-vit-b: OpenAI CLIP ViT-B/16, QuickGELU),
    or a file written by python -m fastloc.align export (give --text-tower)."""

    benchmark: str = ""
    """voc21, voc20, context60, context59, coco_object, coco_stuff164k, city_scapes, ade20k (the
    harness's eight, their class names, background rule and knobs), or manifest: the shard set's own
    class names, one query each, no background rule. Default: from the shard set's dataset."""

    method: Literal["naclip", "sclip", "clearclip"] = "naclip"
    """Whose knobs the benchmark runs with: image size, windows, logit scale, background threshold,
    PAMR (ZEROSHOT-SEG.md section 2)."""

    rule: Literal["harness", "segclip"] = "harness"
    """The decision: the harness's (per pixel, softmax of scale x cosine over every query, background
    below --prob-thd), or SegCLIP's (top-5 classes of the image embedding, the product of softmaxes,
    its per-benchmark background thresholds, one template, short side 224, windows 224 / 224 unless
    --short-side or --window say): it needs a SegCLIP export (--head ENCODER.segclip.safetensors)."""

    readout: Literal["clip", "maskclip", "naclip"] = "naclip"
    """The last block: plain CLIP, MaskCLIP's value path, or NACLIP's neighbourhood attention
    without residual and feed-forward."""

    text_tower: str = ""
    """The registered backbone whose paired text tower embeds the class names (default: --backbone;
    an export names its base backbone here)."""

    text_weights: str = "pretrained"
    """The text tower's weights: pretrained (open_clip's hub), random, or an open_clip state dict file."""

    head: str = "auto"
    """The projection into the text space: auto (the backbone's own; for an export, the head its export
    wrote beside it, else --text-tower's pretrained projection when it needs one), none, a safetensors
    file holding head.weight (and head.bias), or the file an export of a PACL run (its embedder) or a
    SegCLIP run (its groups and trained towers) writes: ENCODER.embedder / ENCODER.segclip.safetensors."""

    class_names: Path | None = None
    """A class-name file (one class a line, synonyms split on ', '; the line number is the class).
    Default: the harness's file for the benchmark (the method's: ClearCLIP's own for voc21, voc20,
    coco_object), or the manifest's names."""

    short_side: int = 0
    """Resize so the short side is this (long side capped at 2048); 0: the method's."""

    window: tuple[int, int] | None = None
    """Sliding window (crop, stride); not given: the method's; --window 0 0: the whole image at once."""

    logit_scale: float = 0.0
    """softmax(scale x cosine) over every query; 0: the method's."""

    prob_thd: float = -1.0
    """Pixels whose top class probability is below this become class 0; -1: the method's (0 without
    a background rule)."""

    pamr: Literal["auto", "on", "off"] = "auto"
    """PAMR post-processing (10 iterations, dilations 8 and 16); auto: as the method reported it."""

    std: float = 5.0
    """NACLIP's Gaussian sigma, in patches."""

    max_images: int = 0
    """Score only the first N evaluation images (0: all)."""

    pictures: int = 4
    """Rows of predictions.png: image, truth and prediction of the first N images (0: none)."""

    # the shared evaluation options a zero-shot run has no use for: off the command line
    eval_batch_size: tyro.conf.Suppress[int] = 1  # one image a step, as the harness
    skip_blocks: tyro.conf.Suppress[int] = 0  # the readouts replace the last block
    cache: tyro.conf.Suppress[bool] = False  # no feature cache: images are read whole
    train_split: tyro.conf.Suppress[str] = ""  # nothing is trained
    loader: tyro.conf.Suppress[str] = "cpu"  # samples are read one by one (slide.read_sample)
    workers: tyro.conf.Suppress[int] = 0

    cache_dir: Path = Path("runs/probe/cache")
    """Where the class names' text embeddings are cached (under text/)."""

    @property
    def image_size(self) -> int:
        return self.short_side

    @property
    def zero_is_ignore(self) -> bool:
        return False  # per benchmark: Benchmark.reduce_zero_label

    def settings(self, bench: Benchmark) -> Settings:
        """The method's knobs on ``bench``, with this config's overrides."""
        base = bench.settings(self.method)
        over = {}
        if self.short_side:
            over["short_side"] = self.short_side
        if self.window is not None:
            over["window"] = None if tuple(self.window) == (0, 0) else tuple(self.window)
        if self.logit_scale:
            over["logit_scale"] = self.logit_scale
        if self.prob_thd >= 0:
            over["prob_thd"] = self.prob_thd
        if self.pamr != "auto":
            over["pamr"] = self.pamr == "on"
        return replace(base, **over)

    def validate(self) -> None:
        super().validate()
        names = [*BENCHMARKS, MANIFEST]
        rule = f"must be one of {', '.join(names)} (or left out: from the shard set)"
        require(self.benchmark in ("", *names), "--benchmark", self.benchmark, rule)
        require(self.method in METHODS, "--method", self.method, f"one of {', '.join(METHODS)}")
        at_least("--short-side", self.short_side, 0, "0: the method's")
        if self.window is not None and tuple(self.window) != (0, 0):
            crop, stride = self.window
            rule = "crop and stride at least 1 and stride at most crop (0 0: the whole image)"
            require(1 <= stride <= crop, "--window", f"{crop} {stride}", rule)
        at_least("--logit-scale", self.logit_scale, 0, "0: the method's")
        require(self.prob_thd == -1 or 0 <= self.prob_thd <= 1, "--prob-thd", self.prob_thd, "in [0, 1], or -1")
        positive(self.std, "--std")
        at_least("--max-images", self.max_images, 0, "0: all")

        at_least("--pictures", self.pictures, 0)


def manifest_benchmark() -> Benchmark:
    """The shard set's own classes: every method's defaults, no background rule, no class-name file."""
    return _benchmark(MANIFEST, "", "none", False)


# the shard set's dataset -> the benchmark it runs by default
DEFAULT_BENCHMARK = {
    "voc": "voc21",
    "context": "context60",
    "coco-object": "coco_object",
    "coco": "coco_stuff164k",
    "cityscapes": "city_scapes",
    "ade20k": "ade20k",
}
