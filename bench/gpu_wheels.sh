#!/usr/bin/env bash
# Wheels the GPU machine lacks for bench/gpu.py (it reaches no package index; its image has
# Python 3.12, torch, torchvision, transformers, onnx, onnxruntime (CPU), pytest, httpx, timm...:
# see /work/.library/device/KINDS.md). Run here, in the repo root; then carry .whl (see the
# docstring of bench/gpu.py for the command). Versions: the ones this project's venv runs.
# onnxruntime-gpu is not here: its 255 MB wheel is over the 64 MiB a device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
rm -rf .whl && mkdir -p .whl
PKGS=(
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth
  pydantic==2.14.4 pydantic-core annotated-types typing-inspection
  pydantic-settings==2.16.3 python-dotenv
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api importlib-metadata
  uvicorn==0.55.0 python-multipart==0.0.34
  redis==8.1.0 rq==3.0.0 croniter
  pyzmq==27.3.0 msgspec==0.23.0
)
# py-spy samples the engine process during the served phases (bench/gpu_hooks.EngineProfile);
# its wheel is tagged py2.py3-none-manylinux1, which the cp312 download above would not match
TOOLS=(py-spy==0.4.3)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${PKGS[@]}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "${TOOLS[@]}"
du -sh .whl
ls .whl
