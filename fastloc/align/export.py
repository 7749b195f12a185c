"""``python -m fastloc.align export RUN``: the aligned encoder as a safetensors file timm loads.

The file holds the objective's ``encoder()`` (MaskEmbed: the student's) under timm's own key
names, so timm loads it strictly; parameters it never used (SigLIP's attention-pooling head) come
from a random initialization and are listed in the metadata. The metadata also holds what plain
timm does not reproduce, the attention logits' soft cap and the final norm's eps (the reference
re-creates it), which ``fastloc.models.exported.load_exported`` restores: its
``forward_features`` equals the trained encoder's exactly.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save
from torch import nn

from fastloc.align.checkpoint import (
    BEST,
    Checkpointer,
    CheckpointError,
    config_differences,
    config_fingerprint,
    from_plain,
    load,
    load_objective,
)
from fastloc.align.config import OBJECTIVES
from fastloc.align.objective import ObjectiveConfig
from fastloc.cli import check_writable
from fastloc.files import write_atomically
from fastloc.models.attention import SoftCapAttention
from fastloc.models.registry import backbone, create_model


def method_config(run_dir: Path) -> ObjectiveConfig:
    """The run's method, from its config.json: the registered objective config with its fields
    (test_align_objective.py keeps those distinct); a ``CheckpointError`` when none fits."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {run_dir} is not a run directory of python -m fastloc.align")
    try:
        method = json.loads(path.read_text())["config"]["method"]
        kind = next((kind for kind in OBJECTIVES if {f.name for f in fields(kind)} == set(method)), None)
        if kind is None:
            raise ValueError("its method is no registered objective's")
        return from_plain(kind, method)
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, not this version's, no registered objective's
        raise CheckpointError(f"{path}: not the config of an alignment run ({type(exc).__name__}: {exc})") from None


def export(run_dir: Path, which: Literal["best", "last"] = "best", out: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    cfg = method_config(run_dir)
    if cfg.encoder_in_checkpoint():
        cfg = replace(cfg, weights="random")  # the student's weights come from the checkpoint
    path = run_dir / BEST if which == "best" else next(iter(Checkpointer(run_dir).steps()), None)
    if path is None or not path.is_file():
        raise CheckpointError(f"{run_dir}: no {which} checkpoint ({BEST if which == 'best' else 'ckpt-*.pt'})")
    out = Path(out) if out else run_dir / f"encoder-{which}.safetensors"
    check_writable("--out", out.parent)
    state = load(path)
    _check_method(path, state, cfg)
    torch.manual_seed(run_seed(run_dir))  # a frozen random encoder is rebuilt as the run built it
    objective = OBJECTIVES[type(cfg)](cfg)
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
        "backbone": cfg.backbone,  # the registry name: the zero-shot readout finds the paired text tower by it
        "timm_id": entry.timm_id,
        "timm_kwargs": entry.kwargs,
        "soft_cap": next((m.cap for m in encoder.modules() if isinstance(m, SoftCapAttention)), None),
        "norm_eps": _final_norm(encoder).eps,
        "untrained": untrained,
        "checkpoint": str(path),
        "step": int(state["step"]),
        **objective.export_metadata(),
    }
    write_atomically(out, save(tensors, metadata={"fastloc": json.dumps(meta)}))
    objective.export_parts(out, {"backbone": cfg.backbone, "checkpoint": str(path), "step": int(state["step"])})
    return out


def run_seed(run_dir: Path) -> int:
    """The run's --run.seed, from its config.json (``method_config`` has read it)."""
    return int(json.loads((Path(run_dir) / "config.json").read_text())["config"]["run"]["seed"])


def _check_method(path: Path, state: dict[str, Any], cfg: ObjectiveConfig) -> None:
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
