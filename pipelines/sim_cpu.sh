#!/usr/bin/env bash
# The longer simulator recipe on a CPU: a contrastive corpus from real searches of every
# training-split question of all bundled benchmarks, a LoRA fine-tune of SmolLM2-135M-Instruct on it,
# then check-sim on held-apart queries (evaluation-split questions, never trained on) without and with
# verified generation, side by side; `zsctl report` prints the check-sim tables.
#   index → collect --policy none (each training question searched once, top 20) → build-sft --label docs
#   (a useful and a noisy row from ONE search; supporting entities of multi-hop questions searched too)
#   → train-sim → check-sim (verify=0) → check-sim (verify=2, verify=3: each of $VERIFY) → report
# Hardware: 2 CPU cores, ~8 GB RAM. Expected time: about 46 minutes on 2 quiet cores with bf16 (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

RUN=${RUN:-runs/sim_cpu}
MODEL=${MODEL:-smollm2-135m}
CORPUS=${CORPUS:-data/corpus/wiki_sample.jsonl}
BENCH=${BENCH:-nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique}   # training split of each
CHECK=${CHECK:-nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,musique,bamboogle}  # evaluation split of each
DEPTH=${DEPTH:-20}                    # results logged per search (the pairs pick from them)
K=${K:-2}                             # documents per simulated search (as the demo's policy uses)
DOC_WORDS=${DOC_WORDS:-30}
STEPS=${STEPS:-400}                   # train-sim steps of 8 rows (about 1.2 epochs of the corpus)
N_CHECK=${N_CHECK:-120}               # held-apart queries for check-sim
VERIFY=${VERIFY:-"2 3"}               # verified check-sims after the unverified one (verify=2 misses 85 points here)
Q=${QUIET:+--quiet}

mkdir -p "$RUN"
t0=$(date +%s)
step() { printf '\n== %s  [%d s so far] ==\n' "$*" "$(( $(date +%s) - t0 ))"; }

step "index the corpus (BM25, the real engine)"
zsctl index "$CORPUS" --out "$RUN/index" $Q
SEARCH="bm25:$RUN/index"

step "real searches: every training question, the question as query, top $DEPTH"
zsctl collect --questions "$BENCH" --policy none --search "$SEARCH" --out "$RUN/question_searches" \
  --topk "$DEPTH" --batch-size 256 $Q

step "build-sft --label docs: a useful and a noisy row from ONE search (only the useful prompt names the answer)"
zsctl build-sft --trajectories "$RUN/question_searches" --out "$RUN/sim_sft" --label docs --pairs-per-search 3 \
  --search "$SEARCH" --topk "$K" --max-doc-words "$DOC_WORDS" $Q

step "train-sim: $STEPS steps (LoRA, completion-only loss)"
# Quiet Intel Xeon, 2 cores, 12 steps each: --threads auto (two threads that spin briefly while the
# cores are free, one when not) took 123 s against 187 s on two threads that sleep at once and 169 s
# on one; 8 rows a step as 2 padded batches of 4 took 53 s against 79 s one row at a time and 69 s
# in one batch of 8, same validation loss (bigger matrices, fewer passes).
zsctl train-sim --threads auto --data "$RUN/sim_sft" --base "$MODEL" --out "$RUN/simulator" --max-steps "$STEPS" \
  --batch-size 4 --grad-accum 2 --max-length 256 --lr 5e-4 --val-limit 32 $Q

for v in 0 $VERIFY; do
  step "check-sim on $N_CHECK held-apart queries, verify=$v"
  zsctl check-sim --search "sim:$RUN/simulator?verify=$v" --questions "$CHECK" --limit "$N_CHECK" --topk "$K" \
    --vs "$SEARCH" --out "$RUN/check_sim_verify$v" $Q
done

zsctl report "$RUN" $Q
echo "sim_cpu finished in $(( $(date +%s) - t0 )) s; report: $RUN/report/report.md"
