"""The one definition of answer scoring, shared by training rewards and evaluation (DESIGN.md §5).

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
