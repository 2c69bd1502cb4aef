"""The one patched transformer block that every reducer runs in.

`apply_reducer` swaps the classes of a timm VisionTransformer and of its blocks for thin
subclasses (weights and state_dict untouched, `remove_reducer` swaps them back). A patched
block runs timm's attention (SDPA kept; for timm's own Attention class its forward's ops inline,
so the evidence comes from its q, k, v without a hook), with proportional attention passed as
its additive `attn_mask`, then lets the policy reduce the tokens, then runs the MLP:

    x = x + ls1(attn(norm1(x), attn_mask=log(size)))  ->  policy.reduce  ->  x = x + ls2(mlp(norm2(x)))

Blocks where the policy does nothing and no bias applies call timm's forward unchanged (for
EVA and BEiT only before any reduction), so `none` is timm bit for bit and costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ipbench.errors import UserError
from ipbench.reducers.evidence import (
    QKV_NEEDS,
    Evidence,
    attention_with_evidence,
    qkv_evidence,
    received_attention,
)
from ipbench.reducers.families import (
    POSITIONAL,
    beit_attention,
    eva_attention,
    family_of,
    gather_rope,
    has_class_token,
    rel_pos_bias,
    size_weighted_pool,
    timm_attention,
    vit_attention,
)
from ipbench.reducers.tokens import TokenState

if TYPE_CHECKING:
    from ipbench.reducers.policy import Policy


@dataclass
class EngineState:
    """Shared by the patched model and its blocks; holds the policy and the last forward's facts."""

    policy: Policy
    n_prefix: int
    grid: tuple[int, int]
    depth: int
    tracing: bool = False
    family: str = "vit"  # FAMILIES: which block code runs a block's attention
    importance: str | None = None  # 'cls' or 'received': how the policy's importance is read
    tokens: TokenState | None = None
    last_counts: list[int] = field(default_factory=list)
    last_image_counts: Tensor | None = None  # [B, depth] real tokens after each block, adaptive policies only
    last_trace: list[dict[str, Any]] | None = None
    last_state: TokenState | None = None


_TRACE_NEEDS = frozenset({"cls_attn", "keys"})
_NOTHING: frozenset[str] = frozenset()
# attend(block, normed x, bias, needs, state) -> (attention output, evidence)
Attend = Callable[[nn.Module, Tensor, "Tensor | None", frozenset, TokenState], tuple[Tensor, Evidence]]


def _scaled(gamma: Tensor | None, t: Tensor) -> Tensor:
    """EVA's and BEiT's LayerScale: a bare gamma parameter, or none."""
    return t if gamma is None else gamma * t


def _bias_dtype(x: Tensor) -> torch.dtype:
    """The dtype the attention logits have: autocast's where it is on, else the hidden states'."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _run_block(block: nn.Module, x: Tensor, attend: Attend, plain: Callable[[Tensor], Tensor],
               ls1: Callable[[Tensor], Tensor], ls2: Callable[[Tensor], Tensor]) -> Tensor:
    """One patched block of any family: attention (with its evidence), the policy's reduction,
    then the MLP. A block that reduces nothing, needs no bias and traces nothing runs timm's own
    code (for EVA and BEiT only before any reduction: their position terms are gathered after)."""
    eng: EngineState = block._ipb
    layer = block._ipb_layer
    st = eng.tokens
    if st is None or layer == 0:
        st = eng.tokens = TokenState(x, eng.n_prefix, eng.grid, eng.policy.needs_pos, eng.tracing,
                                     eng.policy.prop_attn, want_anchor=eng.family in POSITIONAL)
    st.layer = layer
    active = eng.policy.acts_at(layer)
    tracing = st.trace is not None
    bias = st.attn_bias(_bias_dtype(x)) if st.moved else None  # nothing merged or padded before a move
    if not active and bias is None and not tracing and (not st.moved or eng.family not in POSITIONAL):
        x = plain(x)
        st.count(x)
        return x

    # Tracing reads the evidence of every block (same ops, so outputs are unchanged).
    needs = eng.policy.needs if active else _NOTHING
    if tracing:
        needs = needs | _TRACE_NEEDS
    received = eng.importance == "received" and "cls_attn" in needs
    if received:  # read from the attention matrix itself: timm's unfused path, nothing computed twice
        needs = (needs - {"cls_attn"}) | {"attn"}
    a, ev = attend(block, block.norm1(x), bias, needs, st)
    if received:
        ev.cls_attn = received_attention(ev.attn, st.n_prefix, st.valid)
    x = x + block.drop_path1(ls1(a))
    if tracing:
        st.record(op="attn", n_prefix=st.n_prefix, grid=st.grid, cls_attn=ev.cls_attn,
                  size=st.size, source=st.source, pos=st.pos)
    if active:
        x = eng.policy.reduce(layer, x, ev, st)
        st.moved = True
    x = x + block.drop_path2(ls2(block.mlp(block.norm2(x))))
    st.count(x)
    if tracing:
        st.record(op="out", n_prefix=st.n_prefix, grid=st.grid, size=st.size, source=st.source,
                  pos=st.pos)
    return x


def _vit_attend(block: nn.Module, xn: Tensor, bias: Tensor | None, needs: frozenset,
                st: TokenState) -> tuple[Tensor, Evidence]:
    """timm's attention: computed inline for timm's own Attention class (`vit_attention`, the same
    ops), else the module itself runs with its qkv projection's output captured by a hook."""
    attn = block.attn
    if block._ipb_inline:
        return vit_attention(attn, xn, bias, needs)
    a, captured, matrix = attention_with_evidence(attn, xn, bias, bool(needs & QKV_NEEDS), "attn" in needs)
    ev = qkv_evidence(attn, captured[0], bias, needs) if captured else Evidence()
    ev.attn = matrix
    captured.clear()  # the block's qkv [B, N, 3C] must not stay alive through the MLP (peak memory)
    return a, ev


class _PatchedBlock:
    """Mixed into timm's VisionTransformer Block class by `apply_reducer`."""

    _ipb: EngineState
    _ipb_layer: int
    _ipb_inline: bool  # its attention is timm's own class: computed inline (`vit_attention`)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise UserError("ipbench's reducers do not support attention masks or causal attention")
        return _run_block(self, x, _vit_attend, super().forward, self.ls1, self.ls2)


class _PatchedEvaBlock:
    """Mixed into timm's EvaBlock: the rotary table gathered for the tokens that remain."""

    _ipb: EngineState
    _ipb_layer: int

    def forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise UserError("ipbench's reducers do not support attention masks or causal attention")
        base = super()

        def attend(block: nn.Module, xn: Tensor, bias: Tensor | None, needs: frozenset,
                   st: TokenState) -> tuple[Tensor, Evidence]:
            return eva_attention(block.attn, xn, gather_rope(rope, st), bias, needs)

        return _run_block(self, x, attend, lambda t: base.forward(t, rope=rope),
                          lambda t: _scaled(self.gamma_1, t), lambda t: _scaled(self.gamma_2, t))


class _PatchedBeitBlock:
    """Mixed into timm's BEiT Block: the relative position bias gathered for the tokens that remain."""

    _ipb: EngineState
    _ipb_layer: int

    def forward(self, x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
        base = super()

        def attend(block: nn.Module, xn: Tensor, bias: Tensor | None, needs: frozenset,
                   st: TokenState) -> tuple[Tensor, Evidence]:
            return beit_attention(block.attn, xn, rel_pos_bias(block.attn, shared_rel_pos_bias, st), bias, needs)

        return _run_block(self, x, attend, lambda t: base.forward(t, shared_rel_pos_bias=shared_rel_pos_bias),
                          lambda t: _scaled(self.gamma_1, t), lambda t: _scaled(self.gamma_2, t))


def _image_counts(st: TokenState) -> Tensor | None:
    """[B, depth] tokens per image after each block, or None when every image had the same."""
    known = [c for c in st.image_counts if c is not None]
    if not known:
        return None
    return torch.stack([torch.full_like(known[0], n) if c is None else c
                        for c, n in zip(st.image_counts, st.counts)], dim=1)


class _PatchedModel:
    """Mixed into timm's VisionTransformer class: per-forward state and size-weighted pooling."""

    _ipb: EngineState

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        eng = self._ipb
        eng.tokens = None
        try:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        finally:
            st = eng.tokens
            if st is not None:
                eng.last_counts = list(st.counts)
                eng.last_image_counts = _image_counts(st)
                eng.last_trace = st.trace
                eng.last_state = st if eng.tracing else None
            eng.tokens = None

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """VisionTransformer's and Eva's pooling, seeing token sizes: average pooling size-weighted
        (padding left out), an attention-pool head (SigLIP's MAP) given the blocks' own bias."""
        st = self._ipb.tokens
        include_prefix = getattr(self, "pool_include_prefix", False)
        if st is not None and getattr(self, "attn_pool", None) is not None:
            bias = st.attn_bias(x.dtype)
            if bias is not None:
                if not include_prefix:
                    x, bias = x[:, self.num_prefix_tokens:], bias[..., self.num_prefix_tokens:]
                return self.attn_pool(x, attn_mask=bias)
        pooled = size_weighted_pool(x, st, self.global_pool if pool_type is None else pool_type,
                                    self.num_prefix_tokens, include_prefix or self.attn_pool is not None)
        return pooled if pooled is not None else super().pool(x, pool_type)  # type: ignore[misc]


class _PatchedBeitModel(_PatchedModel):
    """Mixed into timm's Beit, whose head pools inline (mean of the patch tokens)."""

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = size_weighted_pool(x, self._ipb.tokens, self.global_pool, self.num_prefix_tokens, False)
        if pooled is None:
            return super().forward_head(x, pre_logits)  # type: ignore[misc]
        x = self.head_drop(self.fc_norm(pooled))
        return x if pre_logits else self.head(x)


_PATCHED_CLASSES: dict[tuple[type, type], type] = {}
_BLOCK_MIXINS = {"vit": _PatchedBlock, "eva": _PatchedEvaBlock, "beit": _PatchedBeitBlock}
_MODEL_MIXINS = {"vit": _PatchedModel, "eva": _PatchedModel, "beit": _PatchedBeitModel}


def _patched_class(base: type, mixin: type) -> type:
    key = (base, mixin)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"IPB{base.__name__}", (mixin, base), {"_ipb_base": base})
    return _PATCHED_CLASSES[key]


def check_fits(model: nn.Module, policy: Policy) -> str:
    """The model's family; a one-line UserError unless `policy` can run on `model`: a supported ViT
    family (FAMILIES), and a class token where the policy ranks by class-token attention."""
    family = family_of(model)
    mode = policy.importance(has_class_token(model))
    if mode == "cls" and not has_class_token(model):
        raise UserError(f"{policy.name} ranks tokens by class-token attention (importance=cls), but this "
                        "model has no class token; use importance=received (the default there: the "
                        "attention each token receives) or a reducer that needs no importance (tome)")
    return family


def reducible(model: nn.Module) -> bool:
    """Whether token reduction and token plans apply: a ViT of a supported family (FAMILIES)."""
    try:
        family_of(model)
    except UserError:
        return False
    return True


def _n_tokens(model: nn.Module) -> int:
    """Tokens entering block 0: patches plus prefix tokens (class, distillation, registers)."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, "_ipb")


def remove_reducer(model: nn.Module) -> nn.Module:
    """Undo `apply_reducer`: the model is plain timm again."""
    if not is_patched(model):
        return model
    for b in model.blocks:
        b.__class__ = b._ipb_base
        del b._ipb, b._ipb_layer, b._ipb_inline
    model.__class__ = model._ipb_base
    del model._ipb
    return model


def apply_reducer(model: nn.Module, policy: Policy, tracing: bool = False) -> nn.Module:
    """Patch a timm ViT in place so that `policy` reduces its tokens; returns the model."""
    family = check_fits(model, policy)
    remove_reducer(model)
    policy.prepare(model)
    depth = len(model.blocks)
    policy.observe(model)
    policy.bind(depth, _n_tokens(model), model.num_prefix_tokens)
    grid = tuple(model.patch_embed.grid_size)
    eng = EngineState(policy=policy, n_prefix=model.num_prefix_tokens, grid=grid, depth=depth,
                      tracing=tracing, family=family, importance=policy.importance(has_class_token(model)))
    for i, b in enumerate(model.blocks):
        b.__class__ = _patched_class(type(b), _BLOCK_MIXINS[family])
        # decided here, once: the class check in each block's forward made torch.compile warn
        b._ipb, b._ipb_layer, b._ipb_inline = eng, i, type(b.attn) is timm_attention()
    model.__class__ = _patched_class(type(model), _MODEL_MIXINS[family])
    model._ipb = eng
    return model


def set_tracing(model: nn.Module, on: bool) -> None:
    """Record per-layer traces (merges, rankings, sources) on the next forwards."""
    model._ipb.tracing = on


@dataclass
class TokenPlan:
    """Static token counts: known without running an image."""

    n_in: int
    attn_tokens: list[int]  # tokens entering each block's attention
    mlp_tokens: list[int]  # tokens in each block's MLP (= after the block's reduction)
    # MACs of each block's reduction itself where a policy declares them (`Policy.extra_macs`)
    extra_macs: list[int] = field(default_factory=list)

    @property
    def after(self) -> list[int]:
        return self.mlp_tokens

    @property
    def final(self) -> int:
        return self.mlp_tokens[-1]


def token_plan(model: nn.Module, policy: Policy | None = None) -> TokenPlan:
    """Token counts per block for a patched model (or for `policy` on a plain one)."""
    depth = len(model.blocks)
    n_prefix = model.num_prefix_tokens
    n = _n_tokens(model)
    if policy is None:
        policy = model._ipb.policy if is_patched(model) else None
    received = False
    if policy is not None:
        policy.observe(model)
        policy.bind(depth, n, n_prefix)
        received = policy.importance(has_class_token(model)) == "received"
    attn, mlp, extra = [], [], []
    for layer, block in enumerate(model.blocks):
        attn.append(n)
        macs = 0
        if policy is not None and policy.acts_at(layer):
            heads = block.attn.num_heads
            macs = policy.extra_macs(layer, n, n_prefix, heads, block.attn.proj.in_features // heads,
                                     model.embed_dim)
            if received:  # the mean over queries of every head's attention matrix: one add per entry
                macs += heads * n * n
            n = policy.tokens_after(layer, n, n_prefix)
        mlp.append(n)
        extra.append(macs)
    return TokenPlan(n_in=attn[0], attn_tokens=attn, mlp_tokens=mlp, extra_macs=extra)
