"""fastloc: locality alignment (MaskEmbed) and Patch-Seg probing for vision transformers."""

__version__ = "0.1.0"
