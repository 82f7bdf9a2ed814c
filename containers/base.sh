#!/usr/bin/env bash
# A Debian 12 base image with Python 3.11, made without any image registry: debootstrap a minimal root file system
# and `docker import` it. Use it where nothing can be pulled (build the images with --build-arg BASE=<this tag>);
# elsewhere the Dockerfiles' default base (python:3.11-slim-bookworm from Docker Hub) does the same job.
#   containers/base.sh [tag]          (root; needs debootstrap and a running Docker engine)
set -euo pipefail
tag=${1:-kalmanrl/debian-python:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag exists"; exit 0
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' - "$tag"
