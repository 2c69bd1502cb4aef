"""Reducer spec strings and the registry.

A spec names a reducer and its parameters: ``evit:keep=0.7,fuse=false,layers=3,6,9``.
Parameters are comma separated; a bare value after a list parameter continues that list
(``layers=3,6,9``). Combinations join specs with ``+`` (``imagepiece+tome:r=4``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ipbench.errors import UserError
from ipbench.reducers.policy import Policy, format_value

REGISTRY: dict[str, type[Policy]] = {}
_COMBINE: list[Callable[[list[Policy]], Policy]] = []


def register(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy available under its `name`."""
    REGISTRY[cls.name] = cls
    return cls


def set_combiner(fn: Callable[[list[Policy]], Policy]) -> None:
    """Install the function that turns several parsed policies into one (``a+b``)."""
    _COMBINE[:] = [fn]


def _parse_one(text: str) -> Policy:
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in REGISTRY:
        raise UserError(f"unknown reducer {name!r}; valid: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    known = {p.name: p for p in cls.PARAMS}
    raw: dict[str, str] = {}
    last: str | None = None
    for item in (i.strip() for i in rest.split(",")) if rest.strip() else ():
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in known:
                valid = ", ".join(known) if known else "none"
                raise UserError(f"{name}: unknown parameter {key!r}; valid: {valid}")
            raw[key] = value.strip()
            last = key
        elif last is not None and known[last].kind == "ints" and item:
            raw[last] += "," + item
        elif item:
            raise UserError(f"{name}: expected key=value, got {item!r}")
    return cls(**{k: known[k].parse(name, v) for k, v in raw.items()})


def parse_spec(spec: str) -> Policy:
    """Parse a spec string into a policy; a bad spec is a one-line UserError."""
    parts = [p for p in spec.split("+")]
    if not spec.strip() or any(not p.strip() for p in parts):
        raise UserError(f"empty reducer spec {spec!r}; valid reducers: {', '.join(sorted(REGISTRY))}")
    policies = [_parse_one(p) for p in parts]
    if len(policies) == 1:
        policy = policies[0]
    elif not _COMBINE:
        raise UserError("combinations (a+b) are not available")
    else:
        policy = _COMBINE[0](policies)
    policy.text = spec.strip()
    return policy


_INT = re.compile(r"[-+]?\d+")


def split_specs(values: Sequence[str], option: str = "--reducers") -> list[str]:
    """Split ``--reducers`` values into specs: ``tome,evit:keep=0.7,fuse=false,imagepiece``.

    Commas separate specs and also the parameters inside one, so a piece starts a new spec when it
    names a reducer (``evit``, ``evit:keep=0.7``, ``imagepiece+tome``) and continues the current
    one when it is a parameter (``fuse=false``) or a bare integer of a list (``layers=3,6,9``).
    """
    specs: list[str] = []
    for value in values:
        for piece in (p.strip() for p in value.split(",")):
            if not piece:
                raise UserError(f"empty item in {option} {value!r}")
            key = piece.split("=", 1)[0]
            continues = ("=" in piece and ":" not in key) or (
                "=" not in piece and _INT.fullmatch(piece.split("+", 1)[0].strip()) is not None)
            if continues:
                if not specs:
                    raise UserError(f"{option} {value!r}: {piece!r} comes before any reducer name")
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


def parse_specs(values: Sequence[str], option: str = "--reducers") -> list[Policy]:
    """The policies of a ``--reducers`` option (commas or the option repeated), in order, each once."""
    seen: dict[str, Policy] = {}
    for text in split_specs(values, option):
        policy = parse_spec(text)
        seen.setdefault(policy.spec, policy)
    return list(seen.values())


def _context_defaults(names: list[str]) -> list[dict[str, object]]:
    """Each part's parameters when only the names are given, in the same combination (a part may
    adapt to its partners: ImagePiece in a combination has no discard blocks of its own)."""
    return [dict(p.params) for p in parse_spec("+".join(names)).parts]


def short_label(policy: Policy | str, drop_knob: bool = False) -> str:
    """The one short label of tables and plots: each part's knob (keep; ToMe's r) and the
    parameters that differ from what the same names alone would give.

    ``drop_knob`` leaves the knob out: the name of the line a row belongs to in accuracy-vs-cost
    figures. A spec that does not parse (an unknown or renamed reducer) is returned as written.
    """
    if isinstance(policy, str):
        try:
            policy = parse_spec(policy)
        except UserError:
            return policy.strip()
    parts = policy.parts
    defaults = _context_defaults([p.name for p in parts])
    out = []
    for part, default in zip(parts, defaults):
        knob = type(part).knob
        shown = []
        for k, v in part.params.items():
            is_knob = knob is not None and k == knob.param
            if is_knob and drop_knob:
                continue
            if is_knob or default.get(k) != v:
                shown.append(f"{k}={knob.format(v) if is_knob and knob is not None else format_value(v)}")
        out.append(part.name + (":" + ",".join(shown) if shown else ""))
    return "+".join(out)


def list_reducers() -> list[type[Policy]]:
    """Registered reducers, in registration order."""
    return list(REGISTRY.values())
