"""Zero-shot readouts (fastloc/probe/zeroshot/readout.py) against the references' own lines.

An open_clip CLIP with QuickGELU (ViT-B-16-quickgelu, shrunk: 3 blocks of width 192, 64 per head)
and random weights; the same weights in timm through timm's own converter. The references' lines
are transcribed below and run on the open_clip (OpenAI-CLIP names: ln_1, in_proj, out_proj,
ln_post, proj) model:
- NACLIP, sinahmr/NACLIP @ 0cac3a651f753b11315ea799cfbfabf79da1bd76, clip/model.py and naclip.py;
- MaskCLIP as ClearCLIP runs it, mc-lan/ClearCLIP @ ad68a404d55d48d27330b93554eb64a234ff717f,
  open_clip/transformer.py.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from fastloc.models.text import NoTextTowerError
from fastloc.probe.zeroshot.readout import READOUTS, ReadoutError, create_tower, dense_tokens, neighbourhood

WIDTH, HEADS, DEPTH, EMBED = 192, 3, 3, 96
SMALL = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": 224, "patch_size": 16, "width": WIDTH, "layers": DEPTH, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}
SIZES = [
    (224, 224),
    (160, 288),
]  # the harness's window; a non-square grid (10 x 18) with the position embedding resampled
# (fastloc readout) -> (NACLIP attn_strategy, NACLIP arch); "maskclip" is ClearCLIP's branch, added to custom_attn below
REFERENCE = {"clip": ("vanilla", "vanilla"), "maskclip": ("maskclip", "reduced"), "naclip": ("naclip", "reduced")}


# --- the references' lines, transcribed -------------------------------------------------------


def gaussian_window(dim1, dim2, std=1.0):
    """NACLIP clip/model.py:153-165."""
    constant = 1 / (std * math.sqrt(2))
    ks = list()
    for dim in [dim1, dim2]:
        start = -(dim - 1) / 2.0
        k = torch.linspace(start=start * constant, end=(start + (dim - 1)) * constant, steps=dim, dtype=torch.float)
        ks.append(k)
    dist_square_to_mu = (torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0)
    return torch.exp(-dist_square_to_mu)


def get_attention_addition(dim1, dim2, window, adjust_for_cls=True):
    """NACLIP clip/model.py:167-176."""
    m = torch.einsum("ij,kl->ijkl", torch.eye(dim1), torch.eye(dim2))
    m = m.permute((0, 3, 1, 2)).contiguous()  # m[ijkl] = 1 iff (i, j) == (k, l)
    out = F.conv2d(m.view(-1, dim1, dim2).unsqueeze(1), window.unsqueeze(0).unsqueeze(1), padding="same").squeeze(1)
    out = out.view(dim1 * dim2, dim1 * dim2)
    if adjust_for_cls:
        v_adjusted = torch.vstack([torch.zeros((1, dim1 * dim2)), out])
        out = torch.hstack([torch.zeros((dim1 * dim2 + 1, 1)), v_adjusted])
    return out


def custom_attn(attn_layer, x, n_patches, attn_strategy, gaussian_std=5.0):
    """NACLIP clip/model.py:178-227 (its addition cache left out), with ClearCLIP's MaskCLIP branch
    (open_clip/transformer.py:604-609) as attn_strategy 'maskclip'."""
    num_heads = attn_layer.num_heads
    num_tokens, bsz, embed_dim = x.size()  # noqa: RUF059 (the reference's line)
    head_dim = embed_dim // num_heads
    scale = head_dim**-0.5

    q, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    q = q.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)

    if attn_strategy == "naclip":  # :189-207
        window_size = [side * 2 - 1 for side in n_patches]
        window = gaussian_window(*window_size, std=gaussian_std)
        addition = get_attention_addition(*n_patches, window).unsqueeze(0).to(x.dtype).to(x.device)
        attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
        omega = addition
        attn_weights += omega
        attn_weights = F.softmax(attn_weights, dim=-1)
    elif attn_strategy == "vanilla":  # :213-215
        attn_weights = torch.bmm(q * scale, k.transpose(1, 2))
        attn_weights = F.softmax(attn_weights, dim=-1)
    elif attn_strategy == "maskclip":  # ClearCLIP open_clip/transformer.py:604-609
        mask = torch.empty(q.shape[1], q.shape[1], dtype=q.dtype).to(q.device)
        mask.fill_(float("-inf"))
        mask.fill_diagonal_(0)
        mask = mask.unsqueeze(0).repeat(q.shape[0], 1, 1)
        attn_weights = F.softmax(mask, dim=-1)

    attn_output = torch.bmm(attn_weights, v)  # :225-227 (ClearCLIP :618-620 the same)
    attn_output = attn_output.transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    attn_output = attn_layer.out_proj(attn_output)
    return attn_output


def interpolate_pos_encoding(visual, x, w, h):
    """NACLIP clip/model.py:134-151 (open_clip keeps patch_size as a pair)."""
    npatch = x.shape[1] - 1
    N = visual.positional_embedding.shape[0] - 1
    if npatch == N and w == h:
        return visual.positional_embedding
    class_pos_embed = visual.positional_embedding[[0]]
    patch_pos_embed = visual.positional_embedding[1:]
    dim = x.shape[-1]
    w0 = w // visual.patch_size[0]
    h0 = h // visual.patch_size[1]
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        mode="bicubic",
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        align_corners=False,
        recompute_scale_factor=False,
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def reference_tokens(visual, x, attn_strategy, arch):
    """NACLIP's VisionTransformer.forward with return_all (clip/model.py:95-126), then naclip.py:58-60
    (class token dropped, L2). open_clip's blocks are batch-first where NACLIP's are sequence-first,
    so the first blocks run before the permute of :111."""
    B, nc, w, h = x.shape  # noqa: RUF059 (the reference's line)
    n_patches = (w // visual.patch_size[0], h // visual.patch_size[1])

    x = visual.conv1(x)  # shape = [*, width, grid, grid]
    x = x.reshape(x.shape[0], x.shape[1], -1)  # shape = [*, width, grid ** 2]
    x = x.permute(0, 2, 1)  # shape = [*, grid ** 2, width]
    x = torch.cat(
        [
            visual.class_embedding.to(x.dtype)
            + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device),
            x,
        ],
        dim=1,
    )
    if x.shape[1] != visual.positional_embedding.shape[0]:
        x = x + interpolate_pos_encoding(visual, x, w, h).to(x.dtype)
    else:
        x = x + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)

    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    x = x.permute(1, 0, 2)  # NLD -> LND
    blk = visual.transformer.resblocks[-1]
    if arch == "vanilla":
        x = x + custom_attn(blk.attn, blk.ln_1(x), n_patches, attn_strategy)
        x = x + blk.mlp(blk.ln_2(x))
    elif arch == "reduced":
        x = custom_attn(blk.attn, blk.ln_1(x), n_patches, attn_strategy)
    x = x.permute(1, 0, 2)  # LND -> NLD

    image_features = visual.ln_post(x) @ visual.proj
    image_features = image_features[:, 1:]
    image_features /= image_features.norm(dim=-1, keepdim=True)
    return image_features


# --- the tests --------------------------------------------------------------------------------


def small_towers():
    """(open_clip visual, timm ViT with CLIP's projection as its head) with the same random weights, in
    eval mode (also the segmentation tests' towers)."""
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, **SMALL).eval()
    with torch.no_grad():  # not init-like weights (norms at 1, biases at 0): a swapped key shows
        for p in clip.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with torch.device("meta"):  # no init: every tensor comes from open_clip (strict, assign)
        vit = timm.create_model(
            "vit_base_patch16_clip_quickgelu_224",
            pretrained=False,
            embed_dim=WIDTH,
            depth=DEPTH,
            num_heads=HEADS,
            num_classes=EMBED,  # CLIP's projection kept as the timm head
        )
    vit.load_state_dict(checkpoint_filter_fn(clip.state_dict(), vit), assign=True)
    return clip.visual, vit.eval()


@pytest.fixture(scope="module")
def towers():
    return small_towers()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("readout", READOUTS)
def test_readout_equals_reference(towers, readout, size):
    visual, vit = towers
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = dense_tokens(vit, images, readout)
        want = reference_tokens(visual, images, *REFERENCE[readout])
    h, w = size[0] // 16, size[1] // 16
    assert tokens.shape == (2, h, w, EMBED)
    torch.testing.assert_close(tokens, want.reshape(2, h, w, EMBED), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, h, w))


def test_vit_b_16_readouts_equal_reference():
    """The full-size tower (ViT-B-16-quickgelu, 12 heads of 64), random weights, at the harness's 224 window."""
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    with torch.no_grad():
        for p in clip.visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=512)
    vit.load_state_dict(checkpoint_filter_fn(clip.state_dict(), vit), assign=True)
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for readout in READOUTS:
            want = reference_tokens(clip.visual, images, *REFERENCE[readout]).reshape(1, 14, 14, 512)
            torch.testing.assert_close(dense_tokens(vit.eval(), images, readout), want, rtol=1e-5, atol=1e-5)


def test_readouts_differ(towers):
    """The three readouts (and NACLIP without its window) are different functions of these weights."""
    _, vit = towers
    images = torch.randn(1, 3, 160, 288, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = [dense_tokens(vit, images, readout) for readout in READOUTS]
        tokens.append(dense_tokens(vit, images, "naclip", std=1e-3))  # omega ~ identity: nearly k-k only
    for i in range(len(tokens)):
        for j in range(i):
            assert (tokens[i] - tokens[j]).abs().max() > 1e-2, (i, j)


@pytest.mark.parametrize("grid", [(14, 14), (5, 7), (7, 5), (1, 3)])
def test_neighbourhood_equals_naclip_window(grid):
    window = gaussian_window(*[2 * side - 1 for side in grid], std=5.0)
    torch.testing.assert_close(neighbourhood(grid, 5.0), get_attention_addition(*grid, window), rtol=0, atol=1e-6)


def test_create_tower_keeps_the_projection_head():
    tower = create_tower("clip-vit-b", "random").eval()
    assert tower.head.out_features == 512  # CLIP's projection: the text tower's width
    with torch.no_grad():
        assert dense_tokens(tower, torch.randn(1, 3, 224, 224), "clip").shape == (1, 14, 14, 512)
    tiny = create_tower("tiny", "random").eval()  # the tiny text tower embeds at the tiny ViT's width
    with torch.no_grad():
        assert dense_tokens(tiny, torch.randn(1, 3, 64, 96), "naclip").shape == (1, 8, 12, 96)
    with pytest.raises(NoTextTowerError):
        create_tower("dinov2-vit-b", "random")


def small_vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=32, depth=1, num_heads=2, **kwargs)


@pytest.mark.parametrize(
    "model, readout, size, match",
    [
        (lambda: small_vit(), "sclip", 32, "unknown readout 'sclip'; readouts: clip, maskclip, naclip"),
        (lambda: nn.Linear(3, 3), "naclip", 32, "Linear: zero-shot readouts need a timm VisionTransformer"),
        (lambda: small_vit(class_token=False, global_pool="avg"), "naclip", 32, "need one class token"),
        (lambda: small_vit(reg_tokens=4), "clip", 32, "need one class token, no registers"),
        (lambda: small_vit(), "maskclip", 40, r"images \(1, 3, 40, 40\): \[B, 3, H, W\] with sides a multiple"),
    ],
    ids=["readout", "not-vit", "no-class-token", "registers", "size"],
)
def test_bad_input_is_one_clear_line(model, readout, size, match):
    with pytest.raises(ReadoutError, match=match) as info:
        dense_tokens(model(), torch.randn(1, 3, size, size), readout)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
