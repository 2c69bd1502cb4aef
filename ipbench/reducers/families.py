"""The timm ViT families the engine reduces, and what each asks of it beyond the plain ViT block.

* ``vit``: timm's ``VisionTransformer`` (DeiT, ViT, DeiT-III, SigLIP with its attention-pool head or
  average pooling, DINOv2 and every register model): timm's own attention module runs, SDPA kept.
* ``eva``: timm's ``Eva`` (EVA, EVA-02: rotary position embedding, SwiGLU, sub-LN, LayerScale gamma).
  The rotary table is gathered for the tokens that remain: each token rotates by the position of its
  anchor (``TokenState.anchor``: its own, a merge's destination, a fused token's heaviest member).
* ``beit``: timm's ``Beit`` (relative position bias): the bias is gathered by anchor, rows and
  columns, so a kept token keeps its bias to every other kept token and a merged token takes its
  destination's.

For EVA and BEiT the attention of a block that reduces, or that follows a reduction, is computed
here, from the module's own weights and norms in timm's order, so that q, k and v are at hand for
the evidence and the position terms can be gathered; a block before any reduction runs timm's code.
Families whose attention is not global over a token set (Swin's windows, NaFlex's masks, CNNs) are
refused with one line that names the supported ones.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipbench.errors import UserError
from ipbench.reducers.evidence import Evidence, token_evidence
from ipbench.reducers.tokens import TokenState

POSITIONAL = frozenset({"eva", "beit"})  # attention that depends on token positions: anchors tracked
SUPPORTED = ("timm VisionTransformer (DeiT, ViT, DeiT-III, SigLIP, DINOv2 and register models), Eva (EVA, "
             "EVA-02) and Beit (BEiT); Swin's windows, NaFlex's masks and CNNs cannot be reduced token by token")


def family_of(model: nn.Module) -> str:
    """'vit', 'eva' or 'beit'; a one-line UserError for anything else."""
    from timm.models.beit import Beit
    from timm.models.beit import Block as BeitBlock
    from timm.models.eva import Eva, EvaBlock
    from timm.models.vision_transformer import Block, VisionTransformer

    kinds = {VisionTransformer: ("vit", Block), Eva: ("eva", EvaBlock), Beit: ("beit", BeitBlock)}
    for cls, (family, block) in kinds.items():
        if isinstance(model, cls):
            bad = sorted({type(b).__name__ for b in model.blocks if not isinstance(b, block)})
            if bad:
                raise UserError(f"unsupported block type(s) {', '.join(bad)} in {type(model).__name__}; token "
                                f"reducers need {block.__name__} (pre-norm attention + MLP)")
            if family == "vit" and any(not hasattr(b.attn, "qkv") for b in model.blocks):
                raise UserError(f"attention {type(model.blocks[0].attn).__name__} has no fused qkv "
                                "projection; not supported")
            return family
    raise UserError(f"{type(model).__name__} is not a ViT family ipbench can reduce; supported: {SUPPORTED}")


def has_class_token(model: nn.Module) -> bool:
    """Whether the model carries a class token (whose attention row `importance=cls` reads)."""
    return getattr(model, "cls_token", None) is not None


def size_weighted_pool(x: Tensor, st: TokenState | None, pool_type: str, n_prefix: int,
                       skip: bool) -> Tensor | None:
    """Average pooling where tokens stand for several patches (each weighted by its size) or a
    batch is padded (padding left out); None where the model's own pooling is already right."""
    if skip or pool_type not in ("avg", "avgmax") or st is None or (st.size is None and st.valid is None):
        return None
    tok, w = x[:, n_prefix:], st.sizes(x)[:, n_prefix:].to(x.dtype)
    real = st.valid[:, n_prefix:].unsqueeze(-1) if st.valid is not None else None
    if real is not None:
        w = w * real.to(x.dtype)
    avg = (tok * w).sum(dim=1) / w.sum(dim=1)
    if pool_type == "avg":
        return avg
    return 0.5 * ((tok if real is None else tok.masked_fill(~real, float("-inf"))).amax(dim=1) + avg)


# -- position terms gathered by anchor ------------------------------------------------------------

def gather_rope(rope: Tensor | None, st: TokenState) -> Tensor | None:
    """EVA's rotary table [N0 − prefix, D] for the current tokens: [B, 1, N − prefix, D] by anchor."""
    if rope is None or not st.moved:
        return rope
    if rope.dim() != 2:
        raise UserError(f"EVA rotary embedding of shape {tuple(rope.shape)} is not supported (only the "
                        "2-D table of rope_type='cat'); reduce an EVA/EVA-02 model with the default rope")
    p = st.n_prefix
    assert st.anchor is not None
    return rope[st.anchor[:, p:] - p].unsqueeze(1)


def rel_pos_bias(attn: nn.Module, shared: Tensor | None, st: TokenState) -> Tensor | None:
    """BEiT's relative position bias (the block's own table plus the model's shared one) for the
    current tokens: [1, H, N0, N0] before any reduction, [B, H, N, N] gathered by anchor after."""
    full = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
    if shared is not None:
        full = shared if full is None else full + shared
    if full is None or not st.moved:
        return full
    assert st.anchor is not None
    a = st.anchor
    bsz, n = a.shape
    full = full.expand(bsz, -1, -1, -1)
    heads = full.shape[1]
    rows = full.gather(2, a[:, None, :, None].expand(bsz, heads, n, full.shape[3]))
    return rows.gather(3, a[:, None, None, :].expand(bsz, heads, n, n))


# -- attention computed here (EVA, BEiT) ----------------------------------------------------------

def _qkv_heads(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v [B, H, N, Dh] as EVA's and BEiT's attention project them (fused qkv with q/v biases
    and a zero k bias, or EVA's separate projections)."""
    bsz, n, _ = x.shape
    if getattr(attn, "qkv", None) is None:  # EVA with qkv_fused=False
        def heads(proj: nn.Module) -> Tensor:
            return proj(x).reshape(bsz, n, attn.num_heads, -1).transpose(1, 2)
        return heads(attn.q_proj), heads(attn.k_proj), heads(attn.v_proj)
    if attn.q_bias is None:
        qkv = attn.qkv(x)
    else:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, weight=attn.qkv.weight, bias=bias)
    q, k, v = qkv.reshape(bsz, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _attention_core(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                    matrix: bool) -> tuple[Tensor, Tensor | None]:
    """softmax(q·kᵀ·scale + bias)·v: fused SDPA, or the explicit matrix (timm's own non-fused
    path, op for op) where a policy reads it."""
    if bias is not None:
        bias = bias.to(q.dtype)
    if not matrix:
        drop = attn.attn_drop.p if attn.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop), None
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    probs = attn.attn_drop(logits.softmax(dim=-1))
    return probs @ v, probs


def _evidence(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, needs: frozenset,
              probs: Tensor | None) -> Evidence:
    ev = token_evidence(q[:, :, 0] if "cls_attn" in needs else None, k.transpose(1, 2), v.transpose(1, 2),
                        attn.scale, bias, needs)
    ev.attn = probs
    return ev


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return a if b is None else b if a is None else a + b


@functools.cache
def timm_attention() -> type:
    """timm's plain ViT attention class: the one `vit_attention` computes inline."""
    from timm.models.vision_transformer import Attention

    return Attention


def vit_attention(attn: nn.Module, x: Tensor, bias: Tensor | None, needs: frozenset) -> tuple[Tensor, Evidence]:
    """timm's ViT Attention (`timm_attention`, the exact class) on x, op for op as its forward (so
    its outputs are the same bits), with the evidence read from its own q, k, v: no forward hook
    to register and remove per block, and no qkv kept after the attention."""
    bsz, n, _ = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(bsz, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    matrix = "attn" in needs
    out, probs = _attention_core(attn, q, k, v, bias, matrix or not attn.fused_attn)
    out = out.transpose(1, 2).reshape(bsz, n, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, (_evidence(attn, q, k, v, bias, needs, probs if matrix else None) if needs else Evidence())


def eva_attention(attn: nn.Module, x: Tensor, rope: Tensor | None, bias: Tensor | None,
                  needs: frozenset) -> tuple[Tensor, Evidence]:
    """EvaAttention on x with the gathered rotary table; the evidence from q, k, v as attended
    (after q/k norms and the rotation: the keys ToMe matches carry their positions)."""
    from timm.layers import apply_rot_embed_cat

    bsz, n, _ = x.shape
    q, k, v = _qkv_heads(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
    out, probs = _attention_core(attn, q, k, v, bias, "attn" in needs)
    out = attn.norm(out.transpose(1, 2).reshape(bsz, n, -1))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out)), _evidence(attn, q, k, v, bias, needs, probs)


def beit_attention(attn: nn.Module, x: Tensor, position: Tensor | None, bias: Tensor | None,
                   needs: frozenset) -> tuple[Tensor, Evidence]:
    """BEiT's Attention on x with the gathered relative position bias added to the engine's bias
    (log size, padding); the evidence's CLS row sees the position bias as the attention does."""
    bsz, n, _ = x.shape
    q, k, v = _qkv_heads(attn, x)
    full = _add(position, bias)
    out, probs = _attention_core(attn, q, k, v, full, "attn" in needs)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(bsz, n, -1)))
    return out, _evidence(attn, q, k, v, full, needs, probs)
