#!/usr/bin/env bash
# GPU acceptance run: fp8 tensorwise/rowwise vs bf16 tokens/s (torchdist's composed step vs a
# hand-written torchao loop), compile on and off, peak memory, bf16 loss parity. One table;
# under 8 minutes on one NVIDIA GPU (a 420 s budget skips, and names, each row that would end
# past it). Exit status 1 when parity fails, nothing was measured, or a row raised.
#
#   bash benchmarks/gpu/run.sh                 # one GPU, ~1 B parameter Llama-style model
#   bash benchmarks/gpu/run.sh --cpu           # smoke: same code paths, tiny model, seconds
#   bash benchmarks/gpu/run.sh --recipes bf16,rowwise --compile on --layers 8
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# The checkout's torchdist, also where it is not pip-installed (a bare GPU machine with torch and
# torchao): a script's own folder, not the working directory, is what Python puts on its path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu/acceptance.py "$@"
