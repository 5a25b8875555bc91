#!/usr/bin/env bash
# What a session with a CUDA GPU runs once, from the repository root:
#   1. the GPU tests (`pytest -m gpu`: tests/test_cuda.py, CUDA graphs included, and the
#      GPU tests of other files);
#   2. the speed benchmark's CUDA configuration (ResNet-110, 10 pareto exits), as JSON.
# Results go to ${OUT:-gpu-results}/. The benchmark runs even when a test fails, so that one
# GPU session gives both; the script then exits with the tests' status.
#
#   OUT=gpu-results bash benchmarks/gpu_check.sh
set -euo pipefail

out="${OUT:-gpu-results}"
python="${PYTHON:-python}"
mkdir -p "$out"

echo "== gpu_check: $("$python" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())')"

echo "== 1/2 GPU tests: pytest -m gpu -> $out/pytest-gpu.txt"
tests=0
"$python" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest-gpu.txt" || tests=$?

echo "== 2/2 speed benchmark on cuda, eager early_exit: resnet110, batches 1-256 -> $out/speed-cuda-eager.json"
"$python" benchmarks/speed.py --model resnet110 --n-exits 10 --devices cuda \
    --batch-sizes 1 4 16 64 256 --json "$out/speed-cuda-eager.json"

# TODO(speed.py): benchmarks/speed.py has no option yet for CUDA graphs
# (`earlyexit.capture_cuda_graphs`) or for `earlyexit.predict`; once it has, run them here, e.g.
#   "$python" benchmarks/speed.py ... --cuda-graphs --json "$out/speed-cuda-graphs.json"

echo "== done: tests exit status $tests; results in $out/"
exit "$tests"
