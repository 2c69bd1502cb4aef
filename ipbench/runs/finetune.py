"""`ipbench finetune`: fine-tune a timm ViT with a token reducer in place, in one process or under torchrun.

Built from timm's own pieces: `create_optimizer_v2` (AdamW, no weight decay on norms, biases and
embeddings), `create_scheduler_v2` (cosine, stepped per update), `Mixup`/CutMix with label smoothing,
the training transform of the model's data config, `ModelEmaV3`, `NativeScaler` for float16, drop-path;
DistributedDataParallel across torchrun's ranks. The defaults are the fine-tune recipe the token
reduction papers converged on (`Recipe`); every one is a flag.

What makes a run trustworthy:

* `--batch-size` is the GLOBAL batch (all ranks and accumulation steps together): the same run on 1
  or 8 processes takes the same optimizer steps on the same images. Each epoch's order is a
  permutation drawn from (seed, epoch); each step's batch is split into contiguous per-rank slices.
* Each image's augmentation is drawn from its own seed (`data.SeededItems`), so it does not depend
  on the rank, the worker or a resume.
* Checkpoints (every epoch, and every `--save-every` steps) hold the weights (`model.safetensors`,
  `model_ema.safetensors`) and a training state (optimizer, scheduler, scaler, every rank's random
  generators, the position in the data order). A resumed run ends bit-identical to an uninterrupted
  one (CPU, deterministic kernels). A checkpoint replaces the previous one in two renames, so a
  crash or Ctrl-C never leaves half of one; Ctrl-C saves at the next step boundary, then stops.
* Validation runs through the one batch loop (exact counts under torchrun) every epoch, for the
  trained weights and their EMA.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ipbench import models, results
from ipbench.data import DataSource, batched, data_config, open_source
from ipbench.errors import UserError
from ipbench.reducers import Policy, apply_reducer, check_fits
from ipbench.reducers.imagepiece import has_conv_stem, install_conv_stem
from ipbench.results import FINETUNE_COLUMNS, accuracy_fields, cell
from ipbench.runs.checkpoint import (
    CHECKPOINT,
    EMA_FILE,
    MODEL_FILE,
    last_checkpoint,
    load_state,
    load_weights,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from ipbench.runs.context import RunContext, RunSpec, open_run
from ipbench.runs.loop import Accuracy, Job, run_jobs
from ipbench.runs.progress import Progress, Silent
from ipbench.runs.stem import StemFit, fit_conv_stem
from ipbench.runs.training import Recipe, Schedule, StopOnSignal, Trainer, criterion, mixup, resolve_stem, with_stem
from ipbench.runs.trainset import SeededItems, epoch_order, holdout, train_batches, train_transform, with_transform


@dataclass
class FinetuneOutcome:
    """What a fine-tune did and where it left its files."""

    out: Path
    csv_path: Path
    checkpoint: Path
    rows: list[dict[str, Any]] = field(default_factory=list)  # the rows this invocation wrote
    steps: int = 0  # optimizer steps done in all (resumed ones included)
    steps_total: int = 0  # the schedule's steps
    resumed_from: int | None = None  # the step a resumed run started from
    stem_fit: StemFit | None = None
    stopped: bool = False  # stopped by Ctrl-C (a checkpoint was saved)
    notes: list[str] = field(default_factory=list)


def _identity(ctx: RunContext, policy: Policy, recipe: Recipe, val: str, stem: str,
              global_batch: int) -> dict[str, Any]:
    """What makes two fine-tunes different runs (a resume must match it)."""
    return {"command": "finetune", **ctx.identity(), "reducer": policy.spec, "val": val, "stem": stem,
            "global_batch": global_batch, **asdict(recipe)}


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def _trim_csv(path: Path, key: str, step: int) -> None:
    """A resumed run rewrites what came after its checkpoint: that run's rows past `step` go (step -1:
    all of them, the stem fit's included, for a run started over with --force)."""
    if not path.is_file():
        return
    from ipbench.csvfile import well_formed

    header, rows, _ = well_formed(path)
    if header is None:
        return
    keep = []
    for values in rows:
        row = dict(zip(header, values))
        ours = row.get("config_key") == key
        stale = ours and (step < 0 or (row.get("kind") != "stem" and int(float(row.get("step") or 0)) > step))
        if not stale:
            keep.append(row)
    if len(keep) != len(rows):
        results.write_table(path, keep, header)


# -- the run --------------------------------------------------------------------------------

def run_finetune(spec: RunSpec, policy: Policy, recipe: Recipe, out: Path, val: str | None = None,
                 holdout_images: int | None = None, schedule: Schedule | None = None, force: bool = False,
                 progress: Progress | None = None) -> FinetuneOutcome:
    """Fine-tune spec's model with `policy` in place on spec's data; validate on `val` (or on
    `holdout_images` of the data held out) every epoch; checkpoints and finetune.csv in `out`.

    A run whose OUT holds a checkpoint of the same configuration resumes from it (`force`: start over)."""
    progress = progress or Silent()
    schedule = schedule or Schedule()
    recipe.check()
    if val is not None and holdout_images is not None:
        raise UserError("--val and --holdout exclude each other: validate on another data source, or on "
                        "images held out of --data")
    csv_path = results.prepare_csv(out, "finetune", FINETUNE_COLUMNS)
    out = csv_path.parent
    ctx = open_run(spec, shard=False, model_kwargs={"drop_path_rate": recipe.drop_path})
    world = ctx.world
    net = ctx.net
    check_fits(net, policy)
    ctx.check_labels()
    source = ctx.source
    val_source: DataSource | None = None
    val_name = ""
    if holdout_images is not None:
        source, val_source = holdout(source, holdout_images)
        val_name = f"holdout:{holdout_images}"
    elif val is not None:
        val_source = open_source(val, net, skip_bad=spec.skip_bad, seed=spec.seed)
        val_name = val_source.path
    global_batch = spec.batch_size
    per_rank = world.size * recipe.accum_steps
    if global_batch % per_rank:
        raise UserError(f"--batch-size {global_batch} (the global batch) does not split over {world.size} "
                        f"process(es) × {recipe.accum_steps} accumulation step(s): use a multiple of {per_rank}")
    micro = global_batch // per_rank
    steps_per_epoch = source.num_images // global_batch
    if steps_per_epoch < 1:
        raise UserError(f"{source.num_images} training images make no batch of {global_batch}: lower --batch-size")
    total_steps = steps_per_epoch * recipe.epochs

    stem = resolve_stem(recipe, policy, net)
    policy = with_stem(policy, stem)
    teacher = None
    if recipe.distill == "kd":  # the same model without reduction, frozen
        teacher = copy.deepcopy(net).eval().requires_grad_(False)
    projection = None
    if stem == "conv" and not has_conv_stem(net):
        projection = net.patch_embed.proj
        install_conv_stem(net)
        net.patch_embed.proj.to(ctx.device)
    apply_reducer(net, policy)
    net.train()

    identity = _identity(ctx, policy, recipe, val_name, stem, global_batch)
    key = results.config_key(identity)
    outcome = FinetuneOutcome(out=out, csv_path=csv_path, checkpoint=out / CHECKPOINT, steps_total=total_steps)
    found = last_checkpoint(out)
    saved: dict[str, Any] | None = None
    if force:  # start over: the checkpoint and this configuration's rows go
        if world.main:
            if found is not None:
                shutil.rmtree(found, ignore_errors=True)
            _trim_csv(csv_path, key, -1)
        found = None
    if found is not None:
        saved = load_state(found)
        diff = _differences(json.loads(saved["identity"]), json.loads(json.dumps(identity, default=str)))
        if diff:
            raise UserError(f"{found} is a checkpoint of another fine-tune ({'; '.join(diff[:3])}): use another "
                            "--out, or --force to start over")
    world.gather(None)  # every rank has read the checkpoint before rank 0 may replace it

    def row(kind: str, epoch: int, step: int, **cells: Any) -> dict[str, Any]:
        fields = ctx.row_fields()
        r = {**{k: fields.get(k, "") for k in FINETUNE_COLUMNS}, "config_key": key, "kind": kind, "epoch": epoch,
             "step": step, "val_data": val_name, "reducer": policy.name, "reducer_spec": policy.spec,
             "reducer_label": policy.label(), "stem": stem, "global_batch": global_batch, "world_size": world.size,
             "data": source.path, **cells}
        if world.main:
            results.append_row(csv_path, r, FINETUNE_COLUMNS)
            outcome.rows.append(r)
        return r

    train_items = SeededItems(with_transform(source.dataset, train_transform(data_config(net), recipe.auto_augment,
                                                                              recipe.reprob)), spec.seed)

    if projection is not None and saved is None and recipe.stem_init_steps > 0:
        progress.phase("stem: regress onto the patch projection", recipe.stem_init_steps)

        def stem_images() -> Iterator[Tensor]:
            epoch = -1  # the stem's own image order, apart from the fine-tune's epochs
            while True:
                train_items.epoch = epoch
                order = epoch_order(len(train_items), spec.seed, epoch)
                for images, _ in train_batches(train_items, order, micro * world.size, spec.workers, spec.skip_bad):
                    yield images.to(ctx.device)
                epoch -= 1

        def on_step(step: int, loss: float) -> None:
            progress.advance(1, detail=f"error {loss:.3f}")
            if step % schedule.log_every == 0 or step == recipe.stem_init_steps:
                row("stem", -1, step, loss=cell(loss, 5), lr=cell(recipe.stem_init_lr, 8))

        outcome.stem_fit = fit_conv_stem(net.patch_embed.proj, projection, stem_images(), recipe.stem_init_steps,
                                         recipe.stem_init_lr, on_step)
        progress.log(f"stem fitted to the patch projection in {recipe.stem_init_steps} steps: relative error "
                     f"{outcome.stem_fit.first:.3f} (first 10) -> {outcome.stem_fit.last:.3f} (last 10)")

    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, NativeScaler

    scale = global_batch / recipe.lr_base_size
    optimizer = create_optimizer_v2(net, recipe.opt, lr=recipe.lr * scale, weight_decay=recipe.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=recipe.sched, num_epochs=recipe.epochs,
                                       min_lr=recipe.min_lr * scale, warmup_lr=recipe.warmup_lr * scale,
                                       warmup_epochs=recipe.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    scaler = NativeScaler() if spec.amp_dtype == "float16" else None
    ema = ModelEmaV3(net, decay=recipe.ema_decay, use_warmup=True) if recipe.ema_decay > 0 else None
    model: nn.Module = net
    if world.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[torch.device(ctx.device)] if ctx.device.startswith("cuda")
                                        else None)
    classes = int(getattr(net, "num_classes", 0) or 0)
    trainer = Trainer(ctx=ctx, net=net, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                       ema=ema, mixup=mixup(recipe, classes, micro), criterion=criterion(recipe), teacher=teacher,
                       recipe=recipe)

    epoch, step_in_epoch, update, seen = 0, 0, 0, 0
    seed_everything(spec.seed * 1_000 + world.rank)  # dropout, drop-path, mixup: each rank its own draws
    if saved is not None:
        load_weights(net, found / MODEL_FILE)
        if ema is not None:
            load_weights(ema.module, found / EMA_FILE)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        epoch, step_in_epoch, update, seen = saved["epoch"], saved["step_in_epoch"], saved["update"], saved["seen"]
        if len(saved["rng"]) == world.size:
            set_rng_state(saved["rng"][world.rank])
        else:
            outcome.notes.append(f"resumed on {world.size} process(es) from a checkpoint of {len(saved['rng'])}: the "
                                 "random draws (drop-path, mixup) differ from an uninterrupted run")
        outcome.resumed_from = update
        if world.main:
            _trim_csv(csv_path, key, update)
        progress.log(f"resumed from {found} at step {update} (epoch {epoch + 1}, step {step_in_epoch} of it)")

    def state() -> dict[str, Any]:
        return {"identity": json.dumps(identity, default=str), "epoch": epoch, "step_in_epoch": step_in_epoch,
                "update": update, "seen": seen, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None}

    def checkpoint() -> None:
        rngs = world.gather(rng_state())
        if world.main:
            save_checkpoint(out, net, ema.module if ema is not None else None, {**state(), "rng": rngs},
                            {models.TRAINED_WITH: policy.spec})
        world.gather(None)

    val_data: tuple[Tensor, Tensor] | None = None
    val_ctx: RunContext | None = None
    if val_source is not None:
        val_ctx = ctx.on(val_source)
        val_ctx.check_labels()
        rng = rng_state()  # decoding draws a DataLoader seed: keep the training draws where they are
        val_data = val_ctx.decode(progress, "validation images")
        set_rng_state(rng)

    def validate(at_epoch: int) -> None:
        if val_ctx is None or val_data is None:
            return
        raw, averaged = Accuracy(), Accuracy()
        jobs = [Job("trained", net, [raw])] + ([Job("ema", ema.module, [averaged])] if ema is not None else [])
        net.eval()
        try:
            progress.phase("validate before training" if at_epoch < 0 else f"validate epoch {at_epoch + 1}",
                           val_ctx.kept * len(jobs))
            run_jobs(val_ctx, batched(*val_data, spec.batch_size), jobs, progress, expected=val_ctx.kept)
        finally:
            net.train()
        res, ema_res = raw.result, averaged.result
        r = row("val", at_epoch, update, images_seen=seen, lr=cell(trainer.lr, 8),
                **accuracy_fields(res.correct1, res.correct5, res.total),
                top1_ema=cell(ema_res.top1, 3) if ema is not None else "",
                top5_ema=cell(ema_res.top5, 3) if ema is not None else "")
        when = "before training" if at_epoch < 0 else f"epoch {at_epoch + 1}"
        progress.row_written(f"{when}: top-1 {r['top1']} % (EMA {r['top1_ema'] or '-'} %), top-5 {r['top5']} %")

    if saved is None:
        validate(-1)  # the starting point (the training-free figure), as epoch 0 of the curves
    losses: list[Tensor] = []
    interval_start, interval_seen = time.perf_counter(), seen
    with StopOnSignal() as stop:
        while epoch < recipe.epochs:
            order = epoch_order(len(train_items), spec.seed, epoch)
            mine: list[int] = []
            for s in range(step_in_epoch, steps_per_epoch):
                batch = order[s * global_batch:(s + 1) * global_batch]
                share = global_batch // world.size
                mine += batch[world.rank * share:(world.rank + 1) * share]
            train_items.epoch = epoch
            micro_batches = train_batches(train_items, mine, micro, spec.workers, spec.skip_bad)
            progress.phase(f"finetune epoch {epoch + 1}/{recipe.epochs}", steps_per_epoch)
            progress.advance(step_in_epoch)
            while step_in_epoch < steps_per_epoch:
                losses.append(trainer.step(micro_batches, update + 1))
                update, step_in_epoch, seen = update + 1, step_in_epoch + 1, seen + global_batch
                progress.advance(1, detail=f"loss {float(losses[-1]):.4f} lr {trainer.lr:.2e}")
                done = step_in_epoch == steps_per_epoch
                finished = schedule.max_steps is not None and update >= schedule.max_steps
                stopping = any(world.gather(stop.asked)) if world.distributed else stop.asked
                if update % schedule.log_every == 0 or done or finished or stopping:  # the interval's row
                    mean = sum(float(x) for x in world.gather(torch.stack(losses).mean())) / world.size
                    elapsed = time.perf_counter() - interval_start
                    row("train", epoch, update, images_seen=seen, loss=cell(mean, 5), lr=cell(trainer.lr, 8),
                        images_per_sec=cell((seen - interval_seen) / max(elapsed, 1e-9), 2))
                    losses, interval_start, interval_seen = [], time.perf_counter(), seen
                if done:
                    epoch, step_in_epoch = epoch + 1, 0
                paused = time.perf_counter()
                if done or stopping or finished or (schedule.save_every and update % schedule.save_every == 0):
                    checkpoint()
                if done:
                    validate(epoch - 1)
                interval_start += time.perf_counter() - paused  # images/s counts training time only
                if stopping:
                    outcome.steps, outcome.stopped = update, True
                    progress.log(f"stopped at step {update}: checkpoint saved in {out / CHECKPOINT}; run the same "
                                 "command again to resume")
                    raise KeyboardInterrupt
                if finished:
                    if not done:
                        validate(epoch)
                    outcome.steps = update
                    return outcome
                if done:
                    break
    outcome.steps = update
    return outcome
