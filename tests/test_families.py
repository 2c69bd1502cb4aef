"""Every timm ViT family the engine reduces (#13): EVA-02 (rotary), BEiT (relative position bias),
SigLIP (attention-pool head, no class token), SigLIP-GAP (average pooling, no class token) and
DINOv2 with registers, on random weights.

With nothing to reduce each equals plain timm; five reducers give the static plan's counts in a real
forward; `remove_reducer` restores the model exactly; fvcore's count (with ipbench's handles) agrees
with the analytic one within 1 %. The position terms are checked where they can be exact: the
engine's own EVA/BEiT attention equals timm's module, and on a permuted token set it gives the
permuted output (the rotary table and the bias gathered by anchor).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from ipbench.errors import UserError
from ipbench.measure.flops import analytic_gmacs, count_gmacs
from ipbench.reducers import apply_reducer, parse_spec, reducible, remove_reducer, token_plan
from ipbench.reducers.evidence import received_attention
from ipbench.reducers.families import beit_attention, eva_attention, gather_rope, rel_pos_bias
from ipbench.reducers.tokens import TokenState

# Every model whole (all blocks, its own widths and heads) but at 112 px, 7x7 or 8x8 patches: the same
# code paths as at 224 or 518 px, in a fraction of the test time.
SMALL = {"img_size": 112}
FAMILIES = {
    "eva02_tiny_patch14_224": SMALL,
    "beit_base_patch16_224": SMALL,
    "vit_base_patch16_siglip_224": SMALL,
    "vit_base_patch16_siglip_gap_224": SMALL,
    "vit_small_patch14_reg4_dinov2": SMALL,
}
REDUCERS = ["tome:r=2", "evit:keep=0.7", "topk:keep=0.7", "imagepiece:keep=0.7", "mstm:keep=0.7"]
NOTHING = ["none", "tome:r=0", "evit:keep=1"]


def _model(name: str) -> torch.nn.Module:
    """Random weights, with BEiT's relative position tables and every LayerScale gamma made random
    too (timm initialises them to zero / a constant, which would hide a wrong gather)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **FAMILIES[name]).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "relative_position_bias_table" in key or "gamma" in key:
                param.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = _model(request.param)
    torch.manual_seed(1)
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.inference_mode():
        plain = model(images)
    return request.param, model, images, plain


def test_each_family_reduces_and_restores_exactly(family) -> None:
    name, model, images, plain = family
    state = copy.deepcopy(model.state_dict())
    assert reducible(model)
    for spec in NOTHING:
        apply_reducer(model, parse_spec(spec))
        with torch.inference_mode():
            assert (model(images) - plain).abs().max().item() <= 1e-5, (name, spec)
    for spec in REDUCERS:
        apply_reducer(model, parse_spec(spec))
        plan = token_plan(model)
        with torch.inference_mode():
            out = model(images)
        assert out.shape == plain.shape and torch.isfinite(out).all()
        assert model._ipb.last_counts == plan.after, (name, spec)
        assert plan.final < plan.n_in
    remove_reducer(model)
    assert type(model).__name__ in ("Eva", "Beit", "VisionTransformer") and not hasattr(model, "_ipb")
    with torch.inference_mode():
        assert torch.equal(model(images), plain)
    restored = model.state_dict()
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)


def test_fvcore_agrees_with_the_analytic_count(family) -> None:
    name, model, images, _ = family
    for spec in ["none", *REDUCERS]:
        apply_reducer(model, parse_spec(spec))
        measured = count_gmacs(model, images[:1])
        analytic = analytic_gmacs(model)
        assert measured.unknown_ops == ()
        assert measured.gmacs == pytest.approx(analytic, rel=0.01), (name, spec)
        if spec == "none":
            assert measured.gmacs == pytest.approx(analytic, rel=1e-6)  # exact without a reducer
    remove_reducer(model)


def test_importance_defaults_to_the_class_token_where_there_is_one(family) -> None:
    name, model, _, _ = family
    apply_reducer(model, parse_spec("evit:keep=0.7"))
    assert model._ipb.importance == ("received" if "siglip" in name else "cls")
    remove_reducer(model)


# -- the position terms: EVA's rotary table and BEiT's relative position bias -----------------------

def _state_with_anchor(x: torch.Tensor, anchor: torch.Tensor, n_prefix: int, grid) -> TokenState:
    st = TokenState(x, n_prefix, grid, False, False, False, want_anchor=True)
    st.anchor, st.moved = anchor, True
    return st


def _permutation(n: int, n_prefix: int, batch: int) -> torch.Tensor:
    torch.manual_seed(2)
    rows = [torch.cat([torch.arange(n_prefix), torch.randperm(n - n_prefix) + n_prefix]) for _ in range(batch)]
    return torch.stack(rows)


def test_eva_attention_is_timms_and_follows_its_tokens() -> None:
    model = _model("eva02_tiny_patch14_224")
    attn, p = model.blocks[3].attn, model.num_prefix_tokens
    rope = model.rope.get_embed()
    torch.manual_seed(3)
    x = torch.randn(2, model.patch_embed.num_patches + p, model.embed_dim)
    with torch.inference_mode():
        ref = attn(x, rope=rope)
        ours, ev = eva_attention(attn, x, rope, None, frozenset({"cls_attn", "keys"}))
        assert (ours - ref).abs().max().item() < 1e-5
        assert torch.allclose(ev.cls_attn.sum(-1), torch.ones(2), atol=1e-5)
        perm = _permutation(x.shape[1], p, 2)
        st = _state_with_anchor(x, perm, p, model.patch_embed.grid_size)
        moved, _ = eva_attention(attn, x.gather(1, perm[..., None].expand_as(x)), gather_rope(rope, st), None,
                                 frozenset())
    assert (moved - ref.gather(1, perm[..., None].expand_as(ref))).abs().max().item() < 1e-5


def test_beit_attention_is_timms_and_follows_its_tokens() -> None:
    model = _model("beit_base_patch16_224")
    attn, p = model.blocks[2].attn, model.num_prefix_tokens
    torch.manual_seed(3)
    x = torch.randn(2, model.patch_embed.num_patches + p, model.embed_dim)
    plain = TokenState(x, p, model.patch_embed.grid_size, False, False, False, want_anchor=True)
    with torch.inference_mode():
        ref = attn(x)
        ours, _ = beit_attention(attn, x, rel_pos_bias(attn, None, plain), None, frozenset())
        assert (ours - ref).abs().max().item() < 1e-5
        perm = _permutation(x.shape[1], p, 2)
        st = _state_with_anchor(x, perm, p, model.patch_embed.grid_size)
        moved, _ = beit_attention(attn, x.gather(1, perm[..., None].expand_as(x)), rel_pos_bias(attn, None, st),
                                  None, frozenset())
    assert (moved - ref.gather(1, perm[..., None].expand_as(ref))).abs().max().item() < 1e-4


def test_anchors_follow_merges_keeps_and_the_fused_token() -> None:
    x = torch.randn(1, 6, 4)
    st = TokenState(x, 1, (1, 5), False, False, False, want_anchor=True)
    weight = torch.tensor([[0.5, 0.1, 0.3, 0.02, 0.03, 0.05]])
    kept = st.keep(x, torch.tensor([[0, 2, 1]]), fuse=torch.tensor([[3, 5, 4]]), weight=weight)
    assert kept.shape[1] == 4
    assert st.anchor.tolist() == [[0, 2, 1, 5]]  # the fused token sits where its heaviest member (5) did


# -- importance without a class token, and the attention-pool head --------------------------------

def test_received_attention_is_the_mean_over_heads_and_patch_queries() -> None:
    torch.manual_seed(4)
    probs = torch.rand(2, 3, 5, 5).softmax(dim=-1)
    got = received_attention(probs, n_prefix=1)
    assert torch.allclose(got, probs[:, :, 1:].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(2), atol=1e-6)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    masked = received_attention(probs, 1, valid)
    assert torch.allclose(masked[1], probs[1, :, 1:3].mean(dim=(0, 1)), atol=1e-6)


def test_received_importance_is_counted_in_the_gmacs() -> None:
    model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, depth=2).eval()
    received = token_plan(model, parse_spec("evit:keep=0.7,layers=1"))
    assert received.extra_macs == [0, 12 * 196 * 196]  # one add per entry of every head's matrix
    assert token_plan(model, parse_spec("tome:r=8")).extra_macs == [0, 0]


def test_the_attention_pool_head_sees_token_sizes() -> None:
    model = _model("vit_base_patch16_siglip_224")
    apply_reducer(model, parse_spec("tome:r=2"))
    torch.manual_seed(5)
    with torch.inference_mode():
        feats = model.forward_features(torch.randn(1, 3, 112, 112))
        st = model._ipb.tokens
        pooled = model.pool(feats)
        by_hand = model.attn_pool(feats, attn_mask=st.size.log().transpose(1, 2).unsqueeze(1))
        blind = model.attn_pool(feats)
    assert torch.allclose(pooled, by_hand, atol=1e-6) and not torch.allclose(pooled, blind, atol=1e-4)


def test_unsupported_families_are_one_line_errors() -> None:
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    with pytest.raises(UserError, match="SwinTransformer is not a ViT family ipbench can reduce; supported: "
                                        "timm VisionTransformer .*Swin's windows"):
        apply_reducer(swin, parse_spec("tome:r=4"))
    assert not reducible(swin)
    post_norm = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=2, use_post_norm=True)
    with pytest.raises(UserError, match="unsupported block type.s. EvaBlockPostNorm"):
        apply_reducer(post_norm, parse_spec("tome:r=4"))


def test_img_size_resamples_each_familys_own_tables(tmp_path) -> None:
    """--img-size with a checkpoint: each timm model module's own checkpoint filter (BEiT: its
    relative position tables too) fits the weights to the new grid, then reducers run on it."""
    from safetensors.torch import save_file

    from ipbench.models import load_checkpoint

    for name in ("eva02_tiny_patch14_224", "beit_base_patch16_224"):
        torch.manual_seed(0)
        source = timm.create_model(name, pretrained=False, depth=2)
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
        small = timm.create_model(name, pretrained=False, depth=2, img_size=112).eval()
        with pytest.raises(UserError, match="does not match the model"):
            load_checkpoint(small, path)
        load_checkpoint(small, path, resample=True)
        apply_reducer(small, parse_spec("evit:keep=0.7,layers=1"))
        with torch.inference_mode():
            assert torch.isfinite(small(torch.randn(1, 3, 112, 112))).all()
        assert small._ipb.last_counts == token_plan(small).after
