#!/usr/bin/env bash
# Build the worker image for RunPod (x86-64 GPUs): ./build.sh IMAGE [TAG] [--bake-lightning STEPS]
#   ./build.sh myuser/qwen-edit-worker 1.0.0 && docker push myuser/qwen-edit-worker:1.0.0
#   --bake-lightning 8 (or 4,8): put the Lightning LoRA for those steps into the image (850 MB
#   each), so that new workers start without downloading it; RunPod's model cache keeps only
#   the base model.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 IMAGE [TAG] [--bake-lightning STEPS]   (TAG defaults to latest)" >&2
    exit 2
fi
image="$1"
shift
tag="latest"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then
    tag="$1"
    shift
fi
bake=""
while [ $# -gt 0 ]; do
    case "$1" in
        --bake-lightning) bake="${2:?--bake-lightning needs the steps, e.g. 8 or 4,8}"; shift 2 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")"
docker build --platform linux/amd64 --build-arg "BAKE_LIGHTNING=${bake}" -t "${image}:${tag}" .
echo "built ${image}:${tag}; push it with: docker push ${image}:${tag}"
