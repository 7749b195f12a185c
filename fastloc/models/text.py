"""Text towers from open_clip, paired with the timm vision towers of the backbone registry
(``fastloc.models.pairing``: which tower goes with which backbone; re-exported here). Class embeddings are
the zero-shot harness's (ZEROSHOT-SEG.md section 3): per query, every template filled, encoded,
L2-normalised, averaged and normalised again; cached on disk by tower, tokenizer, names, templates.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fastloc.cli import exception_line
from fastloc.models.pairing import TEXT_TOWERS, TINY, NoTextTowerError, text_backbones
from fastloc.models.registry import WeightsError, fingerprint

__all__ = ["TEXT_TOWERS", "TINY", "NoTextTowerError", "class_embeddings", "load_text_tower", "text_backbones"]

# the registry's "tiny" ViT (64 px, 8 px patches, width 96, 4 blocks) with a tiny random text tower:
# embeddings of the tiny ViT's width, open_clip's default tokenizer with a short context
TINY_CONTEXT = 32
TINY_CFG: dict[str, Any] = {
    "embed_dim": 96,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 96, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": TINY_CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

TEMPLATES = OPENAI_IMAGENET_TEMPLATES  # the 80 OpenAI ImageNet templates the harness uses
Template = str | Callable[[str], str]  # "a photo of a {}." or open_clip's lambda c: f"a photo of a {c}."


def load_text_tower(backbone: str, weights: str | Path = "pretrained") -> tuple[nn.Module, Callable]:
    """The text tower paired with ``backbone`` (an open_clip model in eval mode, its image tower
    dropped: use ``encode_text``) and its tokenizer. ``weights``: "pretrained" (open_clip's hub
    download), "random", or a local file (an open_clip state dict, whole or text side only)."""
    if backbone not in TEXT_TOWERS and backbone != TINY:
        raise NoTextTowerError(
            f"{backbone}: no text tower is paired with it; backbones with one: {', '.join(text_backbones())}"
        )
    if backbone == TINY:
        name, tag, overrides = "ViT-B-16", None, TINY_CFG  # ViT-B-16 only as the base config, all of it overridden
        if weights == "pretrained":
            raise WeightsError("tiny: random weights only (--weights random or a file)")
    else:
        (name, tag), overrides = TEXT_TOWERS[backbone], {}
    if weights not in ("pretrained", "random") and not Path(weights).is_file():
        raise WeightsError(f"{backbone}: weights file {weights} does not exist (a file, 'pretrained' or 'random')")
    # the tokenizer first: SigLIP's needs transformers and a hub download, so it may fail early
    try:
        tokenizer = open_clip.get_tokenizer(name, context_length=TINY_CONTEXT if backbone == TINY else None)
    except (ImportError, OSError) as exc:
        raise WeightsError(
            f"{backbone}: the tokenizer of open_clip {name} could not be made ({exception_line(exc)})"
        ) from None
    if weights == "pretrained":
        try:
            model = open_clip.create_model(name, pretrained=tag)
        except Exception as exc:
            raise WeightsError(
                f"{backbone}: pretrained weights of open_clip {name} ({tag}) could not be loaded "
                f"({exception_line(exc)}); pass a weights file or 'random'"
            ) from None
    else:
        model = open_clip.create_model(name, **copy.deepcopy(overrides))
    model.visual = nn.Identity()  # the image side is the registry's timm model: keep the text side only
    if weights not in ("pretrained", "random"):
        load_text_weights(model, Path(weights), backbone)
    return model.eval(), tokenizer


def load_text_weights(model: nn.Module, path: Path, backbone: str) -> None:
    """Load an open_clip state dict (safetensors or torch; image tower keys ignored) strictly."""
    try:
        state = open_clip.factory.load_state_dict(str(path))
        state = {k: v for k, v in state.items() if not k.startswith("visual.")}
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not text tower weights for {backbone} ({exception_line(exc)})") from None


def split_queries(class_names: Sequence[str]) -> tuple[list[str], list[int]]:
    """The harness's class-name lines: synonyms split on ", ", each its own query (``naclip.py:178-189``)."""
    queries, classes = [], []
    for index, line in enumerate(class_names):
        names = [name.replace("\n", "") for name in line.split(", ")]
        queries += names
        classes += [index] * len(names)
    return queries, classes


def fill(template: Template, query: str) -> str:
    return template(query) if callable(template) else template.format(query)


@torch.no_grad()
def encode_queries(tower: nn.Module, tokenizer: Callable, queries: Sequence[str], templates: Sequence[Template]):
    """[Q, D] float32: per query, all templates encoded, L2 per template, mean, L2 (``naclip.py:33-41``)."""
    device = next(tower.parameters()).device
    rows = []
    for query in queries:
        tokens = tokenizer([fill(t, query) for t in templates]).to(device)  # [T, L]
        feature = tower.encode_text(tokens).float()  # [T, D]
        feature = feature / feature.norm(dim=-1, keepdim=True)
        feature = feature.mean(dim=0)
        rows.append(feature / feature.norm())
    return torch.stack(rows).cpu()


def class_embeddings(
    tower: nn.Module,
    tokenizer: Callable,
    class_names: Sequence[str],
    templates: Sequence[Template] = TEMPLATES,
    cache_dir: Path | None = Path("runs/text/cache"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query embeddings [Q, D] (float32, L2-normalised, on the host) and each query's class [Q]
    (int64: the line of ``class_names``). Read from ``cache_dir`` when there (None: no cache)."""
    queries, classes = split_queries(class_names)
    rendered = [fill(t, "{}") for t in templates]
    key = {
        "tower": fingerprint(tower),  # architecture and weights
        "tokenizer": [type(tokenizer).__qualname__, getattr(tokenizer, "context_length", None)],
        "names": list(class_names),
        "templates": rendered,
    }
    text = json.dumps(key, sort_keys=True)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"text-{hashlib.blake2b(text.encode(), digest_size=8).hexdigest()}.safetensors"
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if f.metadata().get("key") == text:
                    return f.get_tensor("embeddings"), f.get_tensor("query_class")
    embeddings = encode_queries(tower, tokenizer, queries, templates)
    query_class = torch.tensor(classes, dtype=torch.int64)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"embeddings": embeddings, "query_class": query_class}, str(tmp), metadata={"key": text})
        os.replace(tmp, path)
    return embeddings, query_class
