"""Dataset conversion to WebDataset shards (format: shards/README.md).

``convert(cfg)`` writes a split, ``verify(path)`` re-reads it, ``read_manifest(path)`` loads its
description. The CLI is ``python -m fastloc.shard``.
"""

from fastloc.shard.convert import convert
from fastloc.shard.errors import ConversionError, SampleError
from fastloc.shard.manifest import read_manifest
from fastloc.shard.verify import verify

__all__ = ["convert", "verify", "read_manifest", "ConversionError", "SampleError"]
