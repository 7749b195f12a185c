"""PACL (CVPR 2023; OTHER-METHODS.md section 3): patch-aligned contrastive learning of a vision
embedder on a frozen CLIP. Each image's patch tokens are embedded (``pacl_ops.Embedder``), weighted
by their compatibility with a caption, pooled, and scored against it; a symmetric InfoNCE over the
batch trains the embedder. Its patch-text compatibility is then a zero-shot segmenter.

The paper pools every image with every caption of the (global) batch, each pair with its own
weights; ``--method.own-caption`` pools each image with its own caption only, as the public
reimplementations do (NMS05), and ``--method.weighting sigmoid`` takes their sigmoid(10 cos).
Both towers are frozen and rebuilt from the config (in no checkpoint); ``--method.train-vision``
trains the image tower too. Named departures and unknowns: the paper's temperature is not known
(default CLIP's learnable one, from 0.07, clamped at 100; NMS05: 0.1 fixed); its augmentation is
not known (default open_clip's training crop); NMS05's LayerNorm and dropout before the embedder
and its trainable text head are not built; with ``--data.accumulation`` the negatives are those
of the micro-batch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from fastloc.align.contrastive import MAX_LOGIT_SCALE, CaptionConfig, CaptionObjective, gather_rows
from fastloc.align.objective import Inputs, rebuilt
from fastloc.align.pacl_ops import (
    Embedder,
    infonce_losses,
    logit_scale_init,
    own_scores,
    pair_scores,
)
from fastloc.cli import flowing_help, require
from fastloc.data.batch import Batch
from fastloc.data.recipes import CenterCrop, Rrc
from fastloc.models.registry import create_model, image_config


@flowing_help
@dataclass(frozen=True, kw_only=True)
class PaclConfig(CaptionConfig):
    """PACL's knobs; the defaults are the paper's where it states them."""

    weighting: Literal["softmax", "sigmoid"] = "softmax"
    """Patch weights from their compatibility with the text: softmax over the patches (the paper)
    or sigmoid(10 cos) (NMS05)."""

    own_caption: bool = False
    """Pool each image with its own caption only, then score it against every caption (NMS05's
    model/pacl.py); off: every image-caption pair of the batch pooled with its own weights (the paper)."""

    activation: Literal["relu", "gelu"] = "relu"
    """The embedder MLP's activation (the paper's reproduction: ReLU; NMS05: GELU)."""

    temperature: float = 0.07
    """The InfoNCE temperature, its start when learnt (the paper's value is not known; NMS05: 0.1)."""

    learn_temperature: bool = True
    """Learn the temperature (CLIP's ln(1/tau), clamped at a scale of 100); off: fixed."""

    text_chunk: int = 256
    """Texts pooled at a time in the pairwise pooling (memory: micro-batch x chunk x (patches + width))."""

    train_vision: bool = False
    """Train the image tower with the embedder (the paper freezes it)."""

    noun_phrases: bool = False
    """NMS05's object-centric captions: half of them replaced by one of their noun phrases in a
    template (needs spaCy and its en_core_web_sm; never downloaded at run time)."""

    def validate(self) -> None:
        require(self.temperature > 0, "--method.temperature", self.temperature, "must be above 0")
        require(self.text_chunk >= 1, "--method.text-chunk", self.text_chunk, "must be at least 1")
        if self.noun_phrases:
            require(
                importlib.util.find_spec("spacy") is not None,
                "--method.noun-phrases",
                True,
                "needs spaCy (pip install spacy, and its en_core_web_sm model), which is not installed",
            )

    def encoder_in_checkpoint(self) -> bool:
        return self.train_vision  # else the frozen tower, rebuilt from --method.weights


class PatchTokens(nn.Module):
    """The image tower as PACL reads it: uint8 images [B, 3, S, S] -> the patch tokens after the
    final norm [B, P, D] (prefix tokens dropped)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model, self.prefix = model, model.num_prefix_tokens
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return self.model.forward_features(x)[:, self.prefix :]


class TextTower(nn.Module):
    """The text tower as PACL reads it: tokens [B, L] -> embeddings [B, d] (``encode_text``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


class Trainable(nn.Module):
    """The embedder (and the image tower under ``train_vision``) and the temperature: what DDP
    wraps. (patch tokens [B, P, D], or images when it holds the tower; this rank's texts [B, d];
    every rank's texts [N, d]) -> scaled logits [B, N] of this rank's images against every text."""

    def __init__(self, cfg: PaclConfig, embedder: Embedder, vision: PatchTokens | None):
        super().__init__()
        self.cfg, self.embedder, self.vision = cfg, embedder, vision
        init = torch.tensor(logit_scale_init(cfg.temperature))
        if cfg.learn_temperature:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    def forward(self, inputs: torch.Tensor, own: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        tokens = inputs if self.vision is None else self.vision(inputs)
        patches = self.embedder(tokens)  # [B, P, d]
        if cfg.own_caption:
            scores = own_scores(patches, own, texts, cfg.weighting)
        else:
            scores = pair_scores(patches, texts, cfg.weighting, cfg.text_chunk)
        return scores.float() * self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()  # [B, N]


class Pacl(CaptionObjective):
    def __init__(self, cfg: PaclConfig):
        super().__init__()
        from fastloc.models.text import load_text_tower  # open_clip: only where a PACL run is built

        model = create_model(cfg.backbone, cfg.weights)
        self.cfg, self.image = cfg, image_config(model)
        tower, self.tokenizer = load_text_tower(cfg.backbone, cfg.tower_weights())
        self.text = rebuilt(TextTower(tower).requires_grad_(False))
        vision = PatchTokens(model, self.image.mean, self.image.std)
        embedder = Embedder(model.num_features, _text_width(self.text, self.tokenizer), cfg.activation)
        if cfg.train_vision:
            self.vision = None
            self.trainable = Trainable(cfg, embedder, vision)
        else:
            # what the run's frozen tower was: an export checks the tower it rebuilds against it
            self.register_buffer("tower_sums", tower_sums(model.state_dict()))
            self.vision = rebuilt(vision.requires_grad_(False))
            self.trainable = Trainable(cfg, embedder, None)

    def frozen(self) -> list[nn.Module]:
        return [m for m in (self.vision, self.text) if m is not None]

    def inputs(self) -> tuple[Inputs, Inputs]:
        """open_clip's training crop (RRC scale 0.9-1, bicubic, no flip) and timm's eval transform,
        each sample with one caption."""
        image = self.image
        train = Rrc(scale=(0.9, 1.0), flip_p=0.0, interpolations=("bicubic",))
        val = CenterCrop(crop_pct=image.crop_pct, interpolation=image.interpolation)
        return Inputs(train, image.size, captions=True), Inputs(val, image.size, captions=True)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The captions come with the batch: no random inputs ([batch, 0]), but for noun phrases
        three uniforms per sample [batch, 3] (phrase or caption, which phrase, which template)."""
        return torch.rand(batch, 3 if self.cfg.noun_phrases else 0, generator=generator, device=generator.device)

    def step_sample(self, batch: Batch, sample: torch.Tensor) -> torch.Tensor:
        """This rank's captions (one per sample), tokenized on the host, on the images' device: [B, L]."""
        if batch.captions is None:
            raise ValueError("PACL needs captions in the batch (Inputs(..., captions=True))")
        captions = [lines[0] if lines else "" for lines in batch.captions]
        if self.cfg.noun_phrases:
            captions = noun_phrase_captions(captions, sample.tolist())  # the option's one host sync
        return self.tokenizer(captions).to(batch.images.device, non_blocking=True)

    def losses(self, images: torch.Tensor, tokens: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """Per-image symmetric InfoNCE [B] over the global batch (every rank's captions the negatives)."""
        with torch.no_grad():
            own = self.text(tokens)  # [B, d]
            inputs = images if self.vision is None else self.vision(images)
        texts, _ = gather_rows(own)  # [N, d]: every rank's captions
        rows = (self.trainable if model is None else model)(inputs, own, texts)  # [B, N]
        full, offset = gather_rows(rows)  # [N, N]: every rank's rows
        return infonce_losses(full, offset, len(images))

    def is_head(self, name: str) -> bool:
        """The embedder and the temperature are new parts (with --method.train-vision, the tower is not)."""
        return not name.startswith("vision.")

    def encoder(self) -> nn.Module:
        """The image tower (a timm model): trained under ``train_vision``, else a plain copy of the
        frozen one (its parameters, held as buffers here, as parameters again)."""
        if self.trainable.vision is not None:
            return self.trainable.vision.model
        frozen = self.vision.model
        model = create_model(self.cfg.backbone, "random").to(next(frozen.buffers()).device)
        held = dict(frozen.named_buffers())
        model.load_state_dict({k: held[k] for k in model.state_dict()})
        if not torch.allclose(tower_sums(model.state_dict()), self.tower_sums.to(model.pos_embed.device), rtol=1e-6):
            raise RuntimeError(
                f"the frozen image tower rebuilt from --method.weights {self.cfg.weights} is not the one this "
                "run trained with (its weights are in no checkpoint): build the objective with the run's weights"
            )
        return model

    def embedder(self) -> Embedder:
        """The trained embedder: what the zero-shot readout applies to the patch tokens."""
        return self.trainable.embedder

    def export_parts(self, encoder: Path, source: dict) -> list[Path]:
        """The embedder beside the encoder (ENCODER.embedder.safetensors): zero-shot's ``--head``."""
        from fastloc.probe.zeroshot.pacl import save_embedder

        return [save_embedder(self.embedder(), encoder.with_name(f"{encoder.stem}.embedder.safetensors"), source)]

    def example(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.image.size
        tokens = self.tokenizer([""] * batch)
        return torch.zeros(batch, 3, size, size, dtype=torch.uint8), tokens


def tower_sums(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each tensor's sum in float64 [n], in key order: a cheap summary of a frozen tower's weights."""
    return torch.stack([t.detach().double().sum() for t in state.values()])


def _text_width(text: TextTower, tokenizer) -> int:
    """The text embeddings' width (the embedder's output), read from one encoded empty caption."""
    with torch.no_grad():
        device = next(text.buffers()).device
        return int(text(tokenizer([""]).to(device)).shape[-1])


NOUN_TEMPLATES = (  # NMS05's data/image_caption_data.py
    "a picture of {}.",
    "itap of {}.",
    "a photograph of {}.",
    "this picture contains {}.",
    "a good photo of {}.",
)


def noun_phrase_captions(captions: list[str], draws: list[list[float]]) -> list[str]:
    """NMS05's object-centric captions: per sample, with probability 1/2, one of its caption's noun
    chunks (spaCy en_core_web_sm, lower-cased) in one of 5 templates, else the caption; ``draws``
    are the step's three uniforms per sample (from the run's generator: a resume redraws them)."""
    parser = _spacy()
    out = []
    for caption, (keep, pick, template) in zip(captions, draws):
        phrases = [chunk.text.lower() for chunk in parser(caption).noun_chunks]
        if phrases and keep < 0.5:
            phrase = phrases[min(int(pick * len(phrases)), len(phrases) - 1)]
            caption = NOUN_TEMPLATES[min(int(template * len(NOUN_TEMPLATES)), len(NOUN_TEMPLATES) - 1)].format(phrase)
        out.append(caption)
    return out


_PARSER = None


def _spacy():
    """spaCy's en_core_web_sm, loaded once per process (an error naming it where it is missing)."""
    global _PARSER
    if _PARSER is None:
        try:
            import spacy

            _PARSER = spacy.load("en_core_web_sm")
        except (ImportError, OSError) as exc:
            raise RuntimeError(
                f"--method.noun-phrases needs spaCy and its en_core_web_sm model ({exc}); "
                "install them (python -m spacy download en_core_web_sm) or leave the option off"
            ) from None
    return _PARSER
