#!/usr/bin/env bash
# The GPU check (issue: a speed protocol a GPU user trusts), at most 8 minutes on one H200.
# Needs device_payload/ from benchmarks/prepare_device.sh (weights, 500 images, their CPU accuracy,
# fvcore wheels). Writes every table to $OUT (default: gpu_check_out/):
#   env.txt        GPU, driver, CUDA, cuDNN, torch, timm
#   eval.csv       DeiT-Tiny on the 500 images: float32 and bfloat16 (+ the CPU float32 figure)
#   speed.csv      DeiT-S and DeiT-B (random weights), bf16 autocast, batch 1 and 256, eager; DeiT-S
#                  compiled too: none, tome:r=13 (and prop_attn=false: what the log(size) mask costs
#                  the flash kernel), evit:keep=0.7, imagepiece:keep=0.7, mstm:keep=0.7
#   finetune/      a short bfloat16 fine-tune of DeiT-Tiny + tome:r=8 on the 500 images (400 train, 100
#                  validate; global batch 64, 300 steps at most): finetune.csv with its images/s
#   *.log          each step's output
# Each step has its own time limit, so the script always ends in time with what it has.
#     bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#     DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # a smoke run of the script itself, here
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
P=device_payload
mkdir -p "$OUT"
if ! python3 -c "import fvcore" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$P"/wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 COLUMNS=200
IPB="python3 -m ipbench"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
torch.backends.cudnn.version(), 'timm', timm.__version__, 'gpu', torch.cuda.get_device_name(0) if
torch.cuda.is_available() else '-')"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$QUICK" = 1 ]; then
  SIZES=1,4; REP=(--repeats 2 --min-seconds 0.05 --warmup 1); LIMIT=(--limit 20); ARCHS="deit_s"
else
  SIZES=1,256; REP=(--repeats 5 --min-seconds 0.5 --warmup 3); LIMIT=(); ARCHS="deit_s deit_b"
fi
REDUCERS=tome:r=13,tome:r=13,prop_attn=false,evit:keep=0.7,imagepiece:keep=0.7,mstm:keep=0.7
AMP=bfloat16; [ "$DEVICE" = cpu ] && AMP=float32

# 1. the accuracy path on CUDA: float32 must give the CPU's count; bfloat16 beside it
for dt in float32 bfloat16; do
  timeout 120 $IPB eval --model deit_t --checkpoint $P/deit_tiny_patch16_224.safetensors --data $P/images \
    --device "$DEVICE" --amp-dtype $dt --batch-size 100 "${LIMIT[@]}" --out "$OUT" > "$OUT/eval_$dt.log" 2>&1
done
cp $P/expected/eval.csv "$OUT/eval_cpu_expected.csv" 2>/dev/null

# 2. speed, eager, both models; then compiled, DeiT-S only (each compile takes tens of seconds)
for arch in $ARCHS; do
  timeout 150 $IPB speed --model $arch --weights random --data synthetic --device "$DEVICE" --amp-dtype $AMP \
    --reducers "$REDUCERS" --batch-sizes $SIZES "${REP[@]}" --speed-group 0 --out "$OUT" \
    --timm-csv "$OUT/timm_$arch.csv" > "$OUT/speed_$arch.log" 2>&1
done
if [ "$DEVICE" = cuda ]; then
  timeout 200 $IPB speed --model deit_s --weights random --data synthetic --device cuda --amp-dtype $AMP \
    --reducers "$REDUCERS" --batch-sizes $SIZES "${REP[@]}" --speed-group 0 --compile --out "$OUT" \
    > "$OUT/speed_deit_s_compiled.log" 2>&1
fi

# 3. the training path on CUDA: a short bf16 fine-tune with the reducer in place (loss, img/s, validation)
if [ "$QUICK" = 1 ]; then FT=(--limit 40 --holdout 8 --batch-size 8 --epochs 1 --max-steps 3 --img-size 112)
else FT=(--holdout 100 --batch-size 64 --epochs 48 --max-steps 300); fi
timeout 150 $IPB finetune --model deit_t --checkpoint $P/deit_tiny_patch16_224.safetensors --data $P/images \
  --device "$DEVICE" --amp-dtype $AMP --reducer tome:r=8 --lr 1e-4 --min-lr 1e-5 --mixup 0 --cutmix 0 \
  --log-every 20 "${FT[@]}" --out "$OUT/finetune" > "$OUT/finetune.log" 2>&1

python3 - "$OUT" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

out = Path(sys.argv[1])
pd.set_option("display.width", 250, "display.max_columns", 30)
if (out / "eval.csv").exists():
    ev = pd.read_csv(out / "eval.csv")
    print(ev[["model", "device", "dtype", "n_labelled", "correct1", "top1", "top1_low", "top1_high", "top5"]])
    exp = out / "eval_cpu_expected.csv"
    if exp.exists():
        print("CPU float32, the same images:", pd.read_csv(exp)[["correct1", "top1", "top5"]].to_dict("records"))
if (out / "speed.csv").exists():
    sp = pd.read_csv(out / "speed.csv")
    print(sp[["model", "reducer_label", "compile", "batch_size", "final_tokens", "gmacs_ratio", "img_s_median",
              "speedup_median", "speedup_min", "speedup_max", "latency_ms_median", "latency_ms_p90",
              "peak_mem_mib", "attention_backend", "recompiles"]].to_string(index=False))
EOF
python3 - "$OUT" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

ft = Path(sys.argv[1]) / "finetune" / "finetune.csv"
if ft.exists():
    df = pd.read_csv(ft)
    print(df[["kind", "epoch", "step", "loss", "lr", "images_per_sec", "top1", "top1_ema", "device_name",
              "dtype"]].to_string(index=False))
EOF
echo "tables in $OUT"
