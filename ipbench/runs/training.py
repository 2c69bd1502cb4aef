"""The pieces of a training run: the recipe, one optimizer step, the losses, stopping on a signal.

`Recipe` holds every setting of a fine-tune with the field's defaults; `Trainer.step` does one
optimizer step over its micro-batches (autocast, gradient accumulation without DDP syncs in
between, the float16 scaler, clipping, the scheduler per update, the EMA).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ipbench.errors import UserError
from ipbench.reducers import Policy
from ipbench.reducers.imagepiece import has_conv_stem
from ipbench.runs.context import RunContext

STEMS = ("auto", "patch", "conv")
DISTILL = ("none", "kd")
SCHEDULES = ("cosine", "step", "multistep", "plateau", "tanh", "poly", "onecycle")  # timm create_scheduler_v2


@dataclass(frozen=True)
class Recipe:
    """Every setting of a fine-tune. Defaults: the token-reduction fine-tune recipe of the field
    (EViT finetune.sh, DiffRate, DeiT's augmentation; docs/METHODS.md "Fine-tuning recipes")."""

    epochs: int = 30  # EViT, DiffRate, DynamicViT, PPT: 30 epochs from the pretrained DeiT
    lr: float = 2e-5  # per `lr_base_size` images of global batch (linear scaling, as DeiT and EViT scale it)
    lr_base_size: int = 512  # [choice] lr, min_lr and warmup_lr are all scaled by global batch / lr_base_size
    min_lr: float = 2e-6  # cosine floor (EViT 2e-6, DiffRate 1e-6), scaled like lr so that it stays below it
    warmup_epochs: int = 0  # EViT fine-tunes without warm-up
    warmup_lr: float = 1e-6
    sched: str = "cosine"  # timm scheduler name, stepped after every optimizer update
    opt: str = "adamw"  # timm optimizer name (create_optimizer_v2)
    weight_decay: float = 0.05  # DeiT's default, which the DeiT-based fine-tunes inherit (EViT: 1e-6)
    clip_grad: float | None = None  # gradient-norm clipping (None: off, as in DeiT)
    drop_path: float = 0.1  # stochastic depth (DiffRate fine-tune: 0.1 for DeiT)
    smoothing: float = 0.1  # label smoothing
    mixup: float = 0.8  # mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec (None: off)
    reprob: float = 0.25  # random erasing probability
    ema_decay: float = 0.9998  # ModelEmaV3 decay with its warm-up (0: no EMA)
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation)
    distill: str = "none"  # none | kd: plain KD from the same model without reduction (the teacher)
    distill_alpha: float = 0.5  # weight of the KD term: (1−α)·task loss + α·τ²·KL(teacher ‖ student)
    distill_tau: float = 1.0  # KD temperature τ
    stem: str = "auto"  # patch | conv | auto (conv where the reducer asks stem=conv or the weights have it)
    stem_init_steps: int = 200  # [choice] steps of the stem's regression onto the patch projection
    stem_init_lr: float = 1e-3  # its AdamW learning rate (cosine to zero)

    def check(self) -> None:
        """One-line errors for values no run could use, before anything loads."""
        positive = {"epochs": self.epochs, "lr_base_size": self.lr_base_size, "accum_steps": self.accum_steps}
        for name, value in positive.items():
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        for name in ("lr", "min_lr", "warmup_lr", "weight_decay", "drop_path", "smoothing", "mixup", "cutmix",
                     "reprob", "ema_decay", "distill_tau", "stem_init_lr"):
            value = getattr(self, name)
            if not value >= 0 or math.isinf(value):
                raise UserError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        for name in ("drop_path", "smoothing", "reprob", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.distill_alpha <= 1:
            raise UserError(f"--distill-alpha must be in [0, 1], got {self.distill_alpha}")
        if self.warmup_epochs < 0 or self.stem_init_steps < 0:
            raise UserError("--warmup-epochs and --stem-init-steps must be >= 0")
        if self.stem not in STEMS:
            raise UserError(f"unknown --stem {self.stem!r}; valid: {', '.join(STEMS)}")
        if self.distill not in DISTILL:
            raise UserError(f"unknown --distill {self.distill!r}; valid: {', '.join(DISTILL)}")
        if self.sched not in SCHEDULES:
            raise UserError(f"unknown --sched {self.sched!r}; valid: {', '.join(SCHEDULES)}")
        from timm.optim import list_optimizers

        if self.opt not in list_optimizers():
            raise UserError(f"unknown --opt {self.opt!r}; valid: timm's optimizers, e.g. adamw, sgd, lamb, lion")


@dataclass(frozen=True)
class Schedule:
    """How long the run is and when it writes: none of it changes what is computed."""

    max_steps: int | None = None  # stop after this many optimizer steps (the lr schedule still spans the epochs)
    save_every: int = 0  # checkpoint every N steps too (0: at each epoch's end only)
    log_every: int = 10  # a train row every N steps


# -- the pieces of a run --------------------------------------------------------------------

def with_stem(policy: Policy, stem: str) -> Policy:
    """`policy` with its ImagePiece part's `stem` set (the reducer must know which tokenizer it runs on)."""
    for part in policy.parts:
        if "stem" in part.params and part.params["stem"] != stem:
            if len(policy.parts) == 1:
                return policy.with_params(stem=stem)
            return policy.with_params(**{part.name: {"stem": stem}})
    return policy


def resolve_stem(recipe: Recipe, policy: Policy, net: nn.Module) -> str:
    """patch or conv: --stem, else the reducer's own stem=conv, else what the weights have."""
    if recipe.stem != "auto":
        return recipe.stem
    asked = any(part.params.get("stem") == "conv" for part in policy.parts)
    return "conv" if asked or has_conv_stem(net) else "patch"


def kd_loss(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """Hinton's soft-target term: τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ)), batch mean."""
    log_p = torch.log_softmax(student.float() / tau, dim=-1)
    log_q = torch.log_softmax(teacher.float() / tau, dim=-1)
    return torch.nn.functional.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * tau * tau


@dataclass
class Trainer:
    """Everything one step needs, built once."""

    ctx: RunContext
    net: nn.Module  # the patched model (unwrapped)
    model: nn.Module  # what the step calls: `net`, or its DistributedDataParallel wrapper
    optimizer: Any
    scheduler: Any
    scaler: Any
    ema: Any
    mixup: Any
    criterion: Callable[[Tensor, Tensor], Tensor]
    teacher: nn.Module | None
    recipe: Recipe

    def step(self, micro_batches: Iterator[tuple[Tensor, Tensor]], update: int) -> Tensor:
        """One optimizer step over `accum_steps` micro-batches; returns this rank's mean loss (detached)."""
        r, total = self.recipe, torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        for i in range(r.accum_steps):
            try:
                images, labels = next(micro_batches)
            except StopIteration:
                raise UserError("the training data ran out in the middle of a step (unreadable images skipped "
                                "with --skip-bad leave steps short): remove them from the data") from None
            x = images.to(self.ctx.device, non_blocking=True).to(self._dtype)
            y = labels.to(self.ctx.device, non_blocking=True)
            target: Tensor = y
            if self.mixup is not None:
                x, target = self.mixup(x, y)
            last = i == r.accum_steps - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self.ctx.precision():
                    logits = self.model(x)
                    loss = self.criterion(logits, target)
                    if self.teacher is not None:
                        with torch.no_grad():
                            soft = self.teacher(x)
                        loss = (1 - r.distill_alpha) * loss + r.distill_alpha * kd_loss(logits, soft, r.distill_tau)
                scaled = loss / r.accum_steps
                if self.scaler is not None:
                    self.scaler(scaled, self.optimizer, clip_grad=r.clip_grad, parameters=self.net.parameters(),
                                need_update=last)
                else:
                    scaled.backward()
            total += loss.detach().float() / r.accum_steps
        if self.scaler is None:
            if r.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), r.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step_update(num_updates=update)
        if self.ema is not None:
            self.ema.update(self.net, step=update)
        return total.cpu()  # one host sync per step

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to stop at the next step boundary, after a checkpoint;
    a second one stops at once."""

    def __init__(self) -> None:
        self.asked = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def criterion(recipe: Recipe) -> Callable[[Tensor, Tensor], Tensor]:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if recipe.mixup > 0 or recipe.cutmix > 0:
        return SoftTargetCrossEntropy()  # mixup's targets are soft and carry the smoothing
    if recipe.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=recipe.smoothing)
    return nn.CrossEntropyLoss()


def mixup(recipe: Recipe, num_classes: int, micro: int) -> Any:
    if recipe.mixup <= 0 and recipe.cutmix <= 0:
        return None
    if micro % 2:
        raise UserError(f"mixup/CutMix pair the images of a micro-batch, so it must be even; it is {micro} "
                        "(--batch-size / processes / --accum-steps): change one, or --mixup 0 --cutmix 0")
    from timm.data import Mixup

    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, label_smoothing=recipe.smoothing,
                 num_classes=num_classes)

