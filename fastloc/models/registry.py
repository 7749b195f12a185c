"""The backbone registry: short name -> timm id and how MaskEmbed treats it; weights and image config.

Names follow the reference's configs (MASKEMBED.md section 10). Any other timm id works too.
Weights: ``"pretrained"`` (timm's hub), ``"random"``, or a local file (safetensors or a timm
checkpoint) loaded through timm's own pretrained loader, so its key filters apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
from torch import nn

from fastloc.cli import exception_line


class WeightsError(RuntimeError):
    """Pretrained weights could not be loaded; the message says which option to use instead."""


@dataclass(frozen=True)
class Backbone:
    """One registered backbone."""

    timm_id: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    soft_cap: bool = True  # the reference's svit student; False: a "plain" student
    decoder_qkv_bias: bool | None = None  # None: the student's first block's
    decoder_qk_norm: bool | None = None


_PLAIN = {"soft_cap": False, "decoder_qkv_bias": True, "decoder_qk_norm": False}  # EVA02, BEiT configs

BACKBONES: dict[str, Backbone] = {
    "clip-vit-b": Backbone("vit_base_patch16_clip_quickgelu_224.openai"),
    "clip-vit-l": Backbone("vit_large_patch14_clip_quickgelu_224.openai"),
    "clip-vit-l-336": Backbone("vit_large_patch14_clip_quickgelu_336.openai"),
    "openclip-vit-b": Backbone("vit_base_patch16_clip_224.laion2b"),
    "dfn-vit-b": Backbone("vit_base_patch16_clip_224.dfn2b"),
    "siglip-vit-b": Backbone("vit_base_patch16_siglip_224.webli"),
    "siglip-vit-so400m": Backbone("vit_so400m_patch14_siglip_224.webli"),
    "siglip-vit-so400m-384": Backbone("vit_so400m_patch14_siglip_384.webli"),
    "dinov2-vit-b": Backbone("vit_base_patch14_reg4_dinov2.lvd142m", {"img_size": 224}),
    "eva02-vit-b": Backbone("eva02_base_patch16_clip_224.merged2b", **_PLAIN),
    "beit-vit-b": Backbone("beit_base_patch16_224.in22k_ft_in22k_in1k", **_PLAIN),
    "beitv2-vit-b": Backbone("beitv2_base_patch16_224.in1k_ft_in22k_in1k", **_PLAIN),
    "in1k-vit-t": Backbone("vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
    "in1k-vit-s": Backbone("vit_small_patch16_224.augreg_in21k_ft_in1k"),
    "in1k-vit-b": Backbone("vit_base_patch16_224.augreg_in21k_ft_in1k"),
    "in1k-vit-l": Backbone("vit_large_patch16_224.augreg_in21k_ft_in1k"),
    "mae-vit-b": Backbone("vit_base_patch16_224.mae"),
    "dino-vit-b": Backbone("vit_base_patch16_224.dino"),
    # the rest of Patch-Seg's backbones (PATCHSEG.md section 10), under its short names
    "clip-vit-l-336px": Backbone("vit_large_patch14_clip_quickgelu_336.openai"),
    "siglip-vit-b-256px": Backbone("vit_base_patch16_siglip_256.webli"),
    "siglip-vit-b-384px": Backbone("vit_base_patch16_siglip_384.webli"),
    "siglip-vit-so400m-384px": Backbone("vit_so400m_patch14_siglip_384.webli"),
    "mae-vit-l": Backbone("vit_large_patch16_224.mae"),
    "mae-vit-h": Backbone("vit_huge_patch14_224.mae"),
    "openclip-vit-l": Backbone("vit_large_patch14_clip_224.laion2b"),
    "openclip-vit-h": Backbone("vit_huge_patch14_clip_224.laion2b"),
    "dfn-vit-l": Backbone("vit_large_patch14_clip_quickgelu_224.dfn2b"),
    "dfn-vit-h": Backbone("vit_huge_patch14_clip_224.dfn5b"),
    "dfn-vit-h-378px": Backbone("vit_huge_patch14_clip_378.dfn5b"),
    "ijepa-vit-h": Backbone("vit_huge_patch14_gap_224.in22k_ijepa"),
    "eva02-vit-l": Backbone("eva02_large_patch14_clip_224.merged2b", **_PLAIN),
    "dinov2-vit-l": Backbone("vit_large_patch14_reg4_dinov2.lvd142m", {"img_size": 224}),
    # the dense evaluations' reference backbone: Leopart starts from DINO ViT-S/16 (OTHER-METHODS.md section 1)
    "dino-vit-s": Backbone("vit_small_patch16_224.dino"),
    "dino-vit-b8": Backbone("vit_base_patch8_224.dino"),
    # NeCo's published start point (NECO-AND-GRAM.md A2): DINOv2 ViT-B/14 without registers, 518 px
    "dinov2-vit-b14": Backbone("vit_base_patch14_dinov2.lvd142m"),
    # a small ViT for CPU runs and tests, random weights only: 64 px, 8 px patches, width 96, 4 blocks
    "tiny": Backbone(
        "vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}
    ),
}


def backbone(name: str) -> Backbone:
    """A registered name, or any timm model id (a plain timm ViT gets the soft-capped student)."""
    if name in BACKBONES:
        return BACKBONES[name]
    if timm.is_model(name.split(".")[0]):
        return Backbone(name)
    raise ValueError(f"unknown backbone {name!r}: neither a registered name ({', '.join(BACKBONES)}) nor a timm id")


@dataclass(frozen=True)
class ImageConfig:
    """What the backbone's inputs look like (from its pretrained config and its patch embedding)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str
    patch_size: int
    prefix_tokens: int

    @property
    def grid(self) -> int:
        """Patches per side (the whole patches: 384 px at p = 14 leaves 6 px uncovered)."""
        return self.size // self.patch_size

    @property
    def tokens(self) -> int:
        return self.prefix_tokens + self.grid**2

    @property
    def eval_resize(self) -> int:
        """The short side before the centre crop of timm's eval transform: floor(S / crop_pct)."""
        return math.floor(self.size / self.crop_pct)


def image_config(model: nn.Module) -> ImageConfig:
    """The image config of a built timm model."""
    cfg = model.pretrained_cfg
    size = model.patch_embed.img_size
    patch = model.patch_embed.patch_size
    if size[0] != size[1] or patch[0] != patch[1]:
        raise ValueError(f"square images and patches only, got img_size {size} and patch_size {patch}")
    return ImageConfig(
        size=int(size[0]),
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        patch_size=int(patch[0]),
        prefix_tokens=int(model.num_prefix_tokens),
    )


def create_model(name: str, weights: str | Path = "pretrained", **kwargs: Any) -> nn.Module:
    """The backbone as timm builds it (``num_classes=0``), with ``weights``: "pretrained" (timm's
    hub), "random", or a local file. A hub that cannot be reached is a ``WeightsError``."""
    entry = backbone(name)
    args = {"num_classes": 0, **entry.kwargs, **kwargs}
    if weights == "random":
        return timm.create_model(entry.timm_id, pretrained=False, **args)
    if weights == "pretrained":
        try:
            return timm.create_model(entry.timm_id, pretrained=True, **args)
        except Exception as exc:
            reason = exception_line(exc, 200)
            raise WeightsError(
                f"{name}: pretrained weights of {entry.timm_id} could not be loaded ({reason}); "
                "pass --weights FILE (a safetensors file or a timm checkpoint) or --weights random"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(
            f"{name}: weights file {path} does not exist (--weights takes a file, 'pretrained' or 'random')"
        )
    # custom_load False: the file is a torch state dict even where the hub's weights are JAX .npz
    # (augreg ViTs); timm >= 1.0.31 implies it for a file, older timm would hand it to the npz loader.
    overlay = {"file": str(path), "custom_load": False}
    try:
        return timm.create_model(entry.timm_id, pretrained=True, pretrained_cfg_overlay=overlay, **args)
    except Exception as exc:
        reason = exception_line(exc)
        raise WeightsError(f"{path}: not weights for {entry.timm_id} ({reason})") from None


def fingerprint(model: nn.Module) -> str:
    """Digest of the module tree and of every tensor's bytes (blake2b, 32 hex digits): what the
    feature and text-embedding caches are keyed by."""
    import hashlib

    import torch

    digest = hashlib.blake2b(repr(model).encode(), digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)  # a 0-dim tensor (CLIP's logit_scale) too
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
