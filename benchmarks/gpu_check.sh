#!/usr/bin/env bash
# GPU check: ResNet-18 Tucker2 2x + INT8 validated and benchmarked on ONNX Runtime CPU and CUDA.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; results in $OUT (or a temp folder)
#
# Steps (each time-limited; the whole run is meant to take < 6 minutes):
#   1. GPU facts (nvidia-smi); onnxruntime-gpu: used if CUDAExecutionProvider is already available, else
#      installed with pip into a venv that sees the system packages (the system onnxruntime is left alone).
#      ORT_GPU_WHEELHOUSE=DIR installs from local wheels instead (pip --no-index --find-links DIR).
#      SKIP_GPU_INSTALL=1 skips the install (CPU-only dry run: CUDA then shows as skipped, with its reason).
#   2. torchvision ResNet-18, random weights, exported once (onnxcompress.zoo.cached_export).
#   3. onnxcompress optimize --method tucker2 --ratio 2 --quantize int8 --providers cuda
#      (the CUDA/TensorRT INT8 format: symmetric int8 activations and weights) and, for comparison on the
#      GPU, --method none --quantize int8 and --method none --quantize fp16.
#   4. onnxcompress validate original vs Tucker2+INT8, and original vs INT8 alone, on cpu,cuda (random inputs
#      unless GPU_CHECK_DATA is set to a data source: image folder, .npy, .npz). With random weights Tucker2
#      agreement is meaningless (random kernels have no low-rank structure); the INT8 pair is the check.
#   5. onnxcompress bench FP32 / Tucker2+INT8 / INT8 / FP16 on cpu,cuda (plus tensorrt with GPU_CHECK_TRT=1:
#      building TensorRT engines can take minutes).
# Everything lands in $OUT: gpu_check.json (summary), optimize_report.json, validate.json, bench.json, logs.
# INT8 QDQ on the CUDA EP runs as simulated quantization (Q/DQ around float kernels): the CUDA numbers for
# the INT8 model are an accuracy check, not a speed claim.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
WORK="$(mktemp -d -t gpu_check_work.XXXXXX)"
export ONNXCOMPRESS_CACHE="${ONNXCOMPRESS_CACHE:-$WORK/cache}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
T0=$(date +%s)
STATUS="$OUT/steps.tsv"
: > "$STATUS"

log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/gpu_check.log" >&2; }
step() {  # step NAME TIMEOUT CMD...: run, log, record rc
  local name="$1" limit="$2"; shift 2
  log "$name: $*"
  local t=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo -e "$name\t$rc\t$(( $(date +%s) - t ))" >> "$STATUS"
  if [ $rc -ne 0 ]; then log "$name failed (rc=$rc); last lines:"; tail -5 "$OUT/$name.log" >&2; fi
  return $rc
}

# ---------------------------------------------------------------- 1. GPU and onnxruntime-gpu
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
  log "GPU: $(tail -n +2 "$OUT/nvidia-smi.csv" | head -1)"
else
  echo "nvidia-smi not found" > "$OUT/nvidia-smi.csv"
  log "no nvidia-smi: no GPU visible"
fi

has_cuda() { "$1" -c 'import onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)' 2>/dev/null; }

if has_cuda "$PY"; then
  log "onnxruntime here already has CUDAExecutionProvider"
elif [ "${SKIP_GPU_INSTALL:-0}" = "1" ]; then
  log "SKIP_GPU_INSTALL=1: not installing onnxruntime-gpu (CUDA will be reported as skipped)"
else
  step venv 60 "$PY" -m venv --system-site-packages "$WORK/venv"
  if [ -n "${ORT_GPU_WHEELHOUSE:-}" ]; then
    step install_ort_gpu 240 "$WORK/venv/bin/pip" install --no-index --find-links "$ORT_GPU_WHEELHOUSE" onnxruntime-gpu
  else
    # the [cuda,cudnn] extras bring the CUDA 12 / cuDNN 9 runtime libraries as pip packages
    step install_ort_gpu 240 "$WORK/venv/bin/pip" install "onnxruntime-gpu[cuda,cudnn]" \
      || step install_ort_gpu_plain 180 "$WORK/venv/bin/pip" install onnxruntime-gpu
  fi
  if has_cuda "$WORK/venv/bin/python"; then
    PY="$WORK/venv/bin/python"
    log "using onnxruntime-gpu from $WORK/venv"
  else
    log "onnxruntime-gpu could not be installed or has no CUDA EP: continuing, CUDA will be reported as skipped"
  fi
fi

# one entry point that preloads the CUDA/cuDNN libraries of the pip packages (ORT >= 1.21) before any session
cat > "$WORK/oc.py" <<'EOF'
import sys

import onnxruntime as o

try:
    o.preload_dlls()
except Exception:
    pass
from onnxcompress.cli import main

sys.exit(main(sys.argv[1:]))
EOF
OC=("$PY" "$WORK/oc.py")

"$PY" - > "$OUT/env.json" 2>&1 <<'EOF'
import json, platform, onnxruntime as o
print(json.dumps({"python": platform.python_version(), "onnxruntime": o.__version__,
                  "onnxruntime_file": o.__file__, "available_providers": o.get_available_providers()}))
EOF
log "env: $(cat "$OUT/env.json")"

# ---------------------------------------------------------------- 2. ResNet-18
step export 180 "$PY" -c 'from onnxcompress.zoo import cached_export; import shutil, sys
shutil.copy(cached_export("resnet18"), sys.argv[1])' "$WORK/resnet18.onnx" || { log "export failed"; }

# ---------------------------------------------------------------- 3. optimize
if [ -f "$WORK/resnet18.onnx" ]; then
  step optimize_t2_int8 180 "${OC[@]}" optimize "$WORK/resnet18.onnx" -o "$WORK/resnet18_t2_int8.onnx" \
    --method tucker2 --ratio 2 --quantize int8 --providers cuda --calibration random \
    --calibration-samples 8 --eval-samples 16 --report "$OUT/optimize_report.json" --quiet
  # INT8 alone keeps the random-weight model's predictions (Tucker2 of random weights does not: they have no
  # low-rank structure), so this pair gives meaningful agreement figures for INT8 on CUDA vs CPU
  step optimize_int8 120 "${OC[@]}" optimize "$WORK/resnet18.onnx" -o "$WORK/resnet18_int8.onnx" \
    --method none --quantize int8 --providers cuda --calibration random --calibration-samples 8 \
    --eval-samples 16 --report "$OUT/optimize_int8_report.json" --quiet
  step optimize_fp16 120 "${OC[@]}" optimize "$WORK/resnet18.onnx" -o "$WORK/resnet18_fp16.onnx" \
    --method none --quantize fp16 --providers cuda --eval-samples 8 --report "$OUT/optimize_fp16_report.json" --quiet
fi

PROVS="cpu,cuda"
[ "${GPU_CHECK_TRT:-0}" = "1" ] && PROVS="cpu,cuda,tensorrt"

# ---------------------------------------------------------------- 4. validate
if [ -f "$WORK/resnet18_t2_int8.onnx" ]; then
  step validate 150 "${OC[@]}" validate "$WORK/resnet18.onnx" "$WORK/resnet18_t2_int8.onnx" \
    --data "${GPU_CHECK_DATA:-random}" --samples 64 --providers "$PROVS" --json "$OUT/validate.json"
  cat "$OUT/validate.log" >&2
fi
if [ -f "$WORK/resnet18_int8.onnx" ]; then
  step validate_int8 150 "${OC[@]}" validate "$WORK/resnet18.onnx" "$WORK/resnet18_int8.onnx" \
    --data "${GPU_CHECK_DATA:-random}" --samples 64 --providers "$PROVS" --json "$OUT/validate_int8.json"
  cat "$OUT/validate_int8.log" >&2
fi

# ---------------------------------------------------------------- 5. bench
MODELS=()
for m in resnet18 resnet18_t2_int8 resnet18_int8 resnet18_fp16; do [ -f "$WORK/$m.onnx" ] && MODELS+=("$WORK/$m.onnx"); done
if [ ${#MODELS[@]} -gt 0 ]; then
  step bench 180 "${OC[@]}" bench "${MODELS[@]}" --providers "$PROVS" --threads "${GPU_CHECK_THREADS:-1}" \
    --warmup 5 --runs 30 --json "$OUT/bench.json"
  cat "$OUT/bench.log" >&2
fi

# ---------------------------------------------------------------- summary
"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except Exception:
        return None
steps = [dict(zip(("step", "rc", "seconds"), l.split("\t"))) for l in (out / "steps.tsv").read_text().splitlines()]
summary = {"steps": steps, "env": load("env.json"), "gpu": (out / "nvidia-smi.csv").read_text().strip(),
           "validate": load("validate.json"), "validate_int8": load("validate_int8.json"), "bench": load("bench.json"),
           "optimize": (load("optimize_report.json") or {}).get("model"),
           "note": "INT8 QDQ on the CUDA EP runs as simulated quantization (Q/DQ around float kernels): "
                   "an accuracy check there, not a speed claim"}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
EOF
log "done in $(( $(date +%s) - T0 ))s; results in $OUT"
rm -rf "$WORK"
