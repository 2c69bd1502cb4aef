"""The baseline: a patched model that reduces nothing (timm's output, bit for bit)."""

from ipbench.reducers.policy import Policy
from ipbench.reducers.spec import register


@register
class NoReduction(Policy):
    name = "none"
    description = "no token reduction (the baseline; identical to plain timm)"
