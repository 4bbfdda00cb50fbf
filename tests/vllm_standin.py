"""vLLM stood in for, under TRL's own `VLLMGeneration`, so the `--use-vllm` path runs on a CPU.

`StandInVLLMGeneration` is TRL 1.16's real class with only its engine swapped: `_init_vllm` puts a
`FakeLLM` (colocate mode: `llm.generate(prompts, sampling_params=…)` → RequestOutput-like objects) or
a `FakeClient` (server mode: `vllm_client.generate(prompts=…, n=…, max_tokens=…, …)` → dict) in
place of vLLM, and both sample from the live policy with a real HF model. Everything above the
engine is TRL's code: the prompt gathering and broadcast of server mode, the slicing per process,
`extract_logprobs`. The engine returns the sampled tokens' logprobs after temperature scaling, as
vLLM does with `logprobs_mode="processed_logprobs"`, so TRL's importance-sampling ratio is 1 up to
float error when everything is aligned.

Run as a script under `accelerate launch` (2 CPU processes, gloo), with rows of process 0 answering
at once and rows of process 1 searching every round: `vllm_standin.py MODEL CORPUS MAX_TURNS` rolls
out the agent loop in server mode; `vllm_standin.py rl ARGS…` is `zsctl rl ARGS…` with the stand-in.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from trl.generation import vllm_generation as trl_vllm

from zsctl.core.models import cache_kwarg


@dataclass
class FakeLogprob:
    logprob: float
    rank: int = 1


@dataclass
class FakeCompletion:
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]]


@dataclass
class FakeRequestOutput:
    prompt_token_ids: list[int]
    outputs: list[FakeCompletion]


class FakeSamplingParams:
    """vllm.SamplingParams' constructor, keyword arguments kept as attributes."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class HFEngine:
    """Sampling from an HF causal LM the way vLLM does: stop strings (kept in the output with
    include_stop_str_in_output), EOS kept, `max_tokens`, per-token logprob of the processed
    (temperature-scaled) distribution. `writes(i, n)` may force the text of row i of n (logprobs of
    the forced tokens are still the model's)."""

    def __init__(self, model, tokenizer, writes=None, seed: int = 0):
        import torch

        self.model = model
        self.tok = tokenizer
        self.writes = writes
        self.gen = torch.Generator().manual_seed(seed)
        self.calls: list[int] = []  # rows per call
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def sample(self, prompts: list[list[int]], temperature: float, top_p: float, top_k: int | None,
               max_tokens: int, stop: list[str] | None = None, **_) -> tuple[list[list[int]], list[list[float]]]:
        assert top_p == 1.0 and top_k in (None, 0, -1), "the stand-in samples from the full softmax only"
        self.calls.append(len(prompts))
        ids, lps = [], []
        for i, p in enumerate(prompts):
            forced = self.writes(i, len(prompts)) if self.writes else None
            row, lp = self._one(p, temperature, max_tokens, stop or [], forced)
            ids.append(row)
            lps.append(lp)
        return ids, lps

    def _one(self, prompt, temperature, max_tokens, stop, forced):
        import torch

        forced_ids = self.tok(forced, add_special_tokens=False)["input_ids"] if forced is not None else None
        out, lps, past = [], [], None
        nxt = torch.tensor([prompt])
        cache_kw = cache_kwarg(self.model)
        with torch.no_grad():
            for j in range(max_tokens):
                res = self.model(input_ids=nxt, use_cache=True, **{cache_kw: past})
                past = res.past_key_values
                logp = torch.log_softmax(res.logits[0, -1].float() / max(temperature, 1e-6), dim=-1)
                if forced_ids is not None:
                    tok = forced_ids[j] if j < len(forced_ids) else next(iter(self.eos))
                else:
                    tok = int(torch.multinomial(logp.exp(), 1, generator=self.gen))
                out.append(tok)
                lps.append(float(logp[tok]))
                if tok in self.eos or any(s in self.tok.decode(out) for s in stop):
                    break
                nxt = torch.tensor([[tok]])
        return out, lps


class FakeLLM:
    """vllm.LLM.generate as TRL's colocate mode calls it."""

    def __init__(self, engine: HFEngine):
        self.engine = engine

    def generate(self, prompts, sampling_params, use_tqdm=False):
        sp = sampling_params
        assert sp.n == 1 and sp.logprobs == 0
        ids, lps = self.engine.sample([p["prompt_token_ids"] for p in prompts], **sp.__dict__)
        return [
            FakeRequestOutput(p["prompt_token_ids"], [FakeCompletion(i, [{t: FakeLogprob(v)} for t, v in zip(i, lp)])])
            for p, i, lp in zip(prompts, ids, lps)
        ]


class FakeClient:
    """trl.generation.vllm_client.VLLMClient.generate (and get_server_info) as TRL's server mode calls it."""

    def __init__(self, engine: HFEngine):
        self.engine = engine

    def get_server_info(self):
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def generate(self, prompts, features=None, n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0,
                 min_p=0.0, max_tokens=16, logprobs=0, structured_outputs_regex=None, generation_kwargs=None):
        assert n == 1 and logprobs == 0
        params = dict(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens)
        params.update(generation_kwargs or {})
        ids, lps = self.engine.sample(prompts, **params)
        return {"prompt_ids": prompts, "completion_ids": ids, "logprobs": [[[v] for v in row] for row in lps],
                "logprob_token_ids": [[[t] for t in row] for row in ids]}


class StandInVLLMGeneration(trl_vllm.VLLMGeneration):
    """TRL's VLLMGeneration with the vLLM engine replaced by `HFEngine` on the live policy."""

    writes = None  # set on the class before the trainer is built, to script the engine

    def _init_vllm(self):
        engine = HFEngine(self.model, self.processing_class, writes=type(self).writes)
        self.engine = engine
        self.syncs = 0
        if self.mode == "server":
            if self.accelerator.is_main_process:
                self.vllm_client = FakeClient(engine)
        else:
            self.llm = FakeLLM(engine)
        self.accelerator.wait_for_everyone()

    def sync_weights(self):  # the engine samples from the training model itself
        self.syncs += 1


def install(monkeypatch=None):
    """Make GRPOTrainer(use_vllm=True) build the stand-in (vllm itself is never imported)."""
    from trl.trainer import grpo_trainer

    targets = [
        (grpo_trainer, "VLLMGeneration", StandInVLLMGeneration),
        (trl_vllm, "SamplingParams", FakeSamplingParams),
    ]
    for mod, name, value in targets:
        if monkeypatch is not None:
            monkeypatch.setattr(mod, name, value, raising=False)
        else:
            setattr(mod, name, value)


def _first_process_answers(i: int, n: int) -> str:
    """Server mode hands the engine process 0's rows first, then process 1's (equal shares)."""
    return "<answer> yes </answer>" if i < n // 2 else "<search> alpha </search>"


def _two_process_rollout(model_dir: str, corpus: str, max_turns: int) -> None:
    """Server mode under 2 processes: process 0's rows answer in round 1, process 1's search in every
    round; both must come back with their own rows' results and no collective left unmatched."""
    from types import SimpleNamespace

    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    from zsctl.agent import AgentConfig, AgentLoop
    from zsctl.core.models import load_model
    from zsctl.search import make_engine
    from zsctl.stages import rl

    acc = Accelerator(cpu=True)
    model, tok = load_model(model_dir)
    StandInVLLMGeneration.writes = staticmethod(_first_process_answers)
    vg = StandInVLLMGeneration(model=model, accelerator=acc, processing_class=tok, mode="server",
                               max_completion_length=16, generation_kwargs={"stop": ["</search>", "</answer>"]})
    loop = AgentLoop(model, tok, make_engine(f"bm25:{corpus}"), AgentConfig(max_turns=max_turns, max_new_tokens=16,
                                                                             max_response_tokens=2000))
    rl._attach_vllm(loop, SimpleNamespace(vllm_generation=vg, accelerator=acc))
    rank = acc.process_index
    trajs = loop.run(loop.encode_prompts([f"rank {rank} question {j}?" for j in range(2 + rank)]))
    mine = {"rank": rank, "stops": [t.stop for t in trajs], "searches": [t.num_searches for t in trajs],
            "logprobs_aligned": all(len(t.logprobs) == len(t.response_ids) for t in trajs),
            "policy_logprobs_negative": all(lp < 0 for t in trajs for lp, m in zip(t.logprobs, t.env_mask) if m),
            "inserted_logprobs_zero": all(lp == 0.0 for t in trajs for lp, m in zip(t.logprobs, t.env_mask) if not m),
            "lockstep": loop.lockstep, "generate_calls": loop.generate_calls}
    everyone = gather_object([mine])  # one more collective: it pairs up only if none was left unmatched
    if acc.is_main_process:
        everyone.append({"engine_calls": vg.engine.calls})
        print("RESULT " + json.dumps(everyone), flush=True)
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()  # gloo's threads can abort the exit otherwise


if __name__ == "__main__":
    if sys.argv[1] == "rl":
        from zsctl.cli import main

        install()
        StandInVLLMGeneration.writes = staticmethod(_first_process_answers)
        sys.argv = ["zsctl", *sys.argv[1:]]
        main()
    else:
        _two_process_rollout(sys.argv[1], sys.argv[2], int(sys.argv[3]))
