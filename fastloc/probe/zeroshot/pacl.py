"""PACL's zero-shot readout (OTHER-METHODS.md section 3): per patch, the trained embedder's
compatibility with each class embedding, cos(e_v(token), t_c), the tokens the image tower's patch
tokens after its final norm; argmax and bilinear upsampling follow in the harness.

The embedder maps normed patch tokens into the text space as a CLIP projection head does, so a
timm model whose ``head`` is the embedder reads out PACL through the harness's plain ``clip``
readout (``readout.dense_tokens``: ``head(norm(x))``, L2-normalised). The embedder leaves a run
as a small safetensors file beside the exported encoder (python -m fastloc.align export: ``Pacl.export_parts``),
read back by ``load_embedder`` (``--head FILE`` of python -m fastloc.probe zeroshot).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from fastloc.align.pacl_ops import Embedder
from fastloc.files import write_atomically
from fastloc.probe.zeroshot.readout import dense_tokens

META = "pacl_embedder"  # the metadata key of an embedder file (an encoder export's is "fastloc")


def with_embedder(model: nn.Module, embedder: Embedder) -> nn.Module:
    """``model`` (a timm ViT of the embedder's input width) with the embedder as its ``head``, so
    that ``dense_tokens(model, images, "clip")`` is PACL's unit patch embeddings."""
    if model.num_features != embedder.linear.in_features:
        raise ValueError(
            f"the embedder takes width {embedder.linear.in_features}; the backbone's tokens have {model.num_features}"
        )
    model.head = embedder
    return model


@torch.no_grad()
def patch_logits(model: nn.Module, embedder: Embedder, images: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """PACL's per-patch class logits [B, Q, h, w] (cosines, float32) of normalised ``images``
    [B, 3, H, W] (sides a multiple of the patch) against class embeddings [Q, d]."""
    tokens = dense_tokens(with_embedder(model, embedder), images, "clip")  # [B, h, w, d], unit
    queries = nn.functional.normalize(embeddings.float(), dim=-1).to(tokens.device)
    return (tokens.float() @ queries.T).permute(0, 3, 1, 2)


def save_embedder(embedder: Embedder, path: Path, source: dict) -> Path:
    """The embedder's weights and what rebuilds it (widths, activation) plus ``source`` (the run)."""
    act = "relu" if isinstance(embedder.mlp[1], nn.ReLU) else "gelu"
    meta = {
        "width": embedder.linear.in_features,
        "dim": embedder.linear.out_features,
        "activation": act,
        **source,
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in embedder.state_dict().items()}
    write_atomically(path, save(tensors, metadata={META: json.dumps(meta)}))
    return path


def is_embedder(path: Path) -> bool:
    """A file written by ``save_embedder``."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        return META in (f.metadata() or {})


def load_embedder(path: Path) -> Embedder:
    """The embedder of a ``save_embedder`` file, in eval mode."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get(META, "null") or "null")
    if meta is None:
        raise ValueError(f"{path}: not a PACL embedder file (python -m fastloc.align export of a PACL run writes one)")
    embedder = Embedder(meta["width"], meta["dim"], meta["activation"])
    embedder.load_state_dict(load_file(str(path)))
    return embedder.eval()
