"""Reducer spec strings and the registry.

A spec names a reducer and its parameters: ``evit:keep=0.7,fuse=false,layers=3,6,9``.
Parameters are comma separated; a bare value after a list parameter continues that list
(``layers=3,6,9``). Combinations join specs with ``+`` (``imagepiece+tome:r=4``).
"""

from __future__ import annotations

from collections.abc import Callable

from ipbench.errors import UserError
from ipbench.reducers.policy import Policy

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
        return policies[0]
    if not _COMBINE:
        raise UserError("combinations (a+b) are not available")
    return _COMBINE[0](policies)


def list_reducers() -> list[type[Policy]]:
    """Registered reducers, in registration order."""
    return list(REGISTRY.values())
