"""SegCLIP's parts against the reference's own code on identical tiny inputs and weights: the group
module (with and without the torch-1.8 key mixing), the reconstruction, the MAE decoder and its loss,
the superpixel KL, ITC, the per-patch segment ids, and the whole visual tower of both passes with
gradients. The reference's Gumbel draws are recorded and fed to fastloc's module (same noise).

Below ``# --- transcription`` is a copy of ArrowLuo/SegCLIP @ df09ba2 (no licence file; test use
only). Stripped or changed, and only these: einops (``rearrange`` written as reshape/permute),
timm's trunc_normal_ (torch's), DropPath (drop_path 0 in every use), ``np.float`` (removed from
numpy: ``np.float64``), ``dist_collect`` and the barrier (one process), and SegViT's hard-coded 12
layers (a ``depth`` argument so a 4-block model fits). One switch is added: with
``RefCrossAttentionBlock.per_image_keys`` set, the keys are made sequence-first like the queries
(the reference's intent, what fastloc computes by default); unset, the literal code runs, which on
torch >= 1.9 needs the batch to equal the key count (see ``test_mixed_keys...``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastloc.align.segclip import SegclipConfig, Trainable
from fastloc.align.segclip_ops import (
    CrossAttentionBlock,
    GroupModule,
    MaeDecoder,
    Reconstruct,
    gumbel_noise,
    itc_losses,
    mae_losses,
    patch_segments,
    restore_order,
    sincos_pos_embed,
    superpixel_kl,
    visible_count,
)
from fastloc.models.registry import create_model
from fastloc.models.text import load_text_tower

# --- transcription: modules/module_seg_vit.py


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor):
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor):
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, drop_path: float = 0.0):
        super().__init__()
        self.n_head = n_head
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, d_model * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(d_model * 4, d_model)),
                ]
            )
        )
        self.ln_2 = LayerNorm(d_model)
        self.drop_path = nn.Identity()

    def attention(self, x: torch.Tensor, attn_mask=None):
        return self.attn(x, x, x, need_weights=False, attn_mask=None)[0]

    def forward(self, x: torch.Tensor, attn_mask=None, video_frame=-1):
        x = x.permute(1, 0, 2)  # x: LND
        x = x + self.drop_path(self.attention(self.ln_1(x), attn_mask=attn_mask))
        x = x + self.drop_path(self.mlp(self.ln_2(x)))
        x = x.permute(1, 0, 2)  # x: NLD
        return x


class RefCrossAttentionBlock(nn.Module):
    per_image_keys = False  # added (see the module docstring)

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_x = LayerNorm(d_model)
        self.ln_k = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(d_model, d_model * 4)),
                    ("gelu", QuickGELU()),
                    ("c_proj", nn.Linear(d_model * 4, d_model)),
                ]
            )
        )
        self.ln_2 = LayerNorm(d_model)

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        q = q.permute(1, 0, 2)  # x: LND
        k = k.permute(1, 0, 2) if self.per_image_keys else k  # added
        q = q + self.attn(self.ln_x(q), self.ln_k(k), self.ln_k(k), need_weights=False)[0]
        q = q + self.mlp(self.ln_2(q))
        q = q.permute(1, 0, 2)  # x: NLD
        return q


def gumbel_softmax(logits: torch.Tensor, tau: float = 1, hard: bool = False, dim: int = -1, is_training=True):
    if is_training:
        gumbel_dist = torch.distributions.gumbel.Gumbel(
            torch.tensor(0.0, device=logits.device, dtype=logits.dtype),
            torch.tensor(1.0, device=logits.device, dtype=logits.dtype),
        )
        gumbels = gumbel_dist.sample(logits.shape)
        gumbels = (logits + gumbels) / tau  # ~Gumbel(logits,tau)
        y_soft = gumbels.softmax(dim)
    else:
        y_soft = logits.softmax(dim)
    if hard:
        index = y_soft.max(dim, keepdim=True)[1]
        y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(dim, index, 1.0)
        ret = y_hard - y_soft.detach() + y_soft
    else:
        ret = y_soft
    return ret


class SemanticLearnerModule(nn.Module):
    def __init__(self, in_channels, num_tokens, num_heads, cross_layer=1):
        super().__init__()
        self.in_channels = in_channels
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(self.in_channels)
        self.semantic_center = nn.Parameter(torch.Tensor(*[num_tokens, in_channels]))
        nn.init.trunc_normal_(self.semantic_center, std=0.02)
        self.cross_att = nn.Sequential(
            OrderedDict(
                [
                    (str(indx), RefCrossAttentionBlock(self.in_channels, n_head=self.num_heads))
                    for indx in range(cross_layer)
                ]
            )
        )
        self.cross_ln = nn.LayerNorm(self.in_channels)
        self.k_conv = nn.Conv1d(
            self.in_channels,
            self.in_channels,
            kernel_size=(1,),
            stride=(1,),
            padding=(0,),
            groups=self.num_heads,
            bias=False,
        )
        self.k_ln = nn.LayerNorm(self.in_channels)
        self.v_conv = nn.Conv1d(
            self.in_channels,
            self.in_channels,
            kernel_size=(1,),
            stride=(1,),
            padding=(0,),
            groups=self.num_heads,
            bias=False,
        )
        self.proj_o = nn.Sequential(
            OrderedDict(
                [
                    ("ln", nn.LayerNorm(self.in_channels)),
                    ("mlp", Mlp(self.in_channels, 4 * self.in_channels, self.in_channels)),
                    ("act", QuickGELU()),
                ]
            )
        )

    def forward(self, inputs: torch.Tensor):
        bs, l, c = inputs.size()  # noqa: E741, RUF059 (transcribed as is)
        org_inputs = inputs
        in_feature = self.norm(inputs).permute(0, 2, 1).contiguous()  # (B, H, L)
        q_feat = self.semantic_center.to(device=org_inputs.device, dtype=org_inputs.dtype)
        q_feat = q_feat.unsqueeze(0).repeat(bs, 1, 1)  # [bs, n_token, c]
        for layer_id_, attn_fct_ in enumerate(self.cross_att):  # noqa: B007
            kv_ = torch.cat([q_feat, org_inputs], dim=1)
            q_feat = attn_fct_(q_feat, kv_)
        q_feat = self.cross_ln(q_feat).to(dtype=in_feature.dtype)  # [bs, n_token, c]
        k_feat = self.k_conv(in_feature).permute(0, 2, 1).contiguous()  # (B, L, H)
        k_feat = self.k_ln(k_feat).to(dtype=in_feature.dtype)  # Shape:  [bs, h*w, c]
        v_feat = self.v_conv(in_feature).permute(0, 2, 1).contiguous().to(dtype=in_feature.dtype)  # (B, L, H)
        attn = torch.einsum("...si,...di->...sd", q_feat, k_feat)  # [bs, n_token, h*w]
        hard_attn = gumbel_softmax(attn, tau=0.9, hard=True, dim=1, is_training=self.training)
        soft_attn = F.softmax(attn, dim=1)
        outputs = torch.einsum("...si,...id->...sd", hard_attn, v_feat)  # (B, n_token, c)
        outputs = outputs / torch.clamp_min(torch.sum(hard_attn, dim=-1).unsqueeze(-1), min=1.0)
        outputs = self.proj_o(q_feat + outputs)  # (B, n_token, c)
        return outputs, hard_attn, soft_attn, q_feat


class ReconstructLayer(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rec_proj_a = nn.Sequential(OrderedDict([("a_fc", nn.Linear(self.in_channels, self.in_channels))]))
        self.proj_o = nn.Sequential(OrderedDict([("act_a", QuickGELU())]))

    def forward(self, inputs: torch.Tensor, attn: torch.Tensor):
        attn = attn.permute(0, 2, 1).contiguous()
        attn = self.rec_proj_a(attn)  # (B, M, L)
        attn = attn.to(dtype=inputs.dtype)
        outputs = torch.einsum("...dh,...md->...mh", inputs, attn)  # (B, M, H)
        outputs = self.proj_o(outputs)
        return outputs


class SegViT(nn.Module):
    def __init__(
        self, dim_in, patch_size=32, input_resolution=224, first_stage_layer=10, cross_layer=2, group_num=8, depth=12
    ):
        super().__init__()
        self.dim_in = dim_in
        self.patch_len = input_resolution // patch_size
        depths = [first_stage_layer, depth - first_stage_layer]
        layer_dims = [dim_in, dim_in]
        num_heads = [itm_ // 64 for itm_ in layer_dims]
        i_layer = 0
        self.layers0 = nn.Sequential(
            OrderedDict(
                [
                    (str(indx), ResidualAttentionBlock(layer_dims[i_layer], num_heads[i_layer]))
                    for indx in range(depths[i_layer])
                ]
            )
        )
        self.semantic_layer2 = SemanticLearnerModule(
            in_channels=layer_dims[i_layer], num_tokens=group_num, num_heads=num_heads[i_layer], cross_layer=cross_layer
        )
        i_layer = 1
        self.layers2 = nn.Sequential(
            OrderedDict(
                [
                    (str(indx), ResidualAttentionBlock(layer_dims[i_layer], num_heads[i_layer]))
                    for indx in range(depths[i_layer])
                ]
            )
        )
        self.layers_mae2 = nn.Sequential(
            OrderedDict(
                [
                    (str(indx), ResidualAttentionBlock(layer_dims[i_layer], num_heads[i_layer]))
                    for indx in range(depths[i_layer])
                ]
            )
        )
        self.reconstruct_layer2 = ReconstructLayer(in_channels=group_num, out_channels=layer_dims[i_layer])

    def forward(self, x: torch.Tensor, attn_mask=None, video_frame=-1):
        mid_states = {}
        mid_states["hidden"] = None
        mid_states["attns"] = []
        x = x.permute(1, 0, 2)  # x: NLD
        cls, x_ = torch.split(x, [1, x.size(1) - 1], dim=1)
        x_ = self.layers0(x_)
        if self.patch_len**2 != x_.size(1) and 4 * (self.patch_len**2) != x_.size(1):  # if do MAE mask
            sx_, hard_attn_2, soft_attn_2, _ = self.semantic_layer2(x_)
            x_ = self.reconstruct_layer2(sx_, hard_attn_2)  # s2->s1/m
            x_ = self.layers_mae2(x_)
            mid_states["hidden"] = x_
            cls = torch.mean(x_, dim=1, keepdim=True)
            x = torch.cat([cls, x_], dim=1)
        else:
            mid_states["hidden"] = x_
            x_, hard_attn_2, soft_attn_2, _ = self.semantic_layer2(x_)
            x_ = self.layers2(x_)
            cls = torch.max(x_, dim=1, keepdim=True)[0]
            x = torch.cat([cls, x_], dim=1)
            mid_states["attns"].append({"soft_attn": soft_attn_2, "hard_attn": hard_attn_2})
        x = x.permute(1, 0, 2)  # x: LND
        return x, mid_states


# --- transcription: modules/module_clip_util.py (random_masking), module_clip_vtransformer.py


def random_masking(x, mask_ratio, keep_cls=False):
    N, L, D = x.shape  # batch, length, dim
    len_keep = int(L * (1 - mask_ratio))
    noise = torch.rand(N, L, device=x.device)  # noise in [0, 1]
    if keep_cls:
        noise[:, 0] = -1.0
    ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones([N, L], device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore, ids_keep


class VisualTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim, first_stage_layer=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels=3, out_channels=width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = SegViT(
            width,
            patch_size=patch_size,
            input_resolution=input_resolution,
            first_stage_layer=first_stage_layer,
            depth=layers,
        )
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor, video_frame=-1, mask_ratio=0.0):
        x = self.conv1(x)  # shape = [*, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1)  # shape = [*, width, grid ** 2]
        x = x.permute(0, 2, 1)  # shape = [*, grid ** 2, width]
        x = torch.cat(
            [
                self.class_embedding.to(x.dtype)
                + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device),
                x,
            ],
            dim=1,
        )
        x = x + self.positional_embedding.to(x.dtype)  # get_pos_embed in training: the table as it is
        x = self.ln_pre(x)
        mae_mask, mae_ids_restore = None, None
        if mask_ratio > 0.0:
            x, mae_mask, mae_ids_restore, ids_keep = random_masking(x, mask_ratio, keep_cls=True)  # noqa: RUF059
        x = x.permute(1, 0, 2)  # NLD -> LND
        x, mid_states = self.transformer(x, attn_mask=None, video_frame=video_frame)
        x = x.permute(1, 0, 2)  # LND -> NLD
        return x, mae_mask, mae_ids_restore, mid_states

    def encode_image(self, image, mask_ratio=0.0):  # CLIP.encode_image, return_hidden=True
        hidden, mae_mask, mae_ids_restore, mid_states = self(image, mask_ratio=mask_ratio)
        hidden = self.ln_post(hidden) @ self.proj
        return hidden[:, 0, :], hidden, mae_mask, mae_ids_restore, mid_states


# --- transcription: modules/module_mae.py


def patchify(imgs, patch_size):
    assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % patch_size == 0
    h = w = imgs.shape[2] // patch_size
    x = imgs.reshape(shape=(imgs.shape[0], 3, h, patch_size, w, patch_size))
    x = torch.einsum("nchpwq->nhwpqc", x)
    x = x.reshape(shape=(imgs.shape[0], h * w, patch_size**2 * 3))
    return x


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0)
    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H*W, D/2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H*W, D/2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H*W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega  # (D/2,)
    pos = pos.reshape(-1)  # (M,)
    out = np.einsum("m,d->md", pos, omega)  # (M, D/2), outer product
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class MAEDecoder(nn.Module):
    def __init__(
        self,
        embed_dim,
        decoder_embed_dim,
        image_resolution,
        patch_size,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
    ):
        super().__init__()
        norm_layer = lambda d: nn.LayerNorm(d, eps=1e-6)  # noqa: E731 (partial(nn.LayerNorm, eps=1e-6) in modeling.py)
        pred_len = patch_size**2 * 3
        self.patch_size = patch_size
        self.num_patches = (image_resolution // patch_size) ** 2
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for i in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, pred_len, bias=True)
        pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], int(self.num_patches**0.5), cls_token=True)
        self.decoder_pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))

    def forward_vis(self, image, vis_hidden, vis_mae_mask, vis_mae_ids_restore, loss_allpatch=False):
        vis_hidden = self.decoder_embed(vis_hidden)
        mask_tokens = self.mask_token.repeat(vis_hidden.shape[0], vis_mae_ids_restore.shape[1] - vis_hidden.shape[1], 1)
        x_ = torch.cat([vis_hidden, mask_tokens], dim=1)
        x = torch.gather(
            x_, dim=1, index=vis_mae_ids_restore.unsqueeze(-1).repeat(1, 1, vis_hidden.shape[2])
        )  # unshuffle
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        pred = x[:, 1:, :]
        target = patchify(image, patch_size=self.patch_size)
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # [N, L], mean loss per patch
        if loss_allpatch:
            loss = loss.mean()
        else:
            loss = (loss * vis_mae_mask[:, 1:]).sum() / vis_mae_mask[:, 1:].sum()  # mean loss on removed patches
        return loss


# --- transcription: modules/modeling.py (SegCLIP.forward's losses, _loose_similarity in training)


def reference_itc(sequence_output, visual_output, logit_scale):
    visual_output = visual_output / visual_output.norm(dim=-1, keepdim=True)
    sequence_output = sequence_output / sequence_output.norm(dim=-1, keepdim=True)
    logit_scale = torch.clamp(logit_scale.exp(), max=100)
    retrieve_logits_t2v = logit_scale * torch.matmul(sequence_output, visual_output.t())
    retrieve_logits_v2t = logit_scale * torch.matmul(visual_output, sequence_output.t())
    labels = torch.arange(sequence_output.size(0), dtype=torch.long, device=sequence_output.device)
    loss_fct = nn.CrossEntropyLoss()
    return (loss_fct(retrieve_logits_t2v, labels) + loss_fct(retrieve_logits_v2t, labels)) / 2.0


def reference_clustering(hard_attn, image_seg, b):
    mid_attn_hidden = hard_attn.permute(0, 2, 1)  # B x L x CENTER
    image_seg_ = image_seg.view(b, -1)
    image_seg_ = image_seg_.unsqueeze(-1) - image_seg_.unsqueeze(-2)
    image_seg_ = (image_seg_ == 0).to(dtype=mid_attn_hidden.dtype)  # B x L x L
    clutering_sum = torch.einsum("bgl,blc->bgc", image_seg_, mid_attn_hidden)
    clutering_mean = clutering_sum / torch.clamp_min(torch.sum(image_seg_, dim=-1, keepdim=True), min=1.0)
    coef_ = mid_attn_hidden.size(0) * mid_attn_hidden.size(1) * mid_attn_hidden.size(2)
    kl_mean_1 = F.kl_div(
        F.log_softmax(mid_attn_hidden, dim=-1), F.softmax(clutering_mean, dim=-1), reduction="sum"
    ) / float(coef_)
    kl_mean_2 = F.kl_div(
        F.log_softmax(clutering_mean, dim=-1), F.softmax(mid_attn_hidden, dim=-1), reduction="sum"
    ) / float(coef_)
    return (kl_mean_1 + kl_mean_2) / 2.0


# --- transcription: dataloaders/rawimage_util.py (get_felzenszwalb_from_cache, after the crop)


def reference_patch_ids(seg_map_, img_size, patch_size):
    patch_len = img_size // patch_size
    seg_map_ = seg_map_.reshape(patch_len, patch_size, patch_len, patch_size).transpose(0, 2, 1, 3)
    seg_map_ = seg_map_.reshape(patch_len * patch_len, patch_size * patch_size)  # '(x1 p1) (x2 p2)-> (x1 x2) (p1 p2)'
    seg_map_ = np.mean(seg_map_, axis=-1)
    seg_map_ = seg_map_.reshape(patch_len, patch_len)
    return seg_map_.astype(dtype=np.int64)


# --- end of the transcription


class GumbelRecorder:
    """Records every Gumbel draw the reference makes (``torch.distributions.Gumbel.sample``)."""

    def __init__(self, monkeypatch):
        self.draws = []
        original = torch.distributions.gumbel.Gumbel.sample

        def sample(dist, shape=()):
            out = original(dist, shape)
            self.draws.append(out.clone())
            return out

        monkeypatch.setattr(torch.distributions.gumbel.Gumbel, "sample", sample)


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def close(a, b, atol=1e-5, rtol=1e-4):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def test_gumbel_noise_is_torchs_gumbel_from_the_same_generator_state():
    torch.manual_seed(3)
    theirs = torch.distributions.gumbel.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).sample((4, 8, 16))
    assert torch.equal(gumbel_noise((4, 8, 16), torch.Generator().manual_seed(3)), theirs)


@pytest.mark.parametrize("mixed", [False, True], ids=["per-image", "mixed-keys"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_group_module_equals_the_references_with_gradients(training, mixed, monkeypatch):
    """Hard and soft assignments, groups and every parameter's and the input's gradient; in training
    with the reference's recorded Gumbel draws as fastloc's noise, in evaluation with none. Per
    image: against the reference with its keys sequence-first; mixed keys: against its literal
    code, at a batch equal to the key count (8 centres + 4 tokens), where it runs."""
    torch.manual_seed(0)
    monkeypatch.setattr(RefCrossAttentionBlock, "per_image_keys", not mixed)
    ref = SemanticLearnerModule(128, 8, 2, cross_layer=2).train(training)
    ours = GroupModule(128, 8, 2, blocks=2).train(training)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(12, 4, 128) if mixed else torch.randn(3, 20, 128)
    recorder = GumbelRecorder(monkeypatch)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, hard_r, soft_r, _ = ref(xr)
    noise = recorder.draws[0] if training else None
    assert len(recorder.draws) == int(training)
    out_o, hard_o, soft_o = ours(xo, noise, mixed_keys=mixed)
    assert torch.equal(hard_o, hard_r) and hard_o.sum(1).eq(1).all()
    close(soft_o, soft_r)
    close(out_o, out_r)
    if not mixed:
        monkeypatch.setattr(RefCrossAttentionBlock, "per_image_keys", False)
        with pytest.raises(RuntimeError):  # the literal code at batch 3: torch >= 1.9 refuses it
            ref(xr)
    weights = torch.randn_like(out_r)
    ((out_r * weights).sum() + (hard_r * soft_r).sum()).backward()
    ((out_o * weights).sum() + (hard_o * soft_o).sum()).backward()
    gr, go = grads(ref), grads(ours)
    assert gr.keys() == go.keys() and "semantic_center" in go and "k_conv.weight" in go
    for name in gr:  # float32 sums in another order: gradients of size 10-40 agree to 1e-4
        close(go[name], gr[name], atol=1e-4, rtol=1e-3)
    close(xo.grad, xr.grad, atol=1e-4, rtol=1e-3)


def test_mixed_keys_are_what_the_reference_computes_on_torch_1_8():
    """The reference hands batch-first keys to a sequence-first attention; on torch >= 1.9 that runs
    only when the batch equals the key count, and then computes what torch 1.8's ``view(-1, B*H, d)``
    does at any batch: with ``mixed_keys`` fastloc's block equals it there; without, it does not
    (each image reads its own keys, the reference's intent)."""
    torch.manual_seed(1)
    ref, ours = RefCrossAttentionBlock(64, 2), CrossAttentionBlock(64, 2)
    ours.load_state_dict(ref.state_dict())
    q, kv = torch.randn(6, 2, 64), torch.randn(6, 6, 64)  # batch 6 = 2 centres + 4 tokens
    expected = ref(q, kv)
    close(ours(q, kv, mixed_keys=True), expected)
    assert not torch.allclose(ours(q, kv), expected, atol=1e-3)
    # the intended per-image attention: the reference's block with its keys transposed as well
    per_image = ref.attn(ref.ln_x(q).transpose(0, 1), *[ref.ln_k(kv).transpose(0, 1)] * 2, need_weights=False)[0]
    first = q + per_image.transpose(0, 1)
    close(ours(q, kv), first + ref.mlp(ref.ln_2(first)))


def test_the_reconstruction_and_the_mae_decoder_equal_the_references():
    torch.manual_seed(2)
    ref_rec, our_rec = ReconstructLayer(8, 128), Reconstruct(8)
    our_rec.load_state_dict(ref_rec.state_dict())
    groups, hard = torch.randn(3, 8, 128), F.one_hot(torch.randint(0, 8, (3, 15)), 8).transpose(1, 2).float()
    close(our_rec(groups, hard), ref_rec(groups, hard))

    ref_dec = MAEDecoder(128, 64, 64, 8, decoder_depth=3, decoder_num_heads=8)
    ours = MaeDecoder(128, grid=8, patch=8, depth=3, heads=8)
    missing, unexpected = ours.load_state_dict(ref_dec.state_dict(), strict=False)
    assert not missing and unexpected == ["decoder_pos_embed"]  # a fixed buffer here, rebuilt
    torch.testing.assert_close(ours.decoder_pos_embed, ref_dec.decoder_pos_embed.data, atol=1e-6, rtol=0)
    assert torch.equal(sincos_pos_embed(64, 8), torch.from_numpy(get_2d_sincos_pos_embed(64, 8, True)).float())
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.randn(3, 65, 128)
    torch.manual_seed(5)
    _, mask, restore, _ = random_masking(tokens, 0.75, keep_cls=True)
    torch.manual_seed(5)
    order = torch.rand(3, 65)[:, 1:].argsort(1)  # the same noise, the class token's column left out
    visible = visible_count(64, 0.75)
    assert visible == 15 and torch.equal(restore_order(order), restore)
    hidden = torch.randn(3, 1 + visible, 128)
    expected = ref_dec.forward_vis(images, hidden, mask, restore)
    losses = mae_losses(ours(hidden, restore), images, order, visible, 8)
    assert losses.shape == (3,)
    close(losses.mean(), expected)


def test_the_superpixel_kl_and_itc_equal_the_references():
    torch.manual_seed(4)
    hard = F.one_hot(torch.randint(0, 8, (3, 16)), 8).transpose(1, 2).float()
    segments = torch.randint(0, 4, (3, 16))
    kl = superpixel_kl(hard, segments)
    assert kl.shape == (3,) and (kl > 0).all()
    close(kl.mean(), reference_clustering(hard, segments.view(3, 4, 4), 3))
    one_segment = superpixel_kl(hard, torch.zeros_like(segments))
    assert (superpixel_kl(hard, torch.arange(16).expand(3, 16)) == 0).all() and (one_segment > 0).all()

    images, texts = torch.randn(5, 32, requires_grad=True), torch.randn(5, 32, requires_grad=True)
    scale = torch.tensor(np.log(1 / 0.07), dtype=torch.float32, requires_grad=True)
    ours = itc_losses(images, texts, scale)
    assert ours.shape == (5,)
    theirs = reference_itc(texts, images, scale)
    close(ours.mean(), theirs)
    g_ours = torch.autograd.grad(ours.mean(), (images, texts, scale))
    g_theirs = torch.autograd.grad(theirs, (images, texts, scale))
    for a, b in zip(g_ours, g_theirs):
        close(a, b)
    high = torch.tensor(5.0)  # exp 148 -> clamped at 100
    close(itc_losses(images, texts, high).mean(), reference_itc(texts, images, high))


def test_a_patchs_segment_is_its_mode_or_the_references_int_mean():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(2, 32, 32))
    labels[0, :8, :8] = 5  # a whole patch of one segment
    t = torch.from_numpy(labels)
    mean = patch_segments(t, 8, "mean")
    for b in range(2):
        assert torch.equal(mean[b], torch.from_numpy(reference_patch_ids(labels[b], 32, 8)).flatten())
    mode = patch_segments(t, 8, "mode")
    for b in range(2):
        for n in range(16):
            y, x = divmod(n, 4)
            values, counts = torch.unique(t[b, y * 8 : y * 8 + 8, x * 8 : x * 8 + 8], return_counts=True)
            assert mode[b, n] == values[counts.argmax()]  # the first maximum: the smallest id
    assert mode[0, 0] == mean[0, 0] == 5
    assert patch_segments(t + 2000, 8, "mode", max_segments=1024).eq(1023).all()  # ids past the table share one


def test_both_passes_of_the_visual_tower_equal_the_references(monkeypatch):
    """The tiny ViT (QuickGELU, pre-norm: CLIP's block) loaded into the reference's VisualTransformer +
    SegViT: the full pass's image embedding and assignments, the KL on them, the MAE pass's loss
    (the reference's masking noise and Gumbel draws fed to fastloc's), and the backbone's, group
    module's and MAE parts' gradients of their sum."""
    torch.manual_seed(0)
    vit = create_model(
        "tiny",
        "random",
        embed_dim=128,
        num_heads=2,
        act_layer="quick_gelu",
        pre_norm=True,
        norm_layer=nn.LayerNorm,
        num_classes=96,
    )
    text, _ = load_text_tower("tiny", "random")
    ours = Trainable(SegclipConfig(backbone="tiny", weights="random"), vit, text).train()
    ref = VisualTransformer(64, 8, 128, 4, 2, 96, first_stage_layer=2).train()
    ref_dec = MAEDecoder(128, 64, 64, 8, decoder_depth=3, decoder_num_heads=8)
    with torch.no_grad():
        ref.load_state_dict(reference_state(ours), strict=True)
        ref_dec.load_state_dict(
            {**ours.decoder.state_dict(), "decoder_pos_embed": ref_dec.decoder_pos_embed}, strict=True
        )
    images = torch.randn(2, 3, 64, 64)
    segments = torch.randint(0, 5, (2, 64))
    monkeypatch.setattr(RefCrossAttentionBlock, "per_image_keys", True)
    recorder = GumbelRecorder(monkeypatch)
    embedding_r, _, _, _, states = ref.encode_image(images)
    torch.manual_seed(7)
    _, _, mask, restore, mae_states = ref.encode_image(images, mask_ratio=0.75)
    hidden = mae_states["hidden"]
    mae_r = ref_dec.forward_vis(images, torch.cat([hidden.mean(1, keepdim=True), hidden], 1), mask, restore)
    hard_r = states["attns"][0]["hard_attn"]
    total_r = (embedding_r * torch.linspace(-1, 1, 96)).sum() + reference_clustering(hard_r, segments, 2) + mae_r
    total_r.backward()

    torch.manual_seed(7)
    order = torch.rand(2, 65)[:, 1:].argsort(1)
    noise, mae_noise = recorder.draws
    embedding, _, _, kl, mae = ours(images, torch.zeros(2, 32, dtype=torch.long), noise, segments, order, mae_noise)
    close(embedding, embedding_r)
    close(kl.mean(), reference_clustering(hard_r, segments, 2))
    close(mae.mean(), mae_r)
    total = (embedding * torch.linspace(-1, 1, 96)).sum() + kl.mean() + mae.mean()
    total.backward()
    theirs = grads(ref) | {f"dec.{k}": v for k, v in grads(ref_dec).items()}
    assert theirs.pop("class_embedding").eq(0).all()
    mine = {k: v for k, v in reference_state(ours, grad=True).items() if k in theirs}
    mine |= {f"dec.{k}": p.grad for k, p in ours.decoder.named_parameters()}
    assert len(mine) == len(theirs) > 60
    for name in theirs:
        close(mine[name], theirs[name], atol=1e-5, rtol=1e-3)


def reference_state(ours: Trainable, grad: bool = False) -> dict[str, torch.Tensor]:
    """fastloc's visual tower under the reference's names (its weights, or their gradients)."""
    get = (lambda p: p.grad) if grad else (lambda p: p.detach())
    vit, split = ours.vit, ours.split
    out = {
        "conv1.weight": get(vit.patch_embed.proj.weight),
        "class_embedding": None if grad else get(vit.cls_token)[0, 0],  # unused: no gradient here
        "positional_embedding": get(vit.pos_embed)[0],
        "ln_pre.weight": get(vit.norm_pre.weight),
        "ln_pre.bias": get(vit.norm_pre.bias),
        "ln_post.weight": get(vit.norm.weight),
        "ln_post.bias": get(vit.norm.bias),
        "proj": get(ours.proj.weight).T,
    }

    def block(prefix: str, b: nn.Module) -> None:
        pairs = {
            "attn.in_proj_weight": b.attn.qkv.weight,
            "attn.in_proj_bias": b.attn.qkv.bias,
            "attn.out_proj.weight": b.attn.proj.weight,
            "attn.out_proj.bias": b.attn.proj.bias,
            "ln_1.weight": b.norm1.weight,
            "ln_1.bias": b.norm1.bias,
            "ln_2.weight": b.norm2.weight,
            "ln_2.bias": b.norm2.bias,
            "mlp.c_fc.weight": b.mlp.fc1.weight,
            "mlp.c_fc.bias": b.mlp.fc1.bias,
            "mlp.c_proj.weight": b.mlp.fc2.weight,
            "mlp.c_proj.bias": b.mlp.fc2.bias,
        }
        out.update({f"{prefix}.{k}": get(v) for k, v in pairs.items()})

    for i, b in enumerate(vit.blocks):
        block(f"transformer.layers0.{i}" if i < split else f"transformer.layers2.{i - split}", b)
    for i, b in enumerate(ours.mae_blocks):
        block(f"transformer.layers_mae2.{i}", b)
    for k, p in ours.group.named_parameters():
        out[f"transformer.semantic_layer2.{k}"] = get(p)
    for k, p in ours.reconstruct.named_parameters():
        out[f"transformer.reconstruct_layer2.{k}"] = get(p)
    return {k: v for k, v in out.items() if v is not None}
