#!/usr/bin/env bash
# The GPU path, checked in one go on a machine with one NVIDIA GPU (bf16: Ampere or newer), from a clean
# checkout, in under 8 minutes when the packages are installed already:
#   bash bench/gpu_check.sh
# 1. tests/test_gpu.py: bf16 end to end through fast_train.sh with DeepSpeed ZeRO-2 and ZeRO-3 on one GPU,
#    the shared-prompt guided view against the full one in bf16, resume after SIGTERM;
# 2. bench/step_time.py --config qwen1.5b: Qwen2.5-1.5B's shape with random weights in bf16, TRL's DPO
#    against ours (median step time, peak max_memory_allocated, tokens/s, MFU). KINDS picks the
#    configurations; each holds its own copy of the model, so the default five need about 30 GB of GPU
#    memory (on a 24 GB GPU: KINDS=AB, then KINDS=AC, ...).
# Prints one summary and writes gpu_check.json (with the step-time JSON, the test report and the log) to
# $OUT if set, else bench/results/. Exit status 0 only if every check passed; the speed and memory
# targets are reported, not enforced. Without a usable CUDA device it stops at once with status 1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
RESULTS="${OUT:-$REPO/bench/results}"
KINDS="${KINDS:-ABCDG}"                 # bench/step_time.py configurations: A TRL, B text, C embedding, D ALPHA=0, G distill
STEPS="${STEPS:-10}"                    # timed steps per configuration
INSTALL="${INSTALL:-auto}"              # auto: pip install the pinned packages if any is missing; never: fail instead
TESTS_TIMEOUT="${TESTS_TIMEOUT:-330}"   # seconds
BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"   # seconds

mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
SUMMARY="$RESULTS/gpu_check.json"
TESTS_XML="$RESULTS/gpu_tests.xml"
BENCH_JSON="$RESULTS/qwen1.5b.json"
rm -f "$SUMMARY" "$TESTS_XML" "$BENCH_JSON"
: >"$LOG"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$SECONDS

say() { echo "gpu_check.sh: $*" | tee -a "$LOG" >&2; }

# The summary: gpu_check.json and one table on stdout, from the stages' statuses and result files.
summarize() {
  "$PYTHON" - "$SUMMARY" "$TESTS_XML" "$BENCH_JSON" "$@" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET

summary_path, tests_xml, bench_json, error, elapsed, tests_rc, bench_rc, device = sys.argv[1:9]
summary = {"ok": False, "error": error or None, "seconds": int(elapsed), "device": device or None, "stages": {}}
if tests_rc:
    stage = {"returncode": int(tests_rc)}
    if os.path.exists(tests_xml):
        suite = ET.parse(tests_xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        stage.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        stage["failed"] = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None
                           or c.find("error") is not None]
    summary["stages"]["gpu_tests"] = stage
if bench_rc:
    stage = {"returncode": int(bench_rc)}
    if os.path.exists(bench_json):
        bench = json.load(open(bench_json))
        stage.update(bench)
        results = bench["results"]
        a = results.get("A")
        targets = {}
        for kind in ("B", "C"):
            if a and kind in results:
                targets[f"{kind}/A step time <= 1.25"] = results[kind]["time_ratio_to_A"] <= 1.25
                targets[f"{kind}/A peak memory <= 1.10"] = results[kind]["memory_ratio_to_A"] <= 1.10
        if a and a.get("mfu") is not None:
            targets["MFU of A (LoRA DPO step) >= 0.40"] = a["mfu"] >= 0.40
        stage["targets_met"] = targets
    summary["stages"]["step_time_qwen1.5b"] = stage
stages = summary["stages"]
summary["ok"] = not error and bool(stages) and all(
    s["returncode"] == 0 and not s.get("failures") and not s.get("errors") and not s.get("skipped")
    for s in stages.values())
with open(summary_path, "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")

lines = [f"gpu_check: {'PASSED' if summary['ok'] else 'FAILED'} in {elapsed} s on {device or 'no GPU'}"]
if error:
    lines.append(f"  error: {error}")
t = stages.get("gpu_tests")
if t:
    lines.append(f"  GPU tests: {t.get('tests', '?')} run, {t.get('failures', '?')} failed, {t.get('errors', '?')} "
                 f"errors, {t.get('skipped', '?')} skipped (exit {t['returncode']})")
    lines += [f"    FAILED {name}" for name in t.get("failed", [])]
b = stages.get("step_time_qwen1.5b")
if b:
    lines.append(f"  step time, qwen1.5b shape (exit {b['returncode']}):")
    if "results" in b:
        lines.append(f"    {'':4}{'step (s)':>10}{'peak (GiB)':>12}{'tokens/s':>10}{'MFU':>7}{'time/A':>8}{'mem/A':>7}")
        for kind, r in b["results"].items():
            mfu = f"{r['mfu']:.2f}" if r.get("mfu") is not None else "-"
            lines.append(f"    {kind:<4}{r['median_step_s']:>10.3f}{r['peak_step_memory_bytes'] / 2**30:>12.2f}"
                         f"{r['tokens_per_s']:>10.0f}{mfu:>7}{r.get('time_ratio_to_A', float('nan')):>8.2f}"
                         f"{r.get('memory_ratio_to_A', float('nan')):>7.2f}")
        for target, met in b.get("targets_met", {}).items():
            lines.append(f"    target {target}: {'met' if met else 'MISSED'}")
lines.append(f"  written: {summary_path}")
print("\n".join(lines))
EOF
}

fail() {
  say "FAILED: $*"
  summarize "$*" "$((SECONDS - started))" "" "" "" || true
  exit 1
}

# --- 1. a GPU and its driver -----------------------------------------------------------------------------
command -v nvidia-smi >/dev/null ||
  fail "no NVIDIA driver: nvidia-smi is not on PATH. This check needs a machine with an NVIDIA GPU; the CPU tests are 'python3 -m pytest'."
gpus="$(nvidia-smi -L 2>&1)" || fail "nvidia-smi cannot reach a GPU: ${gpus//$'\n'/ }"
say "GPUs: ${gpus//$'\n'/; }"

# --- 2. the pinned packages (torch 2.13.0: the CUDA build) ------------------------------------------------
pins_missing() {
  "$PYTHON" - requirements.txt requirements-dev.txt <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
wrong = []
for path in sys.argv[1:]:
    for line in open(path):
        m = re.match(r"\s*([A-Za-z0-9_.-]+)==([^\s#;]+)", line)
        if not m:
            continue
        name, pin = m.groups()
        try:
            found = version(name)
        except PackageNotFoundError:
            found = None
        if found is None or found.split("+")[0] != pin:  # 2.13.0+cu128 satisfies torch==2.13.0
            wrong.append(f"{name}=={pin} (found {found})")
print(", ".join(wrong))
EOF
}
missing="$(pins_missing)"
if [[ -n "$missing" ]]; then
  [[ "$INSTALL" == auto ]] || fail "packages differ from requirements*.txt: $missing (INSTALL=$INSTALL)"
  say "installing the pinned packages (differing: $missing)"
  # On Linux, PyPI's torch 2.13.0 wheel is a CUDA build; a CPU-only build already installed satisfies the
  # pin and stays, and the CUDA check below says so. torch goes first: DeepSpeed's setup reads it.
  torch_pin="$(grep -E '^torch==' requirements.txt)"
  { "$PYTHON" -m pip install "$torch_pin" && "$PYTHON" -m pip install -r requirements.txt -r requirements-dev.txt; } \
    2>&1 | tee -a "$LOG" || fail "pip install -r requirements.txt -r requirements-dev.txt failed (see $LOG)"
  missing="$(pins_missing)"
  [[ -z "$missing" ]] || fail "packages still differ from requirements*.txt after installing: $missing"
fi

# --- 3. CUDA as torch sees it --------------------------------------------------------------------------------
device="$("$PYTHON" - <<'EOF' 2>>"$LOG"
import sys, torch
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is a CPU-only build: CUDA is not available. Install torch 2.13.0's CUDA "
             "build (pip install torch==2.13.0 from PyPI, or the cuXXX index at download.pytorch.org/whl that "
             "matches the driver).")
if not torch.cuda.is_available():
    sys.exit(f"CUDA is not available: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable GPU "
             "(driver too old for this build, or CUDA_VISIBLE_DEVICES hides it).")
if not torch.cuda.is_bf16_supported():
    sys.exit(f"{torch.cuda.get_device_name()} has no bf16 support; this check needs an Ampere or newer GPU.")
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
)" || fail "$(tail -n 1 "$LOG")"
say "device: $device"

# --- 4. the GPU-only tests: a missing GPU fails them, never skips them ---------------------------------------
say "GPU tests (tests/test_gpu.py)"
tests_rc=0
PREFERENCE_DPO_REQUIRE_GPU=1 timeout "$TESTS_TIMEOUT" "$PYTHON" -m pytest tests/test_gpu.py -q -p no:cacheprovider \
  --junitxml="$TESTS_XML" 2>&1 | tee -a "$LOG" || tests_rc=$?

# --- 5. step time on the real shape ----------------------------------------------------------------------------
say "bench/step_time.py --config qwen1.5b --kinds $KINDS --steps $STEPS"
bench_rc=0
timeout "$BENCH_TIMEOUT" "$PYTHON" bench/step_time.py --config qwen1.5b --kinds "$KINDS" --steps "$STEPS" --warmup 2 \
  --output "$BENCH_JSON" 2>&1 | tee -a "$LOG" || bench_rc=$?

elapsed=$((SECONDS - started))
((elapsed <= 480)) || say "took ${elapsed} s, over the 8-minute budget"
summarize "" "$elapsed" "$tests_rc" "$bench_rc" "$device" | tee -a "$LOG"
"$PYTHON" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$SUMMARY"
