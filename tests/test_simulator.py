"""The in-process simulated engine: one batched generate per search, per-query alignment, modes,
normalisation of odd outputs, templates and spec options."""

from __future__ import annotations

import random

import pytest

from conftest import script_model
from zsctl.core import prompts
from zsctl.core.errors import BadInput
from zsctl.core.models import load_model
from zsctl.search.base import QueryContext
from zsctl.search.simulator import SimulatorEngine, make_sim, split_options

SAMPLES = [  # (query, question, golds): every question, answer and query distinct
    ("hamlet author", "Who wrote Hamlet?", ["William Shakespeare", "Shakespeare"]),
    ("capital of peru", "What is the capital of Peru?", ["Lima"]),
    ("tallest mountain", "Which is the tallest mountain on Earth?", ["Mount Everest"]),
    ("speed of light", "How fast does light travel?", ["299792 km/s"]),
]


@pytest.fixture()
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _count_generate(model) -> list[int]:
    calls = []
    orig = model.generate

    def generate(*args, **kw):
        calls.append(kw["input_ids"].shape[0])
        return orig(*args, **kw)

    model.generate = generate
    return calls


def _engine(tiny, **kw) -> SimulatorEngine:
    model, tok = tiny
    return SimulatorEngine("tiny", model=model, tokenizer=tok, **kw)


def _contexts(mode=None):
    return [QueryContext(question, golds, mode) for _, question, golds in SAMPLES]


def test_one_batched_generate_per_search(tiny):
    engine = _engine(tiny, max_new_tokens=8)
    calls = _count_generate(engine.model)
    results = engine.search([q for q, _, _ in SAMPLES], k=3, contexts=_contexts())
    assert calls == [len(SAMPLES)]  # one generate with every query as a row
    assert [len(r) for r in results] == [3] * len(SAMPLES)
    engine.search(["one more"], k=2)
    assert calls == [len(SAMPLES), 1]
    assert engine.stats.calls == len(SAMPLES) + 1 and engine.generate_calls == 2


def test_each_query_gets_its_own_question_and_first_answer(tiny):
    model, tok = tiny
    # each sample's documents name its own gold answer; the script is keyed by the question,
    # so any misalignment between queries and contexts shows up in the documents
    scripts = {
        question: [f"Doc 1: ({query}) The answer is {golds[0]}.\nDoc 2: More on {golds[0]}."]
        for query, question, golds in SAMPLES
    }
    script_model(model, tok, scripts)
    engine = _engine(tiny)
    order = [2, 0, 3, 1]  # not the script's order
    queries = [SAMPLES[i][0] for i in order]
    ctxs = [_contexts()[i] for i in order]
    results = engine.search(queries, k=2, contexts=ctxs)
    for i, docs, prompt in zip(order, results, engine.last_prompts):
        query, question, golds = SAMPLES[i]
        assert f"Question: {question}" in prompt and f"Answer: {golds[0]}\n" in prompt
        assert f"Query: {query}" in prompt
        assert docs[0].title == query and docs[0].text == f"The answer is {golds[0]}."
        assert docs[1].text == f"More on {golds[0]}."
    assert engine.last_well_formed == [True] * 4 and engine.well_formed == 4


def test_tuned_prompt_is_the_training_prompt_byte_for_byte(tiny):
    model, tok = tiny
    engine = _engine(tiny, max_new_tokens=4)
    engine.search(["hamlet author"], k=3, contexts=[QueryContext("Who wrote Hamlet?", ["Shakespeare", "Bard"], "noisy")])
    # what build-sft writes as the `prompt` column, and how TRL's SFTTrainer tokenises it
    train_prompt = prompts.render_simulator_prompt("hamlet author", "Who wrote Hamlet?", "Shakespeare", "noisy", 3)
    assert engine.last_prompts == [train_prompt] and engine.model_input(train_prompt) == train_prompt
    # the token ids too: train-sim's prompt ids (zsctl.sft) are what the engine feeds the model
    from zsctl import sft

    ex = sft.encode_example(tok, train_prompt, "Doc 1: (T) x", mask_env=False, prompt_special_tokens=True)
    assert engine.encode(train_prompt) == ex["input_ids"][: ex["prompt_len"]]


def test_prompt_mode_uses_the_fewshot_template_in_the_chat_template(tiny):
    _, tok = tiny
    engine = _engine(tiny, sim_mode="prompt", max_new_tokens=4)
    engine.search(["capital of peru"], k=2, contexts=[QueryContext("What is the capital of Peru?", ["Lima"])])
    prompt = engine.last_prompts[0]
    assert prompt.startswith(prompts.SIMULATOR_FEWSHOT_TEMPLATE.split("{k}")[0])
    assert "Now (mode useful)" in prompt and "Answer: Lima" in prompt
    text = tok.decode(engine.encode(engine.model_input(prompt)))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\nDoc 1:")
    assert prompt in text


def test_prompt_mode_puts_the_primer_back(tiny):
    model, tok = tiny
    # the model is given "...assistant\nDoc 1:" and continues from there
    script_model(model, tok, {"Peru": [" (Lima) Lima is the capital.\nDoc 2: (Peru) A country."]})
    engine = _engine(tiny, sim_mode="prompt")
    [docs] = engine.search(["peru"], k=2, contexts=[QueryContext("What is the capital of Peru?", ["Lima"])])
    assert engine.last_texts == ["Doc 1: (Lima) Lima is the capital.\nDoc 2: (Peru) A country."]
    assert [d.title for d in docs] == ["Lima", "Peru"] and engine.last_well_formed == [True]


def test_modes_explicit_drawn_and_recorded(tiny):
    engine = _engine(tiny, max_new_tokens=2, seed=7)
    queries = [f"q{i}" for i in range(40)]
    engine.search(queries, k=1, contexts=[QueryContext("x", ["y"], "noisy")] * 40)
    assert engine.last_modes == ["noisy"] * 40
    assert all("Mode: noisy." in p for p in engine.last_prompts)
    engine.search(queries, k=1)  # default noise_p = 0: useful
    assert engine.last_modes == ["useful"] * 40
    engine.noise_p = 0.5  # what the RL curriculum does between steps
    engine.rng = random.Random(3)
    engine.search(queries, k=1, contexts=[QueryContext("x", ["y"])] * 40)
    drawn = list(engine.last_modes)
    assert 5 < drawn.count("noisy") < 35
    engine.rng = random.Random(3)
    engine.search(queries, k=1, contexts=[QueryContext("x", ["y"])] * 40)
    assert engine.last_modes == drawn  # seeded: reproducible
    for mode, prompt in zip(drawn, engine.last_prompts):
        assert f"Mode: {mode}." in prompt
    with pytest.raises(BadInput):
        engine.search(["q"], k=1, contexts=[QueryContext("x", ["y"], "sarcastic")])


@pytest.mark.parametrize(
    "script, titles, texts, ok",
    [
        ("Doc 1: (A) alpha", ["A", "", ""], ["alpha", "", ""], False),  # too few: padded
        ("Doc 1: (A) a\nDoc 2: (B) b\nDoc 3: (C) c\nDoc 4: (D) d\nDoc 5: (E) e",  # too many: cut at Doc 4
         ["A", "B", "C"], ["a", "b", "c"], True),
        ("just some words\nand more", ["", "", ""], ["just some words and more", "", ""], False),  # no Doc prefix
        ("", ["", "", ""], ["", "", ""], False),  # nothing at all
        ("Doc 2: (B) b\nDoc 1: (A) a\nDoc 3: c", ["B", "A", ""], ["b", "a", "c"], False),  # out of order
    ],
)
def test_odd_outputs_become_exactly_k_documents(tiny, script, titles, texts, ok):
    model, tok = tiny
    script_model(model, tok, {"odd question": [script]})
    engine = _engine(tiny)
    [docs] = engine.search(["odd"], k=3, contexts=[QueryContext("odd question", ["z"])])
    assert [d.title for d in docs] == titles and [d.text for d in docs] == texts
    assert engine.last_well_formed == [ok] and engine.well_formed == int(ok) and engine.outputs == 1


def test_template_file_override(tiny, tmp_path):
    custom = tmp_path / "t.txt"
    custom.write_text("SEARCH {query} | {question} | {answer} | {mode} | {k}\n")
    engine = _engine(tiny, template=str(custom), max_new_tokens=2)
    engine.search(["q"], k=2, contexts=[QueryContext("qq", ["aa"], "useful")])
    assert engine.last_prompts == ["SEARCH q | qq | aa | useful | 2\n"]
    bad = tmp_path / "bad.txt"
    bad.write_text("{query} {colour}")
    with pytest.raises(BadInput, match="colour"):
        _engine(tiny, template=str(bad))


def test_spec_options_and_errors(tiny_model_dir):
    assert split_options("sim:m?sim_mode=prompt&noise_p=0.25&seed=3") == (
        "sim:m", {"sim_mode": "prompt", "noise_p": 0.25, "seed": 3})
    with pytest.raises(BadInput, match="colour"):
        split_options("sim:m?colour=red")
    with pytest.raises(BadInput, match="noise_p"):
        split_options("sim:m?noise_p=lots")
    engine = make_sim(f"sim:{tiny_model_dir}?sim_mode=prompt&max_new_tokens=5", sim_mode="tuned", noise_p=0.1)
    assert engine.sim_mode == "prompt" and engine.max_new_tokens == 5 and engine.noise_p == 0.1
    with pytest.raises(BadInput, match="timeout"):
        make_sim(f"sim:{tiny_model_dir}?timeout=3")
    with pytest.raises(BadInput, match="no such directory"):
        make_sim("sim:/nowhere/model")
    with pytest.raises(BadInput, match="names no model"):
        make_sim("sim:")
    with pytest.raises(BadInput, match="noise_p"):
        make_sim(f"sim:{tiny_model_dir}", noise_p=1.5)


def test_no_ngram_repeats_within_a_completion_but_the_prompt_may_be_repeated():
    import torch

    from zsctl.search.simulator import _NoRepeatInCompletion

    ban = _NoRepeatInCompletion(3, start=4)
    # prompt 7 8 9 7 | generated 1 2 5 1 2 -> after "1 2" the token 5 would repeat "1 2 5"
    ids = torch.tensor([[7, 8, 9, 7, 1, 2, 5, 1, 2], [7, 8, 9, 7, 8, 3, 3, 3, 3]])
    scores = ban(ids, torch.zeros(2, 12))
    assert scores[0].isinf().nonzero().flatten().tolist() == [5]
    assert scores[1].isinf().nonzero().flatten().tolist() == [3]  # "3 3 3" again
    # "7 8 9" is in the prompt: generating "7 8" then 9 stays allowed
    assert not ban(torch.tensor([[7, 8, 9, 7, 8]]), torch.zeros(1, 12)).isinf().any()
