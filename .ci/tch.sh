#!/usr/bin/env bash
# CI for the worker library's `tch` feature (training tch/libtorch models; docs/tch.md).
#
# libtorch comes from PyPI's torch wheel (tch 0.26 wants libtorch 2.13), installed once into
# a virtualenv outside the clone, so later runs on the same machine reuse it:
# $GRADFLOW_TCH_VENV, default ~/.cache/gradflow/venv-torch-2.13.0. Then the feature's tests run,
# which also build and run examples/tch_mlp.rs. The wheel bundles CUDA libraries; without a
# GPU the CUDA tests say that they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
VENV="${GRADFLOW_TCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/gradflow/venv-torch-$TORCH_VERSION}"

echo "== libtorch (torch==$TORCH_VERSION from PyPI) in $VENV"
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi
TORCH_LIB="$("$VENV/bin/python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"

# torch-sys finds libtorch by asking the venv's python3 (first on PATH) where torch lives.
export LIBTORCH_USE_PYTORCH=1
export PATH="$VENV/bin:$PATH"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "== tests of the tch feature"
cargo test -p gradflow-worker --features tch

echo "== CUDA (runs where libtorch sees a GPU, else says why it is skipped)"
cargo test -p gradflow-worker --features tch --test tch_training on_cuda -- --nocapture
