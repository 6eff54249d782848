#!/usr/bin/env bash
# Creates the side venv for NVIDIA kvpress (design §5): kvpress 0.5.5 pins transformers<5.3, our main venv has
# transformers 5.2x, so the presses run from `.venv-kvpress` through examples/kvpress_memories.py.
#
#   bash examples/setup_kvpress.sh            # makes <repo>/.venv-kvpress (kept if it already works)
#   FORCE=1 bash examples/setup_kvpress.sh    # rebuild from scratch
#   VENV=/elsewhere PYTHON=python3.11 TORCH_SPEC=torch==2.13.0 bash examples/setup_kvpress.sh
#
# torch is installed FIRST and pinned again with kvpress, so pip never swaps in another (e.g. a multi-GB CUDA) build.
# On a CPU-only machine torch==2.13.0 comes from the local CPU wheel; with a GPU set TORCH_SPEC to your CUDA build.
# Known to work (CPU, Python 3.11): torch 2.13.0+cpu, kvpress 0.5.5, transformers 5.2.0, tokenizers 0.22.2.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-kvpress}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PINS=(
  "kvpress==0.5.5"
  "transformers==5.2.0"
  "tokenizers==0.22.2"
  "safetensors==0.8.0"
  "accelerate==1.15.0"
  "peft==0.21.2"
  "huggingface_hub==1.33.0"
  "datasets==5.2.0"
  "numpy==2.4.6"
)

check() {
  "$VENV/bin/python" - <<'EOF'
import importlib.metadata as m
import kvpress, torch, transformers  # noqa: F401
print("kvpress", m.version("kvpress"), "| transformers", transformers.__version__, "| torch", torch.__version__)
EOF
}

if [[ -z "${FORCE:-}" && -x "$VENV/bin/python" ]] && check 2>/dev/null; then
  echo "kvpress side venv already works: $VENV"
  exit 0
fi

start=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet $TORCH_SPEC  # unquoted: a torch and torchvision pair is two words
"$VENV/bin/python" -m pip install --quiet $TORCH_SPEC "${PINS[@]}"
check
echo "made $VENV in $(( $(date +%s) - start ))s"
