#!/usr/bin/env bash
# Build the worker image for RunPod (x86-64 GPUs): ./build.sh IMAGE [TAG]
#   ./build.sh myuser/qwen-edit-worker 1.0.0 && docker push myuser/qwen-edit-worker:1.0.0
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 IMAGE [TAG]   (TAG defaults to latest)" >&2
    exit 2
fi
image="$1"
tag="${2:-latest}"
cd "$(dirname "$0")"
docker build --platform linux/amd64 -t "${image}:${tag}" .
echo "built ${image}:${tag}; push it with: docker push ${image}:${tag}"
