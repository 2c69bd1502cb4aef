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

    cls_attn: Tensor | None = None  # [B, N] CLS attention row, head mean, sums to 1
    keys: Tensor | None = None  # [B, N, Dh] keys averaged over heads
    vnorm: Tensor | None = None  # [B, N] L2 norm of each token's value vector, all heads concatenated
    attn: Tensor | None = None  # [B, H, N, N] the whole attention matrix, post-softmax, per head


def qkv_evidence(attn: nn.Module, qkv: Tensor, bias: Tensor | None, needs: frozenset[str]) -> Evidence:
    """CLS attention row in O(N·d), head-mean keys and value norms, from the attention's qkv output."""
    bsz, n, _ = qkv.shape
    qkv = qkv.reshape(bsz, n, 3, attn.num_heads, attn.head_dim)
    k = attn.k_norm(qkv[:, :, 1])  # [B, N, H, Dh]
    ev = Evidence()
    if "keys" in needs:
        ev.keys = k.mean(dim=2)
    if "vnorm" in needs:
        ev.vnorm = qkv[:, :, 2].reshape(bsz, n, -1).norm(dim=-1)
    if "cls_attn" in needs:
        q0 = attn.q_norm(qkv[:, 0, 0])  # [B, H, Dh]
        logits = torch.einsum("bhd,bnhd->bhn", q0, k) * attn.scale
        if bias is not None:
            logits = logits + bias[:, 0]
        ev.cls_attn = logits.float().softmax(dim=-1).mean(dim=1).to(qkv.dtype)
    return ev


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
