"""Dataset conversion to WebDataset shards (format: shards/README.md).

``convert.convert(cfg)`` writes a split, ``verify.verify(path)`` re-reads it,
``manifest.read_manifest(path)`` loads its description; the CLI is ``python -m fastloc.shard``.
Nothing is re-exported here, so each module name stays the module (and can be patched).
"""
