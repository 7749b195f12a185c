"""Which open_clip text tower goes with which registry backbone (the zero-shot readouts check a
backbone against it without importing open_clip; ``fastloc.models.text`` builds the towers).

A pairing names the open_clip (model, pretrained tag) whose image tower is the registry's timm
model, so both towers embed into one space; QuickGELU goes with the timm id.
"""

from __future__ import annotations

# backbone (registry name) -> (open_clip model, pretrained tag), as open_clip.list_pretrained() spells them
TEXT_TOWERS: dict[str, tuple[str, str]] = {
    "clip-vit-b": ("ViT-B-16-quickgelu", "openai"),
    "clip-vit-l": ("ViT-L-14-quickgelu", "openai"),
    "clip-vit-l-336": ("ViT-L-14-336-quickgelu", "openai"),
    "clip-vit-l-336px": ("ViT-L-14-336-quickgelu", "openai"),
    "openclip-vit-b": ("ViT-B-16", "laion2b_s34b_b88k"),
    "openclip-vit-l": ("ViT-L-14", "laion2b_s32b_b82k"),
    "openclip-vit-h": ("ViT-H-14", "laion2b_s32b_b79k"),
    # the registry's DFN B/16 and H/14 ids run GELU though open_clip tags the weights QuickGELU;
    # the text tower follows the vision tower in use (open_clip warns of the mismatch on load)
    "dfn-vit-b": ("ViT-B-16", "dfn2b"),
    "dfn-vit-l": ("ViT-L-14-quickgelu", "dfn2b"),
    "dfn-vit-h": ("ViT-H-14", "dfn5b"),
    "dfn-vit-h-378px": ("ViT-H-14-378", "dfn5b"),
    "siglip-vit-b": ("ViT-B-16-SigLIP", "webli"),
    "siglip-vit-b-256px": ("ViT-B-16-SigLIP-256", "webli"),
    "siglip-vit-b-384px": ("ViT-B-16-SigLIP-384", "webli"),
    "siglip-vit-so400m": ("ViT-SO400M-14-SigLIP", "webli"),
    "siglip-vit-so400m-384": ("ViT-SO400M-14-SigLIP-384", "webli"),
    "siglip-vit-so400m-384px": ("ViT-SO400M-14-SigLIP-384", "webli"),
    "eva02-vit-b": ("EVA02-B-16", "merged2b_s8b_b131k"),
    "eva02-vit-l": ("EVA02-L-14", "merged2b_s4b_b131k"),
}

TINY = "tiny"  # the registry's tiny ViT, paired with a tiny random text tower of its width (text.py)


class NoTextTowerError(ValueError):
    """The backbone has no paired text tower."""


def text_backbones() -> list[str]:
    """The backbones with a text tower."""
    return [*TEXT_TOWERS, TINY]
