#!/usr/bin/env bash
# The paper's comparison at CPU scale: from ONE warm-started policy, with the same steps, seed and
# training questions,
#   rl_sim   RL whose searches the trained simulator answers, with the noise curriculum (ZeroSearch)
#   rl_real  RL whose searches the real BM25 engine answers (the Search-R1 setting)
#   no_rl    the warm start itself
# then all three scored with the REAL engine on held-apart evaluation questions (N_EVAL per benchmark
# of EVAL; none of them is in any training split). `zsctl report` prints the three-arm table: EM /
# SubEM / F1, searches per question, search-hit rate, degenerate-query share, and the real search
# calls each arm spent in training.
# Starts from a finished demo run (its index, warm start and simulator) or from FROM/SIM you name:
#   bash pipelines/demo.sh && bash pipelines/compare_cpu.sh
# Hardware: 2 CPU cores, ~6 GB RAM. Expected time: see README ("The paper's comparison at CPU scale").
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

FROM=${FROM:-runs/demo}               # the run whose index and warm start this starts from
SIM=${SIM:-$FROM/simulator}           # the simulator (e.g. runs/sim_cpu/simulator from sim_cpu.sh)
SIM_OPTS=${SIM_OPTS:-}                # spec options of the sim: engine, e.g. "?verify=2"
RUN=${RUN:-runs/compare_cpu}
TRAIN=${TRAIN:-hotpotqa,2wikimultihopqa,musique}
EVAL=${EVAL:-hotpotqa,2wikimultihopqa,musique}
STEPS=${STEPS:-20}
N_EVAL=${N_EVAL:-100}                 # per benchmark: 3 x 100 = 300 questions by default
TOPK=${TOPK:-2}
MAX_TURNS=${MAX_TURNS:-3}             # searches per trajectory (one more round answers)
DOC_WORDS=${DOC_WORDS:-30}            # words per document in RL and eval: what the demo's warm start read
ROUND_TOKENS=${ROUND_TOKENS:-64}      # tokens per generation round in RL and eval (as the demo; 48 cut long queries)
SEED=${SEED:-0}
RL_EXTRA=${RL_EXTRA:-}                # more rl options for both RL arms, e.g. "--open-only" (as the demo)
Q=${QUIET:+--quiet}

for need in "$FROM/index/manifest.json" "$FROM/warmup/manifest.json" "$SIM/manifest.json"; do
  [ -f "$need" ] || { echo "compare_cpu: $need is missing; run pipelines/demo.sh first (or set FROM/SIM)" >&2; exit 2; }
done
mkdir -p "$RUN"
t0=$(date +%s)
REAL="bm25:$FROM/index"
RL_OPTS=(--policy "$FROM/warmup" --train "$TRAIN" --steps "$STEPS" --batch-size 8 --grad-accum 4 --group-size 4
         --lr 2e-4 --max-turns "$MAX_TURNS" --max-new-tokens "$ROUND_TOKENS" --topk "$TOPK" --max-doc-words "$DOC_WORDS"
         --reward f1+format --seed "$SEED" $Q
         $RL_EXTRA)

# Two jobs at a time, one thread each: on 2 cores that is about 1.6x the throughput of one job on
# two threads (README, "Rollout speed and CPU threads"). Each arm's eval starts as soon as its
# policy exists, beside the next RL run.
export ZSCTL_THREADS=${ZSCTL_THREADS:-1}
evaluate() {  # arm model
  zsctl eval --bench "$EVAL" --policy "$2" --search "$REAL" --out "$RUN/eval_$1" --limit "$N_EVAL" \
    --max-turns "$MAX_TURNS" --max-new-tokens "$ROUND_TOKENS" --topk "$TOPK" --max-doc-words "$DOC_WORDS" --batch-size 16 \
    --seed "$SEED" $Q \
    > "$RUN/eval_$1.log" 2>&1 || { echo "compare_cpu: eval of $1 failed; see $RUN/eval_$1.log" >&2; return 1; }
  echo "== eval $1 with the real engine done  [$(( $(date +%s) - t0 )) s]"
}
pids=()
evaluate no_rl "$FROM/warmup" & pids+=($!)
echo "== rl_sim: simulated search, noise curriculum 0 -> 0.5  [$(( $(date +%s) - t0 )) s]"
zsctl rl "${RL_OPTS[@]}" --search "sim:$SIM$SIM_OPTS" --noise-start 0 --noise-end 0.5 --out "$RUN/rl_sim"
evaluate rl_sim "$RUN/rl_sim" & pids+=($!)
echo "== rl_real: the real engine answers every training search  [$(( $(date +%s) - t0 )) s]"
zsctl rl "${RL_OPTS[@]}" --search "$REAL" --out "$RUN/rl_real"
evaluate rl_real "$RUN/rl_real" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
zsctl report "$RUN" $Q
echo "compare_cpu finished in $(( $(date +%s) - t0 )) s; report: $RUN/report/report.md"
