"""Token reducers: one engine (engine.py), small policies, spec strings.

Importing this package registers every built-in reducer.
"""

from ipbench.reducers import (  # noqa: F401  (registration)
    ats,
    combine,
    diffrate,
    evit,
    imagepiece,
    mstm,
    none,
    pitome,
    ppt,
    tofu,
    tome,
    zerotprune,
)
from ipbench.reducers.engine import (
    Evidence,
    TokenPlan,
    TokenState,
    apply_reducer,
    check_fits,
    is_patched,
    reducible,
    remove_reducer,
    set_tracing,
    token_plan,
)
from ipbench.reducers.knobs import KEEP_RATE, Knob
from ipbench.reducers.policy import Param, Policy
from ipbench.reducers.spec import REGISTRY, list_reducers, parse_spec, parse_specs, register, short_label, split_specs

__all__ = [
    "KEEP_RATE", "REGISTRY", "Evidence", "Knob", "Param", "Policy", "TokenPlan", "TokenState", "apply_reducer",
    "check_fits", "is_patched", "list_reducers", "parse_spec", "parse_specs", "reducible", "register", "remove_reducer",
    "set_tracing", "short_label", "split_specs", "token_plan",
]
