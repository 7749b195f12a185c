"""SegCLIP's parts (OTHER-METHODS.md section 2; ArrowLuo/SegCLIP @ df09ba2, modules/module_seg_vit.py,
module_mae.py, modeling.py): the group module (learnable centres, cross-attention, logits without
1/sqrt(d), hard Gumbel assignment), the reconstruction of visible tokens from groups, the MAE
decoder, and the three per-image losses (ITC, superpixel KL, masked reconstruction).

Parameter names follow the reference's modules, so its state dicts load as they are. All random
draws (Gumbel noise, the MAE shuffle) come in as tensors from the objective's ``sample``: a step is
a function of its inputs. Departures, all off by default: ``mixed_keys`` reproduces what the
reference's cross-attention computes under its pinned torch 1.8 (keys and values read across the
batch, see ``CrossAttentionBlock``).
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from fastloc.align.contrastive import gather_rows
from fastloc.kernels.label_pool import label_pool

TAU = 0.9  # the reference's Gumbel temperature (SemanticLearnerModule.forward)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """fc1, exact GELU, fc2 (the reference's timm-style Mlp in the group module's output)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CrossAttentionBlock(nn.Module):
    """Centres [B, M, C] attend to keys/values [B, S, C] (pre-norm, 4x QuickGELU MLP).

    ``mixed_keys``: the reference passes its keys batch-first to a sequence-first
    ``nn.MultiheadAttention``; torch 1.8 (its pinned version) reshapes them with ``view(-1, B * H, d)``,
    so image b's key s is token ``(s * B + b) mod S`` of image ``(s * B + b) div S``: the keys mix
    images of the batch (torch >= 1.9 refuses the shapes unless B = S). Off: each image's own keys."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_x, self.ln_k, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(dim, dim * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(dim * 4, dim))])
        )

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mixed_keys: bool = False) -> torch.Tensor:
        k = self.ln_k(kv)  # [B, S, C]
        if mixed_keys:
            B, S, C = k.shape
            k = k.reshape(S, B, C).transpose(0, 1)  # torch 1.8's reading of the same memory
        q = q + self.attn(self.ln_x(q), k, k, need_weights=False)[0]
        return q + self.mlp(self.ln_2(q))


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Gumbel(0, 1) draws exactly as ``torch.distributions.Gumbel(0, 1).sample`` makes them from the
    same uniforms (Uniform(tiny, 1 - eps), then -log(-log u)), on ``generator.device``."""
    finfo = torch.finfo(torch.float32)
    u = torch.rand(shape, generator=generator, device=generator.device)
    u = finfo.tiny + u * (1 - finfo.eps - finfo.tiny)
    return -torch.log(-torch.log(u))


def assign(logits: torch.Tensor, noise: torch.Tensor | None, tau: float = TAU) -> torch.Tensor:
    """Hard one-hot assignment over centres (dim 1) of logits [B, M, L], straight-through; with
    ``noise`` (training) Gumbel-perturbed at temperature ``tau``, without (evaluation) the argmax
    of the softmax (the reference's ``gumbel_softmax(hard=True)``)."""
    soft = ((logits + noise) / tau).softmax(1) if noise is not None else logits.softmax(1)
    index = soft.max(1, keepdim=True)[1]
    hard = torch.zeros_like(logits).scatter_(1, index, 1.0)
    return hard - soft.detach() + soft


class GroupModule(nn.Module):
    """The reference's ``SemanticLearnerModule``: M learnable centres refined by cross-attention
    blocks over (centres, tokens); logits A = centres . k^T [B, M, L] with no 1/sqrt(d); each
    token assigned to one centre; group = mean of its tokens' values, then LN -> MLP -> QuickGELU
    of (centre + group)."""

    def __init__(self, dim: int, centres: int, heads: int, blocks: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.semantic_center = nn.Parameter(torch.empty(centres, dim))
        nn.init.trunc_normal_(self.semantic_center, std=0.02)
        self.cross_att = nn.Sequential(OrderedDict((str(i), CrossAttentionBlock(dim, heads)) for i in range(blocks)))
        self.cross_ln = nn.LayerNorm(dim)
        self.k_conv = nn.Conv1d(dim, dim, 1, groups=heads, bias=False)
        self.k_ln = nn.LayerNorm(dim)
        self.v_conv = nn.Conv1d(dim, dim, 1, groups=heads, bias=False)
        self.proj_o = nn.Sequential(
            OrderedDict([("ln", nn.LayerNorm(dim)), ("mlp", Mlp(dim, 4 * dim)), ("act", QuickGELU())])
        )

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None, mixed_keys: bool = False):
        """Tokens [B, L, C] (and Gumbel noise [B, M, L] or None) -> groups [B, M, C], hard
        assignments [B, M, L] (straight-through), soft assignments softmax(A) [B, M, L]."""
        B = x.shape[0]
        feature = self.norm(x).transpose(1, 2)  # [B, C, L]
        q = self.semantic_center.unsqueeze(0).expand(B, -1, -1).to(x.dtype)  # [B, M, C]
        for block in self.cross_att:
            q = block(q, torch.cat([q, x], dim=1), mixed_keys)
        q = self.cross_ln(q)
        k = self.k_ln(self.k_conv(feature).transpose(1, 2))  # [B, L, C]
        v = self.v_conv(feature).transpose(1, 2)  # [B, L, C]
        logits = torch.einsum("bmc,blc->bml", q, k)  # [B, M, L]
        hard = assign(logits, noise)
        groups = torch.einsum("bml,blc->bmc", hard, v) / hard.sum(-1, keepdim=True).clamp_min(1.0)
        return self.proj_o(q + groups), hard, logits.softmax(1)


class Reconstruct(nn.Module):
    """The reference's ``ReconstructLayer``: token l rebuilt as QuickGELU(sum_m W(a_l)_m g_m) from
    its assignment a_l (W = Linear(M, M)) and the groups g [B, M, C]."""

    def __init__(self, centres: int):
        super().__init__()
        self.rec_proj_a = nn.Sequential(OrderedDict([("a_fc", nn.Linear(centres, centres))]))
        self.proj_o = nn.Sequential(OrderedDict([("act_a", QuickGELU())]))

    def forward(self, groups: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        weights = self.rec_proj_a(hard.transpose(1, 2))  # [B, L, M]
        return self.proj_o(torch.einsum("bmc,blm->blc", groups, weights.to(groups.dtype)))  # [B, L, C]


# ---------------------------------------------------------------------------- MAE


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """[1 + grid^2, dim] float32: MAE's 2-d sin-cos table with a zero row for the class token."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")

    def one(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    # MAE's meshgrid puts w first: its grid[0] (the first half) is the column, grid[1] the row
    table = np.concatenate([one(xs), one(ys)], axis=1)
    return torch.from_numpy(np.concatenate([np.zeros((1, dim)), table], axis=0)).float()


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, N, p * p * 3] (MAE's order: row, column, channel)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // patch) * (W // patch), patch * patch * C)


class MaeDecoder(nn.Module):
    """The reference's ``MAEDecoder`` (vision): embed to half width, mask tokens, fixed sin-cos
    positions, ``depth`` timm blocks, norm, a linear map to p * p * 3 pixels."""

    def __init__(self, dim: int, grid: int, patch: int, width: int | None = None, depth: int = 3, heads: int = 8):
        super().__init__()
        width = width or dim // 2
        self.patch = patch
        self.decoder_embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(width, grid).unsqueeze(0), persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            Block(width, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.decoder_norm = norm(width)
        self.decoder_pred = nn.Linear(width, patch * patch * 3)

    def forward(self, visible: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Visible tokens [B, 1 + K, C] (the first: their mean) and ``restore`` [B, 1 + N] (each
        position's place in (visible, masked)) -> pixel predictions [B, N, p * p * 3]."""
        x = self.decoder_embed(visible)
        B, T, D = x.shape
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, restore.shape[1] - T, D)], dim=1)
        x = torch.gather(x, 1, restore.unsqueeze(-1).expand(-1, -1, D)) + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def visible_count(patches: int, ratio: float) -> int:
    """Patches the MAE branch keeps: the reference masks the class token with them and always keeps
    it, int((N + 1)(1 - ratio)) tokens in all (48 of 196 at 0.75)."""
    return int((patches + 1) * (1 - ratio)) - 1


def restore_order(order: torch.Tensor) -> torch.Tensor:
    """The patches' shuffle [B, N] (kept first) -> the reference's ids_restore [B, 1 + N] over
    (class token, patches): the class token first, then each patch's place in the shuffle."""
    full = torch.cat([order.new_zeros(order.shape[0], 1), order + 1], dim=1)
    return full.argsort(dim=1)


def mae_losses(pred: torch.Tensor, images: torch.Tensor, order: torch.Tensor, visible: int, patch: int) -> torch.Tensor:
    """[B]: per image the mean over its masked patches of the per-patch MSE between predictions
    [B, N, p * p * 3] and the normalised images' patches (the reference's masked-patch mean; every
    image masks the same count, so their mean is the reference's loss)."""
    per_patch = (pred.float() - patchify(images.float(), patch)).square().mean(-1)  # [B, N]
    masked = torch.ones_like(per_patch).scatter(1, order[:, :visible], 0.0)
    return (per_patch * masked).sum(1) / masked.sum(1)


# ---------------------------------------------------------------------------- superpixels


def patch_segments(labels: torch.Tensor, patch: int, rule: str = "mode", max_segments: int = 1024) -> torch.Tensor:
    """Segment ids [B, S, S] -> one id per patch [B, N] int64: the most frequent (ties to the
    smallest; the label-pooling op), or ``mean``: the reference's int(mean of ids), a quirk that
    can name a segment the patch does not touch. Ids from ``max_segments`` on share one id."""
    labels = labels.long().clamp(0, max_segments - 1)
    if rule == "mode":
        return label_pool(labels, patch, max_segments, "majority")
    B, H, W = labels.shape
    patches = labels.reshape(B, H // patch, patch, W // patch, patch).transpose(2, 3).flatten(3)
    return patches.double().mean(-1).long().flatten(1)  # truncation, as numpy's astype(long)


def superpixel_kl(hard: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """[B]: the reference's clustering loss per image. P = hard assignments [B, N, M], S the
    same-segment matrix, P' = S P / rowsum(S); (KL(softmax P' || softmax P) + KL(softmax P ||
    softmax P')) / 2 summed over the image's N x M entries and divided by N M."""
    p = hard.transpose(1, 2).float()  # [B, N, M]
    same = (segments.unsqueeze(-1) == segments.unsqueeze(-2)).float()  # [B, N, N]
    mean = same @ p / same.sum(-1, keepdim=True).clamp_min(1.0)
    a = F.kl_div(F.log_softmax(p, -1), F.softmax(mean, -1), reduction="none")
    b = F.kl_div(F.log_softmax(mean, -1), F.softmax(p, -1), reduction="none")
    return (a + b).sum((1, 2)) / (2.0 * p.shape[1] * p.shape[2])


# ---------------------------------------------------------------------------- ITC


def itc_losses(images: torch.Tensor, texts: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """[B]: CLIP's symmetric InfoNCE per image pair (image i against every rank's captions, caption
    i against every rank's images, averaged); the scale exp(logit_scale) clamped at 100. Their mean
    is the reference's per-rank ``sim_loss``."""
    images, texts = F.normalize(images.float(), dim=-1), F.normalize(texts.float(), dim=-1)
    scale = logit_scale.float().exp().clamp(max=100.0)
    all_images, offset = gather_rows(images)
    all_texts, _ = gather_rows(texts)
    target = torch.arange(images.shape[0], device=images.device) + offset
    t2v = scale * texts @ all_images.T  # [B, B_all]
    v2t = scale * images @ all_texts.T
    return (F.cross_entropy(t2v, target, reduction="none") + F.cross_entropy(v2t, target, reduction="none")) / 2
