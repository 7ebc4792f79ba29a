#!/usr/bin/env bash
# The Python packages `python -m bench.gpu` needs that a bare GPU machine of the device tool lacks
# (nvidia-h200: Python 3.12 with torch, tensorboard, safetensors, pillow, pyyaml, huggingface_hub, …
# preinstalled, and no network; its transformers is older than the pin, so the pinned one travels),
# fetched here into .whl/ (git-ignored) to travel with the tree:
#
#   bash bench/gpu_wheels.sh
#   device run, carry [".whl"], command:
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
#       && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 -m bench.gpu --budget 390 --out "$OUT" --logs "$OUT/logs.tar.gz"
#
# then copy the results file it names into bench/results/ and commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0 importlib_metadata==10.2.0 \
  transformers==5.24.0 \
  hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# DeepSpeed publishes only a source archive: its wheel (pure Python, ops compiled on first use) is built here.
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.7
du -sh .whl && ls .whl
