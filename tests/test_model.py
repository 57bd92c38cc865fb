"""The model package: exact architectures, official keys, timm equivalence, any input size."""
import functools
import pytest
import timm
import torch
import torch.nn.functional as F

import twins
from twins import TIMM_NAMES, create_model
from twins.attention import GlobalSubsampledAttention, LocallyGroupedAttention
from twins.flops import count_flops

from conftest import load_reference

REFERENCE = load_reference("official_state_dict_keys")
OFFICIAL = list(TIMM_NAMES)


@functools.lru_cache(maxsize=None)
def official_model(name):
    torch.manual_seed(0)
    return create_model(name).eval()


@pytest.mark.parametrize("name", OFFICIAL)
def test_parameter_count_and_keys_match_official(name):
    model = official_model(name)
    assert sum(p.numel() for p in model.parameters()) == REFERENCE[name]["params"]
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: shape for k, shape in REFERENCE[name]["state_dict"]}
    assert ours == theirs


@pytest.mark.parametrize("name", OFFICIAL)
def test_fvcore_flops_match_official(name):
    flops = count_flops(official_model(name))
    assert abs(flops / REFERENCE[name]["fvcore_flops_224"] - 1) < 0.01


@pytest.mark.parametrize("name", OFFICIAL)
def test_equal_to_timm_with_the_same_weights(name):
    ours = official_model(name)
    with torch.device("meta"):  # skip timm's initialisation: every tensor is assigned below
        reference = timm.create_model(TIMM_NAMES[name])
    reference.load_state_dict(ours.state_dict(), strict=True, assign=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - reference.eval()(x)).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("name", OFFICIAL + ["alt_gvt_micro", "pcpvt_micro"])
def test_forward_backward_reaches_every_parameter(name):
    model = official_model(name).train()
    try:
        # The smallest legal input still reaches every parameter (the PEG's centre taps at 1x1).
        out = model(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 1000)
        out.logsumexp(1).sum().backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert all(p.grad.abs().sum() > 0 for p in model.pos_block.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (225, 300), (97, 65), (32, 32)])
def test_any_input_size_svt_small(size):
    model = official_model("alt_gvt_small")
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(256, 256), (97, 65)])
def test_any_input_size_pcpvt_small(size):
    with torch.no_grad():
        out = official_model("pcpvt_small_v0")(torch.randn(1, 3, *size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_padded_window_equals_global_attention_over_real_tokens():
    """A window larger than the map must attend to exactly the real tokens, as full attention does."""
    torch.manual_seed(0)
    dim, heads, size = 24, 3, (5, 3)  # pads to 7x7 on both sides, 34 of 49 keys are padding
    lsa = LocallyGroupedAttention(dim, heads, window_size=7).eval()
    gsa = GlobalSubsampledAttention(dim, heads, sr_ratio=1).eval()
    with torch.no_grad():
        gsa.q.weight.copy_(lsa.qkv.weight[:dim])
        gsa.q.bias.copy_(lsa.qkv.bias[:dim])
        gsa.kv.weight.copy_(lsa.qkv.weight[dim:])
        gsa.kv.bias.copy_(lsa.qkv.bias[dim:])
        gsa.proj.load_state_dict(lsa.proj.state_dict())
        x = torch.randn(2, size[0] * size[1], dim)
        torch.testing.assert_close(lsa(x, size), gsa(x, size), atol=1e-5, rtol=1e-5)


def test_padding_on_one_side_only_is_masked():
    """The official masked LSA silently skips masking when only one side needs padding."""
    torch.manual_seed(0)
    lsa = LocallyGroupedAttention(8, 2, window_size=4).eval()
    H, W = 8, 6  # width padded by 2, height not at all
    x = torch.randn(1, H * W, 8)
    with torch.no_grad():
        full = lsa(x, (H, W)).view(1, H, W, 8)
        # The right-hand windows hold columns 4..5 only: the same result as a 8x2 map alone.
        right = x.view(1, H, W, 8)[:, :, 4:].reshape(1, H * 2, 8)
        alone = lsa(right, (H, 2)).view(1, H, 2, 8)
    torch.testing.assert_close(full[:, :, 4:], alone, atol=1e-5, rtol=1e-5)


def test_input_smaller_than_total_stride_is_a_clear_error():
    model = create_model("alt_gvt_micro")
    with pytest.raises(ValueError, match="smaller than the network's total stride 32"):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match=r"expected a \(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("size", [(224, 224), (97, 65)])
def test_pyramid_shapes_strides_and_selection(size):
    model = create_model("alt_gvt_micro", num_classes=0).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        maps = model.forward_pyramid(x)
        picked = model.forward_pyramid(x, out_indices=(3, 1))
    expected_hw = []
    h, w = size
    for p in model.patch_sizes:
        h, w = h // p, w // p
        expected_hw.append((h, w))
    assert [tuple(m.shape) for m in maps] == [(2, c, *hw) for c, hw in zip(model.embed_dims, expected_hw)]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    torch.testing.assert_close(picked[0], maps[3])
    torch.testing.assert_close(picked[1], maps[1])
    with pytest.raises(ValueError, match="out_indices"):
        model.forward_pyramid(x, out_indices=(4,))


def test_stage_output_norms():
    model = create_model("pcpvt_micro", num_classes=0, out_norms=True).eval()
    assert "out_norms.2.weight" in model.state_dict()
    with torch.no_grad():
        maps = model.forward_pyramid(torch.randn(1, 3, 64, 64))
    # A fresh LayerNorm (weight 1, bias 0) leaves every position with zero mean over channels.
    for m in maps:
        assert m.mean(dim=1).abs().max() < 1e-5


def test_classifier_free_model_and_reset_classifier():
    model = create_model("alt_gvt_micro", num_classes=0).eval()
    assert not any(k.startswith("head.") for k in model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
        model.reset_classifier(0)
        assert model(x).shape == (2, 128)


def test_no_weight_decay_is_exactly_the_peg_parameters():
    model = create_model("alt_gvt_micro")
    assert model.no_weight_decay() == {f"pos_block.{i}.proj.0.{p}" for i in range(4)
                                       for p in ("weight", "bias")}


def test_drop_path_rises_linearly_over_all_blocks():
    model = create_model("alt_gvt_micro", drop_path_rate=0.35)
    rates = [blk.drop_path.p for stage in model.blocks for blk in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.35)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert max(steps) - min(steps) < 1e-6


def test_svt_alternates_local_and_global_attention():
    model = official_model("alt_gvt_small")
    kinds = [[type(blk.attn).__name__[0] for blk in stage] for stage in model.blocks]
    assert kinds[2] == list("LG" * 5)
    assert all(blk.attn.sr is None for blk in model.blocks[3] if isinstance(blk.attn, GlobalSubsampledAttention))


def _saved_activation_bytes(model, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    return total, loss


def test_grad_checkpointing_saves_memory_and_keeps_gradients():
    torch.manual_seed(0)
    model = create_model("alt_gvt_micro").train()
    x = torch.randn(2, 3, 64, 64)
    plain_bytes, loss = _saved_activation_bytes(model, x)
    loss.backward()
    plain_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    ckpt_bytes, loss = _saved_activation_bytes(model, x)
    loss.backward()
    assert ckpt_bytes < 0.5 * plain_bytes
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain_grads[n], atol=1e-6, rtol=1e-5)


def test_timm_registration_keeps_timm_entries():
    assert type(timm.create_model("alt_gvt_micro", num_classes=3)) is twins.Twins
    assert type(timm.create_model("pcpvt_small", num_classes=3)) is twins.Twins
    with torch.device("meta"):
        assert type(timm.create_model("twins_svt_small")).__module__ == "timm.models.twins"
    with pytest.raises(ValueError, match="never downloaded"):
        timm.create_model("alt_gvt_micro", pretrained=True)


def test_create_model_errors_name_the_problem():
    with pytest.raises(ValueError, match="Did you mean alt_gvt_small"):
        create_model("alt_gvt_smal")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['drop_pth'\]"):
        create_model("alt_gvt_micro", drop_pth=0.1)
    with pytest.raises(ValueError, match="depths has 3 entries but the model has 4 stages"):
        create_model("alt_gvt_micro", depths=(1, 1, 1))


def test_aliases_and_list_models():
    assert set(twins.list_models()) >= set(OFFICIAL)
    assert "pcpvt_small" in twins.list_models(include_aliases=True)
    with torch.device("meta"):
        a, b = create_model("pcpvt_small"), create_model("pcpvt_small_v0")
    assert a.state_dict().keys() == b.state_dict().keys()


def test_generic_constructor_builds_any_stage_layout():
    model = twins.Twins(num_classes=4, embed_dims=(16, 32, 64), depths=(2, 1, 3), num_heads=(2, 2, 4),
                        mlp_ratios=(2, 2, 2), window_sizes=(3, 0, 5), sr_ratios=(2, 2, 1),
                        patch_sizes=(4, 2, 2), peg_kernel_size=5)
    assert model(torch.randn(1, 3, 40, 48)).shape == (1, 4)
    assert model.pos_block[0].proj[0].kernel_size == (5, 5)
    assert [type(b.attn).__name__ for b in model.blocks[0]] == ["LocallyGroupedAttention",
                                                               "GlobalSubsampledAttention"]


def test_init_follows_official_scheme():
    model = official_model("alt_gvt_small")
    conv = model.blocks[0][1].attn.sr  # 64 -> 64, 8x8: fan_out = 64 * 64
    assert conv.weight.std().item() == pytest.approx((2.0 / (64 * 64)) ** 0.5, rel=0.02)
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.head.bias.abs().max() == 0
    peg = model.pos_block[2].proj[0]  # depth-wise: fan_out = 9 * 256 / 256 = 9
    assert peg.weight.std().item() == pytest.approx((2.0 / 9) ** 0.5, rel=0.1)


def test_bf16_autocast_runs_and_stays_close():
    model = create_model("alt_gvt_micro").eval()
    x = torch.randn(4, 3, 45, 37)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert F.cosine_similarity(low.float(), ref, dim=1).min() > 0.99


def test_per_stage_keyword_api_builds_the_same_network_as_the_table():
    stage_args = {}
    cfg = twins.MODEL_CONFIGS["alt_gvt_small"]
    for i in range(4):
        stage_args.update({f"s{i + 1}_emb_dim": cfg["embed_dims"][i], f"s{i + 1}_patch_size": 4 if i == 0 else 2,
                           f"s{i + 1}_local_patch_size": 7, f"s{i + 1}_global_k": cfg["sr_ratios"][i],
                           f"s{i + 1}_depth": cfg["depths"][i], f"s{i + 1}_heads": cfg["num_heads"][i],
                           f"s{i + 1}_mlp_mult": 4})
    with torch.device("meta"):
        model = twins.twins_from_stage_kwargs(peg_kernel_size=3, dropout=0.0, **stage_args)
    reference = official_model("alt_gvt_small").state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    with pytest.raises(ValueError, match="missing per-stage keyword"):
        twins.twins_from_stage_kwargs(**{k: v for k, v in stage_args.items() if k != "s3_heads"})
    with pytest.raises(ValueError, match="unknown keyword 's1_emb_dims'"):
        twins.twins_from_stage_kwargs(s1_emb_dims=3, **stage_args)
