#!/usr/bin/env bash
# The Python packages `python -m bench.gpu` needs that a bare GPU machine of the device tool lacks
# (nvidia-h200: Python 3.12 with torch, torchvision, tensorboard, safetensors, pillow, pyyaml,
# huggingface_hub, … preinstalled, and no network; its transformers is older than the pin, so the
# pinned one travels), fetched here to travel with the tree: .whl/ for the harness, .whl-peer/ for
# open_clip 3.3.0 and what its trainer imports (its own webdataset 0.2.86, installed apart so that it
# shadows ours in open_clip's runs only; bench/gpu/clip.py OPENCLIP lists them). Both git-ignored.
#
#   bash bench/gpu_wheels.sh
#   device run, carry [".whl", ".whl-peer"], command:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#       && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/peer .whl-peer/*.whl \
#       && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 -m bench.gpu --budget 420 --openclip-site /tmp/peer \
#            --out "$OUT" --logs "$OUT/logs.tar.gz"
#
# then copy the results file it names into bench/results/ and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64)
rm -rf .whl .whl-peer && mkdir .whl .whl-peer
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .whl \
  diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0 importlib_metadata==10.2.0 \
  transformers==5.24.0 \
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# DeepSpeed publishes only a source archive: its wheel (pure Python, ops compiled on first use) is built here.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.7
mapfile -t PEER < <("$PYTHON" -c "from bench.gpu.clip import OPENCLIP; print('\n'.join(OPENCLIP))")
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .whl-peer "${PEER[@]}"
du -sh .whl .whl-peer && ls .whl .whl-peer
