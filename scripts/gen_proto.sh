#!/usr/bin/env bash
# Regenerates the checked-in Python code for protos/ into the given directory
# (default: the repository root, so files land in keysvc/v1/).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
py=${PYTHON:-$root/.venv/bin/python}
bindir=$(dirname "$py")
mkdir -p "$out/keysvc/v1"
# protoc-gen-mypy and protoc-gen-mypy_grpc live next to the interpreter.
PATH="$bindir:$PATH" "$py" -m grpc_tools.protoc -I"$root/protos" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  "$root"/protos/keysvc/v1/*.proto
touch "$out/keysvc/v1/__init__.py"
