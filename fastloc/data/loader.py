"""``make_loader(cfg, placement)``: the loader for this machine and rank. Both yield the same ``Batch``es.

``loader="gpu"`` (the default when CUDA is present) is the DALI pipeline, decoding on the GPU;
``"cpu"`` is its torch twin (PIL in DataLoader workers). The DALI pipeline also runs with CPU
operators (``DaliLoader(cfg, placement, device="cpu")``): that is how the tests compare the two.
"""

from __future__ import annotations

import torch

from fastloc.data.config import LoaderConfig, Placement
from fastloc.data.stream import EpochLoader


def make_loader(cfg: LoaderConfig, placement: Placement) -> EpochLoader:
    """``placement``: a ``Placement`` or the job's ``Runtime`` (its rank and world size)."""
    kind = cfg.loader
    if kind == "auto":
        kind = "gpu" if torch.cuda.is_available() else "cpu"
    if kind == "gpu" and cfg.recipe.dali:
        from fastloc.data.dali_loader import DaliLoader

        return DaliLoader(cfg, placement, device="gpu")
    from fastloc.data.torch_loader import TorchLoader

    return TorchLoader(cfg, placement)
