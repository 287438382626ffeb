#!/usr/bin/env bash
# GPU check: on a machine with one NVIDIA GPU and a copy of this working tree, in under 8 minutes:
#   1. pytest -m gpu                              (CUDA training with --amp/channels_last, CUDA provider)
#   2. benchmarks/train_speed.py --device cuda    (full-width ResNet-18, fp32 NCHW / channels_last / --amp)
#   3. benchmarks/serve_bench.py --providers cuda (saturation, single-request overhead, cascade efficiency)
# Every step has its own time limit, cut to what is left of the 8 minutes (TOTAL_S), and the script
# goes on when one fails; OUT_DIR/summary.json, rewritten after every step (a run killed from outside
# keeps what it finished), says which steps passed, how long each took, and where its output is. In
# GPU mode the gpu tests fail instead of skipping when CUDA or ONNX Runtime's CUDA provider is
# missing (EED_REQUIRE_GPU=1): a skip would pass the step with nothing run on the GPU.
#
#   bash benchmarks/gpu_check.sh --prepare     # here: Fashion-MNIST into data/gpu-check/ (ignored; ~7 MB)
#   bash benchmarks/gpu_check.sh OUT_DIR       # there: run the checks, results under OUT_DIR
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu-smoke   # the same steps, tiny and on the CPU (tests use it)
#
# The data travels with the tree in data/gpu-check/fashion-mnist (ignored by git; a folder of its
# own, so that no training run reading data/ finds the cut training set): the whole test set (the
# cascade runs on real test images) and the first 5,000 training images, in the same idx.gz
# format (the training benchmark reads (steps + warmup) x batch = 4,480; the full training set
# is 26 MB of what a copy of the tree may weigh). The full-width export is rebuilt on the GPU
# machine (~140 MB), in runs/bench/ of the tree as on any machine (GPU_CHECK_EXPORT_DIR elsewhere),
# not under OUT_DIR. Python: $PYTHON, else .venv/bin/python, else python3; it needs torch with
# CUDA, onnxruntime-gpu and the serve/dev extras. CUDA libraries installed from pip (nvidia-*
# wheels, as torch's CUDA builds bring them), wherever Python finds packages (site-packages or a
# folder on PYTHONPATH), are put on LD_LIBRARY_PATH so that ONNX Runtime's CUDA provider finds
# cuDNN and cuBLAS there too (the server never imports torch, which would load them).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DATA_DIR="$ROOT/data/gpu-check/fashion-mnist"
TOTAL_S=${GPU_CHECK_TOTAL_S:-465}  # every step ends by then (8 minutes less the summary and start-up)
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
import glob, os, site, sys
bases = [*site.getsitepackages(), site.getusersitepackages(), *(p for p in sys.path if p)]
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
write_summary() {
    {
        echo "{\"mode\": \"$MODE\", \"device\": \"$DEVICE\", \"steps\": ["
        (IFS=,; echo "${STEPS_JSON[*]}")
        echo "]}"
    } >"$OUT/summary.json.tmp" && mv "$OUT/summary.json.tmp" "$OUT/summary.json"
}
step() {  # step NAME TIMEOUT_S COMMAND... — run with a limit, log to OUT/NAME.log, record the outcome
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    # Cut to what is left of TOTAL_S, keeping the 5 s a killed step may take to go.
    local left=$((TOTAL_S - SECONDS - 5))
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "== $name: not run, ${left}s left of ${TOTAL_S}s" | tee -a "$OUT/gpu_check.log"
        echo "not run: ${left}s left of the ${TOTAL_S}s" >"$OUT/$name.log"
        STEPS_JSON+=("{\"step\": \"$name\", \"exit_status\": null, \"passed\": false, \"seconds\": 0, \"log\": \"$name.log\"}")
        write_summary
        return
    fi
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu_check.log"
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - started))
    tail -n 5 "$OUT/$name.log" | tee -a "$OUT/gpu_check.log"
    echo "   -> exit $rc after ${took}s" | tee -a "$OUT/gpu_check.log"
    STEPS_JSON+=("{\"step\": \"$name\", \"exit_status\": $rc, \"passed\": $([[ $rc == 0 ]] && echo true || echo false), \"seconds\": $took, \"log\": \"$name.log\"}")
    write_summary
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "revision: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "mode: $MODE"
    timeout 10 nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    timeout 45 "$PY" - <<'EOF' 2>&1 || echo "(the environment check failed or took over 45 s)"
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

[[ "$MODE" == gpu ]] && export EED_REQUIRE_GPU=1
write_summary
step pytest_gpu 90 "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
step train_speed 100 "$PY" benchmarks/train_speed.py --device "$DEVICE" --data-dir "$DATA_DIR" "${TRAIN_ARGS[@]}" \
    --out "$OUT/train_speed_$DEVICE.json"
FULL_WIDTH=${GPU_CHECK_EXPORT_DIR:-runs/bench/resnet18-cifar100}
if [[ "$EXPORT" == 1 && ! -f "$FULL_WIDTH/manifest.json" ]]; then
    step full_width_export 60 "$PY" benchmarks/untrained_export.py --out "$FULL_WIDTH"
fi
if [[ "$EXPORT" == 1 && -f "$FULL_WIDTH/manifest.json" ]]; then
    SERVE_ARGS+=(--model "$FULL_WIDTH" --cascade-model exported/fmnist-resnet18-eed --cascade-model "$FULL_WIDTH")
elif [[ "$EXPORT" == 1 ]]; then
    # Without the full-width export, measure what can be measured: the shipped model only.
    SERVE_ARGS+=(--model exported/fmnist-resnet18-eed --cascade-model exported/fmnist-resnet18-eed)
fi
step serve_bench 220 "$PY" benchmarks/serve_bench.py --providers "$PROVIDERS" --fmnist-dir "$DATA_DIR" \
    "${SERVE_ARGS[@]}" --out "$OUT/serve_bench_$PROVIDERS.json"

echo "wrote $OUT/summary.json"
failed=$(grep -o '"passed": false' "$OUT/summary.json" | wc -l)
exit $((failed > 0))
