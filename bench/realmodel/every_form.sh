#!/usr/bin/env bash
# Every ALIGN_LOSS form, ALPHA=0, STAGE=ptune, STAGE=all (embedding mode) and PREFERENCE_POSITION=user on the real
# model (POLICY_MODEL_PATH=smollm2), 2 steps each on 16 of its training pairs and 8 held-out ones, through the
# launcher: a check that each path runs on a real Llama-family tokenizer and template (a 49k vocabulary, a default
# system message, tied embeddings), not a measurement. Prints one line per run (exit status, seconds, tracebacks in
# its log); the logs stay in the work folder. About 9 minutes on 2 CPU cores once the smollm2 folder is built.
#
#   bash bench/realmodel/every_form.sh [WORK_FOLDER]
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
head -16 "$repo/data/smollm2_pairs/train.jsonl" >"$work/train.jsonl"
head -8 "$repo/data/smollm2_pairs/test.jsonl" >"$work/test.jsonl"
export POLICY_MODEL_PATH=smollm2 TRAIN_DATASET_PATH="$work/train.jsonl" TEST_DATASET_PATH="$work/test.jsonl"
export PREFERENCE_TEXT="Answer in French." MAX_STEPS=2 MAX_LENGTH=128 MAX_PROMPT_LENGTH=64 EVAL_STEPS=2
export LOGGING_STEPS=1 NUM_SAMPLE_PROMPTS=1 PER_DEVICE_BATCH_SIZE=4 PTUNE_MAX_STEPS=2 CACHE_DIR="$work/cache"
export OUTPUT_DIR LOG_DIR
failed=0
run() {
  local name="$1" started=$SECONDS status
  shift
  OUTPUT_DIR="$work/out/$name" LOG_DIR="$work/logs/$name" env "$@" "$repo/fast_train.sh" >"$work/$name.log" 2>&1
  status=$?
  (( status == 0 )) || failed=1
  echo "$name: exit $status, $((SECONDS - started)) s, $(grep -c Traceback "$work/$name.log") tracebacks ($work/$name.log)"
}
run ref_distill
run ref_distill_exact DISTILL_TOP_K=0
run hinge ALIGN_LOSS=hinge
run ref_hinge ALIGN_LOSS=ref_hinge
run distill ALIGN_LOSS=distill
run onpolicy_distill ALIGN_LOSS=onpolicy_distill
run context_distill ALIGN_LOSS=context_distill
run plain_dpo ALPHA=0
run ptune STAGE=ptune
run all STAGE=all
run user_position PREFERENCE_POSITION=user
exit "$failed"
