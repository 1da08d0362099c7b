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

# score_test NAME SRC TGT: average NAME's last checkpoints, translate test_2016_flickr.SRC, score it
# against .TGT (BLEU tokenized for TGT), append one line to results.jsonl.
score_test() {
  local name=$1 src=$2 tgt=$3 run=$OUT/$1
  local hyp=$run/test.$src-$tgt.hyp
  [ -f "$hyp.json" ] && return 0
  [ -f "$run/checkpoints/averaged.pt" ] || mtkit average "$run" --last 5
  gzip -dc "$DATA/test_2016_flickr.$src.gz" > "$run/test.$src"
  gzip -dc "$DATA/test_2016_flickr.$tgt.gz" > "$run/test.$tgt"
  mtkit translate -m "$run" --input "$run/test.$src" --output "$hyp"
  mtkit evaluate --ref "$run/test.$tgt" --hyp "$hyp" -l "$tgt" --json > "$hyp.json.tmp"
  mv "$hyp.json.tmp" "$hyp.json"
  "$PYTHON" - "$name" "$src-$tgt" "$hyp.json" "$run" >> "$OUT/results.jsonl" <<'EOF'
import json, sys
name, direction, path, run = sys.argv[1:]
r = json.load(open(path))
records = [json.loads(line) for line in open(f"{run}/log.jsonl")]
print(json.dumps({"model": name, "direction": direction, "bleu": round(r["bleu"], 2),
                  "chrf": round(r["chrf"], 2), "steps": max(x["step"] for x in records),
                  "train_seconds": max(x.get("elapsed", 0) for x in records),
                  "signature": r["signature"]["bleu"]}))
EOF
  say "$name $src-$tgt: $(tail -1 "$OUT/results.jsonl")"
}

trained() { [ -f "$OUT/$1/checkpoints/step_$(printf %08d "$STEPS").pt" ]; }

# bilingual SRC TGT: the quickstart recipe for one direction, its own vocabulary.
bilingual() {
  local src=$1 tgt=$2 name=$1_$2
  local pair=(--set "data.src_lang=$src" --set "data.tgt_lang=$tgt" --set "data.prepared_dir=prepared/workflows/$name")
  if ! trained "$name"; then
    mtkit prepare configs/quickstart_cpu.yaml "${BASE[@]}" "${pair[@]}" --force
    mtkit train configs/quickstart_cpu.yaml "${BASE[@]}" "${pair[@]}" --set "train.run_dir=$OUT/$name" --force
  fi
  score_test "$name" "$src" "$tgt"
}

part_bilingual() {
  bilingual de en
  bilingual fr en
  bilingual cs en
  bilingual en de
}

part_multilingual() {
  local config=configs/multi30k_many_en_cpu.yaml
  local where=(--set "data.prepared_dir=prepared/workflows/many_en" --set "train.run_dir=$OUT/many_en")
  if ! trained many_en; then
    mtkit prepare "$config" "${BASE[@]}" "${where[@]}" --force
    mtkit train "$config" "${BASE[@]}" "${where[@]}" --force
  fi
  for src in de fr cs; do score_test many_en "$src" en; done
}

part_finetune() {
  bilingual de en  # the model fine-tuning starts from (its average)
  bilingual fr en  # the baseline: fr->en from scratch
  local pair=(--set data.src_lang=fr --set "tokenizer.from_model=$OUT/de_en"
              --set "data.prepared_dir=prepared/workflows/fr_en_from_de_en")
  if ! trained fr_en_from_de_en; then
    mtkit prepare configs/quickstart_cpu.yaml "${BASE[@]}" "${pair[@]}" --force
    mtkit train configs/quickstart_cpu.yaml "${BASE[@]}" "${pair[@]}" --init-from "$OUT/de_en" \
      --set "train.run_dir=$OUT/fr_en_from_de_en" --force
  fi
  score_test fr_en_from_de_en fr en
}

part_backtranslate() {
  bilingual de en  # the baseline
  bilingual en de  # the model that back-translates
  local bt=$OUT/bt
  mkdir -p "$bt"
  if [ ! -f "$bt/train.de" ]; then  # sampled, not beam: the back-translations that help most
    mtkit translate -m "$OUT/en_de" --input "$DATA/train.en.gz" --output "$bt/train.de" --sample --seed 1
    gzip -dc "$DATA/train.en.gz" > "$bt/train.en"
  fi
  local where=(--set "data.prepared_dir=prepared/workflows/de_en_bt" --set "train.run_dir=$OUT/de_en_bt")
  if ! trained de_en_bt; then
    mtkit prepare configs/multi30k_de_en_bt_cpu.yaml "${BASE[@]}" "${where[@]}" --force
    mtkit train configs/multi30k_de_en_bt_cpu.yaml "${BASE[@]}" "${where[@]}" --force
  fi
  score_test de_en_bt de en
}

table() {
  "$PYTHON" - "$OUT/results.jsonl" <<'EOF'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["model"], r["direction"])] = r
print(f"{'model':<18} {'direction':<9} {'steps':>5} {'BLEU':>6} {'chrF':>6}")
for (model, direction), r in sorted(rows.items()):
    print(f"{model:<18} {direction:<9} {r['steps']:>5} {r['bleu']:>6.2f} {r['chrf']:>6.2f}")
EOF
}

case "${1:-all}" in
  bilingual) part_bilingual ;;
  multilingual) part_multilingual ;;
  finetune) part_finetune ;;
  backtranslate) part_backtranslate ;;
  all) part_bilingual; part_multilingual; part_finetune; part_backtranslate ;;
  *) say "unknown part '$1' (bilingual, multilingual, finetune, backtranslate, all)"; exit 2 ;;
esac
table
