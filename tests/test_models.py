"""fastloc.models: every registered backbone builds MaskEmbed's modules; soft-capped attention is
exact; teacher, student and decoder are built as the reference builds them; weights load or fail
with a message that names the option."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import Attention
from torch import nn

from fastloc.models.attention import SoftCapAttention, flex_softcap_attention, soft_cap, softcap_attention
from fastloc.models.decoder import Decoder
from fastloc.models.encoders import Student, build_teacher
from fastloc.models.registry import BACKBONES, WeightsError, backbone, create_model, image_config


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_registered_backbone_builds_the_maskembed_modules(name):
    """On the meta device (no memory, no weights): teacher, student and decoder shapes and types."""
    entry = backbone(name)
    with torch.device("meta"):
        model = create_model(name, "random")
        depth, cfg = len(model.blocks), image_config(model)
        teacher = build_teacher(create_model(name, "random"), skip_blocks=1)
        student = Student(model, teacher.num_features, cap=30.0 if entry.soft_cap else None)
        decoder = Decoder.for_student(
            model, teacher.num_features, cfg.tokens, qkv_bias=entry.decoder_qkv_bias, qk_norm=entry.decoder_qk_norm
        )
        x = torch.empty(2, 3, cfg.size, cfg.size)
        target, tokens = teacher.forward_features(x), student(x)
        prediction = decoder(tokens, torch.empty(2, 3, cfg.grid**2))
    D = teacher.num_features
    assert len(teacher.blocks) == depth - 1 and not any(p.requires_grad for p in teacher.parameters())
    assert target.shape == tokens.shape == (2, cfg.tokens, D) and prediction.shape == (6, cfg.tokens, D)
    assert cfg.tokens == cfg.prefix_tokens + (cfg.size // cfg.patch_size) ** 2
    capped = sum(isinstance(b.attn, SoftCapAttention) for b in student.encoder.blocks)
    assert capped == (depth if entry.soft_cap else 0)
    assert getattr(student.encoder, "attn_pool", None) is None and len(decoder.blocks) == 2
    if entry.decoder_qkv_bias is not None:
        assert (decoder.blocks[0].attn.qkv.bias is not None) == entry.decoder_qkv_bias


def test_registry_knows_the_reference_configs():
    assert backbone("clip-vit-b").timm_id == "vit_base_patch16_clip_quickgelu_224.openai"
    assert backbone("dinov2-vit-b").kwargs == {"img_size": 224}
    assert not backbone("eva02-vit-b").soft_cap and backbone("vit_small_patch16_224").timm_id == "vit_small_patch16_224"
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        backbone("nope")
    with torch.device("meta"):
        cfg = image_config(create_model("clip-vit-b", "random"))
    assert (cfg.size, cfg.patch_size, cfg.prefix_tokens, cfg.crop_pct, cfg.eval_resize) == (224, 16, 1, 0.9, 248)
    assert cfg.mean == (0.48145466, 0.4578275, 0.40821073) and cfg.interpolation == "bicubic"


# ---------------------------------------------------------------- soft-capped attention


def test_softcap_attention_is_the_materialized_formula():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=torch.float64) * 4 for _ in range(3))
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / 8**0.5
    expected = torch.softmax(30 * torch.tanh(logits / 30), -1) @ v
    torch.testing.assert_close(softcap_attention(q, k, v, 30.0), expected)
    assert (30 * torch.tanh(torch.tensor(10.0) / 30)).item() == pytest.approx(9.645, abs=1e-3)  # the cap bites


def test_flex_attention_agrees_with_the_materialized_path():
    """The fused path (FlexAttention, tanh score_mod; compiled, here on the CPU) and the exact one."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 17, 16) * 3 for _ in range(3))
    torch.testing.assert_close(
        flex_softcap_attention(q, k, v, 30.0), softcap_attention(q, k, v, 30.0), atol=2e-5, rtol=0
    )


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # uncompiled on purpose
def test_flex_attention_backward_agrees_with_the_materialized_path(monkeypatch):
    """CUDA training differentiates through the fused path. On the CPU this torch refuses to:
    flex_attention's _validate_device raises "FlexAttention does not support backward on CPU", and
    with that check lifted, inductor cannot lower the compiled backward for the CPU (InductorError).
    What does run is FlexAttention's own autograd, uncompiled: the dense backward over the joint
    graph torch traces from our score_mod, the graph the fused CUDA backward is generated from. Its
    gradients must be the materialized path's, for q, k, v and for a soft-capped ViT's parameters."""
    import torch.nn.attention.flex_attention as flex

    from fastloc.models import attention

    monkeypatch.setattr(flex, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(attention, "_flex", lambda: flex.flex_attention)
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 3, 17, 16, dtype=torch.float64) * 6 for _ in range(3))  # logits well above 10
    grad = torch.randn(2, 3, 17, 16, dtype=torch.float64)
    fused = torch.autograd.grad(flex_softcap_attention(*(t.requires_grad_() for t in (q, k, v)), 30.0), (q, k, v), grad)
    exact = torch.autograd.grad(softcap_attention(q, k, v, 30.0), (q, k, v), grad)
    for a, b in zip(fused, exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    def vit(fused: bool) -> nn.Module:
        torch.manual_seed(9)
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=0)
        soft_cap(model.double(), 30.0, fused=fused)
        with torch.no_grad():  # logits ~20, where the cap's derivative departs from 1
            for block in model.blocks:
                block.attn.qkv.weight[: 2 * block.attn.attn_dim] *= 25
        return model

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grads = []
    for fused_path in (True, False):
        model = vit(fused_path)
        model.forward_features(x).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-7, atol=1e-9, msg=name)


def test_a_huge_cap_is_timm_attention():
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model.forward_features(x)
    names = list(model.state_dict())
    assert soft_cap(model, cap=1e7) == 2 and list(model.state_dict()) == names  # same parameters, same names
    torch.testing.assert_close(model.forward_features(x), expected, atol=1e-5, rtol=1e-5)
    soft_cap_30 = [b.attn for b in model.blocks]
    for attn in soft_cap_30:
        attn.cap = 30.0
    assert not torch.allclose(model.forward_features(x * 20), expected, atol=1e-3)


# ---------------------------------------------------------------- teacher, student, decoder


def test_teacher_drops_its_last_block_and_keeps_the_final_norm():
    torch.manual_seed(3)
    full = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=0).eval()
    teacher = build_teacher(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_classes=0), 1
    )
    teacher.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("blocks.2.")})
    x = torch.randn(2, 3, 32, 32)
    manual = full.norm(full.blocks[:2](full.norm_pre(full._pos_embed(full.patch_embed(x)))))
    torch.testing.assert_close(teacher.forward_features(x), manual)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="skip_blocks"):
        build_teacher(full, 3)


def test_student_resets_its_norm_and_starts_at_zero():
    torch.manual_seed(4)
    model = create_model("siglip-vit-b", "random", img_size=32, depth=2)  # SigLIP: no prefix, attention pooling
    assert model.attn_pool is not None and model.norm.eps == 1e-6
    student = Student(model, 64)
    norm = student.encoder.norm
    assert norm.eps == 1e-5 and torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()
    assert student.encoder.attn_pool is None and isinstance(student.encoder.head, nn.Identity)
    out = student(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4, 64) and not out.any()  # zero head: every token 0 at step 0
    assert all(type(b.attn) is SoftCapAttention and b.attn.cap == 30.0 for b in student.encoder.blocks)
    assert not any(type(m) is Attention for m in student.modules())


def test_decoder_zeroes_prefix_and_masked_tokens():
    torch.manual_seed(5)
    decoder = Decoder(tokens=1 + 4, dim=8, num_heads=2, prefix_tokens=1)
    assert decoder.blocks[0].ls1.gamma.eq(1e-6).all() and decoder.blocks[0].mlp.fc1.out_features == 32
    tokens = torch.randn(2, 5, 8)
    masks = torch.tensor([[[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 1, 1]]] * 2, dtype=torch.bool)  # [2, 3, 4]
    seen = []
    decoder.blocks.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    prediction = decoder(tokens, masks)
    assert prediction.shape == (6, 5, 8)
    inputs = seen[0] - decoder.pos_embed  # [6, 5, 8]: the masked tokens
    for row in range(6):
        b, m = divmod(row, 3)
        keep = torch.cat([torch.zeros(1, dtype=torch.bool), masks[b, m]])
        torch.testing.assert_close(inputs[row], tokens[b] * keep[:, None])


# ---------------------------------------------------------------- weights


def test_pretrained_weights_without_a_hub_name_the_option(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time; fails at once
    with pytest.raises(WeightsError, match="--weights FILE"):
        create_model("in1k-vit-t", "pretrained")


def test_local_weights_load_through_timm(tmp_path):
    torch.manual_seed(6)
    source = create_model("tiny", "random")
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_model("tiny", path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("tiny", tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="not weights for"):
        create_model("in1k-vit-s", path)  # another architecture


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_softcap_attention_matches_the_materialized_path(dtype):
    """On CUDA the student's attention runs FlexAttention with the tanh score_mod."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(4, 12, 197, 64, device="cuda", dtype=dtype) * 3 for _ in range(3))
    fused = flex_softcap_attention(q, k, v, 30.0).float()
    exact = softcap_attention(q.double(), k.double(), v.double(), 30.0).float()
    tolerance = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused, exact, atol=tolerance, rtol=tolerance)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).cuda().eval()
    soft_cap(model, 30.0)
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        fused_out = model.forward_features(x)
        for block in model.blocks:
            block.attn.fused = False
        torch.testing.assert_close(fused_out, model.forward_features(x), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_fused_softcap_attention_backward_matches_the_materialized_path():
    """The compiled FlexAttention backward that CUDA training runs, against float64 materialized gradients."""
    torch.manual_seed(11)
    q, k, v = (torch.randn(4, 12, 197, 64, device="cuda") * 3 for _ in range(3))
    grad = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fused = torch.autograd.grad(flex_softcap_attention(*leaves, 30.0), leaves, grad)
    exact_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    exact = torch.autograd.grad(softcap_attention(*exact_leaves, 30.0), exact_leaves, grad.double())
    for a, b in zip(fused, exact):
        torch.testing.assert_close(a.double(), b, atol=1e-3, rtol=1e-3)
