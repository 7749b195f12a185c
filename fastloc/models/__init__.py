"""Backbones and the modules built from them: registry, teacher, student, decoder, attention."""
