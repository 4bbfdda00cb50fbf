#!/usr/bin/env bash
# The whole ZeroSearch loop on a laptop CPU, offline, on the bundled data and SmolLM2-135M-Instruct:
#   index (BM25) → every training question searched once on the real engine (no model, top DEPTH)
#   → warm-start demonstrations (the question, or a multi-hop question's supporting entities, as
#   queries) → warmup → simulator corpus (useful/noisy pairs from ONE search) → train-sim → check-sim
#   on held-apart queries → rl with the simulated engine (verified replies) and the noise curriculum
#   → eval of base / warm start / RL with the REAL engine on held-apart questions → report.
# Training stages only read the training split of the bundled benchmarks; every eval and check-sim
# reads the evaluation split (no question is in both).
# Hardware: 2 CPU cores, 6 GB RAM. Expected time: about 15 minutes on 2 quiet cores (set-up not
# included; see the README for the measured figure). Everything is under $RUN; rerunning overwrites it.
# Knobs (environment): RUN (output folder), MODEL, the sizes below, ZSCTL_THREADS; the test suite runs
# this script with a tiny model and tiny sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

RUN=${RUN:-runs/demo}
MODEL=${MODEL:-smollm2-135m}
CORPUS=${CORPUS:-data/corpus/wiki_sample.jsonl}
TRAIN=${TRAIN:-nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique}  # training split of these benchmarks
RL_TRAIN=${RL_TRAIN:-hotpotqa}        # RL questions (training split)
EVAL=${EVAL:-hotpotqa,2wikimultihopqa}  # evaluation split of these benchmarks
DEPTH=${DEPTH:-20}                    # results logged per real search (simulator pairs pick from them)
WARM_STEPS=${WARM_STEPS:-24}
SIM_STEPS=${SIM_STEPS:-16}
VERIFY=${VERIFY:-2}                   # simulator replies checked and regenerated up to this many times in RL
RL_STEPS=${RL_STEPS:-8}
N_CHECK=${N_CHECK:-24}                # held-apart queries for check-sim
N_EVAL=${N_EVAL:-20}                  # evaluation questions per benchmark
TOPK=${TOPK:-2}
MAX_TURNS=${MAX_TURNS:-3}             # searches per trajectory, in RL and eval (one more round answers)
Q=${QUIET:+--quiet}

if [ -e "$RUN" ] && [ -z "${FRESH:-}" ]; then
  echo "demo: $RUN exists; every stage reruns and overwrites its artifact (FRESH=1 removes it first)"
fi
[ -n "${FRESH:-}" ] && rm -rf "$RUN"
mkdir -p "$RUN"
t0=$(date +%s)
step() { printf '\n== %s  [%d s so far] ==\n' "$*" "$(( $(date +%s) - t0 ))"; }

step "1/10 index the corpus (BM25, the real engine)"
zsctl index "$CORPUS" --out "$RUN/index" $Q
SEARCH="bm25:$RUN/index"

step "2/10 real searches: each training question searched once, the question as query (no model)"
zsctl collect --questions "$TRAIN" --model none --search "$SEARCH" --out "$RUN/question_searches" \
  --topk "$DEPTH" --batch-size 256 $Q

step "3/10 warm-start demonstrations: real queries (the question, or the supporting entities) whose results hold the answer"
zsctl build-sft --for policy --templated --trajectories "$RUN/question_searches" --search "$SEARCH" \
  --out "$RUN/policy_sft" --policy "$MODEL" --docs "$TOPK" --doc-words 30 $Q

step "4/10 warmup: SFT of the policy on them (<information> tokens get no loss)"
zsctl warmup --data "$RUN/policy_sft" --policy "$MODEL" --out "$RUN/warmup" --max-steps "$WARM_STEPS" \
  --batch-size 2 --grad-accum 2 --max-length 512 --lr 5e-4 --val-limit 8 $Q

step "5/10 simulator corpus: a useful and a noisy row from ONE real search (only the mode word differs)"
zsctl build-sft --trajectories "$RUN/question_searches" --search "$SEARCH" --out "$RUN/sim_sft" --label docs \
  --pairs-per-search 3 --docs "$TOPK" --doc-words 30 $Q

step "6/10 train-sim: fine-tune the simulator (LoRA, completion-only loss)"
zsctl train-sim --data "$RUN/sim_sft" --base "$MODEL" --out "$RUN/simulator" --max-steps "$SIM_STEPS" \
  --batch-size 4 --grad-accum 2 --max-length 256 --lr 5e-4 --val-limit 8 $Q

step "7/10 check-sim on held-apart queries: does the mode keyword control the documents (verify=$VERIFY)?"
zsctl check-sim --search "sim:$RUN/simulator?verify=$VERIFY" --questions "$EVAL" --limit "$N_CHECK" --k "$TOPK" \
  --out "$RUN/check_sim" --vs "$SEARCH" $Q

step "8/10 rl: GRPO with the simulated engine (verified replies) and the noise curriculum"
zsctl rl --policy "$RUN/warmup" --search "sim:$RUN/simulator?verify=$VERIFY" --train "$RL_TRAIN" --out "$RUN/policy" \
  --steps "$RL_STEPS" --batch-size 8 --grad-accum 4 --group-size 4 --lr 2e-4 --max-turns "$MAX_TURNS" --max-new-tokens 48 \
  --topk "$TOPK" --noise-start 0 --noise-end 0.5 --reward f1+format $Q

step "9/10 eval: base, warm start and RL policy with the REAL engine on held-apart questions"
for name in base warmup policy; do
  model=$MODEL; [ "$name" != base ] && model="$RUN/$name"
  zsctl eval --bench "$EVAL" --model "$model" --search "$SEARCH" --out "$RUN/eval_$name" --limit "$N_EVAL" \
    --max-turns "$MAX_TURNS" --max-new-tokens 48 --topk "$TOPK" --batch-size 12 $Q
done

step "10/10 report"
zsctl report "$RUN" $Q   # prints the before/after table; report.md and the plots land in $RUN/report
echo "demo finished in $(( $(date +%s) - t0 )) s"
