#!/usr/bin/env bash
# What a session with a CUDA GPU runs once, from the repository root:
#   0. a preflight of a few seconds: the Python with PyTorch, the project importable with its
#      dependencies (a small model converted on the CPU), and a CUDA device; it stops here,
#      before any GPU time is spent on the rest, when one of them is missing;
#   1. the GPU tests (`pytest -m gpu`: tests/test_cuda.py, CUDA graphs included, and the
#      GPU tests of other files);
#   2. the speed benchmark's CUDA configuration (ResNet-110, 10 pareto exits), eager, as JSON;
#   3. the speed benchmark's `--preset issue` on CUDA: ResNet-110, resnet50 and
#      deit_small_patch16_224, the original model as a CUDA graph against early_exit and
#      predict, eager and with CUDA graphs; one JSON per model.
# Results go to ${OUT:-gpu-results}/. Each step after the preflight runs even when one before it
# fails, so that one GPU session gives all it can; the script then exits with the tests'
# status, or else the benchmarks'.
#
#   OUT=gpu-results bash benchmarks/gpu_check.sh
#
# The project runs from this checkout (it is put on PYTHONPATH; nothing is installed). A GPU
# machine whose image has PyTorch, timm and the rest but cannot reach a package index often
# lacks fvcore and the pure-Python packages it needs. Make wheels of them first, on a machine
# that can reach one, and bring the folder along:
#
#   bash benchmarks/gpu_check.sh --prepare wheels              # fvcore, iopath, yacs, termcolor
#   WHEELS=wheels OUT=gpu-results bash benchmarks/gpu_check.sh
#
# WHEELS installs every wheel in that folder into a temporary folder put on PYTHONPATH (no
# index, no dependencies resolved). PYTHON picks the interpreter (default: python3, else
# python).
set -euo pipefail

python="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"

if [ "${1:-}" = "--prepare" ]; then
    dir="${2:?usage: bash benchmarks/gpu_check.sh --prepare DIR}"
    "$python" -m pip wheel -q --no-deps fvcore iopath yacs termcolor -w "$dir"
    echo "== wheels for an offline GPU machine in $dir/:"
    ls "$dir"
    exit 0
fi

out="${OUT:-gpu-results}"
mkdir -p "$out"

if [ -n "${WHEELS:-}" ]; then
    site="$(mktemp -d)"
    echo "== installing the wheels in $WHEELS into $site (no index)"
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== 0/3 preflight: $python"
if ! "$python" - <<'EOF'
import sys

try:
    import torch
except ImportError as err:
    sys.exit(f"No PyTorch in this Python ({err}). Hint: PYTHON=/path/to/the/python/with/torch.")
print("torch", torch.__version__, "CUDA", torch.version.cuda)
try:
    import timm

    import earlyexit

    net = earlyexit.convert(timm.create_model("resnet20", num_classes=10), n_exits=2)
except ImportError as err:
    sys.exit(
        f"The project or one of its dependencies does not import: {err}. Hint: on a machine "
        "that can reach a package index, `bash benchmarks/gpu_check.sh --prepare wheels`, "
        "then run this with WHEELS=wheels."
    )
print("earlyexit", earlyexit.__version__, "timm", timm.__version__, "- converted resnet20:",
      net.num_exits, "exits")
if not torch.cuda.is_available():
    sys.exit("No CUDA device is visible: the GPU checks need one.")
print("device", torch.cuda.get_device_name())
EOF
then
    echo "== preflight failed: nothing else was run"
    exit 3
fi

echo "== 1/3 GPU tests: pytest -m gpu -> $out/pytest-gpu.txt"
tests=0
"$python" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest-gpu.txt" || tests=$?

echo "== 2/3 speed benchmark on cuda, eager early_exit: resnet110, batches 1-256 -> $out/speed-cuda-eager.json"
bench=0
"$python" benchmarks/speed.py --model resnet110 --n-exits 10 --devices cuda \
    --batch-sizes 1 4 16 64 256 --methods original early_exit \
    --json "$out/speed-cuda-eager.json" || bench=$?

echo "== 3/3 speed benchmark on cuda, --preset issue (graphs and predict) -> $out/speed-<model>.json"
"$python" benchmarks/speed.py --preset issue --devices cuda --json-dir "$out" || bench=$?

echo "== done: tests exit status $tests, benchmarks $bench; results in $out/"
if [ "$tests" -ne 0 ]; then exit "$tests"; fi
exit "$bench"
