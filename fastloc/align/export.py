"""``python -m fastloc.align export RUN``: the aligned encoder as a safetensors file timm loads.

The file holds the student's encoder (all blocks, the re-trained final norm) under timm's own key
names, so ``timm.create_model(id, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(
file=PATH, custom_load=False))`` loads it strictly; parameters the student never used (SigLIP's
attention-pooling head) come from a random initialization and are listed in the metadata. Two
things a plain timm model does not reproduce, both recorded in the metadata: the soft cap of the
attention logits (30 * tanh(l / 30), which timm's attention has no option for) and the final
norm's eps (the reference re-creates it: 1e-5 for the ViT family, where timm may build 1e-6).
``fastloc.models.exported.load_exported`` restores both, so its ``forward_features`` equals the
student's exactly; plain timm differs by the cap (logits above ~10) and the eps.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import save
from torch import nn

from fastloc.align.checkpoint import (
    BEST,
    Checkpointer,
    CheckpointError,
    config_differences,
    config_fingerprint,
    load,
    load_objective,
)
from fastloc.align.maskembed import MaskEmbed, MaskEmbedConfig
from fastloc.align.masks import MaskConfig
from fastloc.cli import check_writable
from fastloc.files import write_atomically
from fastloc.models.registry import backbone, create_model


def method_config(run_dir: Path) -> MaskEmbedConfig:
    """The run's method, from its config.json (a ``CheckpointError`` when there is none that fits)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {run_dir} is not a run directory of python -m fastloc.align")
    try:
        method = dict(json.loads(path.read_text())["config"]["method"])
        method["masks"] = MaskConfig(**method["masks"])
        return MaskEmbedConfig(**method)
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not the config of this version
        raise CheckpointError(f"{path}: not the config of an alignment run ({type(exc).__name__}: {exc})") from None


def export(run_dir: Path, which: Literal["best", "last"] = "best", out: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    cfg = replace(method_config(run_dir), weights="random")  # the student's weights come from the checkpoint
    path = run_dir / BEST if which == "best" else next(iter(Checkpointer(run_dir).steps()), None)
    if path is None or not path.is_file():
        raise CheckpointError(f"{run_dir}: no {which} checkpoint ({BEST if which == 'best' else 'ckpt-*.pt'})")
    out = Path(out) if out else run_dir / f"encoder-{which}.safetensors"
    check_writable("--out", out.parent)
    state = load(path)
    _check_method(path, state, cfg)
    objective = MaskEmbed(cfg)
    load_objective(objective, state["objective"])
    encoder = objective.encoder()
    trained = encoder.state_dict()
    skeleton = create_model(cfg.backbone, "random").state_dict()  # every key timm expects
    extra = sorted(set(trained) - set(skeleton))
    if extra:
        raise RuntimeError(f"the student has parameters timm's {backbone(cfg.backbone).timm_id} lacks: {extra[:5]}")
    untrained = sorted(set(skeleton) - set(trained))
    tensors = {k: (trained[k] if k in trained else skeleton[k]).contiguous() for k in skeleton}
    entry = backbone(cfg.backbone)
    meta = {
        "timm_id": entry.timm_id,
        "timm_kwargs": entry.kwargs,
        "soft_cap": cfg.soft_cap if entry.soft_cap else None,
        "norm_eps": _final_norm(encoder).eps,
        "untrained": untrained,
        "checkpoint": str(path),
        "step": int(state["step"]),
        "sigma": float(state["objective"]["sigma"]),
    }
    write_atomically(out, save(tensors, metadata={"fastloc": json.dumps(meta)}))
    return out


def _check_method(path: Path, state: dict[str, Any], cfg: MaskEmbedConfig) -> None:
    """The checkpoint was saved by this run's method (a checkpoint copied from another run is refused)."""
    saved = {k: v for k, v in state["config"].items() if k.startswith("method.") and k != "method.weights"}
    here = {f"method.{k}": v for k, v in config_fingerprint(cfg).items() if k != "weights"}
    differ = config_differences(saved, here)
    if differ:
        shown = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in differ.items())
        raise CheckpointError(f"{path} was saved by another method than {path.parent}/config.json says ({shown})")


def _final_norm(encoder: nn.Module) -> nn.Module:
    """The student's re-created final norm: ``norm``, or ``fc_norm`` where ``norm`` is Identity (BEiT)."""
    norm = encoder.norm
    return encoder.fc_norm if isinstance(norm, nn.Identity) else norm
