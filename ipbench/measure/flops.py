"""GMACs of a (possibly token-reduced) timm Vision Transformer: measured and analytic.

Two independent counts that must agree (tests hold them within 1 %):

* :func:`count_gmacs` traces the model on real images with fvcore and counts every op that
  multiplies matrices. fvcore has no handle for ``aten::scaled_dot_product_attention`` (timm's
  fused attention), so on its own it reports 4.25 instead of 4.61 GMACs for DeiT-S; ipbench adds
  that handle (counter name ``"fvcore+sdpa"``).
* :func:`analytic_gmacs` computes the count from the model's modules and a static token plan
  (tokens entering each block's attention and its MLP), the formula of METHODS.md.

Unit: GMACs per image. fvcore counts one multiply-add as one FLOP, which is what the ViT
literature calls "GFLOPs" (DeiT-S 4.6). Element-wise work (activations, softmax, residual adds,
LayerScale, sorting, gathering, merging by weighted sums) counts as zero, except LayerNorm, which
fvcore counts as 5 ops per element (4 without affine) and the analytic count therefore does too.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ipbench.reducers import token_plan

__all__ = [
    "COUNTER_NAME",
    "FlopResult",
    "TokenCounts",
    "analytic_gmacs",
    "count_gmacs",
    "sdpa_macs",
]

COUNTER_NAME = "fvcore+sdpa"

# Ops that do no matrix multiplication: element-wise arithmetic, activations, reductions,
# normalised exponentials, sorting/selection and index plumbing. Counted as exactly zero MACs
# (the literature's convention) but recorded, so a result says which of them a reducer used.
# Pure layout ops (view, reshape, cat, ...) are already ignored silently by fvcore.
ZERO_MAC_OPS: frozenset[str] = frozenset(
    f"aten::{name}"
    for name in (
        # element-wise arithmetic and activations
        "add add_ sub sub_ rsub mul mul_ div div_ neg reciprocal pow sqrt rsqrt exp log log_ "
        "abs sign clamp_min clamp_max minimum maximum where lerp fill_ zero_ "
        "gelu gelu_ elu elu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardtanh softplus erf "
        # comparisons and logic
        "lt le ne logical_and logical_or logical_not bitwise_and bitwise_or __or__ __and__ isinf isnan "
        # normalised exponentials and reductions
        "softmax log_softmax _softmax sum mean amax amin argmax argmin min cumsum "
        "norm linalg_vector_norm frobenius_norm std var var_mean "
        # sorting, selection, index plumbing (gather/index are also in fvcore's ignore list:
        # handled here anyway so that the result lists them)
        "max sort argsort topk gather scatter scatter_ scatter_add scatter_add_ scatter_reduce "
        "scatter_reduce_ index_select index index_put index_put_ index_add index_add_ "
        "index_copy index_copy_ masked_fill masked_fill_ masked_scatter masked_select take_along_dim "
        "repeat repeat_interleave expand_as flip clone ones_like new_ones empty_like linspace rand randn "
        "randperm bernoulli dropout_ alias lift_fresh"
    ).split()
)


@dataclass(frozen=True)
class FlopResult:
    """A measured GMACs count, with what the counter could not count.

    ``unsupported_ops`` lists every op seen that neither fvcore nor ipbench counts (all of them
    count as 0 MACs), with how often it ran over the traced batch; ``unknown_ops`` is the part of
    it that is NOT on ipbench's list of MAC-free ops and may therefore hide real cost. It should
    be empty; if it is not, the count may be low.
    """

    gmacs: float
    counter: str = COUNTER_NAME
    batch_size: int = 1
    by_operator: dict[str, float] = field(default_factory=dict)
    unsupported_ops: dict[str, int] = field(default_factory=dict)
    unknown_ops: tuple[str, ...] = ()


class TokenCounts(Protocol):
    """What :func:`analytic_gmacs` needs from a token plan (``ipbench.reducers.TokenPlan``)."""

    attn_tokens: Sequence[int]
    mlp_tokens: Sequence[int]


# --------------------------------------------------------------------------------------------
# fvcore count


def _shape(value: Any) -> list[int]:
    """Static shape of a traced jit value (fvcore only hands handles jit values)."""
    if not value.isCompleteTensor():
        raise ValueError("fvcore handle got a tensor without a static shape")
    return list(value.type().sizes())


def sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``.

    QKᵀ costs ``N_q·N_k·D_k`` and AV ``N_q·N_k·D_v`` MACs per batch element and head, whatever
    the mask (a masked or causal attention is counted in full, as the unfused matmuls would be).
    Leading dims (batch, heads) may broadcast, so the output's leading dims are used.
    """
    q, k, v = (_shape(x) for x in inputs[:3])
    out = _shape(outputs[0])
    n_q, d_k = q[-2], q[-1]
    n_k, d_v = k[-2], v[-1]
    return math.prod(out[:-2]) * n_q * n_k * (d_k + d_v)


def _baddbmm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``beta·M + alpha·(A @ B)`` with A (b, n, k) and B (b, k, m): b·n·k·m MACs."""
    a, b = _shape(inputs[1]), _shape(inputs[2])
    return a[0] * a[1] * a[2] * b[2]


def _mv_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """Matrix (n, k) times vector (k): n·k MACs (``aten::mv``)."""
    return math.prod(_shape(inputs[0]))


def _addmv_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``beta·v + alpha·(M @ x)``: the matrix's n·k MACs."""
    return math.prod(_shape(inputs[1]))


def _cdist_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """Pairwise distances x1 (.., P, M) to x2 (.., R, M): P·R·M MACs, the cost of the inner
    products PyTorch computes them with (ImagePiece's locality penalty on token centroids)."""
    return math.prod(_shape(outputs[0])) * _shape(inputs[0])[-1]


# Ops with matrix-multiply cost that fvcore 0.1.5 has no handle for.
_MAC_HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::scaled_dot_product_attention": sdpa_macs,
    "aten::baddbmm": _baddbmm_macs,
    "aten::mv": _mv_macs,
    "aten::addmv": _addmv_macs,
    "aten::cdist": _cdist_macs,
}


def _zero_recorder(name: str, seen: Counter[str]) -> Callable[[list[Any], list[Any]], int]:
    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        seen[name] += 1
        return 0

    return handle


def count_gmacs(model: nn.Module, images: Tensor) -> FlopResult:
    """GMACs per image of ``model`` on ``images`` (B, C, H, W), counted by fvcore + SDPA handle.

    The model is traced with ``torch.jit`` once on the whole batch, in eval mode and without
    gradients; the count is divided by the batch size. Real images matter for reducers whose
    token counts depend on the content (the trace follows the Python control flow of that input).
    The model's training flag is restored afterwards.
    """
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be a non-empty (B, C, H, W) batch, got {tuple(images.shape)}")
    with warnings.catch_warnings():
        # fvcore's import scripts a few helpers: torch warns that torch.jit.script is deprecated.
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    seen_zero: Counter[str] = Counter()
    analysis = FlopCountAnalysis(model, (images,))
    analysis.set_op_handle(**_MAC_HANDLES)
    analysis.set_op_handle(**{op: _zero_recorder(op, seen_zero) for op in ZERO_MAC_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            total = analysis.total()
            by_op = analysis.by_operator()
            unknown = analysis.unsupported_ops()
    except RuntimeError as exc:  # torch.jit's tracer: its messages are internal asserts
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"count_gmacs: torch.jit could not trace {type(model).__name__} (fvcore counts a traced "
            f"forward; the model must be traceable): {first}"
        ) from exc
    finally:
        model.train(was_training)

    batch = images.shape[0]
    unsupported = dict(sorted((seen_zero + unknown).items()))
    if unknown:
        warnings.warn(
            f"count_gmacs: no MAC handle for {', '.join(sorted(unknown))}; counted as 0 "
            "(the GMACs may be low)",
            RuntimeWarning,
            stacklevel=2,
        )
    return FlopResult(
        gmacs=total / batch / 1e9,
        counter=COUNTER_NAME,
        batch_size=batch,
        by_operator={op: n / batch / 1e9 for op, n in sorted(by_op.items()) if n},
        unsupported_ops=unsupported,
        unknown_ops=tuple(sorted(unknown)),
    )


# --------------------------------------------------------------------------------------------
# analytic count


def _linear_macs(module: nn.Module) -> int:
    """MACs per token of every nn.Linear under ``module`` (bias adds are free, as in fvcore)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _layer_norm_ops(norm: nn.Module, copies: int = 1) -> int:
    """fvcore's LayerNorm convention per token: 5 ops per element with affine, 4 without."""
    if not isinstance(norm, nn.LayerNorm):
        return 0
    per_element = 5 if norm.elementwise_affine else 4
    return per_element * math.prod(norm.normalized_shape) * copies


def _attention_geometry(attn: nn.Module) -> tuple[int, int]:
    """(heads, head_dim) of a timm attention module, read from the module."""
    heads = int(attn.num_heads)
    head_dim = getattr(attn, "head_dim", None)
    if head_dim is None:
        head_dim = attn.qkv.out_features // (3 * heads)
    return heads, int(head_dim)


def _attention_norm_ops(attn: nn.Module, heads: int) -> int:
    """Per-token LayerNorm ops inside attention: q/k norms run once per head, others once."""
    total = 0
    for name, child in attn.named_children():
        total += _layer_norm_ops(child, heads if name in ("q_norm", "k_norm") else 1)
    return total


def _block_macs(block: nn.Module, n_attn: int, n_mlp: int) -> int:
    heads, head_dim = _attention_geometry(block.attn)
    attn_per_token = _linear_macs(block.attn) + _layer_norm_ops(block.norm1)
    attn_per_token += _attention_norm_ops(block.attn, heads)
    mlp_per_token = _linear_macs(block.mlp) + _layer_norm_ops(block.norm2)
    mlp_per_token += sum(_layer_norm_ops(m) for m in block.mlp.modules())
    attention_core = 2 * n_attn * n_attn * heads * head_dim  # QKᵀ and AV
    return n_attn * attn_per_token + attention_core + n_mlp * mlp_per_token


def _patch_embed_macs(model: nn.Module, num_patches: int) -> int:
    convs = [m for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != 1 or convs[0].kernel_size != convs[0].stride:
        raise ValueError("analytic_gmacs supports the plain (one-convolution) patch embedding only")
    conv = convs[0]
    per_patch = conv.out_channels * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size)
    per_patch += _layer_norm_ops(getattr(model.patch_embed, "norm", nn.Identity()))
    return num_patches * per_patch


def _attention_pool_macs(pool: nn.Module, n_tokens: int) -> int:
    """An attention-pool head (timm's AttentionPoolLatent, SigLIP's MAP): keys and values of the
    n_tokens it pools, its latent queries' projections, attention core and MLP."""
    latents = int(pool.latent_len)
    per_token = _linear_macs(pool.kv) + _layer_norm_ops(pool.k_norm, int(pool.num_heads))
    per_latent = _linear_macs(pool) - _linear_macs(pool.kv) + _layer_norm_ops(pool.q_norm, int(pool.num_heads))
    per_latent += sum(_layer_norm_ops(m) for m in (pool.norm, *(pool.mlp.modules() if pool.mlp else ())))
    core = 2 * latents * n_tokens * int(pool.num_heads) * int(pool.head_dim)
    return n_tokens * per_token + latents * per_latent + core


def _head_macs(model: nn.Module, final_tokens: int) -> int:
    """Final norm at the last block's tokens, then each classifier head on one pooled vector.

    'token' pooling gives each head its own prefix token (cls; dist for distilled models),
    avg/max pooling one vector per image, an attention-pool head its latent queries over the
    final tokens (prefix tokens left out unless the model pools them); every head then reads one
    vector per image.
    """
    heads = [model.head]
    if getattr(model, "head_dist", None) is not None:
        heads.append(model.head_dist)
    fc_norm = getattr(model, "fc_norm", nn.Identity())
    macs = final_tokens * _layer_norm_ops(model.norm)
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        prefix = 0 if getattr(model, "pool_include_prefix", False) else int(model.num_prefix_tokens)
        macs += _attention_pool_macs(pool, final_tokens - prefix)
    return macs + sum(_linear_macs(head) + _layer_norm_ops(fc_norm) for head in heads)


def analytic_gmacs(model: nn.Module, plan: TokenCounts | None = None) -> float:
    """GMACs per image of a timm ViT computed from its modules and a static token plan.

    Per block i, with N_a = ``plan.attn_tokens[i]`` and N_m = ``plan.mlp_tokens[i]``: every
    Linear of the attention (qkv, proj: 4·N_a·d² for a standard ViT) at N_a tokens, the attention
    core 2·N_a²·(heads·head_dim) (QKᵀ and AV), every Linear of the MLP (2·mlp_ratio·N_m·d²) at N_m
    tokens; plus the patch embedding, the final norm at the last block's tokens and the head(s),
    and LayerNorms counted as fvcore does. Widths, heads, patch size and classes are read from
    the modules, so deit/deit3/registers/distilled models all work. ``plan=None`` takes the
    model's own plan (``ipbench.reducers.token_plan``: every token in every block for a plain
    model, the reducer's schedule for a patched one). Policy bookkeeping (ToMe's matching
    similarities, the CLS attention row) is not in the plan; fvcore counts it, and it stays well
    under 1 % of the total (0.0034 GMACs for ToMe r=13 on DeiT-S/Ti).
    """
    if plan is None:
        plan = token_plan(model)
    blocks = list(model.blocks)
    attn_tokens, mlp_tokens = list(plan.attn_tokens), list(plan.mlp_tokens)
    if not (len(blocks) == len(attn_tokens) == len(mlp_tokens)):
        raise ValueError(
            f"token plan has {len(attn_tokens)}/{len(mlp_tokens)} entries for {len(blocks)} blocks"
        )
    num_patches = attn_tokens[0] - int(getattr(model, "num_prefix_tokens", 1))
    macs = _patch_embed_macs(model, num_patches)
    macs += attn_tokens[0] * _layer_norm_ops(getattr(model, "norm_pre", nn.Identity()))
    for block, n_a, n_m in zip(blocks, attn_tokens, mlp_tokens):
        macs += _block_macs(block, n_a, n_m)
    macs += _head_macs(model, mlp_tokens[-1])
    macs += sum(getattr(plan, "extra_macs", ()))  # a policy's own matrix products, where it declares them
    return macs / 1e9
