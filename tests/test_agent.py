"""The agent loop: stop strings, batched search, insertion, the env mask, the turn limit."""

from __future__ import annotations

import pytest

from conftest import script_model
from zsctl.agent import AgentConfig, AgentLoop
from zsctl.core import prompts
from zsctl.core.models import load_model
from zsctl.search.base import Document, QueryContext, SearchEngine, SearchResult


class RecordingEngine(SearchEngine):
    """A real in-memory engine that records each batched call."""

    name = "recording"

    def __init__(self):
        super().__init__()
        self.batches_seen: list[list[str]] = []

    def _search(self, queries, k, contexts, noise):
        self.batches_seen.append(list(queries))
        self.stats.calls += len(queries)
        return [[Document(f"T{j}", f"about {q} number {j}", 1.0 / (j + 1)) for j in range(k)] for q in queries]


@pytest.fixture()
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _loop(tiny, scripts, cfg=None):
    model, tok = tiny
    script_model(model, tok, scripts)
    engine = RecordingEngine()
    loop = AgentLoop(model, tok, engine, cfg or AgentConfig(max_turns=2, max_new_tokens=40, topk=2))
    qs = list(scripts)
    trajs = loop.run(loop.encode_prompts(qs), [QueryContext(q, ["x"]) for q in qs])
    return loop, engine, trajs


def test_search_then_answer_inserts_information_with_mask(tiny):
    _, tok = tiny
    loop, engine, trajs = _loop(
        tiny,
        {
            "alpha question": ["<think>hm</think><search> alpha </search>", "<answer> Alpha Man </answer>"],
            "beta question": ["<answer> beta </answer>"],
        },
    )
    a, b = trajs
    assert a.prediction == "Alpha Man" and a.stop == "answer" and a.num_searches == 1
    assert b.prediction == "beta" and b.num_searches == 0
    assert engine.batches_seen == [["alpha"]]  # one engine call for the round
    assert len(a.env_mask) == len(a.response_ids)
    inserted = tok.decode([t for t, m in zip(a.response_ids, a.env_mask) if m == 0])
    own = tok.decode([t for t, m in zip(a.response_ids, a.env_mask) if m == 1])
    assert inserted == prompts.information_block(
        [Document("T0", "about alpha number 0"), Document("T1", "about alpha number 1")]
    )
    assert own == "<think>hm</think><search> alpha </search><answer> Alpha Man </answer>"
    # the prompt is never part of the response
    assert "Question:" not in tok.decode(a.response_ids)


def test_all_searches_of_a_round_go_in_one_call(tiny):
    loop, engine, trajs = _loop(
        tiny,
        {
            "q one": ["<search> one </search>", "<answer> 1 </answer>"],
            "q two": ["<search> two </search>", "<search> two again </search>", "<answer> 2 </answer>"],
            "q three": ["<answer> 3 </answer>"],
        },
    )
    assert engine.batches_seen == [["one", "two"], ["two again"]]
    assert [t.prediction for t in trajs] == ["1", "2", "3"]
    assert loop.generate_calls == 3


def test_turn_limit_then_final_round(tiny):
    _, tok = tiny
    loop, engine, trajs = _loop(
        tiny,
        {"greedy searcher": ["<search> a </search>", "<search> b </search>", "<search> c </search>"]},
        AgentConfig(max_turns=2, max_new_tokens=40, topk=1),
    )
    (t,) = trajs
    assert t.num_searches == 2 and t.stop == "turns" and t.prediction is None
    assert engine.batches_seen == [["a"], ["b"]]
    assert prompts.FINAL_TURN.strip() in tok.decode(t.response_ids)


def test_invalid_action_gets_a_note_with_mask_zero(tiny):
    _, tok = tiny
    # rambling until the round's token budget runs out is an invalid action (EOS would end it)
    loop, engine, trajs = _loop(tiny, {"lost one": ["I do not know " * 40, "<answer> ok </answer>"]},
                                AgentConfig(max_turns=2, max_new_tokens=30, topk=1))
    (t,) = trajs
    assert t.prediction == "ok"
    masked = tok.decode([x for x, m in zip(t.response_ids, t.env_mask) if m == 0])
    assert masked == prompts.INVALID_ACTION


def test_eos_without_answer_ends_with_eos_kept(tiny):
    _, tok = tiny
    loop, engine, trajs = _loop(tiny, {"quiet one": ["just words"]}, AgentConfig(max_turns=1, max_new_tokens=30))
    (t,) = trajs
    assert t.stop == "eos" and t.prediction is None
    assert t.response_ids[-1] == tok.eos_token_id and t.env_mask[-1] == 1


def test_random_tiny_model_never_crashes(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    loop = AgentLoop(model, tok, RecordingEngine(), AgentConfig(max_turns=2, max_new_tokens=16, temperature=1.0))
    trajs = loop.run(loop.encode_prompts(["a?", "b?", "c?"]), None)
    assert len(trajs) == 3
    for t in trajs:
        assert len(t.response_ids) == len(t.env_mask) <= loop.cfg.max_response_tokens + 64
        assert t.stop in {"answer", "eos", "turns", "length"}


class ForcedTurn:
    """A logits processor that makes the model write `plan` (token ids) as its first turn, token by
    token whatever the tokenizer would merge, and EOS once anything was inserted after it."""

    def __init__(self, tok, prompt_len: int, plan: list[int]):
        self.tok, self.n, self.plan = tok, prompt_len, plan

    def __call__(self, input_ids, scores):
        for r, row in enumerate(input_ids.tolist()):
            real = row[next(j for j, x in enumerate(row) if x != self.tok.pad_token_id):]  # no left padding
            done = real[self.n:]
            inserted = "</information>" in self.tok.decode(done)
            nxt = self.plan[len(done)] if not inserted and len(done) < len(self.plan) else self.tok.eos_token_id
            scores[r] = -1e9
            scores[r, nxt] = 0.0
        return scores


def test_turn_ends_at_first_stop_string_spelled_in_many_tokens(tiny):
    from transformers import LogitsProcessorList

    model, tok = tiny
    # the old check looked at len(tokens("</search>")) + 2 tokens; one token per character is more
    assert len(tok("</search>", add_special_tokens=False)["input_ids"]) + 2 < len("</search>")
    first = tok("<think>x</think><search> alpha ", add_special_tokens=False)["input_ids"]
    first += tok.convert_tokens_to_ids(list("</search>"))
    junk = tok(" and <information> my own </information><search> beta </search><answer> b </answer>",
               add_special_tokens=False)["input_ids"]
    engine = RecordingEngine()
    loop = AgentLoop(model, tok, engine, AgentConfig(max_turns=1, max_new_tokens=200, topk=1))
    prompt_ids = loop.encode_prompts(["what is alpha?"])
    model.rollout_logits_processor = LogitsProcessorList([ForcedTurn(tok, len(prompt_ids[0]), first + junk)])
    (t,) = loop.run(prompt_ids)
    assert engine.batches_seen == [["alpha"]] and t.prediction is None and t.stop == "eos"
    own = [x for x, m in zip(t.response_ids, t.env_mask) if m]
    assert own == first + [tok.eos_token_id]  # the first turn stops at its </search>, nothing after it
    assert loop.decode_steps == len(own)


class RerollingEngine(RecordingEngine):
    """Different documents on every call, as a simulator's fresh useful/noisy draw gives."""

    def _search(self, queries, k, contexts, noise):
        self.batches_seen.append(list(queries))
        self.stats.calls += len(queries)
        return [SearchResult([Document(f"T{len(self.batches_seen)}", f"draw {len(self.batches_seen)} for {q}")],
                             mode="useful" if len(self.batches_seen) % 2 else "noisy") for q in queries]


def test_a_repeated_query_gets_its_earlier_documents_without_a_call(tiny):
    model, tok = tiny
    scripts = {"twice": ["<search> Kiss and Tell </search>", "<search>  kiss and tell </search>",
                         "<answer> x </answer>"],
               "other": ["<search> Kiss and Tell </search>", "<search> Shirley Temple </search>",
                         "<answer> y </answer>"]}
    script_model(model, tok, scripts)
    engine = RerollingEngine()
    loop = AgentLoop(model, tok, engine, AgentConfig(max_turns=2, max_new_tokens=40, topk=1))
    a, b = loop.run(loop.encode_prompts(list(scripts)), [QueryContext(q, ["x"]) for q in scripts])
    # the repeat costs no call and cannot re-draw; another trajectory's same query is searched anew
    assert engine.batches_seen == [["Kiss and Tell", "Kiss and Tell"], ["Shirley Temple"]]
    assert a.searches[1]["documents"] == a.searches[0]["documents"] and a.searches[1]["mode"] == "useful"
    assert a.searches[1]["query"] == "kiss and tell"
    blocks = tok.decode([t for t, m in zip(a.response_ids, a.env_mask) if m == 0])
    assert blocks.count("draw 1 for Kiss and Tell") == 2
    assert b.searches[1]["documents"][0]["text"] == "draw 2 for Shirley Temple" and b.searches[1]["mode"] == "noisy"
