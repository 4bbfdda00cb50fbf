"""Scoring: the module's own doctests plus the edge cases training and evaluation rely on."""

from __future__ import annotations

import doctest

import pytest

import zsctl.core.metrics as metrics
from zsctl.core.metrics import exact_match, extract_answer, f1_score, normalize_answer, score, sub_exact_match


def test_doctests_pass():
    result = doctest.testmod(metrics)
    assert result.attempted >= 20  # the examples are part of the contract; do not let them vanish
    assert result.failed == 0


@pytest.mark.parametrize(
    "raw, want",
    [
        ("The Beatles", "beatles"),
        ("A Tale of Two Cities", "tale of two cities"),
        ("an", ""),
        ("Anna and the king", "anna and king"),  # "an" inside "anna" stays
        ("rock 'n' roll", "rock n roll"),
        ("  lots\tof \n space ", "lots of space"),
        ("“Quoted” ¡Hola! ¿Qué?", "quoted hola qué"),
        ("Zürich – São Paulo", "zürich são paulo"),
        ("東京、日本。", "東京日本"),
        ("$1,000", "1000"),  # SQuAD's ASCII set includes symbols such as $
        ("", ""),
    ],
)
def test_normalize(raw, want):
    assert normalize_answer(raw) == want


def test_em_subem_f1_basic():
    golds = ["Barack Obama", "Obama"]
    assert exact_match("barack obama.", golds) == 1.0
    assert exact_match("President Barack Obama", golds) == 0.0
    assert sub_exact_match("President Barack Obama", golds) == 1.0
    assert f1_score("President Barack Obama", ["Barack Obama"]) == pytest.approx(0.8)
    # max over golds: "Obama" alone is a better match for "Obama" than "Barack Obama"
    assert f1_score("Obama", golds) == 1.0


def test_f1_repeated_tokens_count_once_each():
    # Counter intersection: "paris paris" vs "paris" shares one token → p=0.5, r=1
    assert f1_score("paris paris", ["paris"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("special", ["yes", "no", "noanswer"])
def test_f1_special_answers_need_exact(special):
    assert f1_score(special, [special]) == 1.0
    assert f1_score(f"{special} indeed", [special]) == 0.0
    assert f1_score(special, [f"{special} indeed"]) == 0.0


@pytest.mark.parametrize("golds", [[], None, [None], [""], ["the"], ["..."]])
def test_no_usable_gold_scores_zero(golds):
    # a gold that normalises to "" would otherwise be a substring of every prediction
    assert score("the", golds) == {"em": 0.0, "subem": 0.0, "f1": 0.0}
    assert score("anything at all", golds) == {"em": 0.0, "subem": 0.0, "f1": 0.0}


@pytest.mark.parametrize("pred", [None, "", "   ", "!!!", "a an the"])
def test_empty_prediction_scores_zero(pred):
    assert score(pred, ["Paris"]) == {"em": 0.0, "subem": 0.0, "f1": 0.0}


def test_odd_inputs_never_raise():
    assert score(1984, [1984]) == {"em": 1.0, "subem": 1.0, "f1": 1.0}
    assert score("1984", "1984")["em"] == 1.0  # a bare string is one gold, not a list of characters
    assert score("x", "xyz")["subem"] == 0.0
    assert score("Paris", ("Paris",))["em"] == 1.0
    assert score(["not", "a", "string"], 42) == {"em": 0.0, "subem": 0.0, "f1": 0.0}


def test_unicode_answers():
    assert exact_match("Café de Flore", ["cafe de flore"]) == 0.0  # accents are kept, not folded
    assert exact_match("«Café de Flore»", ["Café de Flore"]) == 1.0
    assert exact_match("北京", ["北京。"]) == 1.0
    assert sub_exact_match("答案是北京", ["北京"]) == 1.0


@pytest.mark.parametrize(
    "text, want",
    [
        ("<answer>Paris</answer>", "Paris"),
        ("<answer>\n  Paris \n</answer>", "Paris"),
        ("<answer>a</answer><answer>b</answer><answer>c</answer>", "c"),
        ("<answer>a</answer> then <answer>b", "a"),  # the trailing tag is incomplete
        ("<answer>outer <answer>inner</answer>", "inner"),
        ("no tags at all", None),
        ("</answer> backwards <answer>", None),
        ("<ANSWER>Paris</ANSWER>", None),  # the protocol's tags are lowercase
        ("", None),
        (None, None),
        (123, None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_extract_answer_ignores_prompt_example_when_given_only_the_output():
    prompt = "... for example <answer> Beijing </answer>.\nQuestion: capital of France?"
    output = "<think>I am not sure</think>"
    assert extract_answer(output) is None
    assert extract_answer(prompt + output) == "Beijing"  # why callers must pass only the output


def test_score_keys_and_range():
    s = score("<answer>x</answer>", ["x"])
    assert set(s) == {"em", "subem", "f1"}
    assert all(0.0 <= v <= 1.0 and isinstance(v, float) for v in s.values())


# --- search quality ------------------------------------------------------------------------------

from zsctl.core import metrics as m  # noqa: E402


@pytest.mark.parametrize("query", ["", "   ", "query", "your query", "Search", "I need a fact, so I search.",
                                   "I need a fact I do not know", "the answer to the question", "Let me check."])
def test_degenerate_queries_name_nothing(query):
    assert m.is_degenerate_query(query)


@pytest.mark.parametrize("query", ["Kiss and Tell", "who told the story of the prodigal son", "Jaws director",
                                   "capital of Peru", "1984"])
def test_real_queries_are_not_degenerate(query):
    assert not m.is_degenerate_query(query)


def test_search_facts_and_quality_count_what_they_should():
    lima = [{"title": "Lima", "text": "Lima is the capital of Peru."}]
    facts = [
        m.search_facts("capital of Peru", lima, ["Lima"]),       # names something, holds the answer
        m.search_facts("query", lima, ["Lima"]),                 # degenerate, and still holds it
        m.search_facts("Peru", [{"title": "", "text": "Limassol is in Cyprus."}], ["Lima"]),  # whole words only
        m.search_facts("Peru", lima, ["yes"]),                   # yes/no golds cannot tell
        m.search_facts("Peru", lima, []),                        # nor can no golds
    ]
    assert [f["degenerate"] for f in facts] == [False, True, False, False, False]
    assert [f["has_answer"] for f in facts] == [True, True, False, None, None]
    q = m.search_quality(facts)
    assert q == {"searches": 5, "degenerate_share": 0.2, "search_hit_rate": pytest.approx(2 / 3), "hit_searches_n": 3,
                 "repeat_share": None, "ungrounded_share": None}  # search_facts judges one call; repeats and
    # grounding need the trajectory's earlier ones
    # an older artifact's searches (no facts recorded) count as searches that cannot tell
    assert m.search_quality([{"degenerate": None, "has_answer": None}])["hit_searches_n"] == 0


def test_search_records_mark_repeats_within_one_trajectory_only():
    lima = [{"title": "Lima", "text": "Lima is the capital of Peru."}]
    calls = [{"query": q, "documents": lima} for q in ["capital of Peru", "Peru", "Capital  of peru", "Peru"]]
    recs = m.search_records(calls, ["Lima"])
    assert [r["repeated"] for r in recs] == [False, False, True, True]
    assert [r["has_answer"] for r in recs] == [True] * 4 and recs[2]["query"] == "Capital  of peru"
    assert m.search_records(calls[:1], ["Lima"])[0]["repeated"] is False  # a new trajectory starts afresh
    assert m.search_quality(recs)["repeat_share"] == 0.5


def test_a_query_is_grounded_in_the_question_or_in_documents_read_before_it():
    question = "Which country is the city of Lima the capital of?"
    calls = [{"query": "Lima", "documents": [{"title": "Lima", "text": "Lima lies on the coast of Peru."}]},
             {"query": "Peru", "documents": []},                  # a word of the documents read: the next hop
             {"query": "Flat-pack furniture", "documents": []},   # nowhere in either: made up
             {"query": "coast", "documents": []}]
    recs = m.search_records(calls, ["Peru"], question)
    assert [r["grounded"] for r in recs] == [True, True, False, True]
    # words of a later document do not ground an earlier query
    assert [r["grounded"] for r in m.search_records(calls[1:2] + calls[:1], ["Peru"], question)] == [False, True]
    assert m.search_quality(recs)["ungrounded_share"] == 0.25
    assert m.search_records(calls, ["Peru"])[0]["grounded"] is None  # no question: cannot tell
    assert m.search_quality(m.search_records(calls, ["Peru"]))["ungrounded_share"] is None


def test_top_queries_merge_case_and_spacing():
    top = m.top_queries(["query", "Query ", "Jaws  director", "jaws director", "jaws director", "x"], n=2)
    assert top == [["Jaws director", 3], ["query", 2]]
    assert m.top_queries([]) == []


def test_yes_no_and_guessable_take_any_sequence_of_golds():
    np = pytest.importorskip("numpy")
    # pandas hands list columns over as numpy arrays, whose truth value is ambiguous
    assert metrics.yes_no(np.array(["yes", "No."])) and not metrics.yes_no(np.array(["yes", "Paris"]))
    assert metrics.yes_no("yes") and not metrics.yes_no(None) and not metrics.yes_no([])
    assert metrics.guessable("Who is older, A. Smith or B. Jones?", np.array(["A. Smith"]))


def test_paired_difference_matches_questions_and_counts_a_questions_searches_together():
    def row(i, em, hits, source="hotpotqa", golds=("Lima",)):
        return {"data_source": source, "id": f"q{i}", "golden_answers": list(golds), "em": em, "f1": em,
                "searches": [{"has_answer": h} for h in hits]}

    before = [row(0, 0.0, [False]), row(1, 1.0, [True]), row(2, 0.0, [False, False]), row(3, 0.0, []),
              row(0, 0.0, [True], source="2wikimultihopqa"),  # same id, another benchmark: another question
              row(4, 1.0, [None], golds=("yes",))]  # yes/no: counts for EM, not for hit rates
    after = [row(0, 1.0, [True]), row(1, 1.0, [True]), row(2, 0.0, [True, False, False]), row(3, 0.0, [False]),
             row(0, 0.0, [True], source="2wikimultihopqa"), row(4, 0.0, [None], golds=("yes",)),
             row(9, 1.0, [True])]  # only in `after`: left out
    d = m.paired_difference(before, after)
    assert d["n"] == 6 and (d["em_won"], d["em_lost"]) == (1, 1)
    assert d["em"]["before"] == pytest.approx(2 / 6) and d["em"]["diff"] == pytest.approx(0.0)
    # search-hit is over searches (hits / judged searches), question-hit over non-yes/no questions
    assert d["search_hit_rate"]["before"] == pytest.approx(2 / 5)
    assert d["search_hit_rate"]["after"] == pytest.approx(4 / 7)
    assert d["question_hit_rate"]["before"] == pytest.approx(2 / 5)
    assert d["question_hit_rate"]["after"] == pytest.approx(4 / 5)
    for k in ("em", "f1", "question_hit_rate", "search_hit_rate"):
        lo, hi = d[k]["ci95"]
        assert lo <= d[k]["diff"] <= hi
    # every question gained: the whole interval is above 0; the same draw twice gives the same interval
    up = m.paired_difference([row(i, 0.0, [False]) for i in range(20)], [row(i, 1.0, [True]) for i in range(20)])
    assert up["em"]["ci95"] == [1.0, 1.0] and up["search_hit_rate"]["ci95"][0] == 1.0
    assert m.paired_difference(before, after) == d
    assert m.paired_difference(before, [row(7, 1.0, [])]) == {"n": 0}
