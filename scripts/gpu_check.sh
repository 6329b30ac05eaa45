#!/usr/bin/env bash
# The short GPU check for a lent CUDA node (the `device` tool): GPU correctness tests, then the CUDA
# benchmark cases, results copied to $OUT. Its image has torch, triton, transformers and peft; pytest and
# friends come from wheels carried in .whl/ (fill it here with
# `pip download -d .whl pytest pytest-timeout pytest-benchmark py-cpuinfo iniconfig pluggy packaging
#  scikit-build-core pathspec`). Nothing is downloaded on the node.
#   run: bash scripts/gpu_check.sh        (carry: [".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/fasteto-gpu}
mkdir -p "$out"
python=${PYTHON:-python3}
nvidia-smi -L | tee "$out/device.txt"
if [ -d .whl ]; then "$python" -m pip install -q --no-index --find-links .whl pytest pytest-timeout \
  pytest-benchmark scikit-build-core; fi
# the package without its dependencies (the image has them); the native CPU op is built against this torch
"$python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
git rev-parse HEAD > "$out/git_sha.txt" 2>/dev/null || true
"$python" -m pytest -q -m gpu tests/ops tests/models -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
"$python" -m pytest -q -s bench/test_bench_logprob.py bench/test_bench_packing.py -k cuda \
  -p no:cacheprovider 2>&1 | tee "$out/bench.txt"
cp -r bench/results "$out/results"
exit "$tests_rc"
