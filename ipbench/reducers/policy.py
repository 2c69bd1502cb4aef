"""The policy interface: what a reducer decides, given one block's evidence.

A policy is small: it declares its parameters (name, type, default, one line of docs), says
at which blocks it acts and how many tokens survive there (the static plan, known without an
image), and reduces the tokens of a block using the engine's Evidence and TokenState.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ipbench.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ipbench.reducers.engine import Evidence, TokenState
    from ipbench.reducers.knobs import Knob


@dataclass(frozen=True)
class Param:
    """One named, documented parameter of a reducer.

    kind: 'float', 'int', 'bool', 'choice', 'ints' (list of ints; a single int also allowed
    where `scalar_ok`), 'float01' (0 < v <= 1).
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    # Left out of the canonical spec (and the CSV's reducer_params) while at its default: a
    # parameter added later whose default keeps every earlier row's identity (`importance=auto`).
    implicit: bool = False

    def parse(self, reducer: str, raw: str) -> Any:
        """Parse a spec-string value; UserError names the parameter and what is valid."""
        def bad(what: str) -> UserError:
            return UserError(f"{reducer}: bad value {raw!r} for {self.name} ({what})")

        if self.kind == "bool":
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise bad("expected true or false")
        if self.kind == "choice":
            if raw not in self.choices:
                raise bad("valid: " + ", ".join(self.choices))
            return raw
        if self.kind == "ints":
            try:
                vals = [int(v) for v in raw.replace(";", ",").split(",") if v.strip() != ""]
            except ValueError:
                raise bad("expected integers separated by commas") from None
            if self.minimum is not None and any(v < self.minimum for v in vals):
                raise bad(f"each must be >= {self.minimum:g}")
            return vals
        try:
            val: float | int = int(raw) if self.kind == "int" else float(raw)
        except ValueError:
            raise bad(f"expected {'an integer' if self.kind == 'int' else 'a number'}") from None
        if self.kind == "float01" and not 0.0 < val <= 1.0:
            raise bad("must be in (0, 1]")
        if self.minimum is not None and val < self.minimum:
            raise bad(f"must be >= {self.minimum:g}")
        return val

    def coerce(self, reducer: str, value: Any) -> Any:
        """A value set from code (`Policy.with_params`), checked exactly as if written in a spec."""
        return self.parse(reducer, value if isinstance(value, str) else format_value(value))

    def describe(self) -> str:
        extra = f" ({'|'.join(self.choices)})" if self.choices else ""
        return f"{self.name}={format_value(self.default)}{extra}: {self.help}"


def format_value(v: Any) -> str:
    """Spec-string form of a parameter value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(str(i) for i in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


IMPORTANCE = Param(
    "importance", "choice", "auto",
    "what ranks tokens: cls = the class token's attention row (the paper's rule); received = the mean "
    "attention each token receives over every patch query and head (VisionZip's and VisPruner's rule "
    "for models without a class token; its H·N² sum is in the GMACs); auto = cls where the model has "
    "a class token, received where not", choices=("auto", "cls", "received"), implicit=True)


class Policy:
    """Base class of every reducer policy."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    PARAMS: ClassVar[tuple[Param, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset()  # subset of Evidence's fields: cls_attn, keys, vnorm, attn
    # Whether a combination ``a+b`` may include it: one whose evidence (value norms, the attention
    # matrix) a partner's reduction cannot re-index, or whose count varies per image, may not.
    combinable: ClassVar[bool] = True
    # Whether the token count depends on the image (ATS): the static plan is then an upper bound, and
    # rows report the counts measured per image (mean, min, max) and the mean GMACs from them.
    adaptive: ClassVar[bool] = False
    training_free: ClassVar[bool] = True  # ipbench applies every reducer to off-the-shelf weights
    # How a sweep drives this reducer: the parameter a keep rate or a GMACs budget sets (None: run as given).
    knob: ClassVar[Knob | None] = None
    # The parameter listing the blocks where it discards tokens (two reducers discarding in one block
    # of a combination are ambiguous), or None.
    discard_param: ClassVar[str | None] = None
    # Said beside every table that shows this reducer (METHODS.md: training-free numbers and
    # re-implementations are labelled as such in every output); "" for nothing to say.
    note: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A policy that ranks by class-token attention also takes `importance` (models without a
        class token rank by the attention each token receives instead)."""
        super().__init_subclass__(**kwargs)
        if "cls_attn" in cls.needs and all(p.name != IMPORTANCE.name for p in cls.PARAMS):
            cls.PARAMS = (*cls.PARAMS, IMPORTANCE)

    def __init__(self, **params: Any) -> None:
        known = {p.name: p for p in self.PARAMS}
        for k in params:
            if k not in known:
                raise UserError(f"{self.name}: unknown parameter {k!r}; valid: "
                                + ", ".join(known) if known else f"{self.name} takes no parameters")
        self.given: dict[str, Any] = dict(params)  # what the spec set; the rest are defaults
        self._text: str | None = None  # the spec as the user wrote it (set by parse_spec), for messages
        self.params: dict[str, Any] = {p.name: params.get(p.name, p.default) for p in self.PARAMS}
        self.depth: int | None = None
        self.n_tokens = 0
        self.n_prefix = 0
        self.validate()

    # -- what subclasses may override ---------------------------------------------------
    def validate(self) -> None:
        """Check parameter combinations that do not depend on the model."""

    def bind(self, depth: int, n_tokens: int, n_prefix: int) -> None:
        """Check the parameters against a model of `depth` blocks and n_tokens input tokens."""
        self.depth, self.n_tokens, self.n_prefix = depth, n_tokens, n_prefix

    def observe(self, model: nn.Module) -> None:
        """Read what the plan depends on beyond depth and token counts (a published schedule is
        per model width); called before `bind` wherever a plan is made. Must not fail."""

    def prepare(self, model: nn.Module) -> None:
        """Check the model itself before it is patched (e.g. a module the reducer requires)."""

    def in_combination(self, others: list[Policy]) -> None:
        """Adapt to being combined with `others` (``a+b``); called once, before binding."""

    @property
    def needs_pos(self) -> bool:
        """Whether the policy reads token centroids (TokenState.pos)."""
        return False

    @property
    def prop_attn(self) -> bool:
        """Whether token sizes bias the attention (log size on the keys)."""
        return False

    def acts_at(self, layer: int) -> bool:
        return False

    def importance(self, has_cls_token: bool) -> str | None:
        """'cls' or 'received': how this policy's token importance is read on a model with (or
        without) a class token; None for a policy that needs no importance."""
        if "cls_attn" not in self.needs:
            return None
        chosen = self.params.get(IMPORTANCE.name, "cls")
        return ("cls" if has_cls_token else "received") if chosen == "auto" else chosen

    def tokens_after(self, layer: int, n: int, n_prefix: int) -> int:
        """Static plan: tokens left after this block's reduction, from the count before."""
        return n

    def reduce(self, layer: int, x: Tensor, ev: Evidence, st: TokenState) -> Tensor:
        return x

    def extra_macs(self, layer: int, n: int, n_prefix: int, heads: int, head_dim: int, dim: int) -> int:
        """MACs of the reduction itself at a block entered by n tokens (matrix products only: a
        similarity graph, a PageRank), for policies where they are not negligible (> ~0.3 %)."""
        return 0

    # -- copies with other parameters, and the sweep's knob ----------------------------
    @property
    def parts(self) -> list[Policy]:
        """The single policies this one is made of (a combination ``a+b`` has several)."""
        return [self]

    def with_params(self, **params: Any) -> Policy:
        """A new policy of the same reducer: the parameters the spec gave, then `params` on top."""
        known = {p.name: p for p in self.PARAMS}
        unknown = [k for k in params if k not in known]
        if unknown:
            raise UserError(f"{self.name}: unknown parameter {unknown[0]!r}; valid: {', '.join(known) or 'none'}")
        return type(self)(**{**self.given, **{k: known[k].coerce(self.name, v) for k, v in params.items()}})

    def free_knob(self) -> Knob | None:
        """The knob a sweep may set: this reducer's, unless the spec already fixed its parameter."""
        knob = type(self).knob
        return knob if knob is not None and knob.param not in self.given else None

    def with_knob(self, knob: Knob, value: Any) -> Policy:
        """A copy with `knob` set to `value` (in a combination: on every part where it is free)."""
        return self.with_params(**{knob.param: value})

    # -- shared helpers -----------------------------------------------------------------
    def shown_params(self) -> dict[str, Any]:
        """The parameters that identify this policy: all of them, but an implicit one at its default."""
        implicit = {p.name: p.default for p in self.PARAMS if p.implicit}
        return {k: v for k, v in self.params.items() if k not in implicit or implicit[k] != v}

    @property
    def spec(self) -> str:
        """Canonical spec string with every parameter, defaults included (an implicit one only
        where it is set)."""
        shown = self.shown_params()
        if not shown:
            return self.name
        return self.name + ":" + ",".join(f"{k}={format_value(v)}" for k, v in shown.items())

    @property
    def text(self) -> str:
        """The spec as the user wrote it (messages quote it); the canonical spec for a copy."""
        return self._text or self.spec

    @text.setter
    def text(self, value: str) -> None:
        self._text = value

    def params_json(self) -> str:
        """The parameters as compact JSON with sorted keys (the CSV's reducer_params)."""
        return json.dumps(self.shown_params(), sort_keys=True, separators=(",", ":"))

    def label(self, drop_knob: bool = False) -> str:
        """Short label for tables and plots (see `ipbench.reducers.spec.short_label`)."""
        from ipbench.reducers.spec import short_label

        return short_label(self, drop_knob=drop_knob)

    def layer_set(self) -> frozenset[int]:
        """The `layers` parameter (the blocks a reducer acts in), checked against the bound model."""
        self.check_layers(self.params["layers"])
        return frozenset(self.params["layers"])

    def check_layers(self, layers: list[int], what: str = "layers") -> None:
        assert self.depth is not None
        bad = [i for i in layers if not 0 <= i < self.depth]
        if bad:
            raise UserError(f"{self.name}: {what} index {bad[0]} out of range; the model has "
                            f"blocks 0..{self.depth - 1}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


def keep_count(keep: float, n_candidates: int) -> int:
    """EViT's rule: ⌈ρ·(N−prefix)⌉ tokens survive (computed exactly as the official code)."""
    return math.ceil(keep * n_candidates)
