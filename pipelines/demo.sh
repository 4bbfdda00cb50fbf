#!/usr/bin/env bash
# The whole ZeroSearch loop on a laptop CPU, offline, on the bundled data and SmolLM2-135M-Instruct:
#   index (BM25) → warm-start data from real searches → warmup → collect the warm policy's real-search trajectories
#   → build the simulator corpus → train-sim → check-sim → rl with the simulated engine and the
#   noise curriculum → eval of base / warm start / RL with the REAL engine on held-apart questions
#   → report. Training stages only read the training split of the bundled benchmarks; every eval
#   reads the evaluation split (no question is in both).
# Hardware: 2 CPU cores, 6 GB RAM (measured peak 5.3 GB). Expected time: about 15 minutes (measured
# 14.6 min on 2 quiet cores; set-up not included). Everything is under $RUN; rerunning overwrites it.
# Knobs (environment): RUN (output folder), MODEL, and the sizes below; the test suite runs this
# script with a tiny model and tiny sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

RUN=${RUN:-runs/demo}
MODEL=${MODEL:-smollm2-135m}
CORPUS=${CORPUS:-data/corpus/wiki_sample.jsonl}
TRAIN=${TRAIN:-hotpotqa}              # training split of these benchmarks
EVAL=${EVAL:-hotpotqa,bamboogle}      # evaluation split of these benchmarks
N_WARM=${N_WARM:-64}                  # questions searched for warm-start demonstrations
WARM_STEPS=${WARM_STEPS:-12}
N_COLLECT=${N_COLLECT:-24}            # questions for real-search trajectories (x2 samples)
SIM_STEPS=${SIM_STEPS:-12}
RL_STEPS=${RL_STEPS:-8}
N_EVAL=${N_EVAL:-20}                  # evaluation questions per benchmark
TOPK=${TOPK:-2}
Q=${QUIET:+--quiet}

if [ -e "$RUN" ] && [ -z "${FRESH:-}" ]; then
  echo "demo: $RUN exists; every stage reruns and overwrites its artifact (FRESH=1 removes it first)"
fi
[ -n "${FRESH:-}" ] && rm -rf "$RUN"
mkdir -p "$RUN"
t0=$(date +%s)
step() { printf '\n== %s  [%d s so far] ==\n' "$*" "$(( $(date +%s) - t0 ))"; }

step "1/11 index the corpus (BM25, the real engine)"
zsctl index "$CORPUS" --out "$RUN/index" $Q
SEARCH="bm25:$RUN/index"

step "2/11 warm-start demonstrations: each question searched once (no model), answer-holding calls kept"
zsctl collect --questions "$TRAIN" --model none --search "$SEARCH" --out "$RUN/question_searches" \
  --limit "$N_WARM" --topk "$TOPK" $Q
zsctl build-sft --for policy --templated --trajectories "$RUN/question_searches" \
  --out "$RUN/policy_sft" --policy "$MODEL" --docs "$TOPK" --doc-words 40 $Q

step "3/11 warmup: SFT of the policy on them (<information> tokens get no loss)"
zsctl warmup --data "$RUN/policy_sft" --policy "$MODEL" --out "$RUN/warmup" --max-steps "$WARM_STEPS" \
  --batch-size 2 --grad-accum 2 --max-length 384 --lr 5e-4 --val-limit 8 $Q

step "4/11 collect: the warm policy searches the real engine; every call is logged"
zsctl collect --questions "$TRAIN" --model "$RUN/warmup" --search "$SEARCH" --out "$RUN/trajectories" \
  --limit "$N_COLLECT" --samples 2 --temperature 1.0 --max-turns 2 --max-new-tokens 48 --topk "$TOPK" \
  --batch-size 16 $Q

step "5/11 build-sft: simulator corpus (documents holding a gold answer = useful, else noisy)"
zsctl build-sft --trajectories "$RUN/trajectories,$RUN/question_searches" --out "$RUN/sim_sft" --label answer \
  --docs "$TOPK" --doc-words 30 $Q

step "6/11 train-sim: fine-tune the simulator (LoRA, completion-only loss)"
zsctl train-sim --data "$RUN/sim_sft" --base "$MODEL" --out "$RUN/simulator" --max-steps "$SIM_STEPS" \
  --batch-size 2 --grad-accum 2 --max-length 384 --lr 5e-4 --val-limit 8 $Q

step "7/11 check-sim: does the mode keyword control the documents?"
zsctl check-sim --search "sim:$RUN/simulator" --trajectories "$RUN/question_searches" \
  --limit 8 --k "$TOPK" --out "$RUN/check_sim" --vs "$SEARCH" $Q

step "8/11 rl: GRPO with the simulated engine and the noise curriculum"
zsctl rl --policy "$RUN/warmup" --search "sim:$RUN/simulator" --train "$TRAIN" --out "$RUN/policy" \
  --steps "$RL_STEPS" --batch-size 8 --grad-accum 4 --group-size 4 --lr 2e-4 --max-turns 2 --max-new-tokens 48 \
  --topk "$TOPK" --noise-start 0 --noise-end 0.5 --reward f1+format $Q

step "9-11/11 eval: base, warm start and RL policy with the REAL engine on held-apart questions"
for name in base warmup policy; do
  model=$MODEL; [ "$name" != base ] && model="$RUN/$name"
  zsctl eval --bench "$EVAL" --model "$model" --search "$SEARCH" --out "$RUN/eval_$name" --limit "$N_EVAL" \
    --max-turns 2 --max-new-tokens 48 --topk "$TOPK" --batch-size 12 $Q
done

zsctl report "$RUN" $Q   # prints the before/after table; report.md and the plots land in $RUN/report
echo "demo finished in $(( $(date +%s) - t0 )) s"
