"""fastloc against the reference repositories' own computations, on identical inputs, where issue 18
found seven departures that nothing named.

Each test holds a short transcription of what the reference's lines compute (written here, cited
by file and line; the references are not installed): iancovert/locality-alignment @ 092ed8e for
MaskEmbed and iancovert/patch-seg @ fc14f36 for Patch-Seg.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from fastloc.align.maskembed import MaskEmbed, MaskEmbedConfig
from fastloc.align.masks import MaskConfig, block_masks, sample_masks
from fastloc.cli import BadValue
from fastloc.models.decoder import Decoder
from fastloc.models.encoders import Student, reset_norm_eps
from fastloc.models.registry import backbone, create_model, image_config
from fastloc.probe.dense.hummingbird import DIFFERENCES
from fastloc.probe.heads import HeadShape, TransformerHead
from fastloc.probe.metrics import Evaluator, majority_prediction

TINY = MaskEmbedConfig(backbone="tiny", weights="random")  # 1 prefix token, 8 x 8 patches

# ---------------------------------------------------------------- MaskEmbed: the masked losses


def reference_masked_loss(kind: str, reconstruction, masked_preds, mask, training: bool = True) -> torch.Tensor:
    """scripts/train.py 907-918 (training step) and 1059-1070 (validation): mask [M * B, N] float
    (1 = kept) is left-padded over the prefix, with 0 for masked_mse in training and 1 otherwise;
    the mean runs over every element."""
    prefix = reconstruction.shape[1] - mask.shape[1]
    error = (reconstruction - masked_preds) ** 2
    if kind == "masked_mse":
        mask = F.pad(mask, (prefix, 0), value=0 if training else 1)
        return torch.mean((1 - mask).unsqueeze(-1) * error)
    mask = F.pad(mask, (prefix, 0), value=1)
    return torch.mean(mask.unsqueeze(-1) * error)


@pytest.mark.parametrize("kind", ["masked_mse", "unmasked_mse"])
def test_masked_losses_pad_the_prefix_as_the_references_training_step(kind):
    torch.manual_seed(0)
    objective = MaskEmbed(replace(TINY, loss=kind)).eval()
    torch.nn.init.normal_(objective.trainable.student.head.weight, std=0.05)  # the student's tokens matter
    x = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    masks = objective.sample(3, torch.Generator().manual_seed(2))  # [3, 3, 64]
    with torch.no_grad():
        got = objective.losses(x, masks).mean()
        views, full = objective.views(x, masks)
        target, pred = objective.targets(views), objective.trainable(full, masks)  # [9, 65, D] each
    flat = masks.flatten(0, 1).float()  # [M * B, N], rows b * M + m as the reference's repeat_interleave
    torch.testing.assert_close(got, reference_masked_loss(kind, pred, target, flat), rtol=1e-5, atol=0)
    # The reference's validation leaves masked_mse's prefix out; fastloc validates with the training
    # loss, larger by exactly the prefix tokens' share (the docstring of prefix_keep says so).
    prefix_share = ((pred - target)[:, :1] ** 2).sum() / pred.numel()
    validation = reference_masked_loss(kind, pred, target, flat, training=False)
    expected = got - prefix_share if kind == "masked_mse" else got
    torch.testing.assert_close(validation, expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- MaskEmbed: the samplers


def reference_block_masks(batch: int, side: int, target_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """locality_alignment/loss_utils.py 96-114 with no antithetical or null rows (the ablation's
    setting): rectangles of ones until the mean reaches target_ratio, written mask[x:x+w, y:y+h]."""
    masks = torch.zeros(batch, side * side)
    low, high = 16, int(target_ratio * side * side)
    for i in range(batch):
        mask = masks[i].view(side, side)
        while mask.mean() < target_ratio:
            area = rng.integers(low, high)
            aspect = rng.uniform(0.3, 1 / 0.3)
            width = min(int(math.sqrt(area / aspect)), side)
            height = min(int(area / width), side)
            x = rng.integers(0, side - width + 1)
            y = rng.integers(0, side - height + 1)
            mask[x : x + width, y : y + height] = 1
    return masks.numpy().astype(bool)


@pytest.mark.parametrize("side", [8, 14, 16])
def test_block_masks_are_the_references_rectangles_for_the_same_draws(side):
    for seed in range(5):
        got = block_masks(6, side, 0.4, np.random.default_rng(seed))
        expected = reference_block_masks(6, side, 0.4, np.random.default_rng(seed))
        assert np.array_equal(got, expected), f"seed {seed}: {(got != expected).sum()} of {got.size} patches differ"


def test_each_sampler_defaults_to_the_references_keep_ratio():
    """train.py 235-236: --bernoulli-mask-ratio 0.5 (keep iff u < 0.5, loss_utils.py 165) and
    --blockwise-mask-ratio 0.4; one keep_ratio field, None meaning each sampler's own."""
    bernoulli = MaskConfig(sampler="bernoulli", antithetical=False, null=False)
    got = sample_masks(bernoulli, 64, 14, torch.Generator().manual_seed(3))[:, 0]  # [64, 196]
    expected = torch.rand(64, 196, generator=torch.Generator().manual_seed(3)) < 0.5  # the same draws
    assert torch.equal(got, expected)
    block = MaskConfig(sampler="block", antithetical=False, null=False)
    seed = int(
        torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(4)).item()
    )  # the draw masks.py makes
    got = sample_masks(block, 4, 14, torch.Generator().manual_seed(4))[:, 0].numpy()
    assert np.array_equal(got, reference_block_masks(4, 14, 0.4, np.random.default_rng(seed)))
    assert (MaskConfig().ratio, bernoulli.ratio, block.ratio) == (None, 0.5, 0.4)
    assert replace(bernoulli, keep_ratio=0.25).ratio == 0.25


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_a_keep_ratio_outside_zero_one_is_refused_naming_the_option(value):
    with pytest.raises(BadValue, match=r"^--method\.masks\.keep-ratio must be in \(0, 1\]"):
        MaskConfig(sampler="bernoulli", keep_ratio=value).validate()


@pytest.mark.parametrize("value", [None, 1e-3, 0.5, 1.0])
def test_a_keep_ratio_in_zero_one_is_accepted(value):
    MaskConfig(sampler="block", keep_ratio=value).validate()


# ---------------------------------------------------------------- MaskEmbed: student norms and decoder

# The class of each family's final norm under timm 1.0.8, the reference's timm: a ViT's was
# partial(nn.LayerNorm, eps=1e-6) (vision_transformer.py 491), EVA02's and BEiT's timm's LayerNorm
# (eva.py 382, beit.py 293). The reference re-creates norms as type(norm)(D) (student_utils.py
# 22-25), so that class's default eps is what it trained with; timm >= 1.0.16 changed the ViT's.
FAMILY_NORM_TIMM_1_0_8 = {
    "clip-vit-b": nn.LayerNorm,
    "siglip-vit-b": nn.LayerNorm,
    "dinov2-vit-b": nn.LayerNorm,
    "eva02-vit-b": TimmLayerNorm,
    "beit-vit-b": TimmLayerNorm,
    "beitv2-vit-b": TimmLayerNorm,
}


def reference_decoder(encoder: nn.Module, norm_class, dim: int, qkv_bias, qk_norm) -> nn.Module:
    """scripts/train.py 349-370 and model_utils.py MaskEmbedDecoder (43-103): 2 timm Blocks with the
    student's heads, qkv bias and qk norm unless the config sets them, its reset norm's class
    (Identity for BEiT), act and MLP types; LayerScale 1e-6."""
    first = encoder.blocks[0]
    if qkv_bias is None:
        qkv_bias = first.attn.qkv.bias is not None
    if qk_norm is None:
        qk_norm = not isinstance(first.attn.q_norm, nn.Identity)
    norm = nn.Identity if isinstance(encoder.norm, nn.Identity) else norm_class
    decoder = nn.Module()
    decoder.pos_embed = nn.Parameter(torch.empty(1, encoder.patch_embed.num_patches + encoder.num_prefix_tokens, dim))
    decoder.blocks = nn.Sequential(
        *(
            Block(
                dim=dim,
                num_heads=first.attn.num_heads,
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                init_values=1e-6,
                norm_layer=norm,
                act_layer=type(first.mlp.act),
                mlp_layer=type(first.mlp),
            )
            for _ in range(2)
        )
    )
    decoder.norm, decoder.head = nn.LayerNorm(dim), nn.Linear(dim, dim)
    return decoder


def layout(module: nn.Module) -> list[tuple]:
    """Every submodule's name, type and eps, and every parameter's name and shape."""
    modules = [(n, type(m).__name__, getattr(m, "eps", None)) for n, m in module.named_modules() if n]
    return modules + [(n, tuple(p.shape)) for n, p in module.named_parameters()]


@pytest.mark.parametrize("name", list(FAMILY_NORM_TIMM_1_0_8))
def test_student_norms_and_decoder_are_the_references_per_backbone(name):
    entry, norm_class = backbone(name), FAMILY_NORM_TIMM_1_0_8[name]
    with torch.device("meta"):
        model = create_model(name, "random")
        reference_encoder = create_model(name, "random")
        dim, tokens = model.num_features, image_config(model).tokens
        student = Student(model, dim, 30.0 if entry.soft_cap else None)
        decoder = Decoder.for_student(
            model, dim, tokens, qkv_bias=entry.decoder_qkv_bias, qk_norm=entry.decoder_qk_norm
        )
        reference = reference_decoder(reference_encoder, norm_class, dim, entry.decoder_qkv_bias, entry.decoder_qk_norm)
    expected_eps = norm_class(1).eps
    for attr in ("norm", "fc_norm"):
        norm = getattr(student.encoder, attr)
        assert isinstance(norm, nn.Identity) or norm.eps == expected_eps, (attr, norm)
    assert reset_norm_eps(model) == expected_eps
    assert layout(decoder) == layout(reference)
    # the reference's own code (under timm 1.0.8) builds 19,646,976 (EVA02: SwiGLU) and 14,922,240
    decoder_parameters = {"eva02-vit-b": 19_646_976, "clip-vit-b": 14_922_240}
    if name in decoder_parameters:
        assert sum(p.numel() for p in decoder.parameters()) == decoder_parameters[name]


# ---------------------------------------------------------------- Patch-Seg: majority and heads


def reference_majority_confusion(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """patchseg/loss.py 96-103 and 73-77: bf16 logits to the CPU, softmax, argmax; then +1 at
    [target, prediction] per token."""
    logits = logits.cpu().view(-1, logits.size(-1))
    predictions = logits.softmax(dim=-1).argmax(dim=-1)
    confusion = torch.zeros(num_classes, num_classes)
    for target, prediction in zip(targets.reshape(-1), predictions):
        confusion[target, prediction] += 1
    return confusion


@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_majority_predicts_the_argmax_of_the_bf16_softmax(scale):
    """At small logits the bf16 softmax ties (the lowest class wins) where the logits do not."""
    C, g = 151, torch.Generator().manual_seed(5)
    logits = (torch.randn(8, 256, C, generator=g) * scale).to(torch.bfloat16)  # 2,048 tokens
    targets = torch.randint(0, C, (8, 256), generator=g)
    evaluator = Evaluator("majority", C, "cpu")
    evaluator.update(logits, targets, None, torch.tensor(0.0))
    expected = reference_majority_confusion(logits, targets, C)
    assert torch.equal(evaluator.confusion.float(), expected)
    assert torch.equal(majority_prediction(logits).flatten(), logits.view(-1, C).softmax(-1).argmax(-1))


class ReferenceTransformer(nn.Module):
    """patchseg/model.py 23-92 (mode keep_suffix, for union and majority): pos_embed, norm_pre,
    Blocks with nn.LayerNorm passed explicitly (60), norm, head, the patch tokens out."""

    def __init__(self, dim: int, num_heads: int, classes: int, tokens: int, prefix: int, layers: int = 2):
        super().__init__()
        self.prefix = prefix
        self.pos_embed = nn.Parameter(torch.zeros(tokens, dim))
        self.norm_pre = nn.LayerNorm(dim)
        block = dict(mlp_ratio=4, qkv_bias=False, qk_norm=False, init_values=0.01, norm_layer=nn.LayerNorm)
        self.blocks = nn.Sequential(
            *(Block(dim, num_heads, **block, act_layer=nn.GELU, mlp_layer=Mlp) for _ in range(layers))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.head(self.norm(self.blocks(self.norm_pre(x + self.pos_embed))))
        return x[:, self.prefix :]


def test_transformer_head_is_the_originals_with_torch_layernorm():
    torch.manual_seed(6)
    shape = HeadShape(dim=32, num_heads=4, prefix=1, patches=16, classes=7, reduction="union")
    head = TransformerHead(shape)
    reference = ReferenceTransformer(32, 4, 7, shape.tokens, 1)
    state = dict(head.state_dict(), pos_embed=head.pos_embed.detach()[0])  # the original's is [T, D]
    reference.load_state_dict(state)
    eps = {n: m.eps for n, m in head.named_modules() if isinstance(m, nn.LayerNorm)}
    assert eps == {n: m.eps for n, m in reference.named_modules() if isinstance(m, nn.LayerNorm)}
    assert set(eps.values()) == {1e-5}
    x = torch.randn(3, shape.tokens, 32) * 1e-3  # small features: where eps matters
    torch.testing.assert_close(head(x), reference(x), rtol=0, atol=0)


# ---------------------------------------------------------------- the dense protocols


def test_hummingbird_names_its_bf16_features_as_a_difference():
    """open-hummingbird-eval keeps float32 features and memory (hbird/hbird_eval.py, no autocast)."""
    assert "bf16" in DIFFERENCES["precision"] and "fp32" in DIFFERENCES["precision"]
