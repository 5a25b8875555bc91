#!/usr/bin/env bash
# What a session with a CUDA GPU runs once, from the repository root:
#   1. the GPU tests (`pytest -m gpu`: tests/test_cuda.py, CUDA graphs included, and the
#      GPU tests of other files);
#   2. the speed benchmark's CUDA configuration (ResNet-110, 10 pareto exits), eager, as JSON;
#   3. the speed benchmark's `--preset issue` on CUDA: ResNet-110, resnet50 and
#      deit_small_patch16_224, the original model as a CUDA graph against early_exit and
#      predict, eager and with CUDA graphs; one JSON per model.
# Results go to ${OUT:-gpu-results}/. Each step runs even when one before it fails, so that one
# GPU session gives all it can; the script then exits with the tests' status, or else the
# benchmarks'.
#
#   OUT=gpu-results bash benchmarks/gpu_check.sh
set -euo pipefail

out="${OUT:-gpu-results}"
python="${PYTHON:-python}"
mkdir -p "$out"

echo "== gpu_check: $("$python" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())')"

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
