"""The bookkeeping a forward carries beside the hidden states: sizes, centroids, sources, padding.

Every reduction a policy makes goes through one of TokenState's few steps (merge, keep, keep per
image, choose per image), so the hidden states and all their bookkeeping always move together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ipbench.reducers.matching import MergePlan, fuse_tokens, gather_tokens, merge_sum, merge_weighted


class TokenState:
    """Per-forward bookkeeping carried alongside the hidden states.

    size:   [B, N, 1] patches each token stands for; None while every token is one patch.
    pos:    [B, N, 2] size-weighted patch centroid (row, col); only when a policy or the
            trace needs positions. Prefix tokens sit at (-1, -1).
    source: [B, N, P] which of the P patches each token contains; only when tracing.
    anchor: [B, N] the input position (0 .. N0−1, prefix included) whose position embedding a token
            carries: its own while kept, the destination's when merged, the heaviest member's for
            a fused token; only for a model whose attention is position-dependent (EVA's rotary
            table, BEiT's relative position bias), which the engine then gathers by it.
    """

    def __init__(self, x: Tensor, n_prefix: int, grid: tuple[int, int], want_pos: bool,
                 tracing: bool, prop_attn: bool, want_anchor: bool = False) -> None:
        bsz, n, _ = x.shape
        self.n_prefix = n_prefix
        self.grid = grid
        self.prop_attn = prop_attn
        self.size: Tensor | None = None
        self.pos: Tensor | None = None
        self.source: Tensor | None = None
        self.counts: list[int] = []
        # Image-adaptive counts (ATS): valid [B, N] marks each image's real tokens in a batch padded
        # to its longest image; padded keys are masked out of the attention. None: every token real.
        self.valid: Tensor | None = None
        self.image_counts: list[Tensor | None] = []  # per block: real tokens per image, None if all
        self.trace: list[dict[str, Any]] | None = [] if tracing else None
        self.layer = -1
        self.moved = False  # set once a policy has reduced (or reordered) the tokens
        # the last attn_bias: (the size and valid tensors it was made from, dtype, bias)
        self._bias: tuple[Tensor | None, Tensor | None, torch.dtype, Tensor | None] | None = None
        self.anchor: Tensor | None = (torch.arange(n, device=x.device).expand(bsz, -1)
                                      if want_anchor else None)
        n_patches = n - n_prefix
        if want_pos or tracing:
            idx = torch.arange(n_patches, device=x.device)
            rc = torch.stack([idx // grid[1], idx % grid[1]], dim=-1).to(x.dtype)
            pre = torch.full((n_prefix, 2), -1.0, device=x.device, dtype=x.dtype)
            self.pos = torch.cat([pre, rc]).expand(bsz, -1, -1)
        if tracing:
            eye = torch.eye(n_patches, device=x.device, dtype=x.dtype)
            pre = torch.zeros(n_prefix, n_patches, device=x.device, dtype=x.dtype)
            self.source = torch.cat([pre, eye]).expand(bsz, -1, -1)

    def sizes(self, x: Tensor) -> Tensor:
        """Token sizes as a tensor, ones when nothing was merged yet."""
        return self.size if self.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)

    def attn_bias(self, dtype: torch.dtype) -> Tensor | None:
        """Proportional attention, log(size) added to the logits of each key, and −inf on the keys
        of padding (each image then attends exactly as it would alone).

        Kept until the sizes or the padding change (a block that reduces nothing, the pooling head
        and the blocks after the last reduction reuse it instead of taking the log again)."""
        size = self.size if self.prop_attn else None
        if size is None and self.valid is None:
            return None
        made = self._bias
        if made is not None and made[0] is size and made[1] is self.valid and made[2] == dtype:
            return made[3]
        bias = None
        if size is not None:
            bias = size.log().to(dtype).transpose(1, 2).unsqueeze(1)
        if self.valid is not None:
            pad = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device)
            pad = pad.masked_fill(~self.valid, float("-inf"))[:, None, None, :]
            bias = pad if bias is None else bias + pad
        self._bias = (size, self.valid, dtype, bias)
        return bias

    def count(self, x: Tensor) -> None:
        """Record the tokens leaving a block (per image too, once counts vary by image)."""
        self.counts.append(x.shape[1])
        self.image_counts.append(None if self.valid is None else self.valid.sum(dim=1))

    def keep_ragged(self, x: Tensor, idx: Tensor, valid: Tensor) -> Tensor:
        """Keep a different number of tokens per image: idx [B, M] (the batch's longest image; any
        index in the padding), valid [B, M] which of them are real. Padding is zeroed, kept sizes,
        centroids and sources are gathered, and from here on the attention masks the padding out."""
        out = gather_tokens(x, idx) * valid.unsqueeze(-1).to(x.dtype)
        if self.size is not None:
            self.size = gather_tokens(self.size, idx).masked_fill(~valid.unsqueeze(-1), 1.0)
        if self.pos is not None:
            self.pos = gather_tokens(self.pos, idx)
        if self.source is not None:
            self.source = gather_tokens(self.source, idx) * valid.unsqueeze(-1).to(x.dtype)
        if self.anchor is not None:
            self.anchor = self.anchor.gather(1, idx)
        self.valid = valid
        return out

    def merge(self, x: Tensor, plan: MergePlan, weight: Tensor | None = None,
              size_scale: Tensor | None = None) -> Tensor:
        """Apply a MergePlan: size-weighted average of x and centroids, sizes and sources add.

        weight [B, N, 1] replaces the sizes as the weights of x only (MSTM: size × importance;
        ones: an unweighted mean); centroids stay size-weighted, since they describe patches, not
        features. size_scale [B, N, 1] multiplies each token's size before the sizes add (DiffRate
        counts a merged token as s·cos of its best match).
        """
        w = self.sizes(x)
        size = merge_sum(w, plan)  # once: the new sizes are also the size-weighted average's divisor
        x = merge_weighted(x, w, plan, size) if weight is None else merge_weighted(x, weight, plan)
        if self.pos is not None:
            self.pos = merge_weighted(self.pos, w, plan, size)
        if self.source is not None:
            self.source = merge_sum(self.source, plan)
        if self.anchor is not None:
            self.anchor = self.anchor.gather(1, plan.keep)  # a destination keeps its own position
        self.size = size if size_scale is None else merge_sum(w * size_scale, plan)
        return x

    def choose(self, x: Tensor, which: Tensor, first: Callable[[Tensor], Tensor],
               second: Callable[[Tensor], Tensor]) -> Tensor:
        """Per image, one of two reductions that leave the same token count: `first` where
        which [B] is true, `second` elsewhere (PPT pools some images and prunes the others).

        Both run on the whole batch and the rows are then picked: a branch only gathers and
        averages tokens, so running both costs no matrix product beyond its matching.
        """
        before = (self.size, self.pos, self.source, self.anchor)
        xa = first(x)
        size_a, pos_a, source_a, anchor_a = self.size, self.pos, self.source, self.anchor
        self.size, self.pos, self.source, self.anchor = before
        xb = second(x)
        pick = which.view(-1, 1, 1)
        if size_a is not None or self.size is not None:
            size_b = self.sizes(xb)
            self.size = torch.where(pick, size_a if size_a is not None else torch.ones_like(size_b), size_b)
        if self.pos is not None:
            self.pos = torch.where(pick, pos_a, self.pos)
        if self.source is not None:
            self.source = torch.where(pick, source_a, self.source)
        if self.anchor is not None:
            self.anchor = torch.where(which.view(-1, 1), anchor_a, self.anchor)
        return torch.where(pick, xa, xb)

    def keep(self, x: Tensor, idx: Tensor, fuse: Tensor | None = None,
             weight: Tensor | None = None, fused_size: str = "one") -> Tensor:
        """Keep the tokens idx [B, M] in that order; optionally append one fused token.

        fuse [B, D]: tokens folded into EViT's extra token Σ weight_i · x_i (weight [B, N],
        not renormalised). fused_size 'one': that token counts as one patch, as in official
        EViT, which has no sizes; 'count': it counts the patches it absorbed. Its centroid is
        the size-weighted centroid of its members and its sources their union.
        """
        # sizes are needed where tokens have them, or for the fused token's own size or centroid;
        # not for EViT's default (every token one patch, the fused one too, no centroids)
        count = fuse is not None and (fused_size == "count" or self.pos is not None)
        w = self.sizes(x) if (self.size is not None or count) else None
        out = gather_tokens(x, idx)
        new_size = gather_tokens(w, idx) if w is not None else None
        new_pos = gather_tokens(self.pos, idx) if self.pos is not None else None
        new_src = gather_tokens(self.source, idx) if self.source is not None else None
        new_anchor = self.anchor.gather(1, idx) if self.anchor is not None else None
        if fuse is not None:
            assert weight is not None
            out = torch.cat([out, fuse_tokens(x, weight, fuse)], dim=1)
            if w is not None:
                assert new_size is not None
                members = gather_tokens(w, fuse)
                total = members.sum(dim=1, keepdim=True)
                new_size = torch.cat([new_size, total if fused_size == "count" else torch.ones_like(total)], 1)
                if new_pos is not None:
                    centroid = (gather_tokens(self.pos, fuse) * members).sum(dim=1, keepdim=True) / total
                    new_pos = torch.cat([new_pos, centroid], dim=1)
            if new_src is not None:
                new_src = torch.cat([new_src, gather_tokens(self.source, fuse).sum(1, keepdim=True)], 1)
            if new_anchor is not None:  # the fused token sits where its heaviest member did
                heaviest = weight.gather(1, fuse).argmax(dim=1, keepdim=True)
                new_anchor = torch.cat([new_anchor, self.anchor.gather(1, fuse.gather(1, heaviest))], 1)
            if self.size is None and fused_size == "one":
                new_size = None  # still every token one patch: keep the cheap path
        self.size, self.pos, self.source, self.anchor = new_size, new_pos, new_src, new_anchor
        return out

    def record(self, **entry: Any) -> None:
        """Add a trace entry for the current layer (no-op unless tracing)."""
        if self.trace is not None:
            self.trace.append({"layer": self.layer, **entry})
