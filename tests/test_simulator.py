"""The in-process simulated engine: one batched generate per search, per-query alignment, modes,
normalisation of odd outputs, templates and spec options."""

from __future__ import annotations

import random

import pytest

from conftest import script_model
from zsctl.core import metrics, prompts
from zsctl.core.errors import BadInput
from zsctl.core.models import load_model
from zsctl.search.base import Noise, QueryContext
from zsctl.search import simulator
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
    assert [len(r.docs) for r in results] == [3] * len(SAMPLES)
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
    for i, r in zip(order, results):
        docs, prompt = r.docs, r.prompt
        query, question, golds = SAMPLES[i]
        assert f"Question: {question}" in prompt and f"Answer: {golds[0]}\n" in prompt
        assert f"Query: {query}" in prompt
        assert docs[0].title == query and docs[0].text == f"The answer is {golds[0]}."
        assert docs[1].text == f"More on {golds[0]}."
    assert [r.well_formed for r in results] == [True] * 4 and engine.well_formed == 4


def test_a_reply_ends_at_its_kth_line_break(tiny):
    # a small simulator goes on after its k documents ("Docs: ..."); the reply is whole at the k-th
    # line break, so generation stops there and the rest is never written (nor glued to document k)
    model, tok = tiny
    reply = "Doc 1: (Peru) Lima is the capital.\nDoc 2: (Andes) Mountains.\nDocs: (Doc 1) more text about Lima here"
    script_model(model, tok, {SAMPLES[0][1]: [reply]})
    engine = _engine(tiny, max_new_tokens=200)
    r = engine.search([SAMPLES[0][0]], k=2, contexts=_contexts()[:1])[0]
    assert r.text == "Doc 1: (Peru) Lima is the capital.\nDoc 2: (Andes) Mountains." and r.well_formed
    assert r.docs[1].text == "Mountains."
    written = len(tok("Doc 1: (Peru) Lima is the capital.\nDoc 2: (Andes) Mountains.\n",
                      add_special_tokens=False)["input_ids"])
    assert engine.generated_tokens == written < len(tok(reply, add_special_tokens=False)["input_ids"])


def test_documents_end_at_the_words_the_simulator_was_trained_on(tiny, monkeypatch):
    # doc_words (train-sim records build-sft's --max-doc-words): generation breaks a line that runs
    # past it, and what the line holds past it is cut, so verification judges what a policy shown
    # documents of that length reads
    import zsctl.search.simulator as sim

    model, tok = tiny
    reply = "Doc 1: (Peru) Lima is the capital city of Peru.\nDoc 2: (Andes) High mountains."
    script_model(model, tok, {SAMPLES[0][1]: [reply, reply]})  # one per search
    caps = []
    generate = sim.generate_batch
    monkeypatch.setattr(sim, "generate_batch", lambda *a, **kw: caps.append(kw["too_long"]) or generate(*a, **kw))
    engine = _engine(tiny, max_new_tokens=200)
    engine.doc_words = 4
    r = engine.search([SAMPLES[0][0]], k=2, contexts=_contexts()[:1])[0]
    (too_long,) = caps  # four words of document text fit, a fifth does not
    assert not too_long("Doc 1: (Peru) Lima is the capital") and too_long("Doc 1: (Peru) Lima is the capital city")
    assert [d.text for d in r.docs] == ["Lima is the capital", "High mountains."]
    assert r.text == "Doc 1: (Peru) Lima is the capital\nDoc 2: (Andes) High mountains."
    engine.doc_words = 0  # not recorded: documents as written
    again = engine.search([SAMPLES[0][0]], k=2, contexts=_contexts()[:1])[0]
    assert again.docs[0].text == "Lima is the capital city of Peru."


def test_tuned_prompt_is_the_training_prompt_byte_for_byte(tiny):
    model, tok = tiny
    engine = _engine(tiny, max_new_tokens=4)
    results = engine.search(["hamlet author"], k=3,
                            contexts=[QueryContext("Who wrote Hamlet?", ["Shakespeare", "Bard"], "noisy")])
    # what build-sft writes as the `prompt` column, and how TRL's SFTTrainer tokenises it
    train_prompt = prompts.render_simulator_prompt("hamlet author", "Who wrote Hamlet?", "Shakespeare", "noisy", 3)
    assert [r.prompt for r in results] == [train_prompt] and engine.model_input(train_prompt) == train_prompt
    # the token ids too: train-sim's prompt ids (zsctl.sft) are what the engine feeds the model
    from zsctl import sft

    ex = sft.encode_example(tok, train_prompt, "Doc 1: (T) x", mask_env=False, prompt_special_tokens=True)
    assert engine.encode(train_prompt) == ex["input_ids"][: ex["prompt_len"]]


def test_prompt_mode_uses_the_fewshot_template_in_the_chat_template(tiny):
    _, tok = tiny
    engine = _engine(tiny, sim_mode="prompt", max_new_tokens=4)
    [result] = engine.search(
        ["capital of peru"], k=2, contexts=[QueryContext("What is the capital of Peru?", ["Lima"])]
    )
    prompt = result.prompt
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
    [result] = engine.search(["peru"], k=2, contexts=[QueryContext("What is the capital of Peru?", ["Lima"])])
    docs = result.docs
    assert [result.text] == ["Doc 1: (Lima) Lima is the capital.\nDoc 2: (Peru) A country."]
    assert [d.title for d in docs] == ["Lima", "Peru"] and [result.well_formed] == [True]


def test_modes_explicit_drawn_and_recorded(tiny):
    engine = _engine(tiny, max_new_tokens=2, seed=7)
    queries = [f"q{i}" for i in range(40)]
    results = engine.search(queries, k=1, contexts=[QueryContext("x", ["y"], "noisy")] * 40)
    assert [r.mode for r in results] == ["noisy"] * 40
    assert all("Mode: noisy." in r.prompt for r in results)
    results = engine.search(queries, k=1)  # default noise_p = 0: useful
    assert [r.mode for r in results] == ["useful"] * 40
    # what the RL curriculum does each step: its p_i, from a generator seeded for the step
    results = engine.search(queries, k=1, contexts=[QueryContext("x", ["y"])] * 40, noise=Noise(0.5, random.Random(3)))
    drawn = [r.mode for r in results]
    assert 5 < drawn.count("noisy") < 35
    results = engine.search(queries, k=1, contexts=[QueryContext("x", ["y"])] * 40, noise=Noise(0.5, random.Random(3)))
    assert [r.mode for r in results] == drawn  # seeded: reproducible
    for mode, prompt in zip(drawn, [r.prompt for r in results]):
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
    [result] = engine.search(["odd"], k=3, contexts=[QueryContext("odd question", ["z"])])
    docs = result.docs
    assert [d.title for d in docs] == titles and [d.text for d in docs] == texts
    assert [result.well_formed] == [ok] and engine.well_formed == int(ok) and engine.outputs == 1


def test_template_file_override(tiny, tmp_path):
    custom = tmp_path / "t.txt"
    custom.write_text("SEARCH {query} | {question} | {answer} | {mode} | {k}\n")
    engine = _engine(tiny, template=str(custom), max_new_tokens=2)
    results = engine.search(["q"], k=2, contexts=[QueryContext("qq", ["aa"], "useful")])
    assert [r.prompt for r in results] == ["SEARCH q | qq | aa | useful | 2\n"]
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

    from zsctl.core.generation import NoRepeatInCompletion

    ban = NoRepeatInCompletion(3, start=4)
    # prompt 7 8 9 7 | generated 1 2 5 1 2 -> after "1 2" the token 5 would repeat "1 2 5"
    ids = torch.tensor([[7, 8, 9, 7, 1, 2, 5, 1, 2], [7, 8, 9, 7, 8, 3, 3, 3, 3]])
    scores = ban(ids, torch.zeros(2, 12))
    assert scores[0].isinf().nonzero().flatten().tolist() == [5]
    assert scores[1].isinf().nonzero().flatten().tolist() == [3]  # "3 3 3" again
    # "7 8 9" is in the prompt: generating "7 8" then 9 stays allowed
    assert not ban(torch.tensor([[7, 8, 9, 7, 8]]), torch.zeros(1, 12)).isinf().any()


# --- verified generation (?verify=N) ---------------------------------------------------------------

# (query, question, golds, mode, the replies the simulator writes on its successive tries)
VERIFY_CASES = [
    ("capital of peru", "What is the capital of Peru?", ["Lima"], "useful",  # no answer, then the answer twice
     ["Doc 1: (Peru) A country in South America.", "Doc 1: (Peru) The capital of Peru is Lima.",
      "Doc 1: (Lima) Lima is the capital of Peru."]),
    ("hamlet author", "Who wrote Hamlet?", ["Shakespeare"], "useful",  # right the first time
     ["Doc 1: (Hamlet) Hamlet was written by Shakespeare."]),
    ("tallest mountain", "Which is the tallest mountain on Earth?", ["Mount Everest"], "useful",
     ["Doc 1: (Nepal) Mount Everest is in Nepal.",  # the answer, but nothing about the query
      "Doc 1: (Tallest mountain) K2 is tall.",  # about the query, no answer
      "Doc 1: (Alps) Mont Blanc is a tall peak. Mount Everest is higher."]),  # still no query word
    ("lego founder", "Who founded Lego?", ["Ole Kirk Christiansen"], "noisy",  # holds the answer: mended, not retried
     ["Doc 1: (Lego) Lego was founded by Ole Kirk Christiansen. It makes toys.",
      "Doc 1: (Lego) Ole Kirk Christiansen started Lego in Billund. Lego bricks are plastic."]),
    ("I need a fact", "In which city is the Louvre?", ["Paris"], "useful",  # names nothing: never profits
     ["Doc 1: (Louvre) The Louvre is in Paris. It opened in 1793.", "Doc 1: (Museums) Museums hold art."]),
]


def _verify_engine(tiny, verify):
    model, tok = tiny
    script_model(model, tok, {question: replies for _, question, _, _, replies in VERIFY_CASES}, successive=True)
    return _engine(tiny, verify=verify)


def _verify_search(engine):
    return engine.search([c[0] for c in VERIFY_CASES], k=1,
                         contexts=[QueryContext(question, golds, mode) for _, question, golds, mode, _ in VERIFY_CASES])


def test_verify_regenerates_failing_rows_together_and_records_tries(tiny, monkeypatch):
    monkeypatch.setattr(simulator, "DRAW_AHEAD_ROWS", 0)  # a batch too big to draw candidates ahead
    engine = _verify_engine(tiny, verify=2)
    calls = _count_generate(engine.model)
    temperatures = []
    orig = engine._complete
    engine._complete = lambda texts, budget, stop, s, lines: temperatures.append(s.temperature) or orig(
        texts, budget, stop, s, lines)
    results = _verify_search(engine)
    texts = [r.docs[0].title + " | " + r.docs[0].text for r in results]
    # every row once, then ONE batch of two candidates for each of the two useful rows that failed
    assert calls == [5, 4]
    assert temperatures == [0.0, 0.8]  # the retry samples: a greedy retry would repeat itself
    assert [r.tries for r in results] == [3, 1, 3, 1, 1]
    assert [r.verified for r in results] == [True, True, False, False, False]
    # the first candidate that passes is kept
    assert (
        texts[0] == "Peru | The capital of Peru is Lima." and texts[1] == "Hamlet | Hamlet was written by Shakespeare."
    )
    # the retries were asked with the answer on both sides of the query; a reply kept from the first
    # try keeps its plain prompt
    assert "Query: Lima capital of peru Lima\n" in results[0].prompt and "Query: hamlet author\n" in results[1].prompt
    # never verified: the last candidate with every answer-holding sentence removed
    assert texts[2] == "Alps | Mont Blanc is a tall peak."
    # a noisy reply holding the answer is mended at once, not regenerated
    assert texts[3] == "Lego | It makes toys."
    # the degenerate query was written from the noisy prompt, though useful was asked for, and mended
    assert results[4].mode == "useful" and "Mode: noisy." in results[4].prompt
    assert texts[4] == "Louvre | It opened in 1793."
    for (_, _, golds, _, _), r in zip(VERIFY_CASES[2:], results[2:]):
        assert not metrics.docs_hold_answer([d.as_dict() for d in r.docs], golds)
    assert engine.regenerated == 4 and engine.fallbacks == 3 and engine.generation_s > 0 and engine.generation_cpu_s > 0


def test_a_small_batch_draws_the_candidates_with_the_first_replies(tiny, monkeypatch):
    """The same replies kept as when the candidates come in a second batch (above), in ONE batch:
    the first replies greedy, every useful row's candidates sampled beside them."""
    monkeypatch.setattr(simulator, "DRAW_AHEAD_ROWS", 16)
    engine = _verify_engine(tiny, verify=2)
    calls = _count_generate(engine.model)
    drawn = []
    orig = engine._complete
    engine._complete = lambda texts, budget, stop, s, lines: drawn.append([x.temperature for x in s]) or orig(
        texts, budget, stop, s, lines)
    results = _verify_search(engine)
    assert calls == [5 + 2 * 3]  # 5 first replies, 2 candidates for each of the 3 useful rows
    assert drawn == [[0.0] * 5 + [0.8] * 6]
    texts = [r.docs[0].title + " | " + r.docs[0].text for r in results]
    assert texts == ["Peru | The capital of Peru is Lima.", "Hamlet | Hamlet was written by Shakespeare.",
                     "Alps | Mont Blanc is a tall peak.", "Lego | It makes toys.", "Louvre | It opened in 1793."]
    assert [r.verified for r in results] == [True, True, False, False, False]
    # tries count what was generated: a useful row's candidates were, even where the first reply passed
    assert [r.tries for r in results] == [3, 3, 3, 1, 1] and engine.regenerated == 6
    assert "Query: Lima capital of peru Lima\n" in results[0].prompt and "Query: hamlet author\n" in results[1].prompt
    # a batch too big draws them after, only for the rows that failed (the test above)
    assert engine.draws_ahead(16) and not engine.draws_ahead(17)


def test_without_verify_the_first_reply_stands(tiny):
    engine = _verify_engine(tiny, verify=0)
    calls = _count_generate(engine.model)
    results = _verify_search(engine)
    assert calls == [5] and [r.tries for r in results] == [1] * 5 and [r.verified for r in results] == [None] * 5
    # a query that names nothing is written from the noisy prompt, which does not hold the answer
    assert results[4].mode == "useful" and "Mode: noisy." in results[4].prompt and "Paris" not in results[4].prompt
    assert "Mode: useful." in results[0].prompt and "Answer: Lima\n" in results[0].prompt
    # (this scripted model writes the answer whatever the prompt: verification is what removes it)
    assert results[4].docs[0].text == "The Louvre is in Paris. It opened in 1793."


def test_verify_spec_option_and_bad_values(tiny_model_dir, tmp_path):
    assert make_sim(f"sim:{tiny_model_dir}?verify=2").verify == 2
    for bad in ("-1", "11", "two"):
        with pytest.raises(BadInput, match="verify"):
            make_sim(f"sim:{tiny_model_dir}?verify={bad}")
    from zsctl.search import make_engine

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "1", "title": "Lima", "text": "Lima is the capital of Peru."}\n')
    with pytest.raises(BadInput, match="verify applies only to simulated engines"):
        make_engine(f"bm25:{corpus}?verify=2")


def test_verify_over_http_retries_only_the_failing_prompt_with_sampling():
    from test_search import http_server

    from zsctl.search.simulator import make_sim_http

    seen: dict[str, int] = {}

    def completions(request, n):
        if request["path"].endswith("/models"):
            return 200, {"data": [{"id": "sim"}]}
        choices = []
        for i, prompt in enumerate(request["body"]["prompt"]):
            tries = seen[prompt] = seen.get(prompt, 0) + 1
            good = "Peru" not in prompt or tries > 1  # the Peru prompt passes on its second try
            text = "Doc 1: (Peru) Lima is the capital of Peru." if good else "Doc 1: (Peru) A country."
            if "Hamlet" in prompt:
                text = "Doc 1: (Hamlet) A play by Shakespeare."
            choices.append({"index": i, "text": text})
        return 200, {"choices": choices}

    with http_server(completions) as (url, log):
        engine = make_sim_http(f"sim+{url}/v1?verify=2")
        ctxs = [QueryContext("What is the capital of Peru?", ["Lima"], "useful"),
                QueryContext("Who wrote Hamlet?", ["Shakespeare"], "useful")]
        results = engine.search(["capital of peru", "hamlet author"], k=1, contexts=ctxs)
        engine.close()
    posts = [r["body"] for r in log if r["method"] == "POST"]
    # the failing Peru prompt twice (verify=2) in one request, its query line naming the answer; the
    # first candidate of that new prompt fails again, the second passes
    assert [len(b["prompt"]) for b in posts] == [2, 2]
    assert all("Query: Lima capital of peru Lima\n" in p for p in posts[1]["prompt"])
    assert posts[0]["temperature"] == 0.0 and posts[1]["temperature"] == 0.8
    assert [r.tries for r in results] == [3, 1] and [r.verified for r in results] == [True, True]
    assert results[0].docs[0].text == "Lima is the capital of Peru."


# A bundled HotpotQA bridge question: its supporting documents are "Kiss and Tell (1945 film)" and
# "Shirley Temple", whose text holds the answer.
BRIDGE = "What government position was held by the woman who portrayed Corliss Archer in the film Kiss and Tell?"


def test_chain_leads_a_useful_reply_one_hop_at_a_time(tiny):
    engine = _engine(tiny, max_new_tokens=4, chain=1)
    useful, noisy = QueryContext(BRIDGE, ["Chief of Protocol"], "useful"), QueryContext(BRIDGE, ["Chief of Protocol"],
                                                                                        "noisy")
    first, second, shy, other = engine.search(
        ["Kiss and Tell Corliss Archer actress", "Shirley Temple government position", "Kiss and Tell", "Peru capital"],
        k=1, contexts=[useful, useful, noisy, QueryContext("What is the capital of Peru?", ["Lima"], "useful")])
    # the first hop learns of the entity that holds the answer, not the answer
    assert "Answer: Shirley Temple\n" in first.prompt and "Chief of Protocol" not in first.prompt
    assert "Answer: Chief of Protocol\n" in second.prompt  # a query naming her gets the answer
    assert "Shirley Temple" not in shy.prompt and "Chief of Protocol" not in shy.prompt  # noisy: neither
    assert "Answer: Lima\n" in other.prompt  # a question without supporting documents: as without chain
    assert engine.hops == 1
    # off by default: any useful query about the question gets the answer
    [plain] = _engine(tiny, max_new_tokens=4).search(["Kiss and Tell Corliss Archer actress"], k=1, contexts=[useful])
    assert "Answer: Chief of Protocol\n" in plain.prompt


def test_chain_verification_asks_the_first_hop_for_the_next_entity(tiny, tiny_model_dir):
    model, tok = tiny
    script_model(model, tok, {BRIDGE: ["Doc 1: (Kiss and Tell) Kiss and Tell is a 1945 comedy film.",
                                       "Doc 1: (Kiss and Tell) It stars Shirley Temple, later Chief of Protocol.",
                                       "Doc 1: (Kiss and Tell) Kiss and Tell is a 1945 film starring Shirley Temple."]},
                 successive=True)
    engine = _engine(tiny, verify=3, chain=1)
    ctx = QueryContext(BRIDGE, ["Chief of Protocol"], "useful")
    [result] = engine.search(["Kiss and Tell cast"], k=1, contexts=[ctx])
    # the first reply does not lead on; of the three candidates drawn together, the first skips the hop
    # and gives the answer away, the second names the next entity only and passes
    assert result.tries == 4 and result.verified is True
    assert "Shirley Temple" in result.docs[0].text and "Protocol" not in result.docs[0].text
    assert make_sim(f"sim:{tiny_model_dir}?chain=1").chain
    for bad in ("2", "yes"):
        with pytest.raises(BadInput, match="chain"):
            make_sim(f"sim:{tiny_model_dir}?chain={bad}")
    from zsctl.search import make_engine

    with pytest.raises(BadInput, match="chain applies only to simulated engines"):
        make_engine("bm25:data/corpus/wiki_sample.jsonl?chain=1")


def test_chain_falls_back_to_the_supporting_document_that_leads_on(tiny):
    model, tok = tiny
    # the simulator never names the next entity (nor the answer) for this question
    script_model(model, tok, {BRIDGE: ["Doc 1: (Kiss and Tell) Kiss and Tell is a 1945 comedy film."]})
    engine = _engine(tiny, verify=1, chain=1, doc_words=12)
    ctx = QueryContext(BRIDGE, ["Chief of Protocol"], "useful")
    first, second, vague = engine.search(["Kiss and Tell cast", "Shirley Temple", "famous singer biography"],
                                         k=1, contexts=[ctx] * 3)
    # first hop: the question's supporting document that names her (and not the answer) in its place
    assert first.verified is True and first.docs[0].title == "Kiss and Tell"
    assert "Shirley Temple" in first.docs[0].text and "Protocol" not in first.docs[0].text
    # second hop: her document at the sentence that holds the answer; its first 12 words would miss
    # it ("As an adult, she was named United States ambassador to Ghana and to"), so the cut begins
    # 6 words before the answer ends
    assert second.verified is True and second.docs[0].title == "Shirley Temple"
    assert second.docs[0].text == "and also served as Chief of Protocol of the United States."
    # a query that no supporting document is about gets no help: its last candidate without the answer
    assert vague.verified is False and "Shirley" not in vague.text and "Protocol" not in vague.text
    assert engine.supported == 2 and engine.fallbacks == 1


def test_chain_leads_on_only_where_one_document_holds_the_answer_and_is_not_named_by_it(tiny):
    engine = _engine(tiny, chain=1)
    hop = engine.next_hop
    assert hop("Kiss and Tell", QueryContext(BRIDGE, ["Chief of Protocol"])) == "Shirley Temple"
    assert hop("Shirley Temple", QueryContext(BRIDGE, ["Chief of Protocol"])) is None  # she is named: the answer
    # a comparison whose answer is one of its entities: a reply could never name it without the answer
    older = QueryContext("Who is older, Annie Morton or Terry Richardson?", ["Terry Richardson"])
    assert hop("Annie Morton", older) is None


def test_chain_fallback_for_a_first_hop_is_the_document_that_names_the_next_entity(tiny):
    model, tok = tiny
    question = "The Memphis Hustle are based in a suburb of a city with a population of what in 2010?"
    script_model(model, tok, {question: ["Doc 1: (Memphis) A city in Tennessee."]})
    engine = _engine(tiny, verify=1, chain=1, doc_words=30)
    [r] = engine.search(["Memphis Hustle"], k=1, contexts=[QueryContext(question, ["48,982"], "useful")])
    # not "Southaven, Mississippi" (the answer's own page, which names Memphis, cut short of 48,982)
    # but the team's page, from the sentence that names the suburb
    assert r.verified is True and r.docs[0].title == "Memphis Hustle"
    assert r.docs[0].text.startswith("Based in the Memphis suburb of Southaven, Mississippi")
