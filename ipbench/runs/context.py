"""The run context: what every command that runs a model resolves ONCE, before anything is measured.

Model name and weights (a local checkpoint, timm's pretrained download, or timm's random
initialisation), the data source, the device, the precision (autocast and the model's own dtype,
as timm's validate.py has them), CPU threads and the seed. Every row a command writes carries the
context's fields, and every config key its identity, so a row says where it came from and a rerun
knows what it already has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ipbench import models
from ipbench.data import DataSource, decode_all, normalize, open_source
from ipbench.errors import UserError
from ipbench.measure.throughput import precision_context, resolve_dtype
from ipbench.reducers.imagepiece import checkpoint_has_conv_stem, has_conv_stem, install_conv_stem
from ipbench.runs.progress import Progress
from ipbench.runs.world import World, join

PRECISIONS = ("float32", "bfloat16", "float16")
WEIGHTS = ("pretrained", "random")
DEVICES = ("cpu", "cuda")
MAX_DECODED_BYTES = 4 << 30  # 1000 images at 224 px are 150 MB; --limit beyond this
RANDOM_WEIGHTS_NOTE = ("accuracy is meaningless: random weights (--weights random) give chance-level numbers; "
                       "GMACs, token counts and speed do not depend on the weights")


@dataclass(frozen=True)
class RunSpec:
    """What the command line asked for, as plain values (nothing resolved yet)."""

    model: str = "deit_t"
    checkpoint: str | None = None
    weights: str = "pretrained"  # pretrained | random; a checkpoint makes it "checkpoint"
    data: str = "sample"
    limit: int | None = None
    skip_bad: bool = False
    device: str = "cpu"
    amp_dtype: str = "float32"  # autocast to this dtype (float32 = no autocast)
    model_dtype: str = "float32"  # cast the weights and the inputs to this dtype
    threads: int | None = None
    seed: int = 0
    batch_size: int = 32
    workers: int = 0
    img_size: int | None = None  # run the model at this resolution (position embedding resampled)
    patch_size: int | None = None  # ... or with this patch size (patch and position embeddings resampled)


def check_spec(spec: RunSpec) -> None:
    """One-line errors for bad combinations, before a model or an image is loaded."""
    if spec.device not in DEVICES:
        raise UserError(f"unknown --device {spec.device!r}; valid: {', '.join(DEVICES)}")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device cuda: CUDA is not available on this machine (torch {torch.__version__}); "
                        "use --device cpu")
    for option, value in (("--amp-dtype", spec.amp_dtype), ("--model-dtype", spec.model_dtype)):
        if value not in PRECISIONS:
            raise UserError(f"unknown {option} {value!r}; valid: {', '.join(PRECISIONS)}")
    if spec.amp_dtype == "float16" and spec.device != "cuda":
        raise UserError("--amp-dtype float16 needs --device cuda; on CPU use bfloat16 or float32")
    if spec.amp_dtype != "float32" and spec.model_dtype != "float32":
        raise UserError(f"--amp-dtype {spec.amp_dtype} and --model-dtype {spec.model_dtype}: autocast runs on "
                        "float32 weights; use one of the two")
    if spec.weights not in WEIGHTS:
        raise UserError(f"unknown --weights {spec.weights!r}; valid: {', '.join(WEIGHTS)}")
    if spec.weights == "random" and spec.checkpoint is not None:
        raise UserError("--weights random and --checkpoint (or IPBENCH_CHECKPOINT) exclude each other")
    if spec.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {spec.batch_size}")


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """Human name of the hardware a number was measured on (GPU model or CPU model)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return _cpu_name()


@dataclass
class RunContext:
    """A loaded model (plain timm, in eval mode, on the device) and everything a row says about the run."""

    spec: RunSpec
    net: nn.Module
    model: str  # timm name
    weights: str  # checkpoint | pretrained | random
    checkpoint: str  # resolved path, hub:<id>, or random:<timm name>
    sha256: str  # full sha256 of the weights file, "" otherwise
    source: DataSource  # this rank's shard of the images (all of them in a single process)
    threads: int
    world: World = field(default_factory=World)
    device: str = "cpu"  # where this process computes (cuda:LOCAL_RANK under torchrun on CUDA)
    offset: int = 0  # position of this rank's first decoded image among all decoded images
    kept: int | None = None  # decoded images over every rank (after a decode)
    skipped: list[str] = field(default_factory=list)  # unreadable images of the last pass, every rank
    trained_with: str = ""  # the reducer `ipbench finetune` trained the checkpoint with ('' otherwise)

    # -- precision -----------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """The precision the model computes in."""
        return self.spec.amp_dtype if self.spec.amp_dtype != "float32" else self.spec.model_dtype

    def precision(self) -> contextlib.AbstractContextManager:
        """Autocast for --amp-dtype (a no-op for float32)."""
        return precision_context(self.spec.device, self.spec.amp_dtype)

    def inputs(self, images: Tensor) -> Tensor:
        """uint8 images [B, 3, H, W] → normalised model input on the device, in the model's dtype."""
        x = normalize(images.to(self.device, non_blocking=True), self.source.mean, self.source.std)
        return x.to(resolve_dtype(self.spec.model_dtype))

    # -- images --------------------------------------------------------------------------
    def on(self, source: DataSource) -> RunContext:
        """This context on `source`, split over the ranks: this rank's contiguous shard of it, and
        where that shard starts (exact once decoded: `decode` then counts the skipped ones)."""
        world = self.world
        if world.distributed:
            if source.num_images < world.size:
                raise UserError(f"{source.num_images} images for {world.size} processes: every rank needs at "
                                "least one image (fewer processes, or more images)")
            source = source.sharded(world.shard(source.num_images))
        return dataclasses.replace(self, source=source, offset=source.part.start if source.part is not None else 0)

    def fits_in_memory(self, max_bytes: int) -> bool:
        """Whether the largest rank's share of the images fits in `max_bytes` (the same answer on
        every rank)."""
        c, h, w = self.source.input_size
        return -(-self.source.num_images // self.world.size) * c * h * w <= max_bytes

    def decode(self, progress: Progress, description: str, max_bytes: int = MAX_DECODED_BYTES
               ) -> tuple[Tensor, Tensor]:
        """This rank's images, decoded once to one uint8 tensor (and the labels).

        Sets `offset` (where they start among the images every rank decoded), `kept` and `skipped`
        (over every rank); a bad image on any rank stops every rank with its error.
        """
        progress.phase(description, self.source.num_images)
        decoded: list[tuple[Tensor, Tensor]] = []

        def local() -> tuple[int, list[str]]:
            decoded.append(decode_all(self.source, max_bytes, self.spec.batch_size, self.spec.workers,
                                      lambda n: progress.advance(n * self.world.size)))
            return len(decoded[0][1]), list(self.source.skipped)

        counts = self.world.agree(local)
        self.offset = sum(n for n, _ in counts[:self.world.rank])
        self.kept = sum(n for n, _ in counts)
        self.skipped = [m for _, msgs in counts for m in msgs]
        if self.kept == 0:
            raise UserError(f"no readable image in {self.source.path}")
        return decoded[0]

    def first_images(self, n: int) -> Tensor:
        """The first `n` decoded images of the source (uint8)."""
        for images, _ in self.source.sharded(range(min(n, self.source.num_images))).batches(n, 0):
            return images
        raise UserError(f"no readable image in {self.source.path}")

    def check_labels(self) -> None:
        """Accuracy on labelled data needs a classifier head whose classes the labels index: a
        head-less model (num_classes=0) or a label outside its classes is an error, never a 0 %."""
        if not self.source.has_labels:
            return
        classes = int(getattr(self.net, "num_classes", 0) or 0)
        if classes == 0:
            raise UserError(f"{self.model} has no classifier head (num_classes=0), so it has no accuracy on labelled "
                            "data: use weights with a head, or measure GMACs and speed with --data synthetic")
        if self.source.max_label >= classes:
            raise UserError(f"{self.source.path} has class index {self.source.max_label}, but {self.model} has "
                            f"{classes} classes (0-{classes - 1}): labels must index the model's classes")

    # -- what rows say -------------------------------------------------------------------
    def row_fields(self) -> dict[str, Any]:
        """Who, on what and how: the fields every row of every command carries (no hostname)."""
        import timm

        import ipbench

        s = self.spec
        return {
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": self.model, "checkpoint": self.checkpoint, "checkpoint_sha256": self.sha256[:16],
            "weights": self.weights, "trained_with": self.trained_with, "data": self.source.path,
            "num_images": self.source.num_images,
            "device": s.device, "device_name": device_name(self.device), "dtype": self.dtype,
            "amp_dtype": s.amp_dtype, "model_dtype": s.model_dtype, "batch_size": s.batch_size,
            "threads": self.threads, "seed": s.seed,
            "torch": torch.__version__, "timm": timm.__version__, "ipbench": ipbench.__version__,
        }

    def identity(self) -> dict[str, Any]:
        """What makes two runs measure different things (the config key's common part)."""
        s = self.spec
        return {"model": self.model, "checkpoint": self.sha256 or self.checkpoint, "weights": self.weights,
                "data": self.source.path, "num_images": self.source.num_images, "skip_bad": s.skip_bad,
                "device": s.device, "amp_dtype": s.amp_dtype, "model_dtype": s.model_dtype, "seed": s.seed,
                # only when set, so that every key of a model at its own size stays what it was
                **{k: v for k, v in (("img_size", s.img_size), ("patch_size", s.patch_size)) if v is not None}}

    @property
    def accuracy_note(self) -> str | None:
        """What a reader of an accuracy must be told about the weights, if anything."""
        if self.trained_with:
            return (f"weights fine-tuned by ipbench with {self.trained_with}: not a training-free number, and images "
                    "the fine-tune trained on give a contaminated one")
        return RANDOM_WEIGHTS_NOTE if self.weights == "random" else None


def fit_checkpoint(model: nn.Module, state: dict[str, Tensor]) -> None:
    """A checkpoint fine-tuned with ImagePiece's local-coherence conv stem loads into a plain timm ViT:
    the stem takes the place of the patch projection before the strict load."""
    if checkpoint_has_conv_stem(state) and not has_conv_stem(model):
        install_conv_stem(model, state)


def open_run(spec: RunSpec, source_limit: int | None = None, shard: bool = True,
             model_kwargs: dict[str, Any] | None = None) -> RunContext:
    """Resolve a RunSpec: threads, seed, the model with its weights, the data source.

    `source_limit` replaces the spec's limit (flops traces a few images, speed one batch).
    `shard=False` gives every torchrun rank the whole source (training picks each rank's images per
    step); `model_kwargs` go to timm's create_model (training's drop-path rate).
    """
    check_spec(spec)
    world, device = join(spec.device)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    pretrained = spec.weights != "random"
    net = models.create_model(spec.model, spec.checkpoint, device=device, pretrained=pretrained,
                              img_size=spec.img_size, patch_size=spec.patch_size, adapt=fit_checkpoint,
                              **(model_kwargs or {}))
    net = net.to(resolve_dtype(spec.model_dtype))
    timm_name = models.resolve_name(spec.model)
    if spec.checkpoint is not None:
        weights, sha = "checkpoint", models.checkpoint_sha256(spec.checkpoint)
        checkpoint = str(Path(spec.checkpoint).resolve())
    elif pretrained:
        weights, sha = "pretrained", ""
        checkpoint = f"hub:{net.pretrained_cfg.get('hf_hub_id') or spec.model}"
    else:
        weights, sha, checkpoint = "random", "", f"random:{timm_name}"
    limit = source_limit if source_limit is not None else spec.limit
    source = open_source(spec.data, net, limit=limit, skip_bad=spec.skip_bad, seed=spec.seed)
    if world.distributed and shard and source_limit is not None:
        raise UserError("this command measures a few images in one process: run it without torchrun "
                        "(under torchrun, eval, sweep and the analyses split the images over the ranks)")
    ctx = RunContext(spec=spec, net=net, model=timm_name, weights=weights, checkpoint=checkpoint, sha256=sha,
                     source=source, threads=torch.get_num_threads(), world=world, device=device,
                     trained_with=models.trained_with(spec.checkpoint) if spec.checkpoint is not None else "")
    return ctx.on(source) if shard else ctx
