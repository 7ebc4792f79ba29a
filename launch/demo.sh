#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded default, offline. Stages print their own progress.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/demo}

echo "== 1. synthetic data in the official CIFAR-10 / Flickr8k formats → WebDataset shards"
$PY -m data_prep synthetic --out "$DATA/raw"
$PY -m data_prep cifar10 --source "$DATA/raw/cifar-10-python.tar.gz" --no-verify --out "$DATA/cifar10" --workers 2
$PY -m data_prep flickr8k --images "$DATA/raw/Flickr8k_Dataset.zip" --captions "$DATA/raw/Flickr8k_text.zip" \
  --out "$DATA/flickr8k" --workers 2
