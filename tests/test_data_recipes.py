"""The recipe seam: a recipe with several views (multi-crop's shape) goes through the loader
unchanged, its views and boxes in the Batch, the boxes those drawn from ``sample_rng``."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest
import torch
from loader_data import LOADERS, run_epochs
from PIL import Image

from fastloc.data.config import SOLO, LoaderConfig
from fastloc.data.recipes import Recipe, Rrc, View
from fastloc.data.shards import open_shards
from fastloc.data.transforms import sample_rng

S, LOCAL = 32, 16


@dataclass(frozen=True, kw_only=True)
class TwoCrops(Recipe):
    """A global crop at the loader's size (with the label map) and a local one at ``local``."""

    views_per_sample = 2
    local: int = LOCAL
    crop: Rrc = field(default_factory=lambda: Rrc(scale=(0.3, 1.0)))

    def views(self, rng, h, w, size, label):
        out = []
        for side in (size, self.local):
            draw = self.crop.draw(rng, h, w)
            mapped = None if label is None or side != size else self.crop.label(label, side, draw)
            out.append(View(self.crop.window(h, w, side, draw), mapped, (side, draw)))
        return tuple(out)

    def image(self, image, size, draw):
        side, crop = draw
        return self.crop.image(image, side, crop)


def test_a_two_view_recipe_yields_its_views_and_boxes(synthetic):
    cfg = LoaderConfig(shards=synthetic, batch_size=8, size=S, recipe=TwoCrops(), normalize=False, seed=4, workers=0)
    batches = run_epochs(LOADERS["torch"](cfg, SOLO), 2)
    shards = open_shards(synthetic)
    for t, batch in enumerate(batches):
        (local,) = batch.views
        assert batch.images.shape == (8, 3, S, S) and local.shape == (8, 3, LOCAL, LOCAL)
        assert batch.labels.shape == (8, S, S) and batch.boxes.shape == (8, 2, 4)
        for slot, g in enumerate(batch.index.tolist()):
            rng = sample_rng(cfg.seed, t // (len(batches) // 2), g)  # two epochs
            draws = [cfg.recipe.crop.draw(rng, *_size(shards, g)) for _ in range(2)]
            boxes = [[d.top, d.left, d.top + d.height, d.left + d.width] for d in draws]
            assert batch.boxes[slot].tolist() == boxes
            image = _image(shards, g)
            assert torch.equal(batch.images[slot], cfg.recipe.crop.image(image, S, draws[0]))
            assert torch.equal(local[slot], cfg.recipe.crop.image(image, LOCAL, draws[1]))
    with pytest.raises(ValueError, match="one view per sample"):
        LOADERS["dali-cpu"](cfg, SOLO)


def _image(shards, g: int) -> Image.Image:
    _, _, data = shards.read(g, ("jpg",))
    return Image.open(io.BytesIO(data["jpg"])).convert("RGB")


def _size(shards, g: int) -> tuple[int, int]:
    image = _image(shards, g)
    return image.height, image.width


@dataclass(frozen=True, kw_only=True)
class HostOnly(Rrc):
    """A recipe whose pixels DALI cannot make (as mmseg's photometric distortion)."""

    dali = False


def test_a_host_only_recipe_takes_the_torch_twin_and_the_dali_graph_refuses_it(synthetic):
    from fastloc.data.loader import make_loader
    from fastloc.data.torch_loader import TorchLoader

    cfg = LoaderConfig(shards=synthetic, batch_size=8, size=S, recipe=HostOnly(), loader="gpu", workers=0)
    loader = make_loader(cfg, SOLO)  # asked for DALI on the GPU: the twin runs the recipe instead
    assert isinstance(loader, TorchLoader) and next(iter(loader)).images.shape == (8, 3, S, S)
    loader.close()
    with pytest.raises(ValueError, match="one view per sample of a DALI recipe"):
        LOADERS["dali-cpu"](cfg, SOLO)
