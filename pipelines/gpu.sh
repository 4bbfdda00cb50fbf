#!/usr/bin/env bash
# ZeroSearch on one GPU: real-search logs -> simulator SFT -> simulator behind `vllm serve` ->
# RL of a Qwen2.5-3B-Instruct policy with TRL + vLLM (colocated) -> evaluation with BM25.
# Hardware: one 80 GB GPU (A100/H100). The paper's setting (64 prompts x 5 rollouts, lr 1e-6,
# KL 0.001, top-5 documents, ~200 steps) is in configs/gpu_rl.yaml. Models come from the hub.
# Time: not measured by this project on a GPU; expect hours for 200 steps.
#   bash pipelines/gpu.sh             # run it
#   DRY_RUN=1 bash pipelines/gpu.sh   # print every command and check its config, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/gpu}
CFG=pipelines/configs
SIM_PORT=${SIM_PORT:-8001}

z() { if [ -n "${DRY_RUN:-}" ]; then zsctl --dry-run "$@"; else zsctl "$@"; fi; }

z index data/corpus/wiki_sample.jsonl --out "$RUN/index"
z collect --config $CFG/gpu_collect.yaml
z build-sft --trajectories "$RUN/trajectories" --out "$RUN/sim_sft" --label answer --topk 5
z train-sim --config $CFG/gpu_train_sim.yaml

# The simulator gets a quarter of the GPU; the policy's colocated vLLM and training get the rest.
serve=(vllm serve "$RUN/simulator" --port "$SIM_PORT" --gpu-memory-utilization 0.25 --max-model-len 4096)
if [ -n "${DRY_RUN:-}" ]; then
  echo "dry-run: ${serve[*]} &"
else
  "${serve[@]}" > "$RUN/vllm_sim.log" 2>&1 &
  SIM_PID=$!
  trap 'kill $SIM_PID 2>/dev/null || true' EXIT
  until curl -sf "http://127.0.0.1:$SIM_PORT/v1/models" > /dev/null; do sleep 5; done
fi
z check-sim --search "sim+http://127.0.0.1:$SIM_PORT/v1" --questions hotpotqa --limit 200 --out "$RUN/check_sim" --vs "bm25:$RUN/index"
z rl --config $CFG/gpu_rl.yaml
z eval --config $CFG/gpu_eval.yaml
z report "$RUN"
