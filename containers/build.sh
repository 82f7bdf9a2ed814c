#!/usr/bin/env bash
# Build an image where no image registry can be reached (the machines this project is developed and tested on):
# the base from debootstrap (containers/base.sh), and for the CPU image the CPU torch that locks/cpu.txt pins handed
# in as a wheel, fetched by the host's pip from wherever the host finds it (PyTorch's index, or a local wheel store),
# and the CA bundle the host's pip trusts (for a host behind a TLS-inspecting proxy), in containers/handed-in/.
#   containers/build.sh cpu|gpu [tag]          (root; needs debootstrap and a running Docker engine)
# With registries, `docker build -f containers/<flavour>.Dockerfile -t <tag> .` alone does the same.
set -euo pipefail
cd "$(dirname "$0")/.."
flavour=${1:-cpu}
tag=${2:-kalmanrl-$flavour:0.1.0}
base=kalmanrl/debian-python:bookworm
containers/base.sh "$base"
args=(--build-arg "BASE=$base")
cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  cp "$cert" containers/handed-in/ca.crt
fi
if [ "$flavour" = cpu ]; then
  torch=$(grep -oE '^torch==[^ ]+' locks/cpu.txt)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 --dest containers/handed-in "$torch"
  args+=(--build-arg TORCH_INDEX=)
fi
docker build -f "containers/$flavour.Dockerfile" -t "$tag" "${args[@]}" .
