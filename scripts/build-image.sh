#!/usr/bin/env bash
# Build the demo/test image (default sigma/busybox:latest) from images/busybox/Dockerfile:
# FROM scratch plus the host's static busybox, so no registry is needed.
#   usage: scripts/build-image.sh DOCKER_HOST_URL [TAG]
#   e.g.   scripts/build-image.sh unix:///var/run/docker.sock
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 DOCKER_HOST_URL [TAG]" >&2
  exit 2
fi
url=$1
tag=${2:-sigma/busybox:latest}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dockerfile=$root/images/busybox/Dockerfile
busybox=/bin/busybox

if [[ ! -x $busybox ]]; then
  echo "error: $busybox is missing: apt-get install busybox-static" >&2
  exit 1
fi
# A dynamically linked busybox cannot run in a FROM scratch image.
if command -v ldd >/dev/null 2>&1 && ldd "$busybox" >/dev/null 2>&1; then
  echo "error: $busybox is dynamically linked; install the static one: apt-get install busybox-static" >&2
  exit 1
fi
if ! command -v docker >/dev/null 2>&1; then
  echo "error: the docker client is missing: apt-get install docker.io" >&2
  exit 1
fi
[[ -f $dockerfile ]] || { echo "error: $dockerfile is missing" >&2; exit 1; }

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$dockerfile" "$context/Dockerfile"
cp "$busybox" "$context/busybox"

id=$(DOCKER_BUILDKIT=0 docker -H "$url" build -q -t "$tag" "$context")
echo "built $tag (${id#sha256:}) on $url"
