"""Dataset sources: one module per dataset family, each with its subcommand config."""

from fastloc.shard.sources.ade20k import Ade20kConfig
from fastloc.shard.sources.cityscapes import CityscapesConfig
from fastloc.shard.sources.coco import CocoConfig
from fastloc.shard.sources.context import ContextConfig
from fastloc.shard.sources.imagenet import ImagenetConfig
from fastloc.shard.sources.synthetic import SyntheticConfig
from fastloc.shard.sources.voc import VocConfig

# subcommand name -> config class (each config's .source() builds the source)
CONVERTERS = {
    "synthetic": SyntheticConfig,
    "coco": CocoConfig,
    "ade20k": Ade20kConfig,
    "imagenet": ImagenetConfig,
    "voc": VocConfig,
    "context": ContextConfig,
    "cityscapes": CityscapesConfig,
}
