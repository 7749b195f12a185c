"""What Leopart and NeCo share (OTHER-METHODS.md section 1, NECO-AND-GRAM.md A4): multi-crop views
cut on the device, a projection head on the patch tokens, an EMA teacher, the teacher's foreground
mask, a queue of teacher embeddings, and DINOv3's Gram anchor as an option.

The student (``DenseNet``: backbone, 3-layer head, L2 norm, optional prototypes) sees the 2 global
and 4 local crops; the teacher, built like it with its own head initialization (the references load
the backbone weights into both and initialize each head apart), sees the globals and follows the
student by EMA with the per-update cosine momentum, updated before the optimizer's step as the
references do in ``training_step``. The loader delivers one decoded image per sample and the crops'
draws (``MultiCrop``); ``losses`` cuts the views from it, so both loaders and a resumed run see the
same crops.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastloc.align.gram import Anchor, gram_loss
from fastloc.align.leopart_ops import foreground_mask, loss_mask, pair_boxes
from fastloc.align.objective import Inputs, Objective, ObjectiveConfig, rebuilt
from fastloc.align.schedule import cosine
from fastloc.cli import flowing_help, require
from fastloc.data.batch import Batch
from fastloc.data.multicrop import BOX, PARAMS, MultiCrop, view_boxes
from fastloc.models.registry import create_model, image_config


@flowing_help
@dataclass(frozen=True, kw_only=True)
class DenseConfig(ObjectiveConfig):
    """What Leopart and NeCo share; the defaults are Leopart's (train_in100k_config.yml)."""

    crops: MultiCrop = field(default_factory=MultiCrop)
    """The views: sizes, counts, scale ranges, overlap rule, colour jitter, greyscale and blur."""

    base_scale: float = 2.0
    """The one decoded image the crops are cut from is base_scale x the global crop's side."""

    head_hidden: int = 2048
    """Hidden width of the 3-layer projection head."""

    head_dim: int = 256
    """Output width of the projection head (L2-normalized)."""

    head_layers: int = 3
    """Layers of the projection head (GELU between them)."""

    drop_path: float = 0.1
    """The student backbone's stochastic depth (the teacher has none)."""

    momentum: float = 0.9995
    """The EMA teacher's momentum at the first update; a per-update cosine takes it to momentum_end."""

    momentum_end: float = 1.0
    """The EMA teacher's momentum at the last update."""

    roi_kernel: int = 7
    """Side of the roi_align grid each crop pair is compared on (the references' roi_align_kernel_size)."""

    loss_mask: Literal["fg", "all", "bg"] = "fg"
    """Cells the loss averages over: fg (fully inside the teacher's foreground mask), all, or bg."""

    queue_length: int = 8192
    """Teacher embeddings kept per global crop (split over the ranks, as the references); 0: none."""

    gram_weight: float = 0.0
    """Weight of DINOv3's Gram anchoring of the student's global-crop patch tokens to the frozen
    start model's (0: off)."""

    def validate(self) -> None:
        require(self.base_scale >= 1, "--method.base-scale", self.base_scale, "must be at least 1")
        require(self.head_layers >= 1, "--method.head-layers", self.head_layers, "must be at least 1")
        require(self.roi_kernel >= 1, "--method.roi-kernel", self.roi_kernel, "must be at least 1")
        require(0 <= self.drop_path < 1, "--method.drop-path", self.drop_path, "must be in [0, 1)")
        for name, m in (("momentum", self.momentum), ("momentum-end", self.momentum_end)):
            require(0 <= m <= 1, f"--method.{name}", m, "must be in [0, 1]")
        require(self.queue_length >= 0, "--method.queue-length", self.queue_length, "must be 0 (none) or more")
        require(self.gram_weight >= 0, "--method.gram-weight", self.gram_weight, "must be 0 (off) or more")


class DenseNet(nn.Module):
    """A backbone's patch tokens (after its final norm; prefix tokens dropped) through the
    projection head, L2-normalized, and their prototype scores. (views of one size [N, 3, s, s])
    -> (tokens [N, P, D], embeddings [N, P, head_dim], scores [N, P, K] or None)."""

    def __init__(self, model: nn.Module, cfg: DenseConfig, prototypes: int):
        super().__init__()
        self.backbone, self.prefix = model, int(model.num_prefix_tokens)
        dims = [model.num_features] + [cfg.head_hidden] * (cfg.head_layers - 1) + [cfg.head_dim]
        layers: list[nn.Module] = []
        for i in range(cfg.head_layers):
            layers += [nn.Linear(dims[i], dims[i + 1])] + ([nn.GELU()] if i < cfg.head_layers - 1 else [])
        self.head = nn.Sequential(*layers)
        self.prototypes = nn.Linear(cfg.head_dim, prototypes, bias=False) if prototypes else None
        for module in (self.head, self.prototypes):
            if module is not None:
                module.apply(_init_linear)

    def forward(self, views: torch.Tensor):
        return self.project(self.backbone.forward_features(views))

    def project(self, tokens: torch.Tensor):
        """The backbone's output tokens [N, T, D] -> (patch tokens, embeddings, scores)."""
        tokens = tokens[:, self.prefix :]
        emb = nn.functional.normalize(self.head(tokens), dim=-1)
        return tokens, emb, None if self.prototypes is None else self.prototypes(emb)


class Student(nn.Module):
    """The trainable network over every view: (global views [G * B, 3, s, s], local views
    [L * B, 3, l, l] or None) -> a (tokens, embeddings, scores) triple per group of views (one
    call: one DDP forward, one compiled graph)."""

    def __init__(self, net: DenseNet):
        super().__init__()
        self.net = net

    def forward(self, globals_: torch.Tensor, locals_: torch.Tensor | None):
        return [self.net(views) for views in (globals_, locals_) if views is not None]


class Teacher(nn.Module):
    """The EMA network on the global views, in one pass: (tokens, embeddings, scores, and for a loss
    mask the last block's class-token attention to the patches averaged over the heads [N, P])."""

    def __init__(self, net: DenseNet, attention: bool):
        super().__init__()
        self.net, self.attention = net, attention

    def forward(self, views: torch.Tensor):
        if not self.attention:
            return (*self.net(views), None)
        model = self.net.backbone
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(views))))
        for block in model.blocks[:-1]:
            x = block(x)
        attention = cls_attention(model.blocks[-1].attn, model.blocks[-1].norm1(x), self.net.prefix)
        return (*self.net.project(model.norm(model.blocks[-1](x))), attention)


def cls_attention(attn: nn.Module, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """A timm ``Attention``'s softmax weights of the class token to each patch token, averaged over
    the heads: [N, T, C] (its input) -> [N, P] (the references' ``attn[:, :, 0, 1:]``, registers out)."""
    N, T, C = x.shape
    qkv = attn.qkv(x).reshape(N, T, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # [N, H, 1, T]
    return weights[:, :, 0, prefix:].mean(dim=1)


def references_pos_embed(model: nn.Module) -> nn.Module:
    """Make a timm ViT (``dynamic_img_size``) resample its position embedding for another grid as
    the references do (DINO's ``interpolate_pos_encoding``: leopart src/vit.py:183-203, NeCo's
    vit.py and vit_v2.py): bicubic by the scale factor (g + 0.1) / sqrt(N), without antialiasing.
    timm's own resampling interpolates to the size with antialiasing, which changes a local crop's
    embedding (14 x 14 -> 6 x 6 for ViT-S/16 at 96 px). Returns ``model``."""
    model._pos_embed = types.MethodType(_references_pos_embed, model)
    return model


def _references_pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``VisionTransformer._pos_embed`` (dynamic size: x [B, H, W, C]) with the references' resampling."""
    B, H, W, C = x.shape
    pos, (gh, gw) = self.pos_embed, self.patch_embed.grid_size
    if (gh, gw) != (H, W):
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        grid = pos[:, prefix:].float().reshape(1, gh, gw, C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((H + 0.1) / gh, (W + 0.1) / gw), mode="bicubic")
        pos = torch.cat([pos[:, :prefix], grid.permute(0, 2, 3, 1).reshape(1, H * W, C).to(pos.dtype)], dim=1)
    x = x.reshape(B, H * W, C)
    prefix_tokens = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
    if self.no_embed_class:
        x = torch.cat([*prefix_tokens, x + pos], dim=1)
    else:
        x = torch.cat([*prefix_tokens, x], dim=1) + pos
    return self.pos_drop(x)


def _init_linear(module: nn.Module) -> None:
    """The references' head initialization: truncated normal (std 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_backbone(cfg: DenseConfig, model: nn.Module) -> None:
    """One line for what the dense objectives cannot train: crops the patch does not divide, a
    global crop too small for the queue push, a class-token attention mask on a backbone without a
    class token or timm's ViT blocks."""
    patch = image_config(model).patch_size
    for side in cfg.crops.sizes:
        if side % patch:
            raise ValueError(f"--method.crops.sizes: {side} is not divisible by {cfg.backbone}'s patch {patch}")
    grid = cfg.crops.sizes[0] // patch
    if cfg.queue_length and grid * grid < 10:
        raise ValueError(
            f"--method.queue-length: a {cfg.crops.sizes[0]} px global crop has {grid * grid} patches, fewer than the "
            "10 per image each step pushes into the queue; use larger crops or --method.queue-length 0"
        )
    if cfg.loss_mask != "all":
        attn = getattr(getattr(model, "blocks", [None])[-1], "attn", None)
        if getattr(model, "cls_token", None) is None or not hasattr(attn, "qkv"):
            raise ValueError(
                f"--method.loss-mask {cfg.loss_mask} needs a backbone with a class token and timm ViT "
                f"attention ({cfg.backbone} has none); use --method.loss-mask all"
            )


class DenseObjective(Objective):
    """The shared machinery; a subclass implements ``dense_losses`` (``prototypes``: K, or 0 for none)."""

    cfg: DenseConfig

    def __init__(self, cfg: DenseConfig, prototypes: int = 0):
        super().__init__()
        extra = {"dynamic_img_size": True}
        student = references_pos_embed(create_model(cfg.backbone, cfg.weights, drop_path_rate=cfg.drop_path, **extra))
        check_backbone(cfg, student)
        self.cfg, self.image = cfg, image_config(student)
        twin = references_pos_embed(create_model(cfg.backbone, "random", **extra))
        twin.load_state_dict(student.state_dict())
        self.trainable = Student(DenseNet(student, cfg, prototypes))
        self.teacher = Teacher(DenseNet(twin, cfg, prototypes), cfg.loss_mask != "all").requires_grad_(False)
        self.anchor = rebuilt(Anchor(copy.deepcopy(twin)).requires_grad_(False)) if cfg.gram_weight else None
        self.groups = (cfg.crops.counts[0], sum(cfg.crops.counts[1:]))
        queue = cfg.queue_length // _world()
        self.register_buffer("queue", torch.zeros(self.groups[0], queue, cfg.head_dim))
        self.register_buffer("queued", torch.zeros((), dtype=torch.int64))  # rows pushed so far
        self._queued = 0  # its host copy: read once after a load, never in the step

    # ------------------------------------------------------------ the seam

    def inputs(self) -> tuple[Inputs, Inputs]:
        base = round(self.cfg.crops.sizes[0] * self.cfg.base_scale)
        return Inputs(self.cfg.crops, base), Inputs(self.cfg.crops, base)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Per image and global crop, a uniform priority per patch (the queue push's random pick)
        and per reference cell (NeCo's reference draw): [B, G, P + k * k * (V - 1)]."""
        grid = self.cfg.crops.sizes[0] // self.image.patch_size
        width = grid * grid + self.cfg.roi_kernel**2 * (sum(self.cfg.crops.counts) - 1)
        return torch.rand(batch, self.groups[0], width, generator=generator, device=generator.device)

    def step_sample(self, batch: Batch, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.params is None:
            raise ValueError(f"{type(self).__name__} needs the MultiCrop recipe's draws (batch.params)")
        return batch.params, sample

    def example(self, batch: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """A base image and crops spanning it, for the FLOP count and the benchmarks."""
        size, views = self.inputs()[0].size, sum(self.cfg.crops.counts)
        params = torch.zeros(batch, views, PARAMS)
        params[..., BOX] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # the whole image, no photometric op
        return torch.zeros(batch, 3, size, size, dtype=torch.uint8), (params, self.sample(batch, torch.Generator()))

    def is_head(self, name: str) -> bool:
        return name.startswith(("net.head.", "net.prototypes."))

    def decays(self, name: str, param: nn.Parameter) -> bool:
        """The references' ``exclude_from_wt_decay``: not biases nor 1-d parameters."""
        return not (name.endswith(".bias") or param.ndim == 1)

    def encoder(self) -> nn.Module:
        return self.trainable.net.backbone

    @torch.no_grad()
    def before_update(self, step: int, total: int) -> None:
        """The teacher's EMA update with this update's momentum (the references' training_step)."""
        m = cosine(self.cfg.momentum, self.cfg.momentum_end, step, total)
        torch._foreach_lerp_(list(self.teacher.parameters()), list(self.trainable.parameters()), 1 - m)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "queued" in state_dict:
            self._queued = int(state_dict[prefix + "queued"])

    # ------------------------------------------------------------ the step

    def losses(self, images: torch.Tensor, sample, model: nn.Module | None = None) -> torch.Tensor:
        params, drawn = sample
        crops, image = self.cfg.crops, self.image
        sizes = crops.view_sizes
        views = crops.cut(images, params, image.mean, image.std)
        B, (G, L) = images.shape[0], self.groups
        globals_ = torch.cat(views[:G])
        locals_ = torch.cat(views[G:]) if L else None
        self.normalize_prototypes()
        with torch.no_grad():
            _, t_emb, t_scores, attn = self.teacher(globals_)
        student = (self.trainable if model is None else model)(globals_, locals_)
        s_maps = self.view_maps(student, B)
        gc_boxes, other_boxes = pair_boxes(view_boxes(params), sizes, G)
        masks = None
        if self.cfg.loss_mask != "all":
            grid = crops.sizes[0] // image.patch_size
            fg = foreground_mask(attn, grid)  # [G * B, 1, g, g]
            masks = [loss_mask(m, self.cfg.loss_mask) for m in fg.chunk(G)]
        losses = self.dense_losses(t_emb, t_scores, s_maps, gc_boxes, other_boxes, masks, drawn, B)
        if self.cfg.gram_weight:
            losses = losses + self.cfg.gram_weight * self.gram(globals_, student[0][0], B)
        return losses

    def dense_losses(self, t_emb, t_scores, s_maps, gc_boxes, other_boxes, masks, drawn, batch) -> torch.Tensor:
        """Per-image losses [B] from the teacher's global-crop embeddings and scores [G * B, P, .],
        the student's maps per view [B, C, h, w], the pair boxes and the loss masks."""
        raise NotImplementedError

    def gram(self, globals_: torch.Tensor, tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """Per-image Gram anchoring of the student's global-crop tokens [G * B, P, D], averaged over the crops."""
        with torch.no_grad():
            anchor = self.anchor(globals_)[:, self.image.prefix_tokens :]
        return gram_loss(tokens, anchor).view(-1, batch).mean(dim=0)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Both networks' prototypes L2-normalized (rows), before every step as the references."""
        for net in (self.trainable.net, self.teacher.net):
            if net.prototypes is not None:
                net.prototypes.weight.copy_(nn.functional.normalize(net.prototypes.weight, dim=1))

    def view_maps(self, student: list, batch: int) -> list[torch.Tensor]:
        """The student's maps per view [B, C, g, g] (prototype scores, else embeddings), globals first."""
        maps = []
        for (_, emb, scores), size, count in zip(student, self.cfg.crops.sizes, self.cfg.crops.counts):
            grid = size // self.image.patch_size
            rows = emb if scores is None else scores  # [count * B, P, C], crop-major
            maps += [r.transpose(1, 2).reshape(batch, -1, grid, grid) for r in rows.chunk(count)]
        return maps

    def push(self, emb: torch.Tensor, priority: torch.Tensor, mask: torch.Tensor | None, crop: int) -> None:
        """Queue ``min(10 B, queue)`` of global crop ``crop``'s teacher embeddings [B, P, D], picked at
        random among the foreground ones (the references' ``randperm`` of the fg tokens); where fewer
        are foreground, background ones fill the push (the references fail there). Newest first."""
        B, P, D = emb.shape
        n = min(10 * B, self.queue.shape[1])
        if n == 0:
            return
        score = priority.reshape(B * P)
        if mask is not None:
            score = score + mask.reshape(B * P)  # foreground first
        picked = emb.reshape(B * P, D)[score.topk(n).indices]
        self.queue[crop] = torch.cat([picked.to(self.queue.dtype), self.queue[crop, :-n]])
        if crop == self.groups[0] - 1:
            self._queued = min(self._queued + n, self.queue.shape[1])
            self.queued.fill_(self._queued)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
