#!/usr/bin/env bash
# Downloads into ./.whl of this checkout, where there is internet, the wheels that an offline GPU
# machine lacks; bench/run_gpu_all.sh installs them from there (`--no-index --no-deps`). Default:
# tensordict 0.15.3 (pure Python, for torch >= 2.11) and pytest-xdist (run_gpu_all.sh runs the
# tests with -n 8). With --torchrl: torchrl 0.14.1 and the tensordict 0.14.3 it pins instead, for
# the parity tests against torchrl. The wheels are for CPython $PYTHON_VERSION (default 3.12) on
# x86-64 Linux: set it to the GPU machine's Python.
#
#   bash bench/wheels.sh [--torchrl]
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${PYTHON_VERSION:-3.12}
pkgs=("pytest-xdist==3.8.0" "execnet==2.1.2" "pyvers==0.2.3")
if [[ ${1:-} == --torchrl ]]; then
  pkgs+=("tensordict==0.14.3" "torchrl==0.14.1" "hoptorch==0.1.4" orjson importlib_metadata)
elif [[ -n ${1:-} ]]; then
  echo "usage: bash bench/wheels.sh [--torchrl]" >&2
  exit 2
else
  pkgs+=("tensordict==0.15.3")
fi
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
  --implementation cp "${platforms[@]}" -d .whl "${pkgs[@]}"
ls .whl
