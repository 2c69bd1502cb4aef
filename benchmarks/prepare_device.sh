#!/usr/bin/env bash
# Fill device_payload/ (git-ignored) with what benchmarks/gpu_check.sh needs on a machine that has
# only the project's tree: the DeiT-Tiny weights, the first 500 shared images (the 1000 and the
# weights together are over the 64 MiB a device call may carry), their float32 CPU accuracy as
# measured here (the figure the GPU must reproduce), and fvcore with its missing dependencies as
# wheels. Run it here, from the repository root, in the activated venv:
#     bash benchmarks/prepare_device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
N=${N:-500}
OUT=device_payload
rm -rf "$OUT" && mkdir -p "$OUT/images" "$OUT/wheels"
cp "$SHARED/weights/deit_tiny_patch16_224.safetensors" "$OUT/"
# the first N images in sorted order, in their class folders (labels are the folder wnids)
(cd "$SHARED/data/nips17-dev" && find . -mindepth 2 -type f | sort | head -n "$N") | while read -r f; do
  mkdir -p "$OUT/images/$(dirname "$f")" && cp "$SHARED/data/nips17-dev/$f" "$OUT/images/$f"
done
# fvcore and iopath are source distributions (pure Python): build their wheels; the rest as wheels
python -m pip wheel -q --no-deps -w "$OUT/wheels" fvcore==0.1.5.post20221221 iopath==0.1.10
python -m pip download -q --no-deps --only-binary=:all: -d "$OUT/wheels" yacs==0.1.8 termcolor==2.4.0
# the accuracy the GPU must give again (float32), measured here on the same images
ipbench eval --model deit_t --checkpoint "$OUT/deit_tiny_patch16_224.safetensors" --data "$OUT/images" \
  --out "$OUT/expected" --workers 0
du -sh "$OUT"; git ls-files -z | du -ch --files0-from=- | tail -1  # with the tree: under 64 MiB
echo "carry: device_payload (run: bash benchmarks/gpu_check.sh)"
