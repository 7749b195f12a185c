"""The probed backbone: a registered name, a timm id or an aligned export; pruned and fingerprinted.

The fingerprint (a digest of every parameter and buffer, and of the module tree, which holds the
norm eps and the soft-capped attention of an export) keys the feature cache: other weights are
other features, whatever the name says.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from torch import nn

from fastloc.models.exported import is_export, load_exported
from fastloc.models.registry import ImageConfig, create_model, image_config


def load_backbone(name: str, weights: str, skip_blocks: int = 0) -> nn.Module:
    """The backbone in eval mode, its last ``skip_blocks`` blocks dropped (the final norm kept)."""
    if is_export(name):
        if weights != "pretrained":
            raise ValueError(f"{name} is an aligned export, which holds its own weights: leave --weights out")
        model = load_exported(Path(name))
    else:
        model = create_model(name, weights)
    depth = len(model.blocks)
    if not 0 <= skip_blocks < depth:
        raise ValueError(f"--skip-blocks {skip_blocks}: {name} has {depth} blocks, so it must be in [0, {depth - 1}]")
    if skip_blocks:
        # timm keeps blocks[: max index + 1] and, with prune_norm=False, the final norm (PATCHSEG.md section 4)
        model.prune_intermediate_layers(indices=[depth - skip_blocks - 1], prune_norm=False, prune_head=True)
    return model.eval()


def file_tag(path: str) -> str:
    """A file's stem and a short digest of its resolved path, for run directory names: the
    ``encoder-best.safetensors`` of two align runs must not share one run directory."""
    resolved = str(Path(path).expanduser().resolve())
    digest = hashlib.blake2b(resolved.encode(), digest_size=4).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", Path(path).stem).lstrip(".") or "weights"
    return f"{stem}-{digest}"


def backbone_tag(name: str, weights: str) -> str:
    """The backbone part of a default run directory name: a registered name or timm id as given
    ('/' made '_'), an export by ``file_tag``; a weights file (not pretrained or random) adds its
    ``file_tag``, so other weights of one architecture get other run directories."""
    tag = file_tag(name) if name.endswith(".safetensors") else name.replace("/", "_")
    if weights not in ("pretrained", "random"):
        tag += f"-w{file_tag(weights)}"
    return tag


def describe(name: str, weights: str, model: nn.Module) -> dict:
    """What the result JSON says of the backbone."""
    image: ImageConfig = image_config(model)
    timm_id = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    return {
        "name": name,
        "weights": "export" if is_export(name) else weights,
        "timm_id": timm_id,
        "blocks": len(model.blocks),
        "width": int(model.num_features),
        "image": {
            "size": image.size,
            "patch_size": image.patch_size,
            "prefix_tokens": image.prefix_tokens,
            "mean": image.mean,
            "std": image.std,
        },
    }
