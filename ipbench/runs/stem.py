"""ImagePiece's local-coherence stem, made usable from a pretrained model before fine-tuning.

The paper trains its conv stem from scratch with the whole ViT (300 epochs). From a pretrained ViT a
randomly initialised stem would feed the blocks noise, and the fine-tune would spend its first
epochs repairing that. [choice] `stem_init=regress`: first fit the stem alone (everything else
frozen) so that its output regresses onto the original 16×16 patch projection's output on the
training images, then fine-tune end to end. The fit's loss is the relative squared error
||stem(x) − proj(x)||² / ||proj(x) − mean||² (1 = no better than the mean embedding, 0 = exact).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ipbench.reducers.imagepiece import ConvStem


@dataclass
class StemFit:
    """How the stem's regression went: its loss at every step."""

    losses: list[float] = field(default_factory=list)

    def mean_of(self, part: slice) -> float:
        values = self.losses[part]
        return sum(values) / len(values) if values else float("nan")

    @property
    def first(self) -> float:
        """Mean loss over the first 10 steps."""
        return self.mean_of(slice(0, 10))

    @property
    def last(self) -> float:
        """Mean loss over the last 10 steps."""
        return self.mean_of(slice(-10, None))


def relative_error(out: Tensor, target: Tensor) -> Tensor:
    """||out − target||² / ||target − mean(target)||² over the batch (the fraction of the target's
    variance the stem does not reproduce)."""
    return (out - target).pow(2).sum() / (target - target.mean()).pow(2).sum().clamp_min(1e-12)


def fit_conv_stem(stem: ConvStem, projection: nn.Module, images: Iterator[Tensor], steps: int, lr: float,
                  on_step: Callable[[int, float], None] | None = None) -> StemFit:
    """Fit `stem` (trainable, BatchNorm in training mode) to `projection` (the original patch
    projection, frozen) on `steps` batches of normalised training images, with AdamW at `lr` and a
    cosine decay to zero. `on_step(step, loss)` after each step (progress, rows)."""
    from timm.optim import create_optimizer_v2

    projection.eval()
    for p in projection.parameters():
        p.requires_grad_(False)
    stem.train()
    opt = create_optimizer_v2(stem, "adamw", lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    fit = StemFit()
    for step in range(steps):
        x = next(images)
        with torch.no_grad():
            target = projection(x)
        loss = relative_error(stem(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        fit.losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, fit.losses[-1])
    return fit
