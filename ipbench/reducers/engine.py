"""The one patched transformer block that every reducer runs in.

`apply_reducer` swaps the classes of a timm VisionTransformer and of its blocks for thin
subclasses (weights and state_dict untouched, `remove_reducer` swaps them back). A patched
block runs timm's own attention module (SDPA kept), with proportional attention passed as
its additive `attn_mask`, then lets the policy reduce the tokens, then runs the MLP:

    x = x + ls1(attn(norm1(x), attn_mask=log(size)))  ->  policy.reduce  ->  x = x + ls2(mlp(norm2(x)))

Blocks where the policy does nothing and no token has been merged yet call timm's forward
unchanged, so `none` is timm bit for bit and costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ipbench.errors import UserError
from ipbench.reducers.evidence import QKV_NEEDS, Evidence, attention_with_evidence, qkv_evidence
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
    tokens: TokenState | None = None
    last_counts: list[int] = field(default_factory=list)
    last_image_counts: Tensor | None = None  # [B, depth] real tokens after each block, adaptive policies only
    last_trace: list[dict[str, Any]] | None = None
    last_state: TokenState | None = None


_TRACE_NEEDS = frozenset({"cls_attn", "keys"})


class _PatchedBlock:
    """Mixed into timm's Block class by `apply_reducer`."""

    _ipb: EngineState
    _ipb_layer: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        eng = self._ipb
        st = eng.tokens
        if st is None or self._ipb_layer == 0:
            st = eng.tokens = TokenState(x, eng.n_prefix, eng.grid, eng.policy.needs_pos,
                                         eng.tracing, eng.policy.prop_attn)
        layer = self._ipb_layer
        st.layer = layer
        active = eng.policy.acts_at(layer)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) \
            else x.dtype
        bias = st.attn_bias(dtype)
        if attn_mask is not None or is_causal:
            raise UserError("ipbench's reducers do not support attention masks or causal attention")
        tracing = st.trace is not None
        if not active and bias is None and not tracing:
            x = super().forward(x)  # type: ignore[misc]
            st.count(x)
            return x

        # Tracing reads the evidence of every block (same ops, so outputs are unchanged).
        needs = (eng.policy.needs if active else frozenset()) | (_TRACE_NEEDS if tracing else frozenset())
        a, captured, matrix = attention_with_evidence(self.attn, self.norm1(x), bias, bool(needs & QKV_NEEDS),
                                                      "attn" in needs)
        x = x + self.drop_path1(self.ls1(a))
        ev = qkv_evidence(self.attn, captured[0], bias, needs) if captured else Evidence()
        ev.attn = matrix
        captured.clear()  # the block's qkv [B, N, 3C] must not stay alive through the MLP (peak memory)
        if tracing:
            st.record(op="attn", n_prefix=st.n_prefix, grid=st.grid, cls_attn=ev.cls_attn,
                      size=st.size, source=st.source, pos=st.pos)
        if active:
            x = eng.policy.reduce(layer, x, ev, st)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        st.count(x)
        if tracing:
            st.record(op="out", n_prefix=st.n_prefix, grid=st.grid, size=st.size, source=st.source,
                      pos=st.pos)
        return x


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
        pool_type = self.global_pool if pool_type is None else pool_type
        st = self._ipb.tokens
        if pool_type in ("avg", "avgmax") and st is not None and (st.size is not None or st.valid is not None) \
                and self.attn_pool is None and not self.pool_include_prefix:
            p = self.num_prefix_tokens
            tok, w = x[:, p:], st.sizes(x)[:, p:].to(x.dtype)
            real = st.valid[:, p:].unsqueeze(-1) if st.valid is not None else None
            if real is not None:
                w = w * real.to(x.dtype)
            avg = (tok * w).sum(dim=1) / w.sum(dim=1)
            if pool_type == "avg":
                return avg
            return 0.5 * ((tok if real is None else tok.masked_fill(~real, float("-inf"))).amax(dim=1) + avg)
        return super().pool(x, pool_type)  # type: ignore[misc]


_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def _patched_class(base: type, mixin: type) -> type:
    key = (base, mixin)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"IPB{base.__name__}", (mixin, base), {"_ipb_base": base})
    return _PATCHED_CLASSES[key]


def _check_vit(model: nn.Module) -> None:
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise UserError(f"{type(model).__name__} is not a timm VisionTransformer; token reducers "
                        "need a ViT-like model (deit_*, vit_*, deit3_*)")
    bad = {type(b).__name__ for b in model.blocks if not isinstance(b, Block)}
    if bad:
        raise UserError(f"unsupported block type(s) {', '.join(sorted(bad))}; token reducers "
                        "need timm's Block (pre-norm attention + MLP)")
    for b in model.blocks:
        if not hasattr(b.attn, "qkv"):
            raise UserError(f"attention {type(b.attn).__name__} has no fused qkv projection; "
                            "not supported")


def check_fits(model: nn.Module, policy: Policy) -> None:
    """A one-line UserError unless `policy` can run on `model` (a timm ViT, and a class token
    whose attention the head reads, for a policy that ranks tokens by class-token attention)."""
    _check_vit(model)
    if "cls_attn" in policy.needs:
        pool = getattr(model, "global_pool", "token")
        if getattr(model, "cls_token", None) is None or pool != "token":
            why = "has no class token" if getattr(model, "cls_token", None) is None else \
                f"pools its output with global_pool={pool!r}, not the class token"
            raise UserError(f"{policy.name} ranks tokens by class-token attention, but this model {why}; "
                            "use a reducer that needs no class token (tome) or a model with one")


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
        del b._ipb, b._ipb_layer
    model.__class__ = model._ipb_base
    del model._ipb
    return model


def apply_reducer(model: nn.Module, policy: Policy, tracing: bool = False) -> nn.Module:
    """Patch a timm ViT in place so that `policy` reduces its tokens; returns the model."""
    check_fits(model, policy)
    remove_reducer(model)
    policy.prepare(model)
    depth = len(model.blocks)
    policy.observe(model)
    policy.bind(depth, _n_tokens(model), model.num_prefix_tokens)
    grid = tuple(model.patch_embed.grid_size)
    eng = EngineState(policy=policy, n_prefix=model.num_prefix_tokens, grid=grid, depth=depth,
                      tracing=tracing)
    for i, b in enumerate(model.blocks):
        b.__class__ = _patched_class(type(b), _PatchedBlock)
        b._ipb, b._ipb_layer = eng, i
    model.__class__ = _patched_class(type(model), _PatchedModel)
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
    if policy is not None:
        policy.observe(model)
        policy.bind(depth, n, n_prefix)
    attn, mlp, extra = [], [], []
    for layer, block in enumerate(model.blocks):
        attn.append(n)
        macs = 0
        if policy is not None and policy.acts_at(layer):
            macs = policy.extra_macs(layer, n, n_prefix, block.attn.num_heads, block.attn.head_dim,
                                     model.embed_dim)
            n = policy.tokens_after(layer, n, n_prefix)
        mlp.append(n)
        extra.append(macs)
    return TokenPlan(n_in=attn[0], attn_tokens=attn, mlp_tokens=mlp, extra_macs=extra)
