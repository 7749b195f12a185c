"""The main job in miniature (``python -m fastloc.demo``): pre-train, probe, align, probe again."""
