"""Text towers (fastloc/models/text.py): the pairings with the registry, one embedding space, the
harness's class embeddings and their cache. CPU, random weights, no download."""

from __future__ import annotations

import re

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import checkpoint_filter_fn

from fastloc.models import text
from fastloc.models.registry import BACKBONES, WeightsError, create_model
from fastloc.models.text import TEMPLATES, TEXT_TOWERS, NoTextTowerError, class_embeddings, load_text_tower

# registry ids that run GELU where open_clip tags the weights as trained with QuickGELU (the
# reference's ids, PATCHSEG.md section 10); their text towers follow the vision tower in use
GELU_RUNS_OF_QUICKGELU_WEIGHTS = {"dfn-vit-b", "dfn-vit-h", "dfn-vit-h-378px"}

NAMES = ["background", "tv monitor, television", "person in shirt, person"]  # as the harness's files


@pytest.mark.parametrize("backbone", list(TEXT_TOWERS))
def test_pairing_names_an_open_clip_model_of_the_same_vision_tower(backbone):
    model, tag = TEXT_TOWERS[backbone]
    assert (model, tag) in open_clip.list_pretrained()
    timm_id = BACKBONES[backbone].timm_id
    config = open_clip.get_model_config(model)
    assert ("quickgelu" in timm_id) == bool(config.get("quick_gelu", False)), (timm_id, model)
    tag_quick_gelu = open_clip.get_pretrained_cfg(model, tag).get("quick_gelu", False)
    assert (tag_quick_gelu != bool(config.get("quick_gelu"))) == (backbone in GELU_RUNS_OF_QUICKGELU_WEIGHTS)
    vision, timm_cfg = config["vision_cfg"], get_pretrained_cfg(timm_id)
    assert vision["image_size"] == timm_cfg.input_size[-1]
    if "timm_model_name" in vision:  # open_clip builds this image tower from timm itself
        assert vision["timm_model_name"] == timm_id.split(".")[0]
    else:
        assert f"patch{vision['patch_size']}_" in timm_id
    if timm_cfg.num_classes:  # the timm head is the CLIP projection
        assert timm_cfg.num_classes == config["embed_dim"]


def test_clip_vit_b_towers_share_one_image_embedding():
    """open_clip's ViT-B-16-quickgelu image tower, converted by timm's own open_clip filter into the
    registry's timm model, gives the same embedding: the text tower's space is the timm model's."""
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16-quickgelu").eval()
    with torch.no_grad():  # random, not init-like (norms at 1, biases at 0) weights: a swapped key shows
        for p in clip.visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    arch = BACKBONES["clip-vit-b"].timm_id.split(".")[0]
    with torch.device("meta"):  # no init: every tensor comes from open_clip (strict, assign)
        vit = timm.create_model(arch, pretrained=False, num_classes=512).eval()
    vit.load_state_dict(checkpoint_filter_fn(clip.state_dict(), vit), assign=True)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = clip.encode_image(image)
        torch.testing.assert_close(vit(image), want, rtol=1e-4, atol=1e-5)
        for block in vit.blocks:  # the GELU twin (vit_base_patch16_clip_224) is another function
            block.mlp.act = torch.nn.GELU()
        assert not torch.allclose(vit(image), want, rtol=1e-2, atol=1e-3)
        assert clip.encode_text(open_clip.tokenize(["a photo of a dog."])).shape == want.shape


def harness(net, tokenize, class_file_lines, templates):
    """NACLIP's lines, transcribed: get_cls_idx (naclip.py:178-189) and the query features (:33-41)."""
    class_names, class_indices = [], []
    for idx in range(len(class_file_lines)):
        names_i = class_file_lines[idx].split(", ")
        class_names += names_i
        class_indices += [idx for _ in range(len(names_i))]
    class_names = [item.replace("\n", "") for item in class_names]
    query_features = []
    with torch.no_grad():
        for qw in class_names:
            query = tokenize([temp(qw) for temp in templates])
            feature = net.encode_text(query)
            feature /= feature.norm(dim=-1, keepdim=True)
            feature = feature.mean(dim=0)
            feature /= feature.norm()
            query_features.append(feature.unsqueeze(0))
    return torch.cat(query_features, dim=0), torch.tensor(class_indices)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_text_tower("tiny", "random")


def test_class_embeddings_are_the_harness_computation(tiny, tmp_path):
    tower, tokenizer = tiny
    assert len(TEMPLATES) == 80
    embeddings, query_class = class_embeddings(tower, tokenizer, NAMES, cache_dir=tmp_path)
    want, want_class = harness(tower, tokenizer, NAMES, TEMPLATES)
    torch.testing.assert_close(embeddings, want, rtol=0, atol=0)
    assert torch.equal(query_class, want_class) and query_class.tolist() == [0, 1, 1, 2, 2]
    assert embeddings.shape == (5, 96) and embeddings.dtype == torch.float32
    # the tiny tower's embeddings have the width of the registry's tiny ViT
    assert create_model("tiny", "random").num_features == embeddings.shape[1]


def test_class_embeddings_are_cached_by_tower_names_and_templates(tiny, tmp_path, monkeypatch):
    tower, tokenizer = tiny
    templates = ["a photo of a {}.", lambda c: f"a sketch of the {c}."]  # format strings or open_clip's lambdas
    first = class_embeddings(tower, tokenizer, NAMES, templates, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    calls = []
    monkeypatch.setattr(text, "encode_queries", lambda *args: calls.append(args) or pytest.fail("not read"))
    same = ["a photo of a {}.", "a sketch of the {}."]
    second = class_embeddings(tower, tokenizer, NAMES, same, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and not calls
    monkeypatch.undo()
    misses = [(NAMES[:2], same), (NAMES, same[:1])]
    for names, temps in misses:
        class_embeddings(tower, tokenizer, names, temps, cache_dir=tmp_path)
    saved = tower.text_projection.detach().clone()
    with torch.no_grad():
        tower.text_projection.add_(1.0)  # other weights, other embeddings
    try:
        changed = class_embeddings(tower, tokenizer, NAMES, same, cache_dir=tmp_path)
    finally:
        with torch.no_grad():
            tower.text_projection.copy_(saved)
    assert not torch.allclose(changed[0], first[0])
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_tiny_tower_weights_file(tiny, tmp_path):
    tower, tokenizer = tiny
    path = tmp_path / "text.safetensors"
    save_file(tower.state_dict(), str(path))
    loaded, _ = load_text_tower("tiny", path)
    tokens = tokenizer(["a photo of a tv monitor."])
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), tower.encode_text(tokens))
    save_file({"token_embedding.weight": torch.zeros(3, 4)}, str(tmp_path / "bad.safetensors"))
    for weights in ("pretrained", tmp_path / "bad.safetensors", tmp_path / "missing.safetensors"):
        with pytest.raises(WeightsError) as info:
            load_text_tower("tiny", weights)
        assert "\n" not in str(info.value)


def test_backbone_without_text_tower_is_one_clear_line():
    with pytest.raises(NoTextTowerError) as info:
        load_text_tower("dinov2-vit-b", "random")
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert re.match(r"dinov2-vit-b: no text tower", message) and "clip-vit-b" in message and "tiny" in message
    assert set(text.text_backbones()) <= set(BACKBONES)
