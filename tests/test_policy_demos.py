"""`build-sft --for policy --templated`: warm-start demonstrations that teach real queries — varied
thinking, never a degenerate query, only answer-holding real search calls, and for the bundled
multi-hop benchmarks searches for the entities of the supporting documents (real BM25 over those
documents)."""

from __future__ import annotations

import json
import re

from test_build_sft import build, doc, traj, write_trajs
from zsctl import sft
from zsctl.core import data, metrics, prompts
from zsctl.stages import build_sft

SEARCH_RE = re.compile(r"<search> (.*?) </search>")
THINK_RE = re.compile(r"<think> (.*?) </think>")


def _thinking_templates(completion: str) -> list[str]:
    """Which phrasing each <think> of a demonstration used (its text before the first slot)."""
    out = []
    for think in THINK_RE.findall(completion):
        options = [o for group in (prompts.DEMO_THINK_QUESTION, prompts.DEMO_THINK_TOPIC, prompts.DEMO_THINK_ALSO,
                                   prompts.DEMO_THINK_NEXT, prompts.DEMO_THINK_ANSWER) for o in group]
        out.append(next(o for o in options if think.startswith(o.split("{")[0])))
    return out


def test_thinking_varies_and_no_demonstration_searches_for_nothing(tmp_path, tiny_model_dir):
    rows = []
    for i in range(24):
        answer = f"Zorblax{i}"
        hit = [doc(f"Planet {i}", f"The ruler of planet {i} is {answer}.")]
        rows.append(
            traj(f"p{i}#0", f"Who rules planet {i}?", [answer], [("query", hit), (f"ruler of planet {i}", hit)])
        )
    rows.append(
        traj(
            "d#0",
            "Who rules the moon?",
            ["Moonking"],
            [("I need a fact, so I search.", [doc("Moon", "Moonking rules the moon.")]), ("", [doc("M", "Moonking")])],
        )
    )
    src = write_trajs(tmp_path / "t", rows)
    summary, train, val = build(
        tmp_path, src, target="policy", templated=True, policy=str(tiny_model_dir), val_fraction=0.0
    )
    demos = train + val
    assert len(demos) == 24 and summary["degenerate_query"] == 24 + 2  # each planet's "query" call; both moon calls
    queries = [q for r in demos for q in SEARCH_RE.findall(r["completion"])]
    assert queries and not any(metrics.is_degenerate_query(q) for q in queries)
    search_thinks = {_thinking_templates(r["completion"])[0] for r in demos}
    answer_thinks = {_thinking_templates(r["completion"])[-1] for r in demos}
    assert len(search_thinks) >= 3 and len(answer_thinks) >= 3  # several phrasings, not one sentence
    # the thinking names the thing searched for, and the answer the documents hold
    r0 = next(r for r in demos if r["question"] == "Who rules planet 0?")
    assert (
        "ruler of planet 0" in THINK_RE.findall(r0["completion"])[0]
        and "Zorblax0" in THINK_RE.findall(r0["completion"])[-1]
    )
    # deterministic: the same input gives the same demonstrations
    _, again, _ = build(
        tmp_path, src, name="again", target="policy", templated=True, policy=str(tiny_model_dir), val_fraction=0.0
    )
    assert [r["completion"] for r in again] == [r["completion"] for r in train]


def test_every_search_thought_ends_with_what_it_searches_for(tmp_path, tiny_model_dir):
    """A small warm start copies the last words of its thinking into <search>: when the query is the
    question itself the thought ends with it too, so a copied thought still names something."""
    rows = []
    for i in range(12):
        question, answer = f"Who guards tower {i}?", f"Quolmar{i}"
        hit = [doc(f"Tower {i}", f"Tower {i} is guarded by {answer}.")]
        rows.append(traj(f"t{i}#0", question, [answer], [(question, hit)]))
    src = write_trajs(tmp_path / "t", rows)
    _, train, val = build(tmp_path, src, target="policy", templated=True, policy=str(tiny_model_dir), val_fraction=0.0)
    demos = train + val
    assert len(demos) == 12
    assert len({_thinking_templates(r["completion"])[0] for r in demos}) >= 3
    for r in demos:
        (think, *_), (query,) = THINK_RE.findall(r["completion"]), SEARCH_RE.findall(r["completion"])
        assert query == r["question"] and think.endswith(query)


def _first_word(text: str) -> str:
    return re.match(r"\w+", text)[0]


def _bench_row(name: str, qid: str) -> dict:
    with open(data.data_dir() / "bench" / f"{name}.jsonl", encoding="utf-8") as f:
        return next(r for r in map(json.loads, f) if r["id"] == qid)


def test_multi_hop_demonstrations_search_for_the_supporting_entities(tmp_path, tiny_model_dir):
    bridge = _bench_row("hotpotqa", "dev_1")  # ... the woman who portrayed Corliss Archer in the film Kiss and Tell?
    comparison = _bench_row("2wikimultihopqa", "dev_3274")  # ... Forbidden Ground or Free Guy?
    assert build_sft.supporting_entities(bridge["question"]) == [
        "Shirley Temple",
        "Kiss and Tell",
    ]  # '(1945 film)' dropped
    corpus = tmp_path / "corpus.jsonl"  # the two questions' own context passages (supporting ones and distractors)
    passages = {d["title"]: d["text"] for r in (bridge, comparison) for d in r["supporting_docs"]}
    corpus.write_text(
        "".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n" for i, (t, x) in enumerate(passages.items()))
    )
    rows = [traj(f"{r['id']}#0", r["question"], r["golden_answers"], [(r["question"], [doc("x", "nothing useful")])])
            for r in (bridge, comparison)]
    rows.append(traj("plain#0", "Who rules planet 7?", ["Zorblax"], []))  # no supporting documents, nothing found
    src = write_trajs(tmp_path / "t", rows)
    summary, train, val = build(tmp_path, src, target="policy", templated=True, policy=str(tiny_model_dir),
                                val_fraction=0.0, search=f"bm25:{corpus}", docs=2, doc_words=60)
    by_q = {r["question"]: r for r in train + val}
    assert set(by_q) == {bridge["question"], comparison["question"]}
    # bridge: the entity the question names, then the one its results name, whose document holds the answer
    b = by_q[bridge["question"]]["completion"]
    assert SEARCH_RE.findall(b) == ["Kiss and Tell", "Shirley Temple"]
    assert "Shirley Temple" in b.split("</information>")[0]  # the first results named the second entity
    assert (
        b.endswith("<answer> Chief of Protocol </answer>")
        and "Chief of Protocol" in b.split("<search> Shirley Temple")[1]
    )
    # comparison: both entities the question names are looked up
    c = by_q[comparison["question"]]["completion"]
    assert sorted(SEARCH_RE.findall(c)) == ["Forbidden Ground", "Free Guy"] and c.endswith(
        "<answer> Free Guy </answer>"
    )
    assert by_q[bridge["question"]]["id"] == "dev_1#0#e" and summary["entity_demos"] == 2
    # a question already searched as its own query is not searched again; the plain one is searched once
    assert summary["question_searches"] == 1 and summary["entity_searches"] == 6
    for r in (b, c):  # each inserted block is what warmup masks; the policy's turns carry the loss
        assert [trained for _, trained in sft.split_env_spans(r)] == [True, False, True, False, True]
        # after each information block the thought's first word is the decision: search again, or answer
        # (a greedy decoder then follows the likelier decision, not the likelier of several openings)
        assert [_first_word(t) for t in THINK_RE.findall(r)[1:]] == ["Next", "So"]
    again, answer = prompts.DEMO_THINK_ALSO + prompts.DEMO_THINK_NEXT, prompts.DEMO_THINK_ANSWER
    assert {_first_word(o) for o in again} == {"Next"} and {_first_word(o) for o in answer} == {"So"}
    assert all(o.endswith("{topic}.") for o in again)  # a thought copied into <search> still names the thing
