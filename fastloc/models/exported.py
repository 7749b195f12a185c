"""Reading an encoder written by ``python -m fastloc.align export``: a safetensors file under
timm's key names, with fastloc's metadata (the timm id and kwargs, the soft cap, the final
norm's eps). ``load_exported`` restores what plain timm would not, so its ``forward_features``
equals the trained student's exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from fastloc.models.attention import soft_cap


def is_export(name: str) -> bool:
    """A file written by ``python -m fastloc.align export``."""
    path = Path(name)
    if not (name.endswith(".safetensors") and path.is_file()):
        return False
    with safe_open(str(path), "pt") as f:
        return "fastloc" in (f.metadata() or {})


def exported_metadata(path: Path) -> dict[str, Any]:
    """The fastloc metadata of an exported file."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["fastloc"])


def load_exported(path: Path) -> nn.Module:
    """A timm model loaded from an exported file, with the trained soft cap and norm eps restored."""
    import timm

    meta = exported_metadata(path)
    model = timm.create_model(
        meta["timm_id"],
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay={"file": str(path), "custom_load": False},  # a state dict, never timm's .npz
        **meta["timm_kwargs"],
    )
    if meta["soft_cap"] is not None:
        soft_cap(model, meta["soft_cap"])
    for name in ("norm", "fc_norm"):
        norm = getattr(model, name, None)
        if norm is not None and hasattr(norm, "eps"):
            norm.eps = meta["norm_eps"]
    return model.eval()
