#!/usr/bin/env bash
# Quickstart: Multi30k German->English, raw text to sacreBLEU, on any CPU in at most 15 minutes.
#   MTKIT_DATA=/path/to/multi30k bash scripts/quickstart.sh
# Installs what is missing (an existing torch is kept), then prepare -> train -> average ->
# translate -> evaluate with configs/quickstart_cpu.yaml into runs/quickstart/, and prints the
# `mtkit evaluate --json` result for test_2016_flickr on stdout.
#
# The whole script keeps to a budget (MTKIT_BUDGET seconds, default 840 = 14 minutes): training
# gets what installing and preparing left of it, less a reserve for translating and scoring, so a
# slow CPU trains fewer steps instead of running for hours, and a fast one trains more.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET=${MTKIT_BUDGET:-840}
RESERVE=60  # seconds kept for averaging, translating the test set and scoring
start=$(date +%s)

# 1. Install: keep an existing torch (users bring their CUDA build); else the CPU build from
#    PyTorch's CPU index (a bare `pip install torch` on Linux pulls several GB of CUDA wheels).
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install -q "torch==${MTKIT_TORCH_VERSION:-2.13.0}" --index-url https://download.pytorch.org/whl/cpu >&2
fi
# mtkit itself: installed from this checkout (not from another copy that happens to be importable).
if ! "$PYTHON" -c "
import sys, pathlib, mtkit, sentencepiece, sacrebleu, typer, datasets
sys.exit(pathlib.Path(mtkit.__file__).resolve().parents[1] != pathlib.Path('src').resolve())" 2>/dev/null; then
  "$PYTHON" -m pip install -q -e . >&2
fi
mtkit() { "$PYTHON" -m mtkit "$@"; }
mtkit --version | sed 's/^/quickstart: /' >&2
echo "quickstart: CPU $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //'), flags:" \
     "$(grep -o 'avx512_bf16\|amx_bf16\|avx512f\|avx2' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ')" >&2

# 2. Data: $MTKIT_DATA (a directory of Multi30k's {train,val,test_2016_flickr}.{de,en}.gz), else datasets.
DATA_DIR=${MTKIT_DATA:-}
if [ -z "$DATA_DIR" ]; then
  DATA_DIR=runs/quickstart-data
  "$PYTHON" scripts/fetch_multi30k.py "$DATA_DIR" >&2
fi
for f in train.de.gz train.en.gz val.de.gz val.en.gz test_2016_flickr.de.gz test_2016_flickr.en.gz; do
  [ -f "$DATA_DIR/$f" ] || { echo "quickstart: $DATA_DIR/$f not found (set MTKIT_DATA to the Multi30k directory)" >&2; exit 2; }
done

CONFIG=configs/quickstart_cpu.yaml
RUN=runs/quickstart
mkdir -p "$RUN"
mtkit prepare "$CONFIG" --set "data.dir=$DATA_DIR" --force
left=$(( BUDGET - ($(date +%s) - start) - RESERVE ))
if [ "$left" -lt 60 ]; then
  echo "quickstart: only ${left}s of the ${BUDGET}s budget left for training; raise MTKIT_BUDGET" >&2
  exit 2
fi
echo "quickstart: training for at most ${left}s (budget ${BUDGET}s)" >&2
mtkit train "$CONFIG" --set "data.dir=$DATA_DIR" --set "train.max_time=$left" --force
mtkit average "$RUN" --last 5
gzip -dc "$DATA_DIR/test_2016_flickr.de.gz" > "$RUN/test_2016_flickr.de"
gzip -dc "$DATA_DIR/test_2016_flickr.en.gz" > "$RUN/test_2016_flickr.en"
mtkit translate -m "$RUN" --input "$RUN/test_2016_flickr.de" --output "$RUN/test_2016_flickr.hyp.en"
mtkit evaluate --ref "$RUN/test_2016_flickr.en" --hyp "$RUN/test_2016_flickr.hyp.en" --json | tee "$RUN/test_2016_flickr.json"
echo "quickstart: finished in $(( $(date +%s) - start )) s; translations in $RUN/test_2016_flickr.hyp.en" >&2
