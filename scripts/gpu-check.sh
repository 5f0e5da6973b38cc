#!/usr/bin/env bash
# GPU check: runs a patchgd binary built elsewhere on a machine with an NVIDIA GPU, PyTorch 2.11
# in python3, no Rust and no network. libtorch is found through python3's torch.
#
#   scripts/gpu-check.sh [--cpu|--both] [--sizes "512 2048"] [--epochs 1] [--no-bench]
#
# The binary: $PATCHGD_BIN, else .device/patchgd.xz (unpacked with python3's lzma: carry it
# there, see docs/benchmarks.md), else target/debug/patchgd. --cpu runs the same table on the
# CPU (also on a machine without a GPU). Prints one row per size, device and precision (CUDA:
# f32, bf16 and f16 mixed precision; CPU: f32): backbone patch passes per second (fill and
# gradient together), images per second, peak RSS, the final loss and the validation accuracy;
# fails if CUDA is asked for and unusable, or a loss is not finite. Then `patchgd bench` on the first device:
# pipeline efficiency (small CNN and resnet18), peak memory at 1k/4k/16k px, and the mixed
# precision comparison (speed, accuracy, agreement with f32), and one step's gradient average
# through NCCL (one rank: the packing and the call) for small_cnn, resnet18, resnet50, checked
# against the known sum (--no-bench skips it;
# BENCH_SIZES=1024,4096 picks the memory part's sizes).
set -euo pipefail
cd "$(dirname "$0")/.."

devices="cuda"
sizes="512 2048"
epochs=1
bench=1
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) devices="cpu" ;;
        --both) devices="cuda cpu" ;;
        --sizes) sizes="$2"; shift ;;
        --epochs) epochs="$2"; shift ;;
        --no-bench) bench=0 ;;
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
# The carried binary, unless a local build is newer (a stale .device/ must not be measured).
if [ -z "$bin" ] && [ -f .device/patchgd.xz ] && ! [ target/debug/patchgd -nt .device/patchgd.xz ]; then
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
      precisions="f32"
      [ "$device" = cuda ] && precisions="f32 bf16 f16"
      for precision in $precisions; do
        out="$work/out-$size-$device-$precision"
        start=$(date +%s.%N)
        "$bin" run pipelines/ultramnist.yaml --fresh --no-progress \
            --set "source.images=$data/images" --set "source.labels=$data/labels.csv" \
            --set "output=$out" --set "patch.size=$patch" --set "patch.stride=$patch" \
            --set "train.device=$device" --set "train.precision=$precision" \
            --set "train.epochs=$epochs" --set "train.batch_size=8" \
            --set "checkpoint.every_steps=0" > "$out.log" 2>&1 || { cat "$out.log"; exit 1; }
        end=$(date +%s.%N)
        row=$($python - "$out/metrics.csv" "$size" "$patch" "$device" "$precision" "$start" "$end" <<'EOF'
import csv, math, sys
path, size, patch, device, precision, start, end = sys.argv[1:8]
wall = float(end) - float(start)
last = list(csv.DictReader(open(path)))[-1]
for k in ("train_loss", "val_loss"):
    if not math.isfinite(float(last[k])):
        sys.exit(f"{k} is not finite on {device} ({precision}) at {size} px")
grid = (int(size) // int(patch)) ** 2
print(f"| {size} | {patch} | {grid} | {device} | {precision} | {float(last['patches_per_s']):.0f} | "
      f"{float(last['images_per_s']):.1f} | {int(last['peak_rss_bytes']) >> 20} | "
      f"{float(last['train_loss']):.4f} | {float(last['val_accuracy']):.3f} | {wall:.1f} |")
EOF
)
        rows+=("$row")
      done
    done
done
echo
echo "| image px | patch px | patches/image | device | precision | patch passes/s | images/s | peak RSS MiB | train loss | val acc | wall s |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"

if [ "$bench" = 1 ]; then
    first=${devices%% *}
    echo
    "$bin" bench --device "$first" --only efficiency --only memory --only precision --only allreduce --dir "$work/bench" \
        --sizes "${BENCH_SIZES:-1024,4096,16384}"
fi
