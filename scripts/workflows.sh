#!/usr/bin/env bash
# Multi30k workflows, each against its baseline at the same model size and number of steps:
#   MTKIT_DATA=/path/to/multi30k bash scripts/workflows.sh [bilingual|multilingual|finetune|backtranslate|all]
#
#   bilingual      de->en, fr->en, cs->en and en->de, each its own model and vocabulary (the baselines)
#   multilingual   one model {de, fr, cs}->en with one joint vocabulary (configs/multi30k_many_en_cpu.yaml)
#   finetune       fr->en initialised with --init-from the de->en model, its vocabulary reused
#   backtranslate  en->de samples of the English side, tagged <BT>, added to de->en training
#
# Every model is the quickstart's (configs/quickstart_cpu.yaml) trained for MTKIT_STEPS steps
# (default 1000) on CPU; the last 5 checkpoints are averaged and test_2016_flickr is scored with
# sacreBLEU. A step whose result exists is skipped, so the script can be stopped and run again.
# Results: runs/workflows/results.jsonl (one line per model and direction) and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA=${MTKIT_DATA:-../shared/data/multi30k}
STEPS=${MTKIT_STEPS:-1000}
OUT=runs/workflows
mkdir -p "$OUT"
mtkit() { "$PYTHON" -m mtkit "$@"; }
say() { echo "workflows: $*" >&2; }
say "CPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), flags:" \
    "$(grep -o 'avx512_bf16\|amx_bf16\|avx512f\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
BASE=(--set "data.dir=$DATA" --set "train.max_steps=$STEPS" --set train.max_time=null
      --set train.valid_every=250)

# test NAME SRC TGT [translate options...]: average NAME's checkpoints, translate test_2016_flickr.SRC,
# score against .TGT, append one line to results.jsonl.
test() {
  local name=$1 src=$2 tgt=$3 run=$OUT/$1
  shift 3
  local hyp=$run/test.$src-$tgt.hyp
  [ -f "$hyp.json" ] && return 0
  [ -f "$run/checkpoints/averaged.pt" ] || mtkit average "$run" --last 5
  gzip -dc "$DATA/test_2016_flickr.$src.gz" > "$run/test.$src"
  gzip -dc "$DATA/test_2016_flickr.$tgt.gz" > "$run/test.$tgt"
  mtkit translate -m "$run" --input "$run/test.$src" --output "$hyp" "$@"
  mtkit evaluate --ref "$run/test.$tgt" --hyp "$hyp" -l "$tgt" --json > "$hyp.json.tmp"
  mv "$hyp.json.tmp" "$hyp.json"
  "$PYTHON" - "$name" "$src-$tgt" "$hyp.json" "$run" >> "$OUT/results.jsonl" <<'EOF'
import json, sys
name, direction, path, run = sys.argv[1:]
r = json.load(open(path))
steps = [json.loads(line)["step"] for line in open(f"{run}/log.jsonl")]
print(json.dumps({"model": name, "direction": direction, "bleu": round(r["bleu"], 2),
                  "chrf": round(r["chrf"], 2), "steps": max(steps), "signature": r["signature"]["bleu"]}))
EOF
  say "$name $src-$tgt: $(cat "$hyp.json" | "$PYTHON" -c 'import json,sys; r=json.load(sys.stdin); print(f"BLEU {r[\"bleu\"]:.2f} chrF {r[\"chrf\"]:.2f}")')"
}

# bilingual SRC TGT: the quickstart recipe for one direction, its own vocabulary.
bilingual() {
  local src=$1 tgt=$2 name=$1_$2
  if [ ! -f "$OUT/$name/checkpoints/step_$(printf %08d "$STEPS").pt" ]; then
    mtkit prepare configs/quickstart_cpu.yaml "${BASE[@]}" --set "data.src_lang=$src" \
      --set "data.tgt_lang=$tgt" --set "data.prepared_dir=prepared/workflows/$name" --force
    mtkit train configs/quickstart_cpu.yaml "${BASE[@]}" --set "data.src_lang=$src" \
      --set "data.tgt_lang=$tgt" --set "data.prepared_dir=prepared/workflows/$name" \
      --set "train.run_dir=$OUT/$name" --force
  fi
  test "$name" "$src" "$tgt"
}

part_bilingual() {
  bilingual de en
  bilingual fr en
  bilingual cs en
  bilingual en de
}

case "${1:-all}" in
  bilingual) part_bilingual ;;
  all) part_bilingual ;;
  *) say "unknown part '$1' (bilingual, multilingual, finetune, backtranslate, all)"; exit 2 ;;
esac
