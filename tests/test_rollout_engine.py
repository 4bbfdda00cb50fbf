"""The agent loop's decoder: greedy outputs equal the static-batched `generate` it replaced, rows
leave the batch when they stop, each token is fed through the model once, logprobs line up with
the response, the pluggable backend (cut at the first stop, logprobs, lockstep), sampling without top-k."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from zsctl.agent import AgentConfig, AgentLoop
from zsctl.core import prompts
from zsctl.core.models import load_model
from zsctl.search.base import NoSearch

QUESTIONS = [
    "who?",
    "what is the capital of a big country far away?",
    "when did the war of the roses end in england?",
    "x",
    "name the river that runs through the city of Paris",
]


@pytest.fixture()
def varied(tiny_model_dir):
    """The tiny model with larger random weights: its greedy text varies (the default init writes
    only newlines), so turns stop at different steps for different reasons. float32: the tests
    compare decoding paths token for token, which bf16 rounding (a CPU with bf16 loads it) would blur."""
    model, tok = load_model(str(tiny_model_dir), dtype="float32")
    # a seed whose text covers the case mix the tests assert, for the current instruction: a change
    # of the policy prompt can take a case away (the case-mix assertions then fail), pick another seed
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3, generator=g)
    return model, tok


def static_generate(model, tok, stops: list[str], max_new_tokens: int, eos_ids: set[int], calls: list):
    """Reference: the decoder this engine replaced, as a backend. Each round is ONE left-padded
    `generate` over every active row, the whole context prefilled again, every row running until
    the last one stops (checked on the full text of the turn)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    pad = tok.pad_token_id

    def generate(seqs: list[list[int]]) -> list[list[int]]:
        calls.append(len(seqs))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s)
            att[r, width - len(s):] = 1

        class TurnText(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                texts = tok.batch_decode(input_ids[:, width:])
                return torch.tensor([any(s in t for s in stops) for t in texts])

        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([TurnText()]), pad_token_id=pad,
                                 eos_token_id=sorted(eos_ids), temperature=None, top_p=None, top_k=None)
        return out[:, width:].tolist()

    return generate


def _pair(varied, cfg: AgentConfig):
    model, tok = varied
    stops = [" who", "album"]  # strings this model writes mid-turn, in several tokens
    eos = {tok.convert_tokens_to_ids("Ġknown")}  # a word it writes: some trajectories end early
    new, ref = AgentLoop(model, tok, NoSearch(), cfg), AgentLoop(model, tok, NoSearch(), cfg)
    calls: list[int] = []
    for loop in (new, ref):
        loop.stop_strings, loop.eos_ids = stops, eos
    ref.generate_fn = static_generate(model, tok, stops, cfg.max_new_tokens, eos, calls)
    return new, ref, calls


def test_greedy_equals_static_generate_and_feeds_each_token_once(varied):
    model, tok = varied
    cfg = AgentConfig(max_turns=2, max_new_tokens=20, max_response_tokens=100_000)
    new, ref, calls = _pair(varied, cfg)
    prompt_ids = new.encode_prompts(QUESTIONS)
    got, want = new.run(prompt_ids), ref.run(prompt_ids)
    for a, b in zip(got, want):
        assert a.response_ids == b.response_ids and a.env_mask == b.env_mask and a.stop == b.stop
    # the case mix the comparison must cover: EOS mid-turn, turns that hit a stop string early (and
    # go on after a note, from the kept cache), turns that ran out of budget
    assert {t.stop for t in got} == {"eos", "turns"}
    turns = [[tok.decode(x) for x in _own_turns(t)] for t in got]
    assert any(any(s in x for s in new.stop_strings) for ts in turns for x in ts)
    assert any(len(x) == cfg.max_new_tokens for t in got for x in _own_turns(t))
    # no step on a finished row: every sampled token is kept (the reference ran rows to the longest)
    assert new.decode_steps == new.generated_tokens == ref.generated_tokens < ref.decode_steps
    # a round takes one batched forward pass per token of its longest turn (bench/agent_speed.py
    # compares that count with a single-turn batch's)
    by_round = itertools.zip_longest(*[_own_turns(t) for t in got], fillvalue=[])
    assert new.forward_passes == sum(max(len(x) for x in r) for r in by_round) < new.decode_steps
    # each token goes through the model once: prompts and insertions in prefills, the rest in steps;
    # the prompts' shared head (chat template, instruction) only for the first row
    assert new.shared_prefix_tokens >= (len(QUESTIONS) - 1) * len(tok(prompts.POLICY_SYSTEM)["input_ids"])
    fed = new.prefill_tokens + new.shared_prefix_tokens + new.decode_steps - sum(calls)
    assert fed == sum(len(t.prompt_ids) + len(t.response_ids) - 1 for t in got)
    # the time breakdown: prefills and decode steps ran; no turn here was a search
    assert new.seconds["prefill"] > 0 and new.seconds["decode"] > 0 and new.seconds["search"] == 0


def test_prefill_in_length_groups_gives_the_same_tokens(varied, monkeypatch):
    """Rows whose pending tokens differ in length extend their caches in separate passes and then
    decode as one batch: the same greedy tokens as the reference, each token fed once."""
    from zsctl import agent
    from zsctl.core import generation

    cfg = AgentConfig(max_turns=2, max_new_tokens=20, max_response_tokens=100_000)
    new, ref, calls = _pair(varied, cfg)
    prompt_ids = new.encode_prompts(QUESTIONS)
    want = ref.run(prompt_ids)
    groups_seen = []

    def every_length_alone(lengths):
        groups = generation.length_groups(lengths, overhead=0)
        groups_seen.append(len(groups))
        return groups

    monkeypatch.setattr(agent, "length_groups", every_length_alone)
    got = new.run(prompt_ids)
    assert max(groups_seen) >= 3  # the questions differ in length: several passes per prefill
    for a, b in zip(got, want):
        assert a.response_ids == b.response_ids and a.env_mask == b.env_mask and a.stop == b.stop
    fed = new.prefill_tokens + new.shared_prefix_tokens + new.decode_steps - sum(calls)
    assert fed == sum(len(t.prompt_ids) + len(t.response_ids) - 1 for t in got)
    by_round = itertools.zip_longest(*[_own_turns(t) for t in got], fillvalue=[])
    assert new.forward_passes == sum(max(len(x) for x in r) for r in by_round)  # a grouped prefill counts once


def _own_turns(t) -> list[list[int]]:
    """The policy's turns of a trajectory (runs of mask-1 tokens)."""
    runs, cur = [], []
    for x, m in zip(t.response_ids, t.env_mask):
        if m:
            cur.append(x)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + ([cur] if cur else [])


def test_logprobs_match_a_full_forward_pass(varied):
    model, tok = varied
    new, _, _ = _pair(varied, AgentConfig(max_turns=2, max_new_tokens=12, max_response_tokens=100_000))
    trajs = new.run(new.encode_prompts(QUESTIONS[:3]))
    for t in trajs:
        assert len(t.logprobs) == len(t.response_ids) == len(t.env_mask)
        seq = torch.tensor([t.prompt_ids + t.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits[0].float(), dim=-1)
        n = len(t.prompt_ids)
        for j, (x, m, lp) in enumerate(zip(t.response_ids, t.env_mask, t.logprobs)):
            if m:  # the cache-built decode gave the same distribution as one pass over the whole text
                assert lp == pytest.approx(logp[n + j - 1, x].item(), abs=1e-4)
            else:
                assert lp == 0.0


def test_backend_turns_cut_at_first_stop_with_logprobs_and_lockstep(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    stop_chars = tok.convert_tokens_to_ids(list("</search>"))  # the stop string in nine tokens
    first = tok("<think>x</think><search> alpha ", add_special_tokens=False)["input_ids"] + stop_chars
    junk = tok(" more <information> mine </information><search> beta </search>", add_special_tokens=False)["input_ids"]
    answer = tok("<answer> a </answer>", add_special_tokens=False)["input_ids"]
    seen: list[int] = []

    def backend(seqs):
        seen.append(len(seqs))
        rows = [first + junk if len(seen) == 1 else answer + junk for _ in seqs]
        return rows, [[-0.5 - j for j in range(len(r))] for r in rows]

    for lockstep, calls in ((False, [1, 1]), (True, [1, 1, 0, 0])):
        seen.clear()
        loop = AgentLoop(model, tok, NoSearch(), AgentConfig(max_turns=3, max_new_tokens=64, topk=1))
        loop.generate_fn, loop.lockstep = backend, lockstep
        (t,) = loop.run(loop.encode_prompts(["q?"]))
        assert seen == calls  # lockstep: a call in each of the max_turns + 1 rounds, empty once done
        assert t.searches[0]["query"] == "alpha" and t.prediction == "a" and t.stop == "answer"
        n = len(first)
        assert t.response_ids[:n] == first and t.env_mask[n] == 0  # nothing of the junk kept
        assert t.logprobs[:n] == [-0.5 - j for j in range(n)]
        assert len(t.logprobs) == len(t.response_ids)
        inserted = [lp for lp, m in zip(t.logprobs, t.env_mask) if m == 0]
        assert inserted and set(inserted) == {0.0}
        assert t.response_ids[-len(answer) :] == answer and t.logprobs[-len(answer) :] == [
            -0.5 - j for j in range(len(answer))
        ]


def test_backend_without_logprobs_leaves_them_empty(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    loop = AgentLoop(model, tok, NoSearch(), AgentConfig(max_turns=1))
    loop.generate_fn = lambda seqs: [tok("<answer> b </answer>", add_special_tokens=False)["input_ids"] for _ in seqs]
    (t,) = loop.run(loop.encode_prompts(["q?"]))
    assert t.prediction == "b" and t.logprobs == []


def test_sampling_uses_the_full_softmax_and_top_p(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    model.generation_config.top_k = 1  # a model default that must not reach the sampler
    vocab = len(tok)
    loop = AgentLoop(model, tok, NoSearch(), AgentConfig(temperature=1.0))
    choice, logp = loop._pick(torch.zeros((4000, vocab)))
    assert len(set(choice.tolist())) > 300  # transformers' default top-k of 50 would cap this at 50
    assert logp.tolist() == pytest.approx([-torch.log(torch.tensor(float(vocab))).item()] * 4000)
    loop.cfg.top_p = 0.5
    logits = torch.full((2000, vocab), -30.0)
    logits[:, :4] = torch.log(torch.tensor([0.3, 0.25, 0.25, 0.2]))
    choice, logp = loop._pick(logits)
    assert set(choice.tolist()) == {0, 1}  # 0.3 + 0.25 reaches 0.5; the rest is cut
    assert sorted(set(round(x, 4) for x in logp.exp().tolist())) == [round(0.25 / 0.55, 4), round(0.3 / 0.55, 4)]


def test_rollout_with_the_model_in_a_peft_wrapper(tiny_model_dir):
    from peft import get_peft_model

    from zsctl.core.models import lora_config

    model, tok = load_model(str(tiny_model_dir))
    peft = get_peft_model(model, lora_config(4)).eval()
    loop = AgentLoop(peft, tok, NoSearch(), AgentConfig(max_turns=1, max_new_tokens=8))
    trajs = loop.run(loop.encode_prompts(["a?", "bb bb?"]))
    assert all(len(t.response_ids) == len(t.logprobs) > 0 for t in trajs)
    assert prompts.FINAL_TURN in tok.decode(trajs[0].response_ids)


def test_threads_option_reaches_torch_and_bad_counts_exit_2(monkeypatch):
    import subprocess
    import sys

    from zsctl.core.errors import BadInput
    from zsctl.core.models import set_threads

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("ZSCTL_THREADS", "3")
    try:
        set_threads()
        assert torch.get_num_threads() == 3 and os.environ["OMP_NUM_THREADS"] == "3"  # torch imported: set directly
        set_threads(1)
        assert torch.get_num_threads() == 1  # the option beats the environment
        with pytest.raises(BadInput, match="threads '0'"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)
    # after the command name too; before torch is imported it travels as OMP_NUM_THREADS
    probe = "import sys; from zsctl.cli import main; sys.argv = ['zsctl', 'inspect', '--threads', '0', 'x']; main()"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == 2 and "threads '0' is not a positive whole number" in res.stderr
    probe = ("import os, sys; from zsctl.cli import _root; _root(debug=False, dry_run=False, threads=2); import torch; "
             "print(os.environ['OMP_WAIT_POLICY'], os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("ZSCTL_THREADS", "OMP_WAIT_POLICY")}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert res.stdout.split() == ["PASSIVE", "2", "2"]
    # auto: threads that spin a little before sleeping (it takes one thread when the cores are busy)
    probe = ("import os; from zsctl.core.models import set_threads; set_threads('auto'); import torch; "
             "print(os.environ.get('OMP_WAIT_POLICY'), os.environ['GOMP_SPINCOUNT'], torch.get_num_threads())")
    env.pop("GOMP_SPINCOUNT", None)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert res.stdout.split() == ["None", "10000", "1"]


def test_auto_threads_take_the_cores_others_leave_free(monkeypatch):
    import subprocess
    import sys
    import time

    from zsctl.core import models

    # the arithmetic: others' busy cores = the cores' busy time minus ours; a core counts when half free
    idle_beside_us = ((0.0, 0.0, 0.0, 0.0), (10.0, 20.0, 10.0, 10.0))  # 2 cores, 10 s: we used one
    assert models.others_cores(*idle_beside_us, ncpu=2) == pytest.approx(0.0)
    one_job_beside = ((0.0, 0.0, 0.0, 0.0), (20.0, 20.0, 10.0, 10.0))  # both busy, one of them ours
    assert models.others_cores(*one_job_beside, ncpu=2) == pytest.approx(1.0)
    assert [models.free_threads(2, o) for o in (0.0, 0.4, 0.6, 1.0, 1.6, 3.0)] == [2, 2, 1, 1, 1, 1]
    assert models.free_threads(8, 2.2) == 6

    # for real: with every core kept busy by other processes, auto takes one thread
    before = torch.get_num_threads()
    monkeypatch.delenv("ZSCTL_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = models._AutoThreads().ncpu  # the cores this process may run on, not the whole host's
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        torch.set_num_threads(2)
        models.set_threads("AUTO")
        assert torch.get_num_threads() == 1 and os.environ["ZSCTL_THREADS"] == "auto"
        time.sleep(1.5)
        assert models.adapt_threads() == 1 and torch.get_num_threads() == 1
    finally:
        for p in spin:
            p.kill()
        models.set_threads(before)  # a fixed count ends auto
        torch.set_num_threads(before)
    assert models.adapt_threads() is None
    # without /proc/stat the load average stands in: ours subtracted, the rest is others'
    auto = models._AutoThreads()
    monkeypatch.setattr(auto, "sample", lambda: None)
    monkeypatch.setattr(models.os, "getloadavg", lambda: (auto.ncpu + 1.0, 0.0, 0.0))
    assert auto.choose() == 1
    monkeypatch.setattr(models.os, "getloadavg", lambda: (float(torch.get_num_threads()), 0.0, 0.0))
    assert auto.choose() == auto.ncpu
    with pytest.raises(models.BadInput, match="'autox' is not a positive whole number or 'auto'"):
        models.set_threads("autox")


def test_copied_prompt_keys_give_the_outputs_of_a_lone_row(varied):
    model, tok = varied
    cfg = AgentConfig(max_turns=1, max_new_tokens=10, max_response_tokens=100_000)
    group = AgentLoop(model, tok, NoSearch(), cfg)
    prompt = group.encode_prompts(QUESTIONS[1:2])[0]
    trajs = group.run([prompt, prompt, prompt])  # a GRPO group: one prompt, several rollouts
    assert group.shared_prefix_tokens == 2 * (len(prompt) - 1)  # all but each row's last prompt token
    lone = AgentLoop(model, tok, NoSearch(), cfg)
    (alone,) = lone.run([prompt])
    assert lone.shared_prefix_tokens == 0
    assert all(t.response_ids == alone.response_ids for t in trajs)


def test_bf16_follows_the_cpu_unless_told(monkeypatch, tiny_model_dir):
    """Inference loads bf16 weights where the CPU has bf16 instructions (else float32);
    $ZSCTL_BF16 overrides either way, and a bad value is one-line bad input."""
    from zsctl.core.errors import BadInput
    from zsctl.core.models import inference_copy, use_bf16

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    monkeypatch.delenv("ZSCTL_BF16", raising=False)
    assert use_bf16("cpu") == native and use_bf16("cuda")
    assert next(load_model(str(tiny_model_dir))[0].parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setenv("ZSCTL_BF16", "0")
    assert not use_bf16("cpu") and not use_bf16("cuda")
    model = load_model(str(tiny_model_dir))[0]
    assert next(model.parameters()).dtype == torch.float32
    assert inference_copy(model) is model
    monkeypatch.setenv("ZSCTL_BF16", "1")
    # a float32 model being trained rolls out as a bf16 copy, its LoRA adapters merged in
    from peft import get_peft_model

    from zsctl.core.models import lora_config

    trained = get_peft_model(model, lora_config(4))
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the output
    twin = inference_copy(trained)
    assert not hasattr(twin, "peft_config") and next(twin.parameters()).dtype == torch.bfloat16
    assert next(trained.parameters()).dtype == torch.float32  # the trained weights are left alone
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want, got = trained(ids).logits, twin(ids).logits.float()
        with trained.disable_adapter():
            base = trained(ids).logits
    # the copy computes what the adapters compute (up to bf16 rounding), not what the base model does
    assert (got - want).abs().mean() < 0.2 * (want - base).abs().mean()
    monkeypatch.setenv("ZSCTL_BF16", "yes")
    with pytest.raises(BadInput, match="ZSCTL_BF16"):
        use_bf16("cpu")


def test_decode_attention_gives_sdpas_logits_and_tokens(varied, monkeypatch, tmp_path):
    """On a CPU, load_model has decode steps (one new token per row) use the plain-matmul attention
    instead of SDPA: the same logits (float32) with and without padded rows, no SDPA call in a decode
    step, SDPA still for longer inputs, and greedy rollouts token for token those of SDPA. A saved
    model does not carry the choice (another process loads it with its own default)."""
    import json

    from transformers import DynamicCache

    from zsctl.core.models import DECODE_ATTENTION

    model, tok = varied
    assert model.config._attn_implementation == DECODE_ATTENTION
    model.save_pretrained(tmp_path)
    assert DECODE_ATTENTION not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    sdpa_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: sdpa_calls.append(1) or real_sdpa(*a, **k))

    def steps(impl: str, ids, mask):
        """The logits of a prefill and of three decode steps, and the SDPA calls those steps made."""
        model.config._attn_implementation = impl
        cache, out = DynamicCache(config=model.config), []
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
            out.append(logits)
            n = len(sdpa_calls)
            for _ in range(3):
                mask = torch.cat([mask, mask.new_ones((len(ids), 1))], dim=1)
                nxt = logits.argmax(-1, keepdim=True)
                logits = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
                out.append(logits)
        return torch.stack(out), len(sdpa_calls) - n

    try:
        padded = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])  # row 0 left-padded
        for ids, mask in ((padded, (padded > 0).long()), (padded[1:], torch.ones((1, 6), dtype=torch.long))):
            n0 = len(sdpa_calls)
            want, sdpa_in_steps = steps("sdpa", ids, mask)
            assert sdpa_in_steps > 0
            got, fast_in_steps = steps(DECODE_ATTENTION, ids, mask)
            assert fast_in_steps == 0 and len(sdpa_calls) - n0 > sdpa_in_steps  # its prefill still took SDPA
            assert torch.allclose(got, want, atol=1e-5)
        cfg = AgentConfig(max_turns=2, max_new_tokens=20, max_response_tokens=100_000)
        prompt_ids = AgentLoop(model, tok, NoSearch(), cfg).encode_prompts(QUESTIONS)
        model.config._attn_implementation = "sdpa"
        want = AgentLoop(model, tok, NoSearch(), cfg).run(prompt_ids)
        model.config._attn_implementation = DECODE_ATTENTION
        got = AgentLoop(model, tok, NoSearch(), cfg).run(prompt_ids)
        assert [t.response_ids for t in got] == [t.response_ids for t in want]
    finally:
        model.config._attn_implementation = DECODE_ATTENTION
