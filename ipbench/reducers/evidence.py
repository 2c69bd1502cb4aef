"""What a block's attention tells a policy about its tokens, read without computing anything twice.

The CLS attention row (O(N·d) from the captured qkv, not the N×N matrix), the head-mean keys and the
value norms come from timm's qkv projection's output; the whole attention matrix, for a policy that
needs it, from timm's own non-fused attention path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

QKV_NEEDS = frozenset({"cls_attn", "keys", "vnorm"})  # the evidence read from the qkv projection


@dataclass
class Evidence:
    """What a block's attention tells the policy about its tokens."""

    cls_attn: Tensor | None = None  # [B, N] CLS attention row, head mean, sums to 1 (or, with
    # importance=received, the mean attention each token receives: the same role, another rule)
    keys: Tensor | None = None  # [B, N, Dh] keys averaged over heads
    vnorm: Tensor | None = None  # [B, N] L2 norm of each token's value vector, all heads concatenated
    attn: Tensor | None = None  # [B, H, N, N] the whole attention matrix, post-softmax, per head


def qkv_evidence(attn: nn.Module, qkv: Tensor, bias: Tensor | None, needs: frozenset[str]) -> Evidence:
    """CLS attention row in O(N·d), head-mean keys and value norms, from the attention's qkv output."""
    bsz, n, _ = qkv.shape
    qkv = qkv.reshape(bsz, n, 3, attn.num_heads, attn.head_dim)
    k = attn.k_norm(qkv[:, :, 1])  # [B, N, H, Dh]
    q0 = attn.q_norm(qkv[:, 0, 0]) if "cls_attn" in needs else None  # [B, H, Dh]
    return token_evidence(q0, k, qkv[:, :, 2], attn.scale, bias, needs)


def token_evidence(q0: Tensor | None, k: Tensor, v: Tensor, scale: float, bias: Tensor | None,
                   needs: frozenset[str]) -> Evidence:
    """The evidence from the first query q0 [B, H, Dh] and the keys and values [B, N, H, Dh] exactly
    as the attention used them (after q/k norms and, for EVA, the rotary embedding)."""
    bsz, n = k.shape[:2]
    ev = Evidence()
    if "keys" in needs:  # in float32 mean is a sum and one division: those, without its scalar tensor
        ev.keys = k.sum(dim=2).div_(k.shape[2]) if k.dtype == torch.float32 else k.mean(dim=2)
    if "vnorm" in needs:
        ev.vnorm = v.reshape(bsz, n, -1).norm(dim=-1)
    if "cls_attn" in needs:
        assert q0 is not None
        # q0·kᵀ as one batched matmul (the same bmm einsum makes, without its parsing per call)
        logits = (q0.unsqueeze(2) @ k.permute(0, 2, 3, 1)).squeeze(2) * scale
        if bias is not None:
            logits = logits + bias[:, :, 0]
        ev.cls_attn = logits.float().softmax(dim=-1).mean(dim=1).to(k.dtype)
    return ev


def received_attention(matrix: Tensor, n_prefix: int, valid: Tensor | None = None) -> Tensor:
    """[B, N] the mean attention each token receives, over every head and every patch query
    (prefix tokens do not vote; nor does padding). Rows of the matrix sum to 1, so this does too."""
    per_query = matrix.float().mean(dim=1)[:, n_prefix:]  # [B, Nq, N]
    if valid is None:
        return per_query.mean(dim=1).to(matrix.dtype)
    w = valid[:, n_prefix:].to(per_query.dtype).unsqueeze(-1)
    return ((per_query * w).sum(dim=1) / w.sum(dim=1)).to(matrix.dtype)


def attention_with_evidence(attn: nn.Module, x: Tensor, bias: Tensor | None, qkv: bool,
                            matrix: bool) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """timm's attention module on x; with `qkv`, its qkv projection's output captured, and with
    `matrix`, the attention matrix itself: timm's own non-fused path then runs (same maths as
    SDPA, and the matrix is its softmax output, read at attn_drop), so nothing is computed twice."""
    captured: list[Tensor] = []
    probs: list[Tensor] = []
    handles = []
    if qkv:
        handles.append(attn.qkv.register_forward_hook(lambda m, i, o: captured.append(o)))
    fused = attn.fused_attn
    if matrix:
        handles.append(attn.attn_drop.register_forward_hook(lambda m, i, o: probs.append(o)))
        attn.fused_attn = False
    try:
        a = attn(x, attn_mask=bias)
    finally:
        attn.fused_attn = fused
        for h in handles:
            h.remove()
    return a, captured, probs[0] if probs else None
