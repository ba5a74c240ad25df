#!/usr/bin/env bash
# CI for the Python package (crates/gradflow-py, docs/python.md): build it with maturin into
# the torch virtualenv that .ci/tch.sh made, then run its pytest suite against real
# `gradflow ps` servers and `gradflow launch` jobs.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
VENV="${GRADFLOW_TCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gradflow/venv-torch-$TORCH_VERSION}"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check pytest numpy

echo "== the gradflow binary the tests start"
cargo build --workspace --bin gradflow
export GRADFLOW_BIN="$PWD/target/debug/gradflow"

echo "== pip install ./crates/gradflow-py (maturin; the dev profile, as the tests are what counts here)"
MATURIN_PEP517_ARGS="--profile dev" "$VENV/bin/pip" install --quiet --disable-pip-version-check --force-reinstall --no-deps ./crates/gradflow-py

echo "== pytest crates/gradflow-py/tests"
# The script the example job runs starts with `#!/usr/bin/env python3`: the venv's, first on PATH.
PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -q -rs crates/gradflow-py/tests
