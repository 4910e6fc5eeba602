#!/usr/bin/env bash
# Build BloomBee's two images from the Dockerfiles, with buildah from Debian's packages.
#
#   bash scripts/images.sh build [--push REGISTRY]   both images (and push them: REGISTRY/bloombee/NAME:TAG)
#   bash scripts/images.sh push REGISTRY [NAME...]   push built images (operator, stage; default both) and
#                                                    print each as REGISTRY/bloombee/NAME@DIGEST
#   bash scripts/images.sh base                      only the Python base image (see below)
#   bash scripts/images.sh names                     the image names, one a line
#
# The Dockerfiles build on python:3.11-slim. Where no image registry is reachable (as on the
# machines this project is developed on), an equivalent base is made from Debian's packages with
# mmdebstrap (Debian 12: Python 3.11, pip) and imported once; set BLOOMBEE_IMAGE_BASE to use
# another. torch comes from the CPU wheel index by default, or from PyPI when that index cannot be
# reached (BLOOMBEE_TORCH_INDEX overrides). Layers are cached in the container storage
# (/var/lib/containers, outside the repository): after a change to Python code only the last
# layers are rebuilt. Tools missing here are installed with apt-get.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too
cd "$(dirname "$0")/.."
TAG=${BLOOMBEE_IMAGE_TAG:-0.1.0}
PREFIX=localhost/bloombee
CACHE=${BLOOMBEE_CACHE:-$HOME/.cache/bloombee}/images  # the cache root cluster.sh and the stages use
DEBIAN_BASE=$PREFIX/python-base:3.11-bookworm
log() { echo "[images $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Containers may not raise a limit above the host's hard one here (no CAP_SYS_RESOURCE), and runc
# fails at the hard process limit itself: both are set below it for every build step and run.
ulimits() {
    local files processes
    files=$(ulimit -Hn); [[ $files == unlimited || $files -gt 65536 ]] && files=65536
    processes=$(ulimit -Hu); [[ $processes == unlimited || $processes -gt 65536 ]] && processes=65536
    echo "--ulimit nofile=$files:$files --ulimit nproc=$((processes / 2)):$((processes / 2))"
}

need_tools() {
    local missing=()
    # docker-registry: the CNCF distribution registry, where the tests push and nodes pull from
    for tool in buildah podman mmdebstrap docker-registry; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    ((${#missing[@]} == 0)) && return
    log "installing ${missing[*]} from Debian's packages"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman mmdebstrap runc docker-registry >/dev/null
}

# The Python base: BLOOMBEE_IMAGE_BASE, else python:3.11-slim if a registry serves it, else Debian's.
base_image() {
    if [[ -n ${BLOOMBEE_IMAGE_BASE:-} ]]; then echo "$BLOOMBEE_IMAGE_BASE"; return; fi
    if podman image exists docker.io/library/python:3.11-slim \
        || timeout 60 podman pull -q docker.io/library/python:3.11-slim >/dev/null 2>&1; then
        echo docker.io/library/python:3.11-slim; return
    fi
    if ! podman image exists "$DEBIAN_BASE"; then
        mkdir -p "$CACHE"
        if [[ ! -s $CACHE/debian-python.tar ]]; then
            log "no registry serves python:3.11-slim: making a Debian 12 root filesystem with Python 3.11 (mmdebstrap)"
            mmdebstrap --quiet --variant=apt --include=python3,python3-pip,python-is-python3,ca-certificates,passwd \
                bookworm "$CACHE/debian-python.part.tar" >&2
            mv "$CACHE/debian-python.part.tar" "$CACHE/debian-python.tar"
        fi
        # Debian marks its Python as externally managed; in an image pip owns it, as in python:3.11-slim.
        podman import --quiet --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' --change 'CMD ["python3"]' \
            "$CACHE/debian-python.tar" "$DEBIAN_BASE" >/dev/null
        log "base $DEBIAN_BASE imported"
    fi
    echo "$DEBIAN_BASE"
}

torch_index() {
    if [[ -n ${BLOOMBEE_TORCH_INDEX:-} ]]; then echo "$BLOOMBEE_TORCH_INDEX"; return; fi
    local cpu=https://download.pytorch.org/whl/cpu
    if curl -sf --max-time 10 -o /dev/null "$cpu/torch/"; then echo "$cpu"; else echo https://pypi.org/simple; fi
}

build_one() { # name dockerfile base [build args...]
    local name=$1 dockerfile=$2 base=$3 started
    shift 3
    started=$(date +%s)
    log "building $PREFIX/$name:$TAG from $dockerfile on $base"
    # --format docker keeps HEALTHCHECK; the host's CA bundle is lent to the build's steps (pip
    # reaches the package index through it here) and stays out of the image.
    # shellcheck disable=SC2046
    buildah bud --quiet --layers --pull=never --format docker --network host $(ulimits) \
        --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
        --build-arg "BASE=$base" "$@" -f "$dockerfile" -t "$PREFIX/$name:$TAG" . >&2
    log "$PREFIX/$name:$TAG built in $(($(date +%s) - started)) s, $(podman image inspect --format '{{.Size}}' \
        "$PREFIX/$name:$TAG" | awk '{printf "%.0f MB", $1 / 1e6}')"
}

push() { # registry [name...]
    local registry=$1 name digest started
    shift
    (($#)) || set -- operator stage
    for name in "$@"; do
        [[ $name == operator || $name == stage ]] || die "no image $name (operator, stage)"
        started=$(date +%s)
        # A registry on this machine or in a test speaks plain HTTP; a remote one is named with its TLS.
        podman push --quiet --tls-verify=false --digestfile "$CACHE/$name.digest" "$PREFIX/$name:$TAG" \
            "docker://$registry/bloombee/$name:$TAG"
        digest=$(cat "$CACHE/$name.digest")
        log "pushed $registry/bloombee/$name:$TAG ($digest) in $(($(date +%s) - started)) s"
        echo "$registry/bloombee/$name@$digest"
    done
}

cmd=${1:-}
shift || true
case $cmd in
    build)
        registry=""
        while (($#)); do
            case $1 in
                --push) registry=${2:?--push needs REGISTRY (host:port)}; shift 2 ;;
                *) die "unknown option $1 (see the top of $0)" ;;
            esac
        done
        need_tools
        mkdir -p "$CACHE"
        started=$(date +%s)
        base=$(base_image)
        index=$(torch_index)
        log "torch from $index"
        build_one operator Dockerfile.operator "$base"
        build_one stage Dockerfile.stage "$base" --build-arg "TORCH_INDEX=$index"
        log "both images built in $(($(date +%s) - started)) s"
        # Earlier builds of the tags (untagged now) go; the layers the new ones were built from stay
        # as the cache. Without this, every Python change left 6 GB behind on a shared disk.
        podman image prune -f >/dev/null
        if [[ -n $registry ]]; then push "$registry"; fi
        ;;
    push) [[ -n ${1:-} ]] || die "push needs REGISTRY (host:port)"; mkdir -p "$CACHE"; push "$@" ;;
    base) need_tools; base_image ;;
    names) echo "$PREFIX/operator:$TAG"; echo "$PREFIX/stage:$TAG" ;;
    *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; [[ $cmd == -h || $cmd == --help ]] || exit 2 ;;
esac
