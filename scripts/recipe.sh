#!/usr/bin/env bash
# One training recipe end to end: prepare -> train -> average -> translate -> evaluate.
#   bash scripts/recipe.sh configs/multi30k_de_en_cpu_long.yaml [--set KEY=VALUE ...]
# MTKIT_DATA, when set, is the data directory (data.dir). The config names its test split in
# data.splits.test; prepare leaves it alone for training and nothing chooses by it. The run's newest
# RECIPE_AVERAGE checkpoints are averaged (default 3, which scored highest on validation for both
# one-hour recipes, against the last checkpoint alone and the last 5); the averaged model
# translates the validation and the test split. Validation scores go to stderr and RUN/valid.json; the test split's
# `mtkit evaluate --json` result is printed last, on stdout (and kept in RUN/test.json).
# RECIPE_TEST=0 leaves the test split alone (for comparing settings, which is done on validation
# only): the validation result is printed last instead, and the config needs no test split.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ $# -ge 1 ] || { echo "usage: bash scripts/recipe.sh CONFIG [--set KEY=VALUE ...]" >&2; exit 2; }
CONFIG=$1
shift
SETS=("$@")
if [ -n "${MTKIT_DATA:-}" ]; then SETS+=(--set "data.dir=$MTKIT_DATA"); fi
AVERAGE=${RECIPE_AVERAGE:-3}
case "${RECIPE_TEST:-1}" in
  1) SPLITS=(valid test) ;;
  0) SPLITS=(valid) ;;
  *) echo "recipe: error: RECIPE_TEST must be 0 or 1, not '${RECIPE_TEST}'" >&2; exit 2 ;;
esac
start=$(date +%s)
mtkit() { "$PYTHON" -m mtkit "$@"; }

# The run directory and the split files, as the config (with the --set overrides) names them.
paths=$(RECIPE_SPLITS="${SPLITS[*]}" "$PYTHON" - "$CONFIG" "${SETS[@]}" <<'EOF'
import os
import sys
from pathlib import Path

from mtkit.config import load_config
from mtkit.errors import UserError

args = sys.argv[2:]
overrides = [args[i + 1] for i in range(0, len(args) - 1, 2) if args[i] == "--set"]
try:
    cfg = load_config(sys.argv[1], overrides)
    d = cfg.data
    splits = os.environ["RECIPE_SPLITS"].split()
    for split in splits:
        if split not in d.splits:
            raise UserError(f"{sys.argv[1]}: data.splits.{split} is needed by scripts/recipe.sh")
    files = [Path(d.dir) / d.splits[split].format(lang=lang) for split in splits
             for lang in (d.src_lang, d.tgt_lang)]
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: not found (set MTKIT_DATA to the data directory, or --set data.dir=...)")
except UserError as exc:
    sys.exit(f"recipe: error: {exc}")
print(cfg.train.run_dir, *files, sep="\n")
EOF
)
mapfile -t lines <<< "$paths"
RUN=${lines[0]} VALID_SRC=${lines[1]} VALID_REF=${lines[2]} TEST_SRC=${lines[3]:-} TEST_REF=${lines[4]:-}

echo "recipe: $CONFIG -> $RUN; CPU $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //')," \
     "$(nproc) cores, flags: $(grep -o 'avx512_bf16\|amx_bf16\|avx512f\|avx2' /proc/cpuinfo 2>/dev/null | sort -u | tr '\n' ' ')" >&2
mtkit prepare "$CONFIG" "${SETS[@]}" --force
mtkit train "$CONFIG" "${SETS[@]}" --force
trained=$(date +%s)
mtkit average "$RUN" --last "$AVERAGE"
text() { case "$1" in *.gz) gzip -dc "$1" ;; *) cat "$1" ;; esac; }
for split in "${SPLITS[@]}"; do
  if [ "$split" = valid ]; then src=$VALID_SRC ref=$VALID_REF; else src=$TEST_SRC ref=$TEST_REF; fi
  text "$src" > "$RUN/$split.src"
  text "$ref" > "$RUN/$split.ref"
  mtkit translate -m "$RUN" --input "$RUN/$split.src" --output "$RUN/$split.hyp"
  mtkit evaluate --ref "$RUN/$split.ref" --hyp "$RUN/$split.hyp" --json > "$RUN/$split.json"
done
echo "recipe: validation: $(cat "$RUN/valid.json")" >&2
last=${SPLITS[-1]}
echo "recipe: prepare + train $(( trained - start )) s, all $(( $(date +%s) - start )) s; $last result in $RUN/$last.json" >&2
cat "$RUN/$last.json"
