"""ATS: adaptive token sampling (Fayyaz et al., ECCV 2022); the number of tokens varies per image.

In each ATS block the patches are scored s_j ∝ (class-token attention to j) · ‖v_j‖, sorted
ascending, and their cumulative distribution min-max normalised; K evenly spaced values y from the
smallest non-zero CDF value to 1 each pick the token whose CDF is nearest (inverse-transform
sampling, deterministic). The distinct picks survive, in ascending score order: a peaked score
distribution gives many repeated picks and so few tokens. Official code: adaptivetokensampling/ATS
@9271257 (libs/models/transformers/ats_block.py), whose release samples K = N_ref − 1 = 196 (keep=1).

A batch is padded to its longest image and the padding masked out of every attention (TokenState.
keep_ragged), so each image's tokens, logits and counts are those it has alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.knobs import KEEP_RATE
from ipbench.reducers.matching import false_first, positions
from ipbench.reducers.policy import Param, Policy
from ipbench.reducers.spec import register


def sample_grid(ys_start: Tensor, k: int) -> Tensor:
    """The official create_ys: k values from ys_start [B] to 1, evenly spaced, in the same float
    expression (so the picks equal the official code's bit for bit). -> [B, k]."""
    n = k + 1
    ys0 = torch.linspace(0, 1, steps=n - 1, device=ys_start.device, dtype=ys_start.dtype)
    steps = torch.arange(0, n - 1, device=ys_start.device).to(ys_start.dtype)
    start = ys_start.unsqueeze(-1)
    return start + ((ys0 * (n - 2)) - start * steps) / (n - 2)


def inverse_transform_picks(scores: Tensor, real: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Which patches ATS keeps. scores [B, T] (any non-negative significance), real [B, T] the
    image's tokens (padding False). Returns (idx [B, M], valid [B, M]): the distinct picks of each
    image in ascending score order, padded to the batch's largest count M."""
    s = torch.where(real, scores, torch.zeros_like(scores))
    s = s / s.sum(dim=-1, keepdim=True)
    ordered, order = torch.where(real, s, torch.full_like(s, -1.0)).sort(dim=-1)  # padding first
    ordered = ordered.clamp_min(0)
    cdf = ordered.cumsum(dim=-1)
    n_pad = (~real).sum(dim=-1, keepdim=True)
    low, high = cdf.gather(1, n_pad), cdf[:, -1:]
    ncdf = (cdf - low) / ((high - low) / 1.0)
    pad = torch.arange(s.shape[1], device=s.device) < n_pad
    ys_start = torch.where(pad | (ncdf == 0), torch.full_like(ncdf, math.inf), ncdf).amin(dim=-1)
    ys = sample_grid(ys_start, k)
    target = torch.where(pad, torch.full_like(ncdf, -1e9), ncdf)  # padding is never the nearest
    picks = (ys.unsqueeze(-1) - target.unsqueeze(1)).abs().argmin(dim=-1)  # first nearest on ties
    picked = torch.zeros_like(real).scatter_(1, picks, 1)
    count = picked.sum(dim=-1)
    width = int(count.max())
    first = false_first(~picked)[:, :width]  # the picked positions, ascending
    valid = torch.arange(width, device=s.device) < count.unsqueeze(-1)
    return order.gather(1, first), valid


@register
class ATS(Policy):
    name = "ats"
    description = ("ATS adaptive token sampling: in the ATS blocks inverse-transform sampling on the CLS "
                   "attention·‖v‖ distribution keeps the distinct picks; the count varies per image")
    PARAMS = (
        Param("keep", "float01", 1.0, "samples drawn per ATS block, as a share of the initial patch count "
              "(K = ⌈keep·(N₀−1)⌉; 1 is the official release's only working setting, K = 196)"),
        Param("layers", "ints", [3, 4, 5, 6, 7, 8, 9, 10, 11], "0-indexed ATS blocks (official DeiT-S config)",
              minimum=0),
    )
    needs = frozenset({"cls_attn", "vnorm"})
    combinable = False
    adaptive = True
    knob = KEEP_RATE
    discard_param = "layers"

    def bind(self, depth: int, n_tokens: int, n_prefix: int) -> None:
        super().bind(depth, n_tokens, n_prefix)
        self._layers = self.layer_set()
        self._k = max(2, math.ceil(self.params["keep"] * (n_tokens - n_prefix)))

    def acts_at(self, layer: int) -> bool:
        return layer in self._layers

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        """The most an image can keep (its K picks, distinct or not, never more than it had); the
        counts an image really keeps are measured (`adaptive`)."""
        return min(n, n_prefix + self._k)

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        p = st.n_prefix
        real = st.valid[:, p:] if st.valid is not None else torch.ones_like(ev.vnorm[:, p:], dtype=torch.bool)
        idx, valid = inverse_transform_picks(ev.cls_attn[:, p:] * ev.vnorm[:, p:], real, self._k)
        prefix = positions(p, x.shape[0], x.device)
        keep = torch.cat([prefix, idx + p], dim=1)
        return st.keep_ragged(x, keep, torch.cat([torch.ones_like(prefix, dtype=torch.bool), valid], dim=1))
