"""ImagePiece: merge the non-semantic tokens with each other before discarding what stays
non-semantic (Lee et al., AAAI 2025, arXiv 2412.16491; no public code).

A 16×16 patch often means nothing on its own; grouped with similar ones it may. In the
re-tokenize blocks the bottom-k tokens by CLS attention, and only they, are merged among
themselves by bipartite soft matching; the next block's attention re-evaluates them; in the
discard blocks what is still inattentive is fused away as in EViT. Every choice the paper leaves
open is a parameter (docs/METHODS.md). The paper's learned conv stem is `ConvStem`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ipbench.errors import UserError
from ipbench.reducers.engine import Evidence, TokenState
from ipbench.reducers.knobs import KEEP_RATE
from ipbench.reducers.matching import (
    bipartite_match,
    keep_plan,
    locality_penalty,
    ordered_merge_plan,
    rank_tokens,
    raster_sort,
)
from ipbench.reducers.policy import Param, Policy, keep_count
from ipbench.reducers.spec import register
from ipbench.reducers.trace import record_keep, record_merge

_EPS = 1e-9  # ⌈(1−ρ)·M⌉ must not jump by one when (1−ρ)·M is an integer up to float rounding


@dataclass(frozen=True)
class _KParam(Param):
    """k: 'auto' (from the keep rate) or a fixed number of candidates per step."""

    def parse(self, reducer: str, raw: str) -> Any:
        if raw.strip().lower() == "auto":
            return "auto"
        if raw.strip().isdigit():
            return int(raw)
        raise UserError(f"{reducer}: bad value {raw!r} for {self.name} (expected auto or an integer >= 0)")


@dataclass(frozen=True)
class _RParam(Param):
    """r: a rule of k ('k/D', 'k*F') or a fixed number of pairs per step."""

    def parse(self, reducer: str, raw: str) -> Any:
        text = raw.strip().lower().replace(" ", "")
        if text.isdigit():
            return int(text)
        m = re.fullmatch(r"k/(\d+)", text)
        if m and int(m.group(1)) >= 2:
            return f"k/{int(m.group(1))}"
        m = re.fullmatch(r"k\*([0-9]*\.?[0-9]+)", text)
        if m and 0 < float(m.group(1)) <= 0.5:
            return f"k*{float(m.group(1)):g}"
        raise UserError(f"{reducer}: bad value {raw!r} for {self.name} (expected k/D with D >= 2, "
                        "k*F with 0 < F <= 0.5, or an integer >= 0)")


def candidates(keep: float, k: str | int, m: int) -> int:
    """Non-semantic candidates among m tokens: ⌈(1−ρ)·m⌉ for k=auto, else min(k, m)."""
    if k == "auto":
        return min(m, max(0, math.ceil((1.0 - keep) * m - _EPS)))
    return min(int(k), m)


def pairs(rule: str | int, k: int) -> int:
    """Pairs merged among k candidates, never more than ⌊k/2⌋ (the size of set B)."""
    if isinstance(rule, int):
        r = rule
    elif rule.startswith("k/"):
        r = k // int(rule[2:])
    else:
        r = math.floor(k * float(rule[2:]) + _EPS)
    return max(0, min(r, k // 2))


# -- the learned local-coherence stem (needs a trained checkpoint) -------------------------------

class ConvStem(nn.Module):
    """ImagePiece's local-coherence tokenizer: four 3×3 convolutions (stride 2, BatchNorm, ReLU;
    overlapping receptive fields) and one 1×1 convolution to the embedding width.

    It replaces `model.patch_embed.proj` (a 16×16 stride-16 conv), so timm's PatchEmbed still
    flattens and normalises; its weights live under ``patch_embed.proj.body.*`` and
    ``patch_embed.proj.proj.*``. Useful only with trained weights.
    """

    def __init__(self, in_chans: int, embed_dim: int, channels: tuple[int, ...] | None = None) -> None:
        super().__init__()
        channels = channels or (embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim)
        if len(channels) != 4:
            raise UserError(f"the conv stem has four 3x3 convolutions, got {len(channels)} widths")
        layers: list[nn.Module] = []
        c_in = in_chans
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, embed_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.body(x))


STEM_PREFIX = "patch_embed.proj."


def has_conv_stem(model: nn.Module) -> bool:
    return isinstance(getattr(getattr(model, "patch_embed", None), "proj", None), ConvStem)


def checkpoint_has_conv_stem(state_dict: dict[str, Tensor]) -> bool:
    """Whether a state dict carries ImagePiece conv-stem weights."""
    return any(k.startswith(STEM_PREFIX + "body.") for k in state_dict)


def install_conv_stem(model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> nn.Module:
    """Replace the patch embedding's projection by a ConvStem (widths read from state_dict
    when given); the stem is randomly initialised until weights are loaded."""
    pe = model.patch_embed
    if tuple(pe.patch_size) != (16, 16):
        raise UserError(f"the conv stem downsamples by 16; this model's patches are {tuple(pe.patch_size)}")
    in_chans, embed_dim = pe.proj.in_channels, pe.proj.out_channels
    channels = None
    if state_dict is not None:
        channels = tuple(state_dict[f"{STEM_PREFIX}body.{3 * i}.weight"].shape[0] for i in range(4))
    pe.proj = ConvStem(in_chans, embed_dim, channels)
    return model


def load_conv_stem_checkpoint(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """Load a checkpoint trained with the conv stem into a plain timm ViT of the same shape.

    A checkpoint without stem weights is a UserError: the stem cannot be used untrained.
    """
    if not checkpoint_has_conv_stem(state_dict):
        raise UserError("imagepiece stem=conv: the checkpoint has no conv-stem weights "
                        f"({STEM_PREFIX}body.*); it needs weights trained with ImagePiece's "
                        "local-coherence stem (use stem=patch for off-the-shelf timm weights)")
    install_conv_stem(model, state_dict)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise UserError(f"conv-stem checkpoint does not fit the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return model


# -- the policy ---------------------------------------------------------------------------------

KEEP = Param("keep", "float01", 0.7, "keep rate ρ: discard blocks keep ⌈ρ·(N−prefix)⌉ tokens; "
             "also sets k")
PARAMS = (
    KEEP,
    _KParam("k", "rule", "auto", "non-semantic candidates per re-tokenize step: auto = "
            "⌈(1−ρ)·(N−prefix)⌉ of the current tokens (a fused token counts), or a fixed number"),
    _RParam("r", "rule", "k/4", "pairs merged per re-tokenize step: k/D, k*F or a fixed number; "
            "at most ⌊k/2⌋"),
    Param("retok_layers", "ints", [1, 2, 4, 5, 7, 8], "0-indexed blocks that re-tokenize "
          "(paper Table 5: blocks 2, 3, 5, 6, 8, 9)", minimum=0),
    Param("discard_layers", "ints", [3, 6, 9], "0-indexed blocks that re-rank and discard "
          "(EViT's 4, 7, 10); empty = re-tokenization only", minimum=0),
    Param("split", "choice", "spatial", "A/B sets: alternate (first to A) in raster order of "
          "the token centroids (spatial) or in CLS-attention order (rank)",
          choices=("spatial", "rank")),
    Param("metric", "choice", "keys", "similarity features: head-mean keys or hidden states x",
          choices=("keys", "x")),
    Param("fuse", "bool", True, "discard blocks fuse the dropped tokens into one (EViT)"),
    Param("fused_size", "choice", "one", "size of the fused token in attention: one (no bias, as "
          "official EViT) or count (patches absorbed)", choices=("one", "count")),
    Param("retok", "choice", "merge", "merge the matched pairs, or prune (drop the r tokens that "
          "would merge: same schedule, the control for merging)", choices=("merge", "prune")),
    Param("locality", "float", 0.0, "λ: similarity − λ·(centroid distance / grid side); "
          "0 = off (training-free stand-in for the conv stem)", minimum=0.0),
    Param("prop_attn", "bool", True, "add log(token size) to the attention logits"),
    Param("stem", "choice", "patch", "tokenizer: timm's patch embedding, or the paper's learned "
          "local-coherence conv stem (needs a checkpoint trained with it)", choices=("patch", "conv")),
)


@register
class ImagePiece(Policy):
    name = "imagepiece"
    description = (
        "ImagePiece re-tokenization (paper: trained models; here applied training-free unless "
        "stem=conv): in the re-tokenize blocks the bottom-k tokens by CLS attention, and only "
        "they, merge pairwise by bipartite matching (size-weighted, proportional attention); in "
        "the discard blocks the rest is re-ranked and the bottom ones fused away as in EViT. "
        "Combined (imagepiece+X), ImagePiece contributes its re-tokenization only and X takes "
        "the place of its discard step: imagepiece+evit is the paper's full model (= imagepiece), "
        "imagepiece+tome adds ToMe's merging in every block; X uses ImagePiece's keep rate "
        "unless its own is given")
    PARAMS = PARAMS
    needs = frozenset({"cls_attn", "keys"})
    knob = KEEP_RATE
    discard_param = "discard_layers"
    note = "training-free on off-the-shelf weights (the paper's models are trained)"

    def validate(self) -> None:
        p = self.params
        both = sorted(set(p["retok_layers"]) & set(p["discard_layers"]))
        if both:
            raise UserError(f"imagepiece: block {both[0]} is in both retok_layers and discard_layers; "
                            "a block does one or the other (imagepiece+evit:layers=... does both)")
        if p["fused_size"] == "count" and not p["prop_attn"]:
            raise UserError("imagepiece: fused_size=count biases attention by size; it needs prop_attn=true")
        self.training_free = p["stem"] == "patch"  # type: ignore[misc]
        self._retok = frozenset(p["retok_layers"])
        self._discard = frozenset(p["discard_layers"])

    def in_combination(self, others: list[Policy]) -> None:
        """Re-tokenization only (unless discard_layers is given); the partner's keep rate."""
        if "discard_layers" not in self.given:
            self.params["discard_layers"] = []
        if "keep" not in self.given:
            rates = [o.params["keep"] for o in others if "keep" in o.params]
            if rates:
                self.params["keep"] = rates[0]
        self.validate()

    def prepare(self, model: nn.Module) -> None:
        conv = has_conv_stem(model)
        if self.params["stem"] == "conv" and not conv:
            raise UserError("imagepiece stem=conv needs a model whose patch embedding is the trained "
                            "local-coherence conv stem (load its checkpoint with "
                            "ipbench.reducers.imagepiece.load_conv_stem_checkpoint); this model has "
                            "timm's plain patch embedding, whose weights lack it: use stem=patch")
        if self.params["stem"] == "patch" and conv:
            raise UserError("imagepiece: this model's patch embedding is the conv stem; use stem=conv")

    def bind(self, depth: int, n_tokens: int, n_prefix: int) -> None:
        super().bind(depth, n_tokens, n_prefix)
        self.check_layers(self.params["retok_layers"], "retok_layers")
        self.check_layers(self.params["discard_layers"], "discard_layers")

    @property
    def needs_pos(self) -> bool:
        return self.params["split"] == "spatial" or self.params["locality"] > 0

    @property
    def prop_attn(self) -> bool:
        return bool(self.params["prop_attn"])

    def acts_at(self, layer: int) -> bool:
        p = self.params
        if layer in self._retok:
            return p["r"] != 0 and p["k"] != 0 and (p["keep"] < 1.0 or p["k"] != "auto")
        return layer in self._discard and p["keep"] < 1.0

    # -- the static plan ------------------------------------------------------------------
    def _pairs(self, m: int) -> tuple[int, int]:
        k = candidates(self.params["keep"], self.params["k"], m)
        return k, pairs(self.params["r"], k)

    def _kept(self, m: int) -> int | None:
        kept = keep_count(self.params["keep"], m)
        return None if kept >= m else kept

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        if layer in self._retok:
            return n - self._pairs(n - n_prefix)[1]
        if layer in self._discard:
            kept = self._kept(n - n_prefix)
            return n if kept is None else n_prefix + kept + int(self.params["fuse"])
        return n

    # -- the forward ----------------------------------------------------------------------
    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        m = x.shape[1] - st.n_prefix
        if layer in self._retok:
            k, r = self._pairs(m)
            return self._retokenize(x, ev, st, k, r) if r > 0 else x
        kept = self._kept(m)
        if kept is None:
            return x
        keep, drop = keep_plan(rank_tokens(ev.cls_attn, st.n_prefix), kept, st.n_prefix)
        fuse = bool(self.params["fuse"])
        record_keep(st, self.name, keep, drop, ev.cls_attn, fuse)
        if fuse:
            return st.keep(x, keep, fuse=drop, weight=ev.cls_attn, fused_size=self.params["fused_size"])
        return st.keep(x, keep)

    def _retokenize(self, x: Tensor, ev: Evidence, st: TokenState, k: int, r: int) -> Tensor:
        """Merge r pairs among the k least attended tokens (or drop them: retok=prune)."""
        p = self.params
        n, m = x.shape[1], x.shape[1] - st.n_prefix
        cand = rank_tokens(ev.cls_attn, st.n_prefix)[:, m - k:]  # bottom-k, most attended first
        if p["split"] == "spatial":
            cand = raster_sort(cand, st.pos)
        # ToMe's slicing applied to the candidates: A = 1st, 3rd, ..., B = 2nd, 4th, ...
        a_idx, b_idx = cand[:, 0::2], cand[:, 1::2]
        metric = ev.keys if p["metric"] == "keys" else x
        bias = None
        if p["locality"] > 0:
            bias = locality_penalty(st.pos, a_idx, b_idx, p["locality"], float(max(st.grid)))
        src_a, dst_b, _ = bipartite_match(metric, a_idx, b_idx, r, bias)
        src, dst = a_idx.gather(1, src_a), b_idx.gather(1, dst_b)
        plan = ordered_merge_plan(n, src, dst)
        record_merge(st, self.name, plan, metric, x, ev.cls_attn,
                     op="merge" if p["retok"] == "merge" else "prune", metric_name=p["metric"],
                     candidates=cand)
        if p["retok"] == "merge":
            return st.merge(x, plan)
        return st.keep(x, plan.keep)

