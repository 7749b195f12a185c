"""Patch-Seg: how local a backbone's patch features are (``python -m fastloc.probe``)."""
