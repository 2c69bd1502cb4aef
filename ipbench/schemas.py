"""The columns of every result CSV, in order (documented in the README), and nothing else.

`ipbench.results` writes and reads rows by these lists (and re-exports them); a change here is a
schema change: `results.derive_missing` must give an older file's rows the added columns.
"""

from __future__ import annotations

# How sure each accuracy is (ipbench.stats): the images it rests on and its 95 % interval, in percent.
ACCURACY_INTERVAL_COLUMNS: list[str] = [
    "n_labelled",  # labelled images top1/top5 count over (the sample size)
    "top1_low",  # 95 % Wilson score interval of top1 (stats.INTERVAL), percent
    "top1_high",
    "top5_low",
    "top5_high",
]
# The accuracy cells of a row, as `results.accuracy_fields` fills them: percentages, the exact
# counts behind them, then the sample size and the intervals.
ACCURACY_COLUMNS: list[str] = ["top1", "top5", "correct1", "correct5", *ACCURACY_INTERVAL_COLUMNS]

# What a timed configuration needed beside its time (ipbench.measure.footprint), and its latency.
SPEED_DETAIL_COLUMNS: list[str] = [
    "latency_ms_median",  # one forward of the timed batch, median over every timed call
    "latency_ms_p90",  # its 90th percentile
    "peak_mem_mib",  # memory one forward allocates above what was allocated before it (activations)
    "attention_backend",  # the SDPA kernels that served the forward (flash, efficient, cudnn, math)
    "compile_mode",  # torch.compile's mode (empty without --compile)
    "compiled_graphs",  # graphs torch.compile made in the warm-up
    "recompiles",  # graphs it made later, in the timed rounds (should be 0: token counts are static)
    "cuda",  # the CUDA runtime torch was built with (empty on CPU)
    "cudnn",  # cuDNN's version, as torch.backends.cudnn.version() gives it (empty on CPU)
    "driver",  # the NVIDIA driver's version (empty on CPU, or where /proc does not say)
]

# Columns of results/eval.csv, in order (documented in the README).
EVAL_COLUMNS: list[str] = [
    "timestamp",
    "config_key",
    "model",
    "checkpoint",
    "checkpoint_sha256",
    "weights",  # checkpoint (a local file) | pretrained (timm's hub weights) | random (timm's initialisation)
    "data",
    "num_images",
    "skipped_images",
    "reducer",
    "reducer_params",
    "reducer_label",  # the short label tables and plots show (knob and parameters off their defaults)
    "training_free",
    "trained_with",  # the reducer `ipbench finetune` trained the checkpoint with; empty: off-the-shelf
    "tokens_per_layer",
    "final_tokens",
    *ACCURACY_COLUMNS,
    "device",
    "device_name",
    "dtype",  # the precision the model computed in: amp_dtype under autocast, else model_dtype
    "amp_dtype",  # autocast dtype (float32 = no autocast)
    "model_dtype",  # dtype the weights and inputs were cast to
    "batch_size",
    "threads",
    "seed",
    "torch",
    "timm",
    "ipbench",
]


# Columns of results/sweep.csv (also written by `ipbench flops` and `ipbench speed` for their own
# files with the measurements they make; empty where a measurement was not taken).
SWEEP_COLUMNS: list[str] = [
    "timestamp",
    "config_key",
    "model",
    "checkpoint",
    "checkpoint_sha256",
    "weights",
    "data",
    "num_images",
    "reducer",  # reducer name ("none" for the baseline)
    "reducer_spec",  # canonical spec with every parameter
    "reducer_params",  # the same parameters as JSON
    "reducer_label",  # short label: the knob and the parameters off their defaults
    "reducer_line",  # the label without the knob: the line a row belongs to in a figure
    "keep_rate",  # the sweep's nominal keep rate this row stands for (empty for the baseline)
    "gmacs_budget",  # --match-gmacs target, empty otherwise
    "training_free",
    "trained_with",  # the reducer `ipbench finetune` trained the checkpoint with; empty: off-the-shelf
    "tokens_per_layer",  # tokens after each block, space separated
    "final_tokens",
    "gmacs",  # fvcore GMACs per image (fused attention counted)
    "gmacs_analytic",  # from the static token plan
    "flop_counter",
    "gmacs_ratio",  # baseline GMACs / this row's GMACs
    *ACCURACY_COLUMNS,
    "img_s_median",
    "img_s_min",
    "img_s_max",
    "speedup_median",  # median of per-round paired ratios against the baseline of the same run
    "speedup_min",
    "speedup_max",
    *SPEED_DETAIL_COLUMNS,
    "batch_size",
    "repeats",
    "min_seconds",
    "device",
    "device_name",
    "dtype",
    "amp_dtype",
    "model_dtype",
    "threads",
    "compile",
    "seed",
    "torch",
    "timm",
    "ipbench",
]


# The analysis CSVs (ipbench.analyses): who/what/which reducer first, then the command's own
# columns, then where and how it ran. `layer` is a 0-indexed block, or "all" for the pooled row.
_ANALYSIS_HEAD: list[str] = [
    "timestamp",
    "config_key",
    "model",
    "checkpoint",
    "checkpoint_sha256",
    "weights",
    "data",
    "num_images",
    "reducer",
    "reducer_spec",
    "reducer_params",
    "reducer_label",
    "reducer_line",
    "training_free",
    "trained_with",  # the reducer `ipbench finetune` trained the checkpoint with; empty: off-the-shelf
    "tokens_per_layer",
    "final_tokens",
]
_ANALYSIS_TAIL: list[str] = [
    "device",
    "device_name",
    "dtype",
    "amp_dtype",
    "model_dtype",
    "batch_size",
    "threads",
    "seed",
    "torch",
    "timm",
    "ipbench",
]

# results/robustness.csv: top-1 under random 16x16 masks (paper Table 4), one row per reducer and count.
ROBUSTNESS_COLUMNS: list[str] = [
    *_ANALYSIS_HEAD,
    "mask_count",  # masked squares per image
    "mask_fraction",  # mask_count / patches of the grid
    "placement",  # patch (distinct grid cells) | free (any pixel position, may overlap)
    "fill",  # zero (0 in normalised space) | mean (the image's channel means) | noise (N(0,1), normalised)
    *ACCURACY_COLUMNS,
    *_ANALYSIS_TAIL,
]

# results/similarity.csv: cosine similarity of merged pairs (paper Tables 6, 8), per block and features.
SIMILARITY_COLUMNS: list[str] = [
    *_ANALYSIS_HEAD,
    "layer",
    "features",  # metric (what the reducer matched on) | hidden (hidden states)
    "metric",  # the matching metric's name (keys = head-mean keys, x = hidden states)
    "pairs",  # merged | pruned (imagepiece retok=prune: the pairs that would have merged)
    "mean_cos",
    "std_cos",
    "n_pairs",
    *_ANALYSIS_TAIL,
]

# results/importance.csv: share of merged tokens in the top-p by CLS attention (paper Table 7).
IMPORTANCE_COLUMNS: list[str] = [
    *_ANALYSIS_HEAD,
    "layer",
    "top_p",  # fraction (0.3 = top 30 %)
    "tokens",  # src (tokens merged away) | both (and their destinations)
    "share",  # fraction of the merged tokens inside the top-p set
    "random_share",  # the same for tokens chosen at random (the top set's size / tokens)
    "n_top",  # merged tokens inside the top-p set
    "n_merged",
    *_ANALYSIS_TAIL,
]

# results/attentiveness.csv: inattentive tokens that are attentive in the next block (paper Table 5).
ATTENTIVENESS_COLUMNS: list[str] = [
    *_ANALYSIS_HEAD,
    "layer",  # the re-tokenize block; attentiveness is read again in layer + 1
    "attentive_rate",  # attentive = inside the top attentive_rate fraction by CLS attention
    "population",  # merged (inattentive tokens that took part in a merge) | inattentive (all of them)
    "score",  # token (CLS attention a token draws) | patch (that attention / the token's size)
    "share_became_attentive",
    "n_became_attentive",
    "n_inattentive",
    *_ANALYSIS_TAIL,
]

# results/coherence.csv: ImagePiece's local-coherence ablation (paper Table 8), one row per variant.
COHERENCE_COLUMNS: list[str] = [
    *_ANALYSIS_HEAD,
    "locality",  # λ of the training-free locality penalty (0 = off)
    "retok",  # merge | prune (the control: same schedule, pairs dropped)
    "stem",  # patch (timm's patch embedding) | conv (the learned local-coherence stem)
    *ACCURACY_COLUMNS,
    "gmacs",  # fvcore (+ SDPA handle) on one image
    "gmacs_analytic",  # from the static token plan (empty for the conv stem)
    "flop_counter",  # fvcore+sdpa, or analytic where torch.jit cannot trace the reducer
    "sim_metric",  # mean cosine of the merged (or pruned) pairs over all blocks, matching metric
    "sim_hidden",  # the same on hidden states
    "sim_metric_first",  # in the first re-tokenize block only (the paper's Table 8 value)
    "sim_hidden_first",
    "n_pairs",
    *_ANALYSIS_TAIL,
]


# Columns of OUT/finetune.csv (ipbench finetune): one row per logged training interval (kind=train),
# per stem-initialisation interval (kind=stem) and per validation (kind=val).
FINETUNE_COLUMNS: list[str] = [
    "timestamp",
    "config_key",  # the run: model, weights, data, reducer and every recipe setting
    "kind",  # train | stem | val
    "epoch",  # 0-based epoch the row belongs to (-1: the validation before training, and the stem fit)
    "step",  # optimizer steps done (global, all ranks together); stem rows: the stem fit's step
    "images_seen",  # training images consumed so far, every rank together
    "loss",  # train: mean training loss over the interval; stem: relative regression error
    "lr",  # learning rate after the row's last step
    "images_per_sec",  # training images per second over the interval, every rank together
    *ACCURACY_COLUMNS,  # val: the trained model
    "top1_ema",  # val: the EMA weights (empty without --ema-decay)
    "top5_ema",
    "model",
    "checkpoint",  # the weights it started from
    "checkpoint_sha256",
    "weights",
    "data",  # the training data
    "val_data",  # the validation data (holdout:N = N images of --data held out)
    "reducer",
    "reducer_spec",
    "reducer_label",
    "stem",  # patch | conv (ImagePiece's local-coherence stem)
    "global_batch",
    "world_size",
    "device",
    "device_name",
    "dtype",
    "seed",
    "torch",
    "timm",
    "ipbench",
]

# Columns added to a schema since the first release: a file without some of them (and otherwise
# the same columns in the same order) was written by an older ipbench and is upgraded, its rows
# given the values `results.derive_missing` computes from their own cells. Add a new column here.
# Columns of results/sensitivity.csv: the variant, then the sweep row's own cells (ipbench sensitivity).
SENSITIVITY_COLUMNS: list[str] = [
    "axis",  # patch (patch size varied at the model's resolution) | resolution (at its patch size)
    "patch_size",
    "img_size",
    "grid",  # patches per side
    "patch_tokens",
    "model",
    "checkpoint_sha256",
    "data",
    "num_images",
    "reducer_spec",
    "reducer_label",
    "reducer_line",
    "keep_rate",
    "tokens_per_layer",
    "final_tokens",
    "gmacs",
    "gmacs_analytic",
    "gmacs_ratio",  # the variant's baseline GMACs / this row's
    *ACCURACY_COLUMNS,
    "img_s_median",
    "speedup_median",  # against the variant's own baseline, paired in one run
    "config_key",  # <axis>/<the key of the OUT/sensitivity/<variant>/sweep.csv row it comes from>
]

ADDED_COLUMNS: frozenset[str] = frozenset({*ACCURACY_INTERVAL_COLUMNS, *SPEED_DETAIL_COLUMNS, "score",
                                         "trained_with"})
