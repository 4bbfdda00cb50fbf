#!/usr/bin/env bash
# ZeroSearch across nodes: the simulator on its own nodes behind `vllm serve` (one per node,
# load-balanced by zsctl), the policy trained on 2 x 8-GPU nodes with accelerate + DeepSpeed ZeRO-3
# and TRL's vLLM in server mode. Run the role each node has:
#   ROLE=sim     bash pipelines/multinode.sh                      # on each simulator node
#   ROLE=vllm    bash pipelines/multinode.sh                      # policy vLLM server (trl vllm-serve)
#   ROLE=trainer RANK=0 MASTER_ADDR=host0 bash pipelines/multinode.sh   # on each trainer node
#   DRY_RUN=1 ROLE=trainer bash pipelines/multinode.sh            # print and check, run nothing
# Time: not measured by this project; hardware: 2 trainer nodes + 2 simulator nodes (8 GPUs each).
set -euo pipefail
cd "$(dirname "$0")/.."
CFG=pipelines/configs
ROLE=${ROLE:-trainer}
SIM=${SIM:-runs/gpu/simulator}
POLICY=${POLICY:-Qwen/Qwen2.5-7B-Instruct}

run() { if [ -n "${DRY_RUN:-}" ]; then echo "dry-run: $*"; else "$@"; fi; }

case "$ROLE" in
  sim)
    run vllm serve "$SIM" --port 8001 --tensor-parallel-size 1 --data-parallel-size 8 ;;
  vllm)
    run trl vllm-serve --model "$POLICY" --tensor-parallel-size 2 --data-parallel-size 4 ;;
  trainer)
    if [ -n "${DRY_RUN:-}" ]; then
      zsctl --dry-run rl --config $CFG/multinode_rl.yaml
      python -c "import yaml,sys; yaml.safe_load(open('$CFG/accelerate_multinode.yaml'))" && echo "dry-run: accelerate config parses"
    fi
    run accelerate launch --config_file $CFG/accelerate_multinode.yaml \
      --machine_rank "${RANK:-0}" --main_process_ip "${MASTER_ADDR:-127.0.0.1}" \
      -m zsctl rl --config $CFG/multinode_rl.yaml ;;
  *) echo "ROLE must be sim, vllm or trainer" >&2; exit 2 ;;
esac
