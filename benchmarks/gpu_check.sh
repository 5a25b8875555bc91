#!/usr/bin/env bash
# What a session with a CUDA GPU runs once, from the repository root:
#   0. a preflight of a few seconds: the Python with PyTorch, the project importable with its
#      dependencies (a small model converted on the CPU), pytest, hypothesis and
#      pytest-timeout when the tests step is to run, and a CUDA device; it stops here, before
#      any GPU time is spent on the rest, when one of them is missing;
#   then the steps, in this order unless STEPS says otherwise (e.g. STEPS="preset"):
#   tests:  the GPU tests (`pytest -m gpu`: the GPU tests of the other files, then
#           tests/test_cuda.py, CUDA graphs included, whose torch.compile test, the slowest,
#           is last), their output in pytest-gpu.txt;
#   preset: the speed benchmark's `--preset issue`: ResNet-110, resnet50 and
#           deit_small_patch16_224, the original model as a CUDA graph against early_exit and
#           predict, eager and with CUDA graphs; speed-<model>.json, written row by row;
#   sweep:  the speed benchmark's earlier CUDA configuration (ResNet-110, 10 pareto exits,
#           batches 256 down to 1, eager early_exit against the original),
#           speed-cuda-eager.json, row by row (a run stopped at its limit keeps the batch
#           sizes it finished).
# Results go to ${OUT:-gpu-results}/. Each step runs even when one before it failed, so that one
# GPU session gives all it can; the script then exits with the tests' status, or else the
# benchmarks'.
#
#   OUT=gpu-results bash benchmarks/gpu_check.sh
#
# GPU time is lent by the command, so no step may take the rest of it: each runs within a limit
# (LIMIT_TESTS=180, LIMIT_PRESET=330, LIMIT_SWEEP=120 seconds) and all of them, preflight
# included, within BUDGET=540 seconds; a step past its limit is stopped (with SIGINT, so that
# pytest still reports what it ran), the next one runs, and the last line lists each step's
# exit status and seconds. DEVICE=cpu runs the same steps on the CPU: a check of this script.
#
# The project runs from this checkout (it is put on PYTHONPATH; nothing is installed). A GPU
# machine whose image has PyTorch, timm and the rest but cannot reach a package index often
# lacks fvcore and the pure-Python packages it needs. Make wheels of them first, on a machine
# that can reach one, and bring the folder along:
#
#   PREPARE_PYTHON=3.12 bash benchmarks/gpu_check.sh --prepare wheels
#   WHEELS=wheels OUT=gpu-results bash benchmarks/gpu_check.sh
#
# --prepare fetches wheels of fvcore and what it imports, and of pytest, hypothesis,
# pytest-timeout and what they import, for the GPU machine's Python (PREPARE_PYTHON, default:
# this one's version; some of them hold compiled code) on x86-64 Linux. WHEELS installs, of the
# wheels in that folder, those whose package that machine's Python does not have already (its
# own stay: a second pytest beside the image's would not match the image's plugins) into a
# temporary folder put on PYTHONPATH (no index, no dependencies resolved). PYTHON picks the
# interpreter (default: python3, else python).
set -euo pipefail

python="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"

if [ "${1:-}" = "--prepare" ]; then
    dir="${2:?usage: bash benchmarks/gpu_check.sh --prepare DIR}"
    version="${PREPARE_PYTHON:-$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}"
    # What fvcore imports, then what the tests import (pytest and its plugins), as wheels for
    # that Python on x86-64 Linux ...
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$dir" iopath yacs termcolor portalocker tabulate \
        pytest pluggy iniconfig pygments packaging exceptiongroup tomli hypothesis \
        sortedcontainers attrs pytest-timeout
    # ... and fvcore, published as source only: built here (pure Python).
    "$python" -m pip wheel -q --no-deps -w "$dir" fvcore
    echo "== wheels for an offline GPU machine in $dir/:"
    ls "$dir"
    exit 0
fi

out="${OUT:-gpu-results}"
steps="${STEPS:-tests preset sweep}"
budget="${BUDGET:-540}"
device="${DEVICE:-cuda}"
for name in $steps; do
    case "$name" in
        tests | preset | sweep) ;;
        *)
            echo "Unknown step '$name' in STEPS. Hint: the steps are tests, preset and sweep." >&2
            exit 2
            ;;
    esac
done
mkdir -p "$out"

if [ -n "${WHEELS:-}" ]; then
    site="$(mktemp -d)"
    missing=()
    for wheel in "$WHEELS"/*.whl; do
        name="$(basename "$wheel")"
        if ! "$python" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' \
            "${name%%-*}" 2> /dev/null; then
            missing+=("$wheel")
        fi
    done
    echo "== installing ${#missing[@]} of the wheels in $WHEELS into $site (no index; the" \
        "others' packages are there already)"
    if [ "${#missing[@]}" -gt 0 ]; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
            "${missing[@]}"
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== preflight: $python"
case " $steps " in *" tests "*) with_tests=1 ;; *) with_tests=0 ;; esac
if ! DEVICE="$device" WITH_TESTS="$with_tests" "$python" - <<'EOF'
import os
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
if os.environ["WITH_TESTS"] == "1":
    try:  # what the test files import, and the plugin of their `timeout` marker
        import hypothesis
        import pytest
        import pytest_timeout
    except ImportError as err:
        sys.exit(
            f"The tests step needs pytest, hypothesis and pytest-timeout: {err}. Hint: "
            "`bash benchmarks/gpu_check.sh --prepare wheels` makes wheels of them too; or "
            "STEPS='preset sweep' runs the benchmarks alone."
        )
    print("pytest", pytest.__version__, "hypothesis", hypothesis.__version__)
if os.environ["DEVICE"] == "cpu":
    print("device cpu: the steps run on the CPU (a check of this script)")
elif not torch.cuda.is_available():
    sys.exit("No CUDA device is visible: the GPU checks need one. Hint: DEVICE=cpu runs the "
             "steps on the CPU, to check the script.")
else:
    print("device", torch.cuda.get_device_name())
EOF
then
    echo "== preflight failed: nothing else was run"
    exit 3
fi

step() {  # step NAME COMMAND...: run it within its limit and the budget left
    local name="$1" cap left limit status=0 began
    shift
    case "$name" in
        tests) cap="${LIMIT_TESTS:-180}" ;;
        preset) cap="${LIMIT_PRESET:-330}" ;;
        *) cap="${LIMIT_SWEEP:-120}" ;;
    esac
    left=$((budget - SECONDS))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        echo "== $name: not run, ${left} s of the ${budget} s budget left"
        summary+=("$name not-run")
        return 124
    fi
    echo "== $name (at most $limit s): $(echo "$*" | tr -s ' ')"
    began=$SECONDS
    # SIGINT first, so that pytest still prints what it ran and a benchmark its traceback.
    timeout --signal=INT --kill-after=20 "$limit" "$@" || status=$?
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        echo "== $name: stopped at its limit of $limit s (LIMIT_${name^^} raises it)"
    fi
    summary+=("$name exit-$status $((SECONDS - began))s")
    return "$status"
}

tests=0
bench=0
summary=()
for name in $steps; do
    case "$name" in
        tests)
            # A file that fails to import is reported, and the other files still run;
            # tests/test_cuda.py last, so that its compile test is the last test.
            files="$(ls tests/test_*.py | grep -v '^tests/test_cuda.py$' | tr '\n' ' ')"
            step tests bash -c "set -o pipefail; \"$python\" -m pytest -m gpu -q \
                -p no:cacheprovider --continue-on-collection-errors $files tests/test_cuda.py \
                2>&1 | tee -i \"$out/pytest-gpu.txt\"" || tests=$?
            ;;
        preset)
            # The issue's tables: the original as a CUDA graph against early_exit and predict,
            # eager and with graphs; one JSON per model, written row by row.
            step preset "$python" benchmarks/speed.py --preset issue --devices "$device" \
                --json-dir "$out" || { s=$?; [ "$bench" -ne 0 ] || bench=$s; }
            ;;
        sweep)
            step sweep "$python" benchmarks/speed.py --model resnet110 --n-exits 10 \
                --devices "$device" --batch-sizes 256 64 16 4 1 --methods original early_exit \
                --json "$out/speed-$device-eager.json" || { s=$?; [ "$bench" -ne 0 ] || bench=$s; }
            ;;
    esac
done

echo "== done in $SECONDS s: ${summary[*]}; results in $out/"
if [ "$tests" -ne 0 ]; then exit "$tests"; fi
exit "$bench"
