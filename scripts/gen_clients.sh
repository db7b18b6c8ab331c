#!/usr/bin/env bash
# Regenerates the checked-in Go and TypeScript code for protos/ under the given directory
# (default: the repository root, so files land in clients/go/keysvcv1 and clients/node/src/gen).
# Uses the pinned protoc of grpcio-tools, the Go plugins from .tools/bin (tools/go.mod) and
# ts-proto from clients/node/node_modules (clients/node/package-lock.json): `make tools`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
py=${PYTHON:-$root/.venv/bin/python}
protos=("$root"/protos/keysvc/v1/*.proto)

mkdir -p "$out/clients/go" "$out/clients/node/src/gen"
rm -rf "$out/clients/go/keysvcv1" "$out/clients/node/src/gen"/*
PATH="$root/.tools/bin:$PATH" "$py" -m grpc_tools.protoc -I"$root/protos" \
  --go_out="$out/clients/go" --go_opt=module=keysvc/clients/go \
  --go-grpc_out="$out/clients/go" --go-grpc_opt=module=keysvc/clients/go \
  "${protos[@]}"

# int64 fields become numbers (every keysvc count fits in 2^53); Timestamps become Dates.
"$py" -m grpc_tools.protoc -I"$root/protos" \
  --plugin=protoc-gen-ts_proto="$root/clients/node/node_modules/.bin/protoc-gen-ts_proto" \
  --ts_proto_out="$out/clients/node/src/gen" \
  --ts_proto_opt=outputServices=grpc-js,env=node,esModuleInterop=true,forceLong=number,useDate=true,useExactTypes=false \
  "${protos[@]}"
