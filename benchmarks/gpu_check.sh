#!/usr/bin/env bash
# GPU check: on a machine with one NVIDIA GPU and a copy of this working tree, in under 8 minutes:
#   1. pytest -m gpu                              (CUDA training with --amp/channels_last, CUDA provider)
#   2. benchmarks/train_speed.py --device cuda    (full-width ResNet-18, fp32 NCHW / channels_last / --amp)
#   3. benchmarks/serve_bench.py --providers cuda (saturation, single-request overhead, cascade efficiency)
# Every step has its own time limit and the script goes on when one fails; OUT_DIR/summary.json
# says which steps passed, how long each took, and where its output is.
#
#   bash benchmarks/gpu_check.sh --prepare     # here: Fashion-MNIST into data/ (ignored; ~7 MB, see below)
#   bash benchmarks/gpu_check.sh OUT_DIR       # there: run the checks, results under OUT_DIR
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu-smoke   # the same steps, tiny and on the CPU (tests use it)
#
# The data travels with the tree in data/fashion-mnist (ignored by git): the whole test set (the
# cascade runs on real test images) and the first 5,000 training images, in the same idx.gz
# format (the training benchmark reads (steps + warmup) x batch = 4,480; the full training set
# is 26 MB of what a copy of the tree may weigh). The full-width export is rebuilt on the GPU
# machine (~140 MB). Python: $PYTHON, else .venv/bin/python, else python3; it needs torch with
# CUDA, onnxruntime-gpu and the serve/dev extras. CUDA libraries installed from pip (nvidia-*
# wheels, as torch's CUDA builds bring them) are put on LD_LIBRARY_PATH so that ONNX Runtime's
# CUDA provider finds cuDNN and cuBLAS there too.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DATA_DIR="$ROOT/data/fashion-mnist"
SYSTEM_DATA=/usr/share/datasets/fashion-mnist

if [[ "${1:-}" == "--prepare" ]]; then
    TRAIN_IMAGES=${2:-5000}
    mkdir -p "$DATA_DIR"
    ls "$SYSTEM_DATA"/t10k-*-ubyte.gz >/dev/null 2>&1 || { echo "no Fashion-MNIST in $SYSTEM_DATA" >&2; exit 1; }
    cp -u "$SYSTEM_DATA"/t10k-*-ubyte.gz "$DATA_DIR"/
    python3 - "$SYSTEM_DATA" "$DATA_DIR" "$TRAIN_IMAGES" <<'EOF' || exit 1
import gzip, math, sys
from pathlib import Path

source, dest, keep = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):  # the first KEEP items, same format
    data = gzip.open(source / f"{stem}.gz", "rb").read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    shape[0] = min(keep, shape[0])
    header = data[:4] + b"".join(d.to_bytes(4, "big") for d in shape)
    body = data[4 + 4 * ndim :][: math.prod(shape)]  # uint8 elements: one byte each
    (dest / f"{stem}.gz").write_bytes(gzip.compress(header + body, mtime=0))
    print(f"{stem}: first {shape[0]} items")
EOF
    du -sh "$DATA_DIR"
    exit 0
fi
OUT=${1:?usage: gpu_check.sh OUT_DIR [--cpu-smoke] | --prepare}
MODE=${2:-gpu}
# A flag in OUT_DIR's place (OUT_DIR forgotten) would become a folder named "--cpu-smoke"; and if the
# folder cannot be made, $OUT must not fall back to "" (the steps would write into /).
if [[ "$OUT" == -* ]]; then
    echo "usage: gpu_check.sh OUT_DIR [--cpu-smoke] | --prepare   (OUT_DIR first, got $OUT)" >&2
    exit 2
fi
if [[ "$MODE" != gpu && "$MODE" != --cpu-smoke ]]; then
    echo "gpu_check.sh: unknown mode $MODE; the second argument may only be --cpu-smoke" >&2
    exit 2
fi
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || { echo "gpu_check.sh: cannot write to $1" >&2; exit 2; }
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
[[ -d "$DATA_DIR" ]] || DATA_DIR=$SYSTEM_DATA
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
NVIDIA_LIBS=$("$PY" - <<'EOF' 2>/dev/null
import glob, os, site
bases = [*site.getsitepackages(), site.getusersitepackages()]
print(":".join(dict.fromkeys(d for b in bases for d in sorted(glob.glob(os.path.join(b, "nvidia", "*", "lib"))))))
EOF
)
[[ -n "$NVIDIA_LIBS" ]] && export LD_LIBRARY_PATH="$NVIDIA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [[ "$MODE" == "--cpu-smoke" ]]; then
    DEVICE=cpu PROVIDERS=cpu
    TRAIN_ARGS=(--width-mult 0.25 --steps 1 --warmup 1 --batch-size 16 --ref-workers 0 --no-amp)
    SERVE_ARGS=(--model exported/fmnist-resnet18-eed --cascade-model exported/fmnist-resnet18-eed --rounds 1
                --seconds 1 --raw-seconds 0.2 --overhead-slices 2 --slice-seconds 0.2 --images 40 --connections 4)
    EXPORT=0
else
    DEVICE=cuda PROVIDERS=cuda
    TRAIN_ARGS=(--width-mult 1.0 --steps 30 --warmup 5 --batch-size 128)
    SERVE_ARGS=(--rounds 1 --seconds 4 --raw-seconds 1 --images 1000 --full-width-images 500)
    EXPORT=1
fi

STEPS_JSON=()
step() {  # step NAME TIMEOUT_S COMMAND... — run with a limit, log to OUT/NAME.log, record the outcome
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - started))
    tail -n 5 "$OUT/$name.log" | tee -a "$OUT/gpu_check.log"
    echo "   -> exit $rc after ${took}s" | tee -a "$OUT/gpu_check.log"
    STEPS_JSON+=("{\"step\": \"$name\", \"exit_status\": $rc, \"passed\": $([[ $rc == 0 ]] && echo true || echo false), \"seconds\": $took, \"log\": \"$name.log\"}")
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "revision: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "mode: $MODE"
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    "$PY" - <<'EOF' 2>&1
import importlib
for name in ("torch", "onnxruntime"):
    try:
        m = importlib.import_module(name)
    except Exception as exc:
        print(f"{name}: missing ({exc})")
        continue
    extra = ""
    if name == "torch":
        extra = f", cuda available: {m.cuda.is_available()}" + (f" ({m.cuda.get_device_name(0)})" if m.cuda.is_available() else "")
    else:
        extra = f", providers: {m.get_available_providers()}"
    print(f"{name} {m.__version__}{extra}")
EOF
} >"$OUT/environment.txt"
cat "$OUT/environment.txt" | tee -a "$OUT/gpu_check.log"

step pytest_gpu 90 "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
step train_speed 100 "$PY" benchmarks/train_speed.py --device "$DEVICE" --data-dir "$DATA_DIR" "${TRAIN_ARGS[@]}" \
    --out "$OUT/train_speed_$DEVICE.json"
if [[ "$EXPORT" == 1 && ! -f runs/bench/resnet18-cifar100/manifest.json ]]; then
    step full_width_export 60 "$PY" benchmarks/untrained_export.py --out runs/bench/resnet18-cifar100
fi
if [[ "$EXPORT" == 1 && ! -f runs/bench/resnet18-cifar100/manifest.json ]]; then
    # Without the full-width export, measure what can be measured: the shipped model only.
    SERVE_ARGS+=(--model exported/fmnist-resnet18-eed --cascade-model exported/fmnist-resnet18-eed)
fi
step serve_bench 220 "$PY" benchmarks/serve_bench.py --providers "$PROVIDERS" --fmnist-dir "$DATA_DIR" \
    "${SERVE_ARGS[@]}" --out "$OUT/serve_bench_$PROVIDERS.json"

{
    echo "{\"mode\": \"$MODE\", \"device\": \"$DEVICE\", \"steps\": ["
    (IFS=,; echo "${STEPS_JSON[*]}")
    echo "]}"
} >"$OUT/summary.json"
echo "wrote $OUT/summary.json"
failed=$(grep -o '"passed": false' "$OUT/summary.json" | wc -l)
exit $((failed > 0))
