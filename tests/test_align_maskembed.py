"""MaskEmbed's objective against the method written out by hand (MASKEMBED.md sections 1-7):
masks, masked views, teacher pruning, sigma, the student's capped attention and fresh norm, the
decoder's prefix zeroing, the losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastloc.align.maskembed import MaskEmbed, MaskEmbedConfig, batch_moments, merge_moments, per_image_loss
from fastloc.align.masks import MaskConfig, block_masks, sample_masks
from fastloc.data.batch import Batch

TINY = MaskEmbedConfig(backbone="tiny", weights="random")


def tiny(**kw) -> MaskEmbed:
    torch.manual_seed(0)
    from dataclasses import replace

    return MaskEmbed(replace(TINY, **kw)).eval()


def images(b: int = 3, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ---------------------------------------------------------------- masks


def test_uniform_masks_keep_a_uniform_count_with_complement_and_full_rows():
    g = torch.Generator().manual_seed(0)
    masks = sample_masks(MaskConfig(), 20_000, 4, g)  # N = 16: counts 0..16
    assert masks.shape == (20_000, 3, 16) and masks.dtype == torch.bool
    assert torch.equal(masks[:, 1], ~masks[:, 0]) and masks[:, 2].all()
    counts = np.bincount(masks[:, 0].sum(1).numpy(), minlength=17)
    expected = 20_000 / 17
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 39.25  # uniform on 0..N: the 0.999 quantile of chi-square with 16 degrees of freedom
    per_patch = masks[:, 0].float().mean(0)
    assert per_patch.min() > 0.46 and per_patch.max() < 0.54  # no patch is favoured
    again = sample_masks(MaskConfig(), 20_000, 4, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)  # the generator's state decides


def test_other_samplers():
    g = torch.Generator().manual_seed(1)
    bern = sample_masks(MaskConfig(sampler="bernoulli", keep_ratio=0.25, antithetical=False, null=False), 4000, 8, g)
    assert bern.shape == (4000, 1, 64) and abs(bern.float().mean().item() - 0.25) < 0.01
    block = sample_masks(MaskConfig(sampler="block", keep_ratio=0.4), 200, 14, g)
    assert block.shape == (200, 3, 196) and (block[:, 0].float().mean(1) >= 0.4).all()
    assert torch.equal(block[:, 1], ~block[:, 0]) and block[:, 2].all()  # rows done right (pitfall 8)
    rows = block_masks(1, 14, 0.4, np.random.default_rng(0)).reshape(14, 14)
    assert 0.4 <= rows.mean() < 0.8  # rectangles, not a scatter: few row changes
    assert np.abs(np.diff(rows.astype(int), axis=1)).sum() < 0.5 * rows.size


# ---------------------------------------------------------------- the loss, by hand


def _masked_pixels(x: torch.Tensor, masks: torch.Tensor, mean, std, p: int) -> torch.Tensor:
    """Textbook normalization, nearest upsampling of the mask, multiplication: [B * M, 3, S, S]."""
    norm = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    B, M, N = masks.shape
    g = math.isqrt(N)
    up = masks.view(B, M, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3).double()  # [B, M, S, S]
    return (norm[:, None] * up[:, :, None]).flatten(0, 1).float()


def _teacher_by_hand(objective: MaskEmbed, pixels: torch.Tensor) -> torch.Tensor:
    full = objective.trainable.student.encoder  # the student started from the same weights...
    t = objective.teacher  # ... but the teacher's own modules are what we read
    x = t.norm_pre(t._pos_embed(t.patch_embed(pixels)))
    for block in t.blocks:
        x = block(x)
    assert len(t.blocks) == len(full.blocks) - 1
    return t.norm(x)


def _capped_block(block, x: torch.Tensor, cap: float) -> torch.Tensor:
    attn = block.attn
    B, T, D = x.shape
    h = block.norm1(x)
    q, k, v = attn.qkv(h).view(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q / math.sqrt(q.shape[-1])) @ k.transpose(-1, -2)
    out = (cap * torch.tanh(logits / cap)).softmax(-1) @ v
    x = x + block.ls1(attn.proj(out.transpose(1, 2).reshape(B, T, D)))
    return x + block.ls2(block.mlp(block.norm2(x)))


def _student_by_hand(objective: MaskEmbed, pixels: torch.Tensor) -> torch.Tensor:
    enc = objective.trainable.student.encoder
    x = enc.norm_pre(enc._pos_embed(enc.patch_embed(pixels)))
    for block in enc.blocks:
        x = _capped_block(block, x, 30.0)
    x = F.layer_norm(x, (x.shape[-1],), enc.norm.weight, enc.norm.bias, eps=1e-5)
    return objective.trainable.student.head(x)


def test_loss_equals_the_method_written_by_hand():
    objective = tiny()
    cfg = objective.image
    head = objective.trainable.student.head
    torch.nn.init.normal_(head.weight, std=0.05)  # a trained-looking head: the student path matters
    torch.nn.init.normal_(objective.trainable.student.encoder.norm.weight, 1.0, 0.1)
    with torch.no_grad():  # large attention logits, where 30 tanh(l / 30) departs from l
        for block in objective.trainable.student.encoder.blocks:
            block.attn.qkv.weight[: 2 * block.attn.attn_dim] *= 25  # logits ~20 on average
    objective.scale.fill_(0.37)  # 1 / sigma
    x = images()
    masks = objective.sample(3, torch.Generator().manual_seed(5))  # [3, 3, 64]
    got = objective.losses(x, masks)

    pixels = _masked_pixels(x, masks, cfg.mean, cfg.std, cfg.patch_size)  # [9, 3, 64, 64]
    target = _teacher_by_hand(objective, pixels) * 0.37  # [9, T, D]
    tokens = _student_by_hand(objective, pixels.view(3, 3, 3, 64, 64)[:, 2])  # the full image
    keep = torch.cat([torch.zeros(3, 3, 1), masks.float()], dim=2)  # prefix always zeroed
    dec = objective.trainable.decoder
    z = (tokens[:, None] * keep[..., None]).flatten(0, 1) + dec.pos_embed
    pred = dec.head(dec.norm(dec.blocks(z)))
    expected = (pred - target).square().view(3, -1).mean(1)  # mse per image over [M, T, D]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_at_step_zero_the_prediction_does_not_depend_on_the_image():
    objective = tiny()
    masks = objective.sample(2, torch.Generator().manual_seed(0))
    a = objective.trainable(objective.views(images(2, seed=1), masks)[1], masks)
    b = objective.trainable(objective.views(images(2, seed=2), masks)[1], masks)
    assert torch.equal(a, b)  # the zero head: the decoder sees only its positional embedding
    assert objective.trainable.student(objective.views(images(2), masks)[1]).abs().max() == 0


def test_views_are_the_masking_kernel_and_the_full_image():
    objective = tiny(masks=MaskConfig(sampler="bernoulli", keep_ratio=0.5, antithetical=False, null=False))
    x = images(2)
    masks = objective.sample(2, torch.Generator().manual_seed(3))
    assert masks.shape == (2, 1, 64)
    views, full = objective.views(x, masks)
    cfg = objective.image
    torch.testing.assert_close(views, _masked_pixels(x, masks, cfg.mean, cfg.std, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(full, _masked_pixels(x, torch.ones(2, 1, 64, dtype=torch.bool), cfg.mean, cfg.std, 8))


@pytest.mark.parametrize("kind", ["mse", "l1", "cosine", "masked_mse", "unmasked_mse"])
def test_loss_definitions(kind):
    torch.manual_seed(0)
    B, M, T, D = 2, 3, 5, 4
    pred, target = torch.randn(B * M, T, D), torch.randn(B * M, T, D)
    keep = torch.rand(B, M, T) > 0.5
    keep[:, :, 0] = False  # the prefix
    got = per_image_loss(kind, pred, target, keep)
    d, w = (pred - target).view(B, M, T, D), keep.float()[..., None]
    expected = {
        "mse": d.square().mean((1, 2, 3)),
        "l1": d.abs().mean((1, 2, 3)),
        "cosine": (1 - F.cosine_similarity(pred, target, dim=-1)).view(B, -1).mean(1),
        "masked_mse": ((1 - w) * d.square()).mean((1, 2, 3)),  # the prefix counts (as masked)
        "unmasked_mse": (w * d.square()).mean((1, 2, 3)),
    }[kind]
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- sigma


def test_sigma_is_the_population_std_of_every_masked_teacher_output():
    objective = tiny()
    batches = [Batch(images=images(3, seed=s), valid=torch.tensor([True, True, s == 0])) for s in range(3)]
    pairs = [(b, objective.sample(3, torch.Generator().manual_seed(i))) for i, b in enumerate(batches)]
    record = objective.calibrate(pairs)
    outs = []
    for i, batch in enumerate(batches):
        masks = objective.sample(3, torch.Generator().manual_seed(i))  # seeded by batch index
        out = objective.targets(objective.views(batch.images, masks)[0]) / objective.scale  # unscaled
        outs.append(out[batch.valid.repeat_interleave(3)].double())  # not valid: repeats, left out
    everything = torch.cat(outs)
    sigma = everything.std(unbiased=False).item()
    assert record["sigma"] == pytest.approx(sigma, rel=1e-9) and objective.sigma.item() == pytest.approx(sigma)
    assert objective.scale.item() == pytest.approx(1 / sigma, rel=1e-6)
    scaled = everything / sigma  # predicting the mean then costs ~1
    assert (scaled - scaled.mean()).square().mean().item() == pytest.approx(1.0, rel=1e-9)


def test_moments_merge_exactly():
    x = torch.randn(1000, dtype=torch.float64) * 3 + 7
    merged = None
    for part in x.split([1, 99, 400, 500]):
        merged = merge_moments(merged, batch_moments(part))
    n, mean, m2 = merged
    assert n == 1000 and mean == pytest.approx(x.mean().item(), rel=1e-12)
    assert m2 / n == pytest.approx(x.var(unbiased=False).item(), rel=1e-12)


def test_other_losses_keep_unscaled_targets():
    objective = tiny(loss="cosine")
    objective.calibrate([(Batch(images=images(2)), objective.sample(2, torch.Generator().manual_seed(0)))])
    assert objective.sigma.item() > 0 and objective.scale.item() == 1.0


# ---------------------------------------------------------------- the pooled target (prefix_only)


def test_the_pooled_target_is_the_whole_teachers_class_token_predicted_by_the_decoders_first():
    """The reference's prefix_only ablation: target = the teacher's pooled output of each masked
    view (all blocks, final norm, class token), prediction = the decoder's first token."""
    objective = tiny(skip_blocks=0, target="pooled")
    torch.nn.init.normal_(objective.trainable.student.head.weight, std=0.05)
    teacher = objective.teacher
    assert len(teacher.blocks) == len(objective.trainable.student.encoder.blocks)  # nothing skipped

    def pooled(views: torch.Tensor) -> torch.Tensor:  # [B * M, D]
        return teacher.norm(teacher.blocks(teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(views)))))[:, 0]

    calibration = (images(2), objective.sample(2, torch.Generator().manual_seed(0)))
    objective.calibrate([(Batch(images=calibration[0]), calibration[1])])
    sigma = pooled(objective.views(*calibration)[0]).double().std(unbiased=False).item()
    assert objective.sigma.item() == pytest.approx(sigma, rel=1e-6)

    x, masks = images(), objective.sample(3, torch.Generator().manual_seed(5))
    views, full = objective.views(x, masks)
    pred = objective.trainable(full, masks)[:, 0]  # [9, D]
    expected = ((pred - pooled(views) / sigma) ** 2).view(3, -1).mean(1)
    torch.testing.assert_close(objective.losses(x, masks), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"skip_blocks": 1}, "needs --method.skip-blocks 0"), ({"loss": "masked_mse"}, "weighs tokens by the mask")],
)
def test_the_pooled_target_refuses_what_the_reference_does_not_define(change, message):
    with pytest.raises(ValueError, match=message):
        tiny(**{"skip_blocks": 0, "target": "pooled", **change})
