#!/usr/bin/env bash
# Create benchmarks/.venv-deepsparse: DeepSparse 1.8.0 (the last real release; 1.9.0 refuses to install) in a venv of
# its own, because it needs numpy<2 and onnx 1.14, which cannot share the main environment. bench_speed.py drives it
# through benchmarks/speed/deepsparse_worker.py. Idempotent. PYTHON=/path/to/python3.11 chooses the interpreter;
# HF_SPARSE_DEEPSPARSE_VENV=/path another venv location (bench_speed.py reads the same variable).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${HF_SPARSE_DEEPSPARSE_VENV:-$(cd "$here/.." && pwd)/.venv-deepsparse}"
python="${PYTHON:-python3.11}"

if ! command -v "$python" >/dev/null; then
    echo "setup_deepsparse.sh: $python not found; DeepSparse 1.8.0 ships wheels for CPython 3.8-3.11 only." \
        "Set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
test -x "$venv/bin/python" || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# deepsparse pins numpy<2 and onnx 1.14 itself; nothing else is needed (the int8 QOperator model is written by the
# main environment's onnxruntime and only read here).
"$venv/bin/python" -m pip install --quiet "deepsparse==1.8.0"
"$venv/bin/python" - <<'PY'
import deepsparse, numpy, onnx
print(f"deepsparse {deepsparse.__version__}, numpy {numpy.__version__}, onnx {onnx.__version__}")
PY
echo "DeepSparse venv ready: $venv"
