"""``make_loader(cfg)``: the loader for this machine. Both yield the same ``Batch``es.

``device="gpu"`` (the default when CUDA is present) is the DALI pipeline, decoding on the GPU;
``device="cpu"`` is its torch twin (PIL in DataLoader workers). The DALI pipeline also runs
with CPU operators (``DaliLoader(cfg, device="cpu")``): that is how the tests compare the two.
"""

from __future__ import annotations

import torch

from fastloc.data.config import LoaderConfig
from fastloc.data.stream import EpochLoader


def make_loader(cfg: LoaderConfig) -> EpochLoader:
    device = cfg.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        from fastloc.data.dali_loader import DaliLoader

        return DaliLoader(cfg, device="gpu")
    from fastloc.data.torch_loader import TorchLoader

    return TorchLoader(cfg)
