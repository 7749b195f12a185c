"""Patch-Seg: how local a backbone\x27s patch features are (``python -m fastloc.probe``)."""
