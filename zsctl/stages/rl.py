"""`zsctl rl`: train a search policy with RL, its searches answered by a (simulated) engine.

setup (questions, policy, engine, TRL config) → GRPOTrainer with our multi-turn `rollout_func` →
save (LoRA merged) → rollouts.parquet, metrics.parquet, manifest.json (last).

The rollout: TRL hands us the batch's prompts (each repeated `group_size` times); the agent loop
rolls all of them out together at token level, and returns per trajectory `prompt_ids`,
`completion_ids` (policy turns + inserted <information> tokens), `env_mask` (0 on every inserted
token, so they are attended to but never trained on), `logprobs` (the sampler's own, with vLLM, for
TRL's importance-sampling correction) and extras the reward functions read. A completion holds at
most `max_response_tokens` tokens (TRL's `max_completion_length`), its closing EOS included; a
trajectory that answered or used up its turns is closed with EOS, one cut by the budget is not
(so `dapo` masks only those) and is scored on what was kept.

Curriculum (ZeroSearch): at step i of m (i = 1 … m) the simulator writes a noisy document with
probability
    p_i = p_s + (b^(i/m) - 1) / (b - 1) * (p_e - p_s)
drawn per search, so step m uses p_e; p_i and the realised noisy share are logged every step.

Algorithms, all through TRL's GRPOTrainer (the paper used veRL with PPO / GRPO / REINFORCE):
- grpo: per-sequence-normalised clipped policy gradient, advantages = (r - group mean) / group std.
- dapo: token-level normalisation, clip-higher (eps_high 0.28), truncated completions masked.
- dr_grpo: GRPO without length and std normalisation (unbiased "done right" variant).
- reinforce++: REINFORCE++-baseline: group-mean baseline, advantages scaled by the batch std.
PPO (a critic) and plain REINFORCE are not on this path; they belong to a veRL backend.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from zsctl.agent import AgentConfig, AgentLoop
from zsctl.core import artifacts, data, metrics, prompts
from zsctl.core.config import DEFAULT_MODEL, Options, option
from zsctl.core.errors import BadInput
from zsctl.core.generation import GROUP_OVERHEAD, length_groups
from zsctl.core.models import adapt_threads, inference_copy
from zsctl.core.progress import Progress
from zsctl.core.rewards import REWARDS
from zsctl.core.schemas import ROLLOUTS
from zsctl.search import make_engine
from zsctl.search.base import Noise, QueryContext
from zsctl.sft import REPORT_TO, REPORT_TO_HELP, check_report_to

ALGOS = {
    "grpo": dict(loss_type="grpo", scale_rewards="group"),
    "dapo": dict(loss_type="dapo", scale_rewards="group", epsilon_high=0.28, mask_truncated_completions=True),
    "dr_grpo": dict(loss_type="dr_grpo", scale_rewards="none"),
    "reinforce++": dict(loss_type="dapo", scale_rewards="batch"),
}
DEFAULT_DOC_WORDS = 40  # --max-doc-words for a policy that recorded none
RUN_FILE = "rl_run.json"  # identifies the run a --resume must match
DONE_MARK = "zsctl_complete.json"  # written into checkpoint-N after TRL finished saving it
FINISHED = ("answer", "turns")  # trajectory stops that end it for good (closed with EOS for TRL)
VLLM_LOGS = {"sampling/sampling_logp_difference/mean": "vllm_logp_diff_mean",
             "sampling/importance_sampling_ratio/min": "vllm_is_ratio_min",
             "sampling/importance_sampling_ratio/mean": "vllm_is_ratio_mean"}


@dataclass(kw_only=True)
class RLConfig(Options):
    policy: str = option(DEFAULT_MODEL, "Policy model: HF dir, hub id, or smollm2-135m.")
    search: str = option(help="sim:MODEL / sim+http://HOST:PORT/v1 (ZeroSearch) or a real engine (Search-R1 style).")
    train: str = option(help="Training questions: bundled name(s) (train split) or a FlashRAG jsonl / ZeroSearch "
                        "parquet.")
    out: str = option(help="Output artifact directory.")
    algo: str = option("grpo", "grpo | dapo | dr_grpo | reinforce++", choices=ALGOS)
    steps: int = option(50, "Optimizer steps.", ge=1)
    batch_size: int = option(8, "Completions per step and process (prompts x group size).", ge=1)
    grad_accum: int = option(1, "Micro-batches the step's batch is split into.", ge=1)
    group_size: int = option(4, "Rollouts per prompt (group-relative advantages need at least 2).", ge=2)
    lr: float = option(1e-5, "Learning rate.", gt=0)
    beta: float = option(0.001, "KL coefficient.", ge=0)
    lora: bool = option(True, "LoRA adapters (merged at the end) or full fine-tuning.", off="full")
    lora_r: int = option(16, "LoRA rank.", ge=1)
    noise_start: float = option(0.0, "Curriculum p_s: noisy-document probability at the start.", ge=0, le=1)
    noise_end: float = option(0.5, "Curriculum p_e: noisy-document probability at the last step.", ge=0, le=1)
    noise_base: float = option(4.0, "Curriculum base b (1 = a linear ramp).", gt=0)
    max_turns: int = option(2, "Searches allowed per rollout.", ge=0)
    max_new_tokens: int = option(64, "Tokens per generation round.", ge=1)
    max_response_tokens: int = option(640, "Whole response (policy + inserted tokens), a hard bound: TRL's "
                                      "max_completion_length.", ge=1)
    topk: int = option(3, "Documents per search.", ge=1)
    max_doc_words: int | None = option(None, "Each document is cut to this many words (zsctl prompt style only: "
                                       "upstream styles insert whole documents). Default: the length the policy "
                                       "was trained on (recorded by warmup or rl), else 40 (a CPU pays for every "
                                       "inserted token).", ge=1)
    temperature: float = option(1.0, "Sampling temperature of the rollouts (0 = greedy).", ge=0)
    reward: str = option("f1", "f1 | em | f1+format", choices=REWARDS)
    save_every: int = option(0, "Checkpoint every K steps (0 = only the end).", ge=0)
    resume: bool = option(False, "Continue from the last complete checkpoint in --out.")
    report_to: str = option("none", REPORT_TO_HELP, choices=REPORT_TO)
    use_vllm: bool = option(False, "Generate with TRL's vLLM integration (GPU).")
    vllm_mode: str = option("colocate", "colocate | server", choices=("colocate", "server"))
    vllm_server_host: str = option("127.0.0.1", "TRL vllm-serve host (server mode).")
    val: str | None = option(None, "Validation questions (needs --val-search).")
    val_search: str | None = option(None, "Real engine for validation.")
    val_every: int = option(0, "Validate every K steps (0 = never).", ge=0)
    val_limit: int = option(50, "Validation questions scored each time.", ge=1)
    limit: int | None = option(None, "At most N training questions per source.", ge=1)
    open_only: bool = option(False, "Train only on open questions: drop those whose golds are all yes/no or that "
                             "name their answer (comparisons: 'A or B?'), where a guess earns reward without a "
                             "search.")
    seed: int = option(0, "Random seed.", ge=0)
    prompt_style: str = option("zsctl", "zsctl | search-r1 | zerosearch: the instruction, document lines and notes "
                               "the policy is trained with.", choices=prompts.PROMPT_STYLES)
    prompt_from_data: bool = option(False, "Give the policy each training question's own 'prompt' column (a "
                                    "ZeroSearch/Search-R1 parquet) verbatim.")
    sim_template: str | None = option(None, prompts.SIM_TEMPLATE_HELP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size % self.group_size:
            raise BadInput(f"--batch-size {self.batch_size} is not divisible by --group-size {self.group_size}")
        if self.batch_size % self.grad_accum:
            raise BadInput(f"--batch-size {self.batch_size} is not divisible by --grad-accum {self.grad_accum}")
        if self.max_response_tokens < self.max_new_tokens:
            raise BadInput(f"--max-response-tokens {self.max_response_tokens} must hold at least one round "
                           f"(--max-new-tokens {self.max_new_tokens})")
        if self.val and not self.val_search:
            raise BadInput("--val needs --val-search (a real engine, e.g. bm25:data/corpus/wiki_sample.jsonl)")
        check_report_to(self.report_to)


def noise_probability(step: int, total: int, p_start: float, p_end: float, base: float = 4.0) -> float:
    """The curriculum's p_i at step i of m (exponential ramp from p_start to p_end).

    >>> noise_probability(0, 100, 0.0, 0.5)
    0.0
    >>> noise_probability(100, 100, 0.0, 0.5)
    0.5
    >>> round(noise_probability(50, 100, 0.0, 0.5), 4)  # (4**0.5 - 1) / 3 * 0.5
    0.1667
    """
    if total <= 0:
        return p_start
    frac = min(max(step / total, 0.0), 1.0)
    ramp = frac if base == 1 else (base**frac - 1) / (base - 1)
    return p_start + ramp * (p_end - p_start)


def _run_identity(cfg: RLConfig) -> dict:
    """What must not change between a run and its --resume: data order, curriculum, the environment,
    the rollout and the objective (checkpointing, logging and validation may)."""
    keys = ("policy", "search", "train", "algo", "steps", "batch_size", "grad_accum", "group_size", "seed", "lora",
            "lora_r", "limit", "open_only", "noise_start", "noise_end", "noise_base", "reward", "max_turns",
            "max_new_tokens", "max_response_tokens", "topk", "max_doc_words", "temperature", "lr", "beta", "use_vllm",
            "prompt_style", "prompt_from_data", "sim_template")
    return {k: getattr(cfg, k) for k in keys}


def load_train_questions(spec: str, limit: int | None, open_only: bool = False) -> list[dict]:
    """Training questions (the train split of bundled benchmarks), one row per distinct question text:
    the rollout function finds a prompt's gold answers by its text, so texts must be unique.
    `open_only` drops the guessable ones (metrics.guessable): in the demo's HotpotQA rollouts they were
    3 in 8 and earned 0.22-0.25 mean reward against 0.07-0.10 for open questions, so most of what RL
    learned was to answer a comparison with the first name it reads."""
    rows, seen = [], set()
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        split = "train" if name in data.BENCHMARKS else None
        for r in data.load_questions(name, split=split, limit=limit).to_pylist():
            if r["question"] not in seen:
                seen.add(r["question"])
                rows.append(r)
    if not rows:
        raise BadInput(f"--train '{spec}' has no questions; pass a non-empty question file")
    if open_only:
        rows = [r for r in rows if not metrics.guessable(r["question"], r.get("golden_answers"))]
        if not rows:
            raise BadInput(f"--open-only leaves no question of --train '{spec}' (every one is yes/no or names its "
                           "answer); drop --open-only or pass other questions")
    return rows


def _last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / DONE_MARK).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


class Recorder:
    """Per-step logs as one Parquet file per step, so a step redone after a crash replaces its own
    file and the merged logs hold each step exactly once."""

    def __init__(self, out: Path, rank: int):
        self.rollouts_dir = out / "rollouts.steps"
        self.metrics_dir = out / "metrics.steps"
        self.rank = rank
        for d in (self.rollouts_dir, self.metrics_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.pending: dict = {}

    def drop_after(self, step: int) -> None:
        for d in (self.rollouts_dir, self.metrics_dir):
            for p in d.glob("step-*.parquet"):
                if int(p.stem.split("-")[1]) > step:
                    p.unlink(missing_ok=True)  # another process may have removed it already

    def rollouts(self, step: int, rows: list[dict]) -> None:
        artifacts.write_table(
            self.rollouts_dir, f"step-{step:06d}-r{self.rank}.parquet", pa.Table.from_pylist(rows, schema=ROLLOUTS)
        )

    def metrics(self, step: int, row: dict) -> None:
        artifacts.write_table(self.metrics_dir, f"step-{step:06d}.parquet", pa.Table.from_pylist([row]))

    def merge(self, out: Path) -> tuple[int, int]:
        def cat(d: Path, schema=None) -> pa.Table:
            files = sorted(d.glob("step-*.parquet"))
            tables = [pq.read_table(f) for f in files]
            return (
                pa.concat_tables(tables, promote_options="default")
                if tables
                else (schema or pa.schema([])).empty_table()
            )

        rollouts, mets = cat(self.rollouts_dir, ROLLOUTS), cat(self.metrics_dir)
        artifacts.write_table(out, "rollouts.parquet", rollouts)
        artifacts.write_table(out, "metrics.parquet", mets)
        return rollouts.num_rows, mets.num_rows


def make_rollout_func(cfg: RLConfig, engine, golds_by_question: dict, recorder: Recorder, progress: Progress):
    """The `rollout_func(prompts, trainer)` TRL calls once per generation batch."""
    reward_fn = REWARDS[cfg.reward]
    agent_cfg = AgentConfig(
        max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, max_response_tokens=cfg.max_response_tokens,
        topk=cfg.topk, max_doc_words=cfg.max_doc_words if cfg.prompt_style == "zsctl" else None,
        temperature=cfg.temperature, prompt_style=cfg.prompt_style,
    )
    # prompt_from_data: each question's own chat messages, found by its text as the golds are
    chats_by_question = (
        dict(zip(golds_by_question, prompts.chats_from_data(list(golds_by_question.values()), cfg.train)))
        if cfg.prompt_from_data
        else {}
    )

    def rollout_func(prompts: list[str], trainer) -> dict:
        import torch
        from trl.models.utils import unwrap_model_for_generation

        step = trainer.state.global_step + 1  # this step, 1-based (TRL counts the updates done so far)
        p = noise_probability(step, cfg.steps, cfg.noise_start, cfg.noise_end, cfg.noise_base)
        # a simulated engine draws useful/noisy per search with p_i (real engines ignore it); seeded per
        # step and process, so a step redone after a crash draws the same modes
        noise = Noise(p, random.Random(f"{cfg.seed}-{step}-{trainer.accelerator.process_index}"))
        t0 = time.perf_counter()
        if trainer.use_vllm:  # vLLM samples: the trained weights need no gathering (DeepSpeed ZeRO-3)
            policy = contextlib.nullcontext(trainer.accelerator.unwrap_model(trainer.model_wrapped))
        else:
            policy = unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator)
        with policy as model:
            was_training = model.training
            model.eval()
            loop = AgentLoop(inference_copy(model), trainer.processing_class, engine, agent_cfg)
            if trainer.use_vllm:
                _attach_vllm(loop, trainer)
            with torch.no_grad():
                trajs = loop.run(
                    loop.encode_prompts(prompts, chats=[chats_by_question.get(q) for q in prompts]),
                    [QueryContext(q, golds_by_question[q]["golden_answers"]) for q in prompts],
                    noise,
                )
            model.train(was_training)
        gen_s = time.perf_counter() - t0
        adapt_threads()  # --threads auto: the loss gets the cores others leave free

        tok = trainer.processing_class
        completion_ids, env_mask, logprobs = zip(*[_completion(t, tok, cfg.max_response_tokens) for t in trajs])
        predictions = [t.prediction or "" for t in trajs]
        golds = [golds_by_question[q]["golden_answers"] for q in prompts]
        queries = [[s["query"] for s in t.searches] for t in trajs]
        rewards = reward_fn(completions=[t.response for t in trajs], golden_answers=golds, prediction=predictions,
                            queries=queries)

        g = cfg.group_size
        # search quality per call (metrics.search_records); the documents are the simulator's
        searches = [metrics.search_records(t.searches, gold, q) for t, gold, q in zip(trajs, golds, prompts)]
        recorder.rollouts(step, [
            {"step": step, "noise_p": p, "question_id": golds_by_question[q]["id"], "sample": i % g,
             "response": t.response, "prediction": pred, "reward": float(r), "num_searches": t.num_searches,
             "sim_labels": t.sim_labels, "searches": ss}
            for i, (q, t, pred, r, ss) in enumerate(zip(prompts, trajs, predictions, rewards, searches))
        ])
        # the step's metrics cover every process's rollouts (a collective: all ranks get here each step)
        from accelerate.utils import gather_object

        mine = {
            "rewards": [float(r) for r in rewards],
            "valid": [t.prediction is not None for t in trajs],
            "searches": [t.num_searches for t in trajs],
            "labels": [m for t in trajs for m in t.sim_labels],
            "tokens": sum(sum(m) for m in env_mask),
            "facts": [{**{k: f[k] for k in metrics.FACT_KEYS}, "mode": s.get("mode")}
                      for t, ss in zip(trajs, searches) for s, f in zip(t.searches, ss)],
        }
        parts = gather_object([mine]) if trainer.accelerator.num_processes > 1 else [mine]
        rewards_all = [r for part in parts for r in part["rewards"]]
        labels = [m for part in parts for m in part["labels"]]
        n = len(rewards_all)
        model_tokens = sum(part["tokens"] for part in parts)
        recorder.pending = {
            "step": step,
            "noise_p": p,
            "noisy_share": (labels.count("noisy") / len(labels)) if labels else float("nan"),
            "sim_searches": len(labels),
            "reward_mean": sum(rewards_all) / n,
            "reward_std": _std(rewards_all),
            # groups whose rewards are all equal get advantage 0: no gradient (TRL's frac_reward_zero_std).
            # A small policy whose sampled answers are all wrong trains on nothing, or on format credit alone
            "zero_std_share": _zero_std_share(rewards_all, cfg.group_size),
            "valid_answer_rate": sum(v for part in parts for v in part["valid"]) / n,
            "searches_per_traj": sum(s for part in parts for s in part["searches"]) / n,
            "generated_tokens": model_tokens,
            "gen_tokens_per_s": model_tokens / gen_s if gen_s > 0 else float("nan"),
            # where this process's rollout time went: engine calls (a simulator's generation and
            # verification included) vs the policy's own prefill and decoding
            "rollout_seconds": gen_s,
            "search_seconds": loop.seconds["search"],
            "threads": torch.get_num_threads(),  # the loss's CPU threads (--threads auto changes them)
            **search_metrics([f for part in parts for f in part["facts"]]),
        }
        progress.log(
            f"step {step}/{cfg.steps}: p={p:.3f} reward={recorder.pending['reward_mean']:.3f} "
            f"flat-groups={recorder.pending['zero_std_share']:.2f} "
            f"valid={recorder.pending['valid_answer_rate']:.2f} searches={recorder.pending['searches_per_traj']:.2f} "
            f"degenerate={recorder.pending['degenerate_share']:.2f} repeated={recorder.pending['repeat_share']:.2f} "
            f"ungrounded={recorder.pending['ungrounded_share']:.2f} hit={recorder.pending['search_hit_rate']:.2f}"
        )
        return {
            "prompt_ids": [t.prompt_ids for t in trajs],
            "completion_ids": list(completion_ids),
            # the sampler's logprobs: with vLLM, TRL corrects for its mismatch with the trained model
            # (HF rollouts sample from the trained model itself, exactly on-policy; TRL ignores them)
            "logprobs": list(logprobs) if all(lp is not None for lp in logprobs) else None,
            "env_mask": list(env_mask),
            "prediction": predictions,
            "queries": queries,
            "num_searches": [t.num_searches for t in trajs],
        }

    return rollout_func


def search_metrics(facts: list[dict]) -> dict:
    """A step's search quality (metrics.search_quality), with the hit rate also per simulator mode:
    useful documents should hold the answer and noisy ones not, whatever the query. NaN: nothing to count."""
    row = metrics.search_quality(facts)
    for mode in ("useful", "noisy"):
        row[f"search_hit_rate_{mode}"] = metrics.search_quality(f for f in facts if f.get("mode") == mode)[
            "search_hit_rate"
        ]
    return {k: float("nan") if v is None else v for k, v in row.items()}


def _zero_std_share(rewards: list[float], group: int) -> float:
    """Share of the groups (consecutive `group` rewards, one question's rollouts) whose rewards are all equal.

    >>> _zero_std_share([0.0, 0.0, 0.0, 0.1, 0.0, 0.1], 3)
    0.5
    """
    groups = [rewards[i:i + group] for i in range(0, len(rewards), group)]
    return sum(max(g) - min(g) < 1e-9 for g in groups) / len(groups)


def _std(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _completion(t, tok, budget: int) -> tuple[list[int], list[int], list[float] | None]:
    """What TRL trains on for trajectory `t`: (completion ids, env mask, sampler logprobs or None).

    A finished trajectory (it answered, or used its last round) is closed with EOS, not trained on,
    so TRL counts it as terminated (`dapo` masks only unterminated ones). At most `budget` tokens: a
    longer one is cut there and `t` is rescored as unfinished (an answer that was cut is no answer).
    """
    ids, mask = list(t.response_ids), list(t.env_mask)
    lps = list(t.logprobs) if len(t.logprobs) == len(ids) and ids else None
    if t.stop in FINISHED:
        ids.append(tok.eos_token_id)
        mask.append(0)
        if lps is not None:
            lps.append(0.0)
    if len(ids) > budget:
        ids, mask = ids[:budget], mask[:budget]
        lps = lps[:budget] if lps is not None else None
        t.stop, t.prediction = "length", None
        t.response = tok.decode(ids, skip_special_tokens=True)
    return ids, mask, lps


def _attach_vllm(loop: AgentLoop, trainer) -> None:
    """Make `loop` generate through TRL's own vLLM engine (TRL syncs its weights before each rollout).

    TRL's server mode (and colocated tensor parallelism) gathers every process's prompts in a
    collective and hands process k the rows from k * len(prompts): every process must call it in
    every round (`lockstep`) and with as many rows as the others, so a shorter local batch is padded
    with one-token filler rows whose output is dropped. A round in which no process has a row left
    costs only the count exchange.
    """
    from accelerate.utils import gather_object

    vg, acc = trainer.vllm_generation, trainer.accelerator
    collective = acc.num_processes > 1 and (vg.mode == "server" or getattr(vg, "tensor_parallel_size", 1) > 1)

    def generate(seqs: list[list[int]]) -> tuple[list[list[int]], list[list[float]] | None]:
        rows = max(gather_object([len(seqs)])) if collective else len(seqs)
        if rows == 0:
            return [], []
        batch = seqs + [[loop.pad_id]] * (rows - len(seqs))
        _, completion_ids, logprobs, _ = vg.generate(prompts=batch, images=None, num_generations=1)
        ids = [list(c) for c in completion_ids[: len(seqs)]]
        if logprobs is None:
            return ids, None
        # one entry per token (the sampled token's; vLLM writes None for NaN, TRL neutralises NaN)
        return ids, [[math.nan if lp[0] is None else lp[0] for lp in row] for row in logprobs[: len(seqs)]]

    loop.generate_fn = generate
    loop.lockstep = collective


def _make_callback(cfg: RLConfig, recorder: Recorder, progress: Progress, validate):
    from transformers import TrainerCallback

    class ZsctlCallback(TrainerCallback):
        """Writes one metrics row per step (our rollout stats + TRL's loss/KL), marks finished checkpoints."""

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or "loss" not in (logs or {}) or not recorder.pending:
                return
            row = dict(recorder.pending)
            step_s = time.perf_counter() - getattr(self, "t0", time.perf_counter())
            row.update(
                loss=float(logs.get("loss", float("nan"))),
                kl=float(logs.get("kl", float("nan"))),
                step_seconds=step_s,
                tokens_per_s=row["generated_tokens"] / step_s if step_s > 0 else float("nan"),
            )
            # with vLLM: how far its sampling logprobs are from the trained model's (TRL's correction)
            for key, name in VLLM_LOGS.items():
                if key in logs:
                    row[name] = float(logs[key])
            if validate is not None and cfg.val_every and state.global_step % cfg.val_every == 0:
                row.update(validate(kw["model"]))
            recorder.metrics(state.global_step, row)
            progress.advance(1)

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (ckpt / DONE_MARK).write_text(json.dumps({"step": state.global_step}))

    return ZsctlCallback()


def _make_validator(cfg: RLConfig, tokenizer):
    """Score the current policy on --val with the real --val-search engine (like the paper's validation)."""
    if not cfg.val:
        return None
    import torch

    questions = data.load_questions(cfg.val, split="eval" if cfg.val in data.BENCHMARKS else None,
                                    limit=cfg.val_limit).to_pylist()
    engine = make_engine(cfg.val_search)

    def validate(model) -> dict:
        was_training = model.training
        model.eval()
        loop = AgentLoop(inference_copy(model), tokenizer, engine, AgentConfig(
            max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, topk=cfg.topk,
            max_doc_words=cfg.max_doc_words if cfg.prompt_style == "zsctl" else None,
            max_response_tokens=cfg.max_response_tokens, prompt_style=cfg.prompt_style))
        rows = []  # per question: its scores and what it searched for with the real engine, as eval reports it
        with torch.no_grad():
            for i in range(0, len(questions), 8):
                batch = questions[i : i + 8]
                trajs = loop.run(loop.encode_prompts([q["question"] for q in batch]))
                rows += [{"question": q["question"], "golden_answers": q["golden_answers"], "prediction": t.prediction,
                          **metrics.score(t.prediction or "", q["golden_answers"]),
                          "searches": metrics.search_records(t.searches, q["golden_answers"], q["question"])}
                         for q, t in zip(batch, trajs)]
        model.train(was_training)
        if not rows:
            return {}
        quality = {**metrics.search_quality(f for r in rows for f in r["searches"]), **metrics.question_hits(rows),
                   **metrics.open_em(rows), **metrics.reading(rows)}
        return {**{f"val_{k}": sum(r[k] for r in rows) / len(rows) for k in ("em", "subem", "f1")},
                **{f"val_{k}": quality[k] for k in ("em_open", "read_em", "degenerate_share", "search_hit_rate",
                                                     "first_search_hit_rate", "question_hit_rate", "repeat_share",
                                                     "ungrounded_share")}}

    return validate


def trim_padding(batch: dict) -> dict:
    """Cut the columns that are padding in every row of one micro-batch: the prompt's left padding
    and the completion's right padding.

    TRL pads a whole generation batch to its longest prompt and longest completion and computes every
    micro-batch at that width. Multi-turn completions vary a lot in length (one answer vs two
    searches with documents), so most of that width is padding. Cutting it is exact: right padding
    comes after every kept token (causal attention never sees it), and removing left padding only
    shifts a row's positions by a constant, which rotary attention does not see. Every B×T tensor
    aligned with the completion (masks, sampled and reference log-probs) is cut alike.
    """
    import torch

    prompt_mask, completion_mask = batch["prompt_mask"], batch["completion_mask"]
    width = completion_mask.size(1)
    used = torch.nonzero(completion_mask.any(dim=0))
    keep = int(used[-1]) + 1 if len(used) else 1
    first = int(torch.nonzero(prompt_mask.any(dim=0))[0]) if prompt_mask.any() else 0
    out = dict(batch)
    for key, value in batch.items():
        if key.startswith("prompt_") and torch.is_tensor(value) and value.dim() == 2:
            out[key] = value[:, first:]
        elif torch.is_tensor(value) and value.dim() == 2 and value.size(1) == width and keep < width:
            out[key] = value[:, :keep]
    return out


# How each loss type's micro-batch loss is the sum of its row groups' losses: "rows" → weighted by the
# group's share of rows (a mean over sequences, or dr_grpo's division by rows x budget); "sum" → as is
# (dapo divides by the whole batch's token count, fixed beforehand). Other loss types are not split.
_GROUP_WEIGHT = {"grpo": "rows", "dr_grpo": "rows", "dapo": "sum"}


def _trainer_class():
    from trl import GRPOTrainer

    class Trainer(GRPOTrainer):
        """TRL's GRPOTrainer, each training micro-batch computed at its own width (trim_padding), and
        its rows in groups of similar length (length_groups): multi-turn completions vary in length
        (an answer alone vs two searches with their documents), and one micro-batch padded to its
        longest completion computes mostly padding."""

        group_overhead = GROUP_OVERHEAD

        def _prepare_inputs(self, generation_batch):
            inputs = super()._prepare_inputs(generation_batch)
            return trim_padding(inputs) if self.model.training else inputs

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weight = _GROUP_WEIGHT.get(self.loss_type)
            rows = inputs["completion_mask"].size(0)
            lengths = inputs["completion_mask"].sum(dim=1).tolist()
            groups = length_groups(lengths, self.group_overhead) if weight and self.top_entropy_quantile >= 1 else []
            if len(groups) < 2:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            total = 0.0
            for group in groups:
                sub = trim_padding(_take_rows(inputs, group, rows))
                share = len(group) / rows if weight == "rows" else 1.0
                total = total + share * super().compute_loss(model, sub, return_outputs, num_items_in_batch)
            return total

    return Trainer


def _take_rows(batch: dict, rows: list[int], n: int) -> dict:
    """The batch restricted to `rows`: every tensor whose first dimension is the batch's `n` rows."""
    import torch

    index = torch.tensor(rows)
    return {k: v.index_select(0, index.to(v.device)) if torch.is_tensor(v) and v.dim() and v.size(0) == n else v
            for k, v in batch.items()}


def resolved(cfg: RLConfig) -> RLConfig:
    """The config with its defaults that depend on the policy filled in (what the run records and
    compares on --resume): --max-doc-words unset → the length the policy was trained on, else 40."""
    if cfg.max_doc_words is not None:
        return cfg
    return replace(cfg, max_doc_words=artifacts.doc_words_for(cfg.policy, "zsctl", None) or DEFAULT_DOC_WORDS)


def build_trainer(cfg: RLConfig, progress: Progress | None = None, policy=None):
    """Setup: validate, resolve the resume point, load questions/engine/policy, build the GRPOTrainer.

    Returns (trainer, engine, recorder, resume_from). `policy` may be passed as (model, tokenizer).
    """
    cfg = resolved(cfg)
    import torch
    from datasets import Dataset
    from trl import GRPOConfig

    from zsctl.core.models import (
        load_model,
        lora_config,
        no_activation_checkpointing,
        score_labelled_positions_only,
        training_precision,
    )

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is TRL's documented experimental API
    progress = progress or Progress()
    out = artifacts.check_out(cfg.out, "policy", [cfg.policy, cfg.search, cfg.train, cfg.val, cfg.val_search])
    ckpt_dir = out / "checkpoints"
    resume_from = None
    if cfg.resume:
        run_file = out / RUN_FILE
        if not run_file.is_file():
            raise BadInput(
                f"--resume: '{out}' holds no zsctl rl run ({RUN_FILE} missing); drop --resume or pass the run's --out"
            )
        then, now = json.loads(run_file.read_text()), _run_identity(cfg)
        if then != now:
            diff = "; ".join(f"{k}: {then.get(k)} then, {now[k]} now" for k in now if then.get(k) != now[k])
            raise BadInput(f"--resume: '{out}' was started with other settings ({diff or 'see ' + str(run_file)}); "
                           "use the same options or a new --out")
        last = _last_complete_checkpoint(ckpt_dir)
        resume_from = str(last) if last else None

    questions = load_train_questions(cfg.train, cfg.limit, cfg.open_only)
    if cfg.prompt_from_data:
        prompts.chats_from_data(questions, cfg.train)  # every question has its prompt, or bad input now
    engine = make_engine(cfg.search, sim_template=cfg.sim_template)
    on_gpu = torch.cuda.is_available()
    dtype, bf16 = training_precision()
    model, tok = policy or load_model(cfg.policy, dtype=dtype)
    score_labelled_positions_only()  # the loss projects completion positions only, as on a GPU

    # In place: its checkpoints let a killed run resume; an older policy in --out stays valid until
    # the final save.
    out = artifacts.prepare_out(out, "policy")
    for p in ckpt_dir.glob("checkpoint-*"):
        # a new run drops an earlier run's checkpoints (a later --resume must not take them, and TRL
        # must not save into a directory that still says "complete"); a resumed run drops the one
        # the kill interrupted. Before the run file, so it never vouches for another run's checkpoints.
        if not cfg.resume or not (p / DONE_MARK).is_file():
            shutil.rmtree(p, ignore_errors=True)
    (out / RUN_FILE).write_text(json.dumps(_run_identity(cfg)))
    start_step = int(Path(resume_from).name.split("-")[1]) if resume_from else 0

    args = GRPOConfig(
        output_dir=str(ckpt_dir),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size // cfg.grad_accum,
        gradient_accumulation_steps=cfg.grad_accum,
        num_generations=cfg.group_size,
        learning_rate=cfg.lr,
        beta=cfg.beta,
        # the rollout samples from the full softmax at this temperature (no top-k/top-p), as TRL's loss assumes
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        max_completion_length=cfg.max_response_tokens,  # what _completion bounds; dr_grpo's loss divides by it
        logging_steps=1,
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        report_to=cfg.report_to,
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not on_gpu,
        bf16=bf16,
        **no_activation_checkpointing(),
        use_vllm=cfg.use_vllm,
        vllm_mode=cfg.vllm_mode,
        vllm_server_host=cfg.vllm_server_host,
        # vLLM generates one round per call: TRL's max_completion_length would be its per-call budget
        generation_kwargs={"stop": prompts.STOP_STRINGS, "include_stop_str_in_output": True,
                           "max_tokens": cfg.max_new_tokens} if cfg.use_vllm else None,
        remove_unused_columns=False,
        disable_tqdm=True,
        **ALGOS[cfg.algo],
    )
    golds_by_question = {q["question"]: q for q in questions}
    dataset = Dataset.from_list([{"prompt": q["question"], "golden_answers": q["golden_answers"]} for q in questions])
    recorder = Recorder(out, rank=0)
    recorder.drop_after(start_step)
    trainer = _trainer_class()(
        model=model,
        reward_funcs=REWARDS[cfg.reward],
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=lora_config(cfg.lora_r) if cfg.lora else None,
        rollout_func=make_rollout_func(cfg, engine, golds_by_question, recorder, progress),
        callbacks=[_make_callback(cfg, recorder, progress, _make_validator(cfg, tok))],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our per-step line replaces its raw log dicts
    recorder.rank = trainer.accelerator.process_index
    return trainer, engine, recorder, resume_from


def run(cfg: RLConfig, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    cfg = resolved(cfg)  # the manifest below records what the run used
    trainer, engine, recorder, resume_from = build_trainer(cfg, progress)
    out = Path(cfg.out)
    start_step = int(Path(resume_from).name.split("-")[1]) if resume_from else 0
    progress.start("rl", cfg.steps)
    if start_step:
        progress.advance(start_step)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from)
    wall = time.perf_counter() - t0
    progress.stop()

    summary: dict = {"out": str(out), "steps": cfg.steps, "resumed_from_step": start_step, "wall_s": round(wall, 1)}
    trainer.accelerator.wait_for_everyone()  # every rank's rollout files are written before the merge
    if trainer.accelerator.is_main_process:
        final = trainer.model
        if cfg.lora:
            final = final.merge_and_unload()
        artifacts.mark_incomplete(out, "policy")  # the model files are replaced next
        final.save_pretrained(out)
        trainer.processing_class.save_pretrained(out)
        n_roll, n_met = recorder.merge(out)
        mets = pq.read_table(out / "metrics.parquet").to_pylist()
        summary.update(rollouts=n_roll, metric_rows=n_met, search=engine.stats.as_dict())
        if mets:
            first, last = mets[0], mets[-1]
            summary.update(
                reward_first=first["reward_mean"], reward_last=last["reward_mean"],
                valid_answer_rate_last=last["valid_answer_rate"],
            )
            if getattr(engine, "simulated", False):  # a real engine has no useful/noisy draw to report
                summary["noise_p_last"] = last["noise_p"]
        artifacts.write_manifest(
            out, "policy", config=asdict(cfg), inputs=[artifacts.input_ref(cfg.train)], summary=summary,
            seed=cfg.seed, extra={"base_model": cfg.policy, "algo": cfg.algo, "doc_words": cfg.max_doc_words,
                                  "prompt_style": {**prompts.style_of(cfg.prompt_style).as_dict(),
                                                   "prompt_from_data": cfg.prompt_from_data}},
        )
    trainer.accelerator.wait_for_everyone()
    return summary
