"""The one definition of answer scoring, shared by training rewards and evaluation.

Normalisation follows the SQuAD evaluation script (lowercase, strip punctuation, drop the articles
a/an/the, collapse whitespace), with one widening: punctuation means every Unicode punctuation
category, not only ASCII, so answers such as «Paris» or 北京。 compare equal to Paris and 北京.

- EM: some normalised gold answer equals the normalised prediction.
- SubEM: some normalised gold answer is a substring of the normalised prediction. This is what the
  ZeroSearch and Search-R1 tables report as "EM".
- F1: token-level F1, maximum over the gold answers.

Every scorer returns a float in [0, 1] and never raises: odd input (None, numbers, an empty gold
list) scores 0.0 rather than crashing a training step or dropping an evaluation row.
"""

from __future__ import annotations

import functools
import re
import string
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Yes/no questions (HotpotQA comparisons) have one-token answers: a partial token overlap with a
# different yes/no answer must not earn credit (rule of the HotpotQA evaluation script).
_SPECIAL = {"yes", "no", "noanswer"}


def _is_punct(ch: str) -> bool:
    # string.punctuation keeps SQuAD's ASCII set exactly (it includes symbols such as $ + < = > ^ ` | ~
    # that Unicode files under S*, not P*); the P* categories add «», “”, 。, 、, ¿ and the rest.
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(s: object) -> str:
    """SQuAD-style normalisation: lowercase, remove punctuation, drop articles, collapse whitespace.

    >>> normalize_answer("The  Eiffel Tower!")
    'eiffel tower'
    >>> normalize_answer("an apple, a pear and the plum")
    'apple pear and plum'
    >>> normalize_answer("Theatre")      # articles only as whole words
    'theatre'
    >>> normalize_answer("U.S.A.")       # punctuation is removed, not turned into spaces (as SQuAD)
    'usa'
    >>> normalize_answer("«École Normale» — Paris")   # accents survive, Unicode punctuation goes
    'école normale paris'
    >>> normalize_answer("北京。")
    '北京'
    >>> normalize_answer(None), normalize_answer(1984)
    ('', '1984')
    """
    if s is None:
        return ""
    text = str(s).lower().translate(_punct_table())
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@functools.lru_cache(maxsize=1)
def _punct_table() -> dict:
    # One str.translate deletes every punctuation character: ~4x faster than a per-character test on
    # document-length text (build-sft checks millions of documents for answers).
    return {c: None for c in range(sys.maxunicode + 1) if _is_punct(chr(c))}


def _golds(golds: object) -> list[str]:
    """Normalised, non-empty gold answers. A bare string counts as one answer; None as none."""
    if golds is None:
        return []
    if isinstance(golds, (str, bytes)) or not isinstance(golds, Iterable):
        golds = [golds]
    out = []
    for g in golds:
        n = normalize_answer(g)
        # A gold that normalises to nothing (e.g. "the") would be a substring of every prediction.
        if n:
            out.append(n)
    return out


def exact_match(pred: object, golds: object) -> float:
    """1.0 when some normalised gold answer equals the normalised prediction, else 0.0.

    >>> exact_match("the Eiffel Tower", ["Eiffel Tower", "La tour Eiffel"])
    1.0
    >>> exact_match("Eiffel Tower in Paris", ["Eiffel Tower"])
    0.0
    >>> exact_match("Paris", [])          # empty gold list
    0.0
    >>> exact_match(None, ["Paris"]), exact_match("", ["Paris"])
    (0.0, 0.0)
    """
    p = normalize_answer(pred)
    return float(bool(p) and any(p == g for g in _golds(golds)))


def sub_exact_match(pred: object, golds: object) -> float:
    """1.0 when some normalised gold answer is a substring of the normalised prediction (SubEM).

    >>> sub_exact_match("It is the Eiffel Tower, in Paris.", ["eiffel tower"])
    1.0
    >>> sub_exact_match("Eiffel", ["Eiffel Tower"])
    0.0
    >>> sub_exact_match("anything", [])
    0.0
    """
    p = normalize_answer(pred)
    return float(bool(p) and any(g in p for g in _golds(golds)))


def _f1(pred_norm: str, gold_norm: str) -> float:
    if (pred_norm in _SPECIAL or gold_norm in _SPECIAL) and pred_norm != gold_norm:
        return 0.0
    p, g = pred_norm.split(), gold_norm.split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: object, golds: object) -> float:
    """Token F1 between the normalised prediction and each gold answer; the best one counts.

    >>> f1_score("Eiffel Tower Paris", ["The Eiffel Tower"])
    0.8
    >>> f1_score("no", ["yes"]), f1_score("no way", ["no"])   # yes/no/noanswer: exact or nothing
    (0.0, 0.0)
    >>> f1_score("Paris", [])
    0.0
    """
    p = normalize_answer(pred)
    if not p:
        return 0.0
    return max((_f1(p, g) for g in _golds(golds)), default=0.0)


def extract_answer(text: object) -> str | None:
    """Content of the LAST complete <answer>…</answer> in `text`, stripped; None when there is none.

    Pass only the model's own output: the instruction prompt shows an example answer, and
    scanning the prompt as well would score that example whenever the model gives no answer.
    When tags are nested or unbalanced, the innermost <answer> before the last </answer> wins.

    >>> extract_answer("<think>hmm</think> <answer> Paris </answer>")
    'Paris'
    >>> extract_answer("<answer>Lyon</answer> wait, <answer>Paris</answer>")   # the last one wins
    'Paris'
    >>> extract_answer("I think it is Paris.") is None                       # no answer tag
    True
    >>> extract_answer("<answer>Paris") is None                              # not complete
    True
    >>> extract_answer("<answer></answer>")                                  # complete but empty
    ''
    """
    if not isinstance(text, str):
        return None
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


def score(pred: object, golds: object) -> dict[str, float]:
    """All three scores of one prediction.

    >>> score("the Eiffel Tower", ["Eiffel Tower"])
    {'em': 1.0, 'subem': 1.0, 'f1': 1.0}
    >>> score(None, ["Eiffel Tower"])
    {'em': 0.0, 'subem': 0.0, 'f1': 0.0}
    """
    return {"em": exact_match(pred, golds), "subem": sub_exact_match(pred, golds), "f1": f1_score(pred, golds)}


# --- search quality ------------------------------------------------------------------------------
# Two facts about every search call, shown beside EM/F1 by eval, collect, rl and report: whether the
# query says anything of its own (a policy that learns to search "query" or "I need a fact" is not
# searching, whatever its EM), and whether the documents it got back hold a gold answer.

_YES_NO = frozenset({"yes", "no"})

# Words of the search protocol and of the instruction: a query made only of these (and stop words)
# names nothing to search for.
INSTRUCTION_WORDS = frozenset(
    "search searching searches query queries need needs needed fact facts know knows known "
    "information answer answers question questions find look lookup result results think "
    "your my i me let lets check checking looking up sure answering searched now first next".split()
)
STOP_WORDS = frozenset(
    "a an the and or but if of to in on at by for with about from into over as is are was were be "
    "been being am do does did doing have has had having it its this that these those there here "
    "what which who whom whose when where why how not no yes so than then too very can could will "
    "would shall should may might must just also only some any all each both more most other such "
    "same own s t he she they them his her their we us our you he's she's it's".split()
)


def content_words(text: object) -> list[str]:
    """Normalised words of `text` that are neither stop words nor words of the search protocol.

    >>> content_words("Who directed the film Jaws?")
    ['directed', 'film', 'jaws']
    >>> content_words("I need a fact, so I search.")
    []
    """
    return [w for w in normalize_answer(text).split() if w not in STOP_WORDS and w not in INSTRUCTION_WORDS]


def is_degenerate_query(query: object) -> bool:
    """True for a query with no content word of its own: empty, a placeholder such as "query" or
    "your query", or instruction words ("I need a fact I do not know").

    >>> [is_degenerate_query(q) for q in ["", "query", "your query", "I need a fact, so I search."]]
    [True, True, True, True]
    >>> is_degenerate_query("director of Jaws")
    False
    """
    return not content_words(query)


def find_answer(texts: Iterable[object], golds: object) -> str | None:
    """The first gold answer that occurs, normalised and as whole words, in one of `texts`.

    Yes/no golds (HotpotQA comparisons) never count: "no" occurs in almost any text.

    >>> find_answer(["Jaws was directed by Steven Spielberg."], ["Steven Spielberg"])
    'Steven Spielberg'
    >>> find_answer(["No, it was not."], ["no"]) is None
    True
    """
    hay = " " + " | ".join(normalize_answer(t) for t in texts) + " "  # '|' never survives normalisation
    if isinstance(golds, (str, bytes)) or golds is None:
        golds = [] if golds is None else [golds]
    for g in golds:
        n = normalize_answer(g)
        if n and n not in _YES_NO and f" {n} " in hay:
            return g
    return None


def docs_hold_answer(documents: Iterable[object], golds: object) -> bool:
    """Whether search results (dicts or objects with title/text) hold a gold answer.

    >>> docs_hold_answer([{"title": "Jaws", "text": "Directed by Steven Spielberg."}], ["Steven Spielberg"])
    True
    """
    return find_answer([x for d in documents or [] for x in _title_text(d)], golds) is not None


def _title_text(doc: object) -> tuple[str, str]:
    """A document's (title, text), from a dict or an object with those attributes."""
    get = doc.get if isinstance(doc, dict) else (lambda k: getattr(doc, k, ""))
    return get("title") or "", get("text") or ""


def yes_no(golds: object) -> bool:
    """True when every gold answer is yes or no: such questions cannot show whether documents hold
    the answer, so search-hit rates and simulator checks leave them out."""
    ns = _golds(golds)  # any sequence (a numpy array from pandas too), a bare string, or None
    return bool(ns) and all(n in _YES_NO for n in ns)


def search_facts(query: object, documents: Iterable[object], golds: object) -> dict:
    """What eval, collect and rl record for one search call: `degenerate` (the query names nothing)
    and `has_answer` (its documents hold a gold answer; None when the golds are all yes/no or
    empty, which cannot tell).

    >>> docs = [{"title": "Jaws", "text": "Directed by Steven Spielberg."}]
    >>> search_facts("director of Jaws", docs, ["Steven Spielberg"])
    {'degenerate': False, 'has_answer': True}
    >>> search_facts("query", [{"text": "Yes."}], ["yes"])
    {'degenerate': True, 'has_answer': None}
    """
    judged = bool(_golds(golds)) and not yes_no(golds)
    return {
        "degenerate": is_degenerate_query(query),
        "has_answer": docs_hold_answer(documents, golds) if judged else None,
    }


# What eval, collect and rl record about each search call (search_records), beside its query and documents
FACT_KEYS = ("degenerate", "has_answer", "repeated", "grounded")


def search_records(searches: Iterable[dict], golds: object, question: str | None = None) -> list[dict]:
    """One trajectory's search calls as eval, collect and rl record them: query, documents, their
    search_facts, `repeated` (the query repeats an earlier one of the same trajectory, case and
    spacing aside: a real engine returns the same documents, so the search finds nothing new) and
    `grounded` (the query shares a content word with the question or with a document the trajectory
    was shown before it; None without the question). An ungrounded query is made up: a name the
    policy invented, a topic of its own.

    >>> docs = [{"title": "Jaws", "text": "Directed by Steven Spielberg."}]
    >>> [r["repeated"] for r in search_records([{"query": "Jaws", "documents": docs},
    ...                                         {"query": " jaws", "documents": docs}], ["Steven Spielberg"])]
    [False, True]
    >>> [r["grounded"] for r in search_records([{"query": "Jaws", "documents": docs},
    ...                                         {"query": "Steven Spielberg", "documents": []},
    ...                                         {"query": "Boeing 777", "documents": []}],
    ...                                        ["1975"], "When was the film Jaws released?")]
    [True, True, False]
    """
    seen: set[str] = set()
    read = None if question is None else set(content_words(question))  # words the policy had before each query
    records = []
    for s in searches:
        key = query_key(s["query"])
        grounded = None if read is None else bool(read.intersection(content_words(s["query"])))
        records.append({"query": s["query"], "documents": s["documents"],
                        **search_facts(s["query"], s["documents"], golds), "repeated": key in seen,
                        "grounded": grounded})
        seen.add(key)
        if read is not None:
            for d in s["documents"] or []:
                read.update(content_words(" ".join(_title_text(d))))
    return records


def search_quality(facts: Iterable[dict]) -> dict:
    """Search counts and rates over per-search facts (FACT_KEYS): `searches`;
    `degenerate_share` = degenerate queries / searches; `search_hit_rate` = searches whose documents
    hold a gold answer / `hit_searches_n`, the searches that can tell (golds not all yes/no);
    `repeat_share` = searches repeating an earlier query of their trajectory (search_records) / the
    searches that record it (None for artifacts written before it was); `ungrounded_share` likewise for
    queries that name nothing of the question or of the documents read. A rate with nothing to count is None.

    >>> search_quality([{"degenerate": True, "has_answer": False, "repeated": False, "grounded": False},
    ...                 {"degenerate": False, "has_answer": True, "repeated": False, "grounded": True},
    ...                 {"degenerate": False, "has_answer": None, "repeated": True, "grounded": True},
    ...                 {"degenerate": False, "has_answer": None, "repeated": False, "grounded": False}])
    {'searches': 4, 'degenerate_share': 0.25, 'search_hit_rate': 0.5, 'hit_searches_n': 2, 'repeat_share': 0.25, \
'ungrounded_share': 0.5}
    >>> search_quality([])
    {'searches': 0, 'degenerate_share': None, 'search_hit_rate': None, 'hit_searches_n': 0, 'repeat_share': None, \
'ungrounded_share': None}
    """
    facts = list(facts)
    judged = [bool(f["has_answer"]) for f in facts if f.get("has_answer") is not None]
    repeats = [bool(f["repeated"]) for f in facts if f.get("repeated") is not None]
    grounded = [bool(f["grounded"]) for f in facts if f.get("grounded") is not None]
    return {
        "searches": len(facts),
        "degenerate_share": sum(bool(f["degenerate"]) for f in facts) / len(facts) if facts else None,
        "search_hit_rate": sum(judged) / len(judged) if judged else None,
        "hit_searches_n": len(judged),
        "repeat_share": sum(repeats) / len(repeats) if repeats else None,
        "ungrounded_share": 1 - sum(grounded) / len(grounded) if grounded else None,
    }


def question_hits(rows: Iterable[dict]) -> dict:
    """Per question rather than per search: `question_hit_rate` = questions for which at least one
    search returned a gold answer / `hit_questions_n`, the questions whose golds can tell (not all
    yes/no); a question that never searched is a miss. A policy that drops useless extra searches
    raises its per-search hit rate without finding more; this one moves only when it finds more.
    `first_search_hit_rate` = of those questions that searched (`first_searches_n`), the share whose
    FIRST search returned a gold answer: the quality of the opening query whatever follows it. A
    policy that stops searching after one query lowers the per-search rate when its later searches hit
    more often (a second hop, a name read in the first results), while its first queries may be as good.

    >>> question_hits([{"golden_answers": ["Paris"], "searches": [{"has_answer": False}, {"has_answer": True}]},
    ...                {"golden_answers": ["Rome"], "searches": []}, {"golden_answers": ["yes"], "searches": []}])
    {'question_hit_rate': 0.5, 'hit_questions_n': 2, 'first_search_hit_rate': 0.0, 'first_searches_n': 1}
    """
    judged = [r for r in rows if _golds(r.get("golden_answers")) and not yes_no(r.get("golden_answers"))]
    hits = sum(any(s.get("has_answer") for s in r.get("searches") or []) for r in judged)
    searched = [r["searches"][0] for r in judged if r.get("searches")]
    return {"question_hit_rate": hits / len(judged) if judged else None, "hit_questions_n": len(judged),
            "first_search_hit_rate": sum(bool(s.get("has_answer")) for s in searched) / len(searched)
            if searched else None, "first_searches_n": len(searched)}


def guessable(question: object, golds: object) -> bool:
    """True when the answer can be had without finding anything: every gold is yes/no, or the
    question names a gold answer itself (a comparison: "who is younger, A or B?").

    >>> guessable("Who is younger, Mart Van Duren or Madeleine Simms?", ["Mart Van Duren"])
    True
    >>> guessable("Who wrote Hamlet?", ["Shakespeare"]), guessable("Is Lima in Peru?", ["yes"])
    (False, True)
    """
    return yes_no(golds) or find_answer([question], golds) is not None


def open_em(rows: Iterable[dict]) -> dict:
    """EM over the open questions only (not `guessable`): `em_open` / `open_n`. Answering a
    comparison with the first name it reads scores half of them by chance, so a policy can raise
    its EM without searching; this one moves only when it answers what the question does not say.

    >>> open_em([{"question": "Who wrote Hamlet?", "golden_answers": ["Shakespeare"], "em": 1.0},
    ...          {"question": "Who is older, A. Smith or B. Jones?", "golden_answers": ["A. Smith"], "em": 1.0},
    ...          {"question": "Where is the Louvre?", "golden_answers": ["Paris"], "em": 0.0}])
    {'em_open': 0.5, 'open_n': 2}
    """
    rs = [r for r in rows if not guessable(r.get("question"), r.get("golden_answers"))]
    return {"em_open": sum(r["em"] for r in rs) / len(rs) if rs else None, "open_n": len(rs)}


def reading(rows: Iterable[dict]) -> dict:
    """How well a policy reads what its searches found, apart from how well it searched, on the open
    questions (not `guessable`). `read_em`: EM over those one of whose searches returned a gold
    answer (`found_open_n`); `query_answer_share`: of those it answered (`answered_open_n`), the
    share whose answer is one of its own queries (a small policy that cannot read yet answers with
    the name it looked up: "Kaiser Ventures" for who founded Kaiser Ventures).

    >>> reading([{"question": "Who founded K?", "golden_answers": ["Henry"], "em": 0.0, "prediction": "K",
    ...           "searches": [{"query": "K", "has_answer": True}]},
    ...          {"question": "Who wrote H?", "golden_answers": ["Will"], "em": 1.0, "prediction": "Will",
    ...           "searches": [{"query": "H", "has_answer": True}]}])
    {'read_em': 0.5, 'found_open_n': 2, 'query_answer_share': 0.5, 'answered_open_n': 2}
    """
    rs = [r for r in rows if not guessable(r.get("question"), r.get("golden_answers"))]
    found = [r for r in rs if any(s.get("has_answer") for s in r.get("searches") or [])]
    answered = [r for r in rs if normalize_answer(r.get("prediction") or "")]
    queries = [{normalize_answer(s.get("query")) for s in r.get("searches") or []} for r in answered]
    echoes = sum(normalize_answer(r["prediction"]) in q for r, q in zip(answered, queries))
    return {"read_em": sum(r["em"] for r in found) / len(found) if found else None, "found_open_n": len(found),
            "query_answer_share": echoes / len(answered) if answered else None, "answered_open_n": len(answered)}


def top_queries(queries: Iterable[object], n: int = 5) -> list[list]:
    """The `n` most common queries with their counts, [[query, count], ...]; queries that differ only
    in case or spacing count as one (shown as first written).

    >>> top_queries(["search", "Jaws director", "Search ", "search"], n=2)
    [['search', 3], ['Jaws director', 1]]
    """
    counts: Counter = Counter()
    shown: dict[str, str] = {}
    for q in queries:
        key = query_key(q)
        shown.setdefault(key, " ".join(str(q or "").split()))
        counts[key] += 1
    return [[shown[k], c] for k, c in counts.most_common(n)]


def query_key(query: object) -> str:
    """What makes two queries the same search: their words, case and spacing aside."""
    return " ".join(str(query or "").split()).casefold()


def paired_difference(before: Iterable[dict], after: Iterable[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """How two evaluations of the same questions differ, with 95 % paired bootstrap intervals.

    Rows are eval's predictions (data_source, id, question, golden_answers, em, f1, searches with
    has_answer); only questions in both count (`n`). For EM, F1, `question_hit_rate` and
    `search_hit_rate` it gives before, after, their difference and the 2.5/97.5 percentiles of that
    difference over `resamples` resamplings of the questions, both evaluations resampled together
    (so a question's difficulty cancels); search-hit is a ratio over searches, so a question and all
    its searches are drawn together. `em_won` / `em_lost`: questions only `after` / only `before`
    got right. On 40 questions one question is 2.5 EM points: an interval that holds 0 says the
    change cannot be told from a different draw of questions.

    >>> a = [{"data_source": "x", "id": str(i), "golden_answers": ["Paris"], "em": 0.0, "f1": 0.0,
    ...       "searches": [{"has_answer": False}]} for i in range(4)]
    >>> b = [dict(r, em=1.0, f1=1.0, searches=[{"has_answer": True}]) if r["id"] == "0" else r for r in a]
    >>> d = paired_difference(a, b)
    >>> d["n"], d["em"]["before"], d["em"]["after"], d["em"]["diff"], d["em_won"], d["em_lost"]
    (4, 0.0, 0.25, 0.25, 1, 0)
    >>> d["search_hit_rate"]["diff"], d["em"]["ci95"][0] >= 0.0
    (0.25, True)
    """
    import numpy as np

    key = lambda r: (r.get("data_source"), str(r.get("id")))  # noqa: E731 - ids repeat across benchmarks
    first = {key(r): r for r in before}
    pairs = [(first[key(r)], r) for r in after if key(r) in first]
    out: dict = {"n": len(pairs)}
    if not pairs:
        return out

    def per_question(r: dict) -> tuple[float, float, float, float, float, float]:
        judged = bool(_golds(r.get("golden_answers"))) and not yes_no(r.get("golden_answers"))
        facts = [s.get("has_answer") for s in r.get("searches") or [] if s.get("has_answer") is not None]
        return (float(r["em"]), float(r["f1"]), float(judged and any(facts)), float(judged),
                float(sum(bool(f) for f in facts)), float(len(facts)))

    # columns: em, f1, found, judged question, hit searches, judged searches; axis 0 before/after
    x = np.array([[per_question(b), per_question(a)] for b, a in pairs]).transpose(1, 0, 2)
    idx = np.random.default_rng(seed).integers(0, len(pairs), size=(resamples, len(pairs)))

    def rate(num: int, den: int | None):
        """The metric before and after on all questions, and the difference on each resample."""
        full = [x[s, :, num].sum() / (x[s, :, den].sum() if den is not None else len(pairs)) for s in (0, 1)]
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = [x[s][idx, num].sum(1) / (x[s][idx, den].sum(1) if den is not None else len(pairs)) for s in (0, 1)]
        diffs = boot[1] - boot[0]
        diffs = diffs[~np.isnan(diffs)]
        ci = [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))] if diffs.size else None
        return {"before": float(full[0]), "after": float(full[1]), "diff": float(full[1] - full[0]), "ci95": ci}

    out["em"], out["f1"] = rate(0, None), rate(1, None)
    if x[0, :, 3].sum():
        out["question_hit_rate"] = rate(2, 3)
    if x[0, :, 5].sum() and x[1, :, 5].sum():  # both searched somewhere
        out["search_hit_rate"] = rate(4, 5)
    out["em_won"] = int(((x[1, :, 0] > 0) & (x[0, :, 0] == 0)).sum())
    out["em_lost"] = int(((x[0, :, 0] > 0) & (x[1, :, 0] == 0)).sum())
    return out
