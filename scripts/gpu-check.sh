#!/usr/bin/env bash
# GPU check: runs a patchgd binary built elsewhere on a machine with an NVIDIA GPU, PyTorch 2.11
# in python3, no Rust and no network. libtorch is found through python3's torch.
#
#   scripts/gpu-check.sh [--cpu] [--sizes "512 2048"] [--epochs 1]
#
# The binary: $PATCHGD_BIN, else .device/patchgd.xz (unpacked with python3's lzma: carry it
# there, see docs/benchmarks.md), else target/debug/patchgd. --cpu runs the same table on the
# CPU (also on a machine without a GPU). Prints one row per size and device: backbone patch
# passes per second (fill and gradient together), images per second, peak RSS, the final loss
# and the validation accuracy; fails if CUDA is asked for and unusable, or a loss
# is not finite.
set -euo pipefail
cd "$(dirname "$0")/.."

devices="cuda"
sizes="512 2048"
epochs=1
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) devices="cpu" ;;
        --both) devices="cuda cpu" ;;
        --sizes) sizes="$2"; shift ;;
        --epochs) epochs="$2"; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && python=.venv/bin/python
torch_lib=$($python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
$python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

work=${GPU_CHECK_DIR:-$(mktemp -d)}
mkdir -p "$work"
bin=${PATCHGD_BIN:-}
if [ -z "$bin" ] && [ -f .device/patchgd.xz ]; then
    bin="$work/patchgd"
    $python -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' .device/patchgd.xz "$bin"
    chmod +x "$bin"
fi
bin=${bin:-target/debug/patchgd}
"$bin" --version

rows=()
for size in $sizes; do
    patch=$((size / 8 < 256 ? size / 8 : 256))
    data="$work/um$size"
    [ -d "$data" ] || "$bin" synth ultramnist --out "$data" --size "$size" --classes 4 --train 64 --val 16 --seed 3 >/dev/null
    for device in $devices; do
        out="$work/out-$size-$device"
        start=$(date +%s.%N)
        "$bin" run pipelines/ultramnist.yaml --fresh --no-progress \
            --set "source.images=$data/images" --set "source.labels=$data/labels.csv" \
            --set "output=$out" --set "patch.size=$patch" --set "patch.stride=$patch" \
            --set "train.device=$device" --set "train.epochs=$epochs" --set "train.batch_size=8" \
            --set "checkpoint.every_steps=0" > "$out.log" 2>&1 || { cat "$out.log"; exit 1; }
        end=$(date +%s.%N)
        row=$($python - "$out/metrics.csv" "$size" "$patch" "$device" "$start" "$end" <<'EOF'
import csv, math, sys
path, size, patch, device, start, end = sys.argv[1:7]
wall = float(end) - float(start)
last = list(csv.DictReader(open(path)))[-1]
for k in ("train_loss", "val_loss"):
    if not math.isfinite(float(last[k])):
        sys.exit(f"{k} is not finite on {device} at {size} px")
grid = (int(size) // int(patch)) ** 2
print(f"| {size} | {patch} | {grid} | {device} | {float(last['patches_per_s']):.0f} | "
      f"{float(last['images_per_s']):.1f} | {int(last['peak_rss_bytes']) >> 20} | "
      f"{float(last['train_loss']):.4f} | {float(last['val_accuracy']):.3f} | {wall:.1f} |")
EOF
)
        rows+=("$row")
    done
done
echo
echo "| image px | patch px | patches/image | device | patch passes/s | images/s | peak RSS MiB | train loss | val acc | wall s |"
echo "|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
