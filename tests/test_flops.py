"""GMACs: fvcore (+ SDPA handle) on real images against the literature and the analytic count."""

from __future__ import annotations

import logging
import warnings

import pytest
import timm
import torch
from torch import nn

from ipbench.measure.flops import COUNTER_NAME, _attention_pool_macs, analytic_gmacs, count_gmacs
from ipbench.reducers import TokenPlan, apply_reducer, parse_spec, remove_reducer, token_plan


@pytest.fixture(scope="module")
def images(shared_subset) -> torch.Tensor:
    """Two real photographs, normalised for DeiT (GMACs are counted on real input)."""
    return shared_subset.images[:2]


@pytest.fixture(scope="module")
def image(images: torch.Tensor) -> torch.Tensor:
    """One real image: enough for a per-image count, half the tracing time of two."""
    return images[:1]


@pytest.fixture(scope="module")
def vit():
    """get(name, spec=None, fused=True): a cached timm model, reset to plain, then configured."""
    cache: dict[str, nn.Module] = {}

    def get(name: str, spec: str | None = None, fused: bool = True) -> nn.Module:
        if name not in cache:
            cache[name] = _vit(name)
        model = remove_reducer(cache[name])
        for block in model.blocks:
            block.attn.fused_attn = fused
        return apply_reducer(model, parse_spec(spec)) if spec else model

    return get


def _vit(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, **kwargs).eval()


@pytest.mark.parametrize(
    ("name", "expected", "tol"),
    [
        ("deit_tiny_patch16_224", 1.26, 0.01),
        ("deit_small_patch16_224", 4.60, 0.01),
        ("deit_base_patch16_224", 17.6, 0.05),
    ],
)
def test_plain_deit_matches_literature_and_analytic(image, vit, name, expected, tol):
    model = vit(name)
    result = count_gmacs(model, image)
    assert result.gmacs == pytest.approx(expected, abs=tol)
    assert result.counter == COUNTER_NAME
    assert result.unknown_ops == ()
    assert analytic_gmacs(model) == pytest.approx(result.gmacs, rel=0.01)


def test_sdpa_handle_counts_qk_and_av(image, vit):
    """Without the handle fvcore reports 4.25 for DeiT-S; the handle adds 2·H·N²·Dh per block."""
    result = count_gmacs(vit("deit_small_patch16_224"), image)
    sdpa = result.by_operator["scaled_dot_product_attention"]
    assert sdpa == pytest.approx(12 * 2 * 197**2 * 384 / 1e9)
    assert result.gmacs - sdpa == pytest.approx(4.25, abs=0.01)


@pytest.mark.parametrize("spec", [None, "tome:r=13", "evit:keep=0.7", "imagepiece", "mstm"])
def test_fused_and_unfused_attention_count_the_same(image, vit, spec):
    fused = count_gmacs(vit("deit_tiny_patch16_224", spec), image)
    unfused = count_gmacs(vit("deit_tiny_patch16_224", spec, fused=False), image)
    assert fused.gmacs == pytest.approx(unfused.gmacs, rel=1e-9)
    assert "scaled_dot_product_attention" in fused.by_operator
    assert "scaled_dot_product_attention" not in unfused.by_operator
    assert unfused.unsupported_ops["aten::softmax"] >= 12


def test_count_is_per_image_and_restores_training_mode(images, vit):
    model = vit("deit_tiny_patch16_224").train()
    one = count_gmacs(model, images[:1])
    two = count_gmacs(model, images)
    assert model.training
    model.eval()
    assert one.batch_size == 1 and two.batch_size == 2
    assert one.gmacs == pytest.approx(two.gmacs, rel=1e-12)


def test_no_warning_or_log_spam(image, vit, caplog):
    model = vit("deit_tiny_patch16_224", "tome:r=13")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        result = count_gmacs(model, image)
    assert [str(w.message) for w in caught] == []
    assert caplog.records == []
    assert result.unknown_ops == ()


@pytest.mark.parametrize(
    ("keep", "expected"), [(0.9, 4.0), (0.8, 3.5), (0.7, 3.0), (0.6, 2.6), (0.5, 2.3)]
)
def test_evit_deit_small_matches_official_gmacs(image, vit, keep, expected):
    model = vit("deit_small_patch16_224", f"evit:keep={keep}")
    result = count_gmacs(model, image)
    assert result.gmacs == pytest.approx(expected, abs=0.05)
    assert analytic_gmacs(model, token_plan(model)) == pytest.approx(result.gmacs, rel=0.01)
    assert result.unknown_ops == ()


def test_tome_deit_small_r13_matches_paper(image, vit):
    model = vit("deit_small_patch16_224", "tome:r=13")
    result = count_gmacs(model, image)
    assert result.gmacs == pytest.approx(2.70, abs=0.02)
    assert analytic_gmacs(model, token_plan(model)) == pytest.approx(result.gmacs, rel=0.01)
    # the merge is index plumbing and weighted sums: zero MACs, but listed
    for op in ("aten::argsort", "aten::gather", "aten::scatter_add_"):  # in place on the gathered slots
        assert result.unsupported_ops[op] > 0
    assert result.unknown_ops == ()


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("deit_tiny_patch16_224", "tome:r=13"),
        ("deit_tiny_patch16_224", "topk:keep=0.7"),
        ("deit_tiny_patch16_224", "evit:keep=0.7,fused_size=count"),
        ("deit_tiny_patch16_224", "mstm"),
        ("deit_tiny_patch16_224", "imagepiece"),
        ("deit_tiny_patch16_224", "imagepiece:locality=2"),
        ("deit_tiny_patch16_224", "imagepiece+tome:r=4"),
        ("deit_tiny_distilled_patch16_224", "tome:r=8"),
        ("deit3_small_patch16_224", "evit:keep=0.6"),
    ],
)
def test_reduced_fvcore_agrees_with_analytic(image, vit, name, spec):
    model = vit(name, spec)
    measured = count_gmacs(model, image)
    assert measured.unknown_ops == ()
    assert analytic_gmacs(model, token_plan(model)) == pytest.approx(measured.gmacs, rel=0.01)


def test_reducer_none_counts_like_plain_timm(image, vit):
    patched = count_gmacs(vit("deit_tiny_patch16_224", "none"), image).gmacs
    plain = count_gmacs(vit("deit_tiny_patch16_224"), image).gmacs
    assert patched == plain


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("deit_tiny_distilled_patch16_224", {}),  # two heads, two prefix tokens
        ("deit3_small_patch16_224", {"depth": 4}),  # LayerScale
        ("vit_base_patch16_reg4_gap_256", {"depth": 2}),  # registers, avg pool, fc_norm
        ("vit_small_patch16_224", {"depth": 2, "qk_norm": True, "mlp_ratio": 3.0}),
        ("vit_small_patch16_224", {"depth": 2, "num_classes": 0}),
    ],
)
def test_analytic_reads_the_architecture_from_the_modules(name, kwargs):
    model = _vit(name, **kwargs)
    size = model.patch_embed.img_size
    x = torch.randn(1, 3, *size)
    assert analytic_gmacs(model) == pytest.approx(count_gmacs(model, x).gmacs, rel=0.01)


def test_analytic_follows_the_given_plan(vit):
    model = vit("deit_small_patch16_224")
    plain = analytic_gmacs(model)
    assert analytic_gmacs(model, TokenPlan(197, [197] * 12, [197] * 12)) == plain
    # fewer tokens in the MLPs only: exactly the MLP (and norm2) terms shrink
    mlp_only = analytic_gmacs(model, TokenPlan(197, [197] * 12, [197] * 11 + [97]))
    per_mlp_token = 2 * 384 * 1536 + 2 * 5 * 384  # fc1 + fc2, norm2 and the final norm
    assert (plain - mlp_only) * 1e9 == pytest.approx(100 * per_mlp_token)
    with pytest.raises(ValueError, match="12 blocks"):
        analytic_gmacs(model, TokenPlan(197, [197] * 11, [197] * 11))


def test_analytic_counts_attention_pool_heads():
    """SigLIP's MAP head: keys/values of every pooled token, one latent query, its MLP; exactly fvcore's."""
    model = _vit("vit_small_patch16_224", depth=1, global_pool="map", class_token=False)
    pool = model.attn_pool
    assert pool.latent_len == 1 and pool.mlp is not None
    with_head = analytic_gmacs(model)
    measured = count_gmacs(model, torch.randn(1, 3, 224, 224)).gmacs
    assert with_head == pytest.approx(measured, rel=1e-9)
    d, n = 384, 196
    head = n * 2 * d * d + (d * d + d * d + 2 * d * 1536 + 5 * d) + 2 * n * d  # kv; q, proj, MLP, norm; core
    assert _attention_pool_macs(pool, n) == head


class _ExtraMatmuls(nn.Module):
    """Ops with matrix cost that fvcore alone does not count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(2, 3, 4)  # batched (3x4) matrices
        b = torch.ones(2, 4, 5)
        out = torch.baddbmm(torch.zeros(2, 3, 5), a, b)  # 2·3·4·5 = 120
        v = torch.mv(torch.ones(6, 24), x.reshape(-1))  # 6·24 = 144
        d = torch.cdist(x.reshape(1, 4, 6), torch.ones(1, 5, 6))  # 4·5·6 = 120
        return out.sum() + v.sum() + d.sum()


def test_extra_matmul_handles():
    x = torch.ones(1, 24)
    result = count_gmacs(_ExtraMatmuls(), x.reshape(1, 1, 4, 6))
    assert result.gmacs * 1e9 == pytest.approx(120 + 144 + 120)
    assert result.unknown_ops == ()


class _TensordotModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        return torch.tensordot(flat, flat, dims=([2], [2]))


def test_unknown_ops_are_reported_and_warned():
    with pytest.warns(RuntimeWarning, match="aten::tensordot"):
        result = count_gmacs(_TensordotModel(), torch.randn(1, 3, 4, 4))
    assert result.unknown_ops == ("aten::tensordot",)
    assert result.unsupported_ops["aten::tensordot"] == 1


def test_bad_images_are_rejected():
    with pytest.raises(ValueError, match="B, C, H, W"):
        count_gmacs(_vit("deit_tiny_patch16_224"), torch.randn(3, 224, 224))
