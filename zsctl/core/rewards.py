"""RL rewards with TRL's reward-function signature, built on core/metrics.py (one scoring definition
for training and evaluation).

TRL calls each with `completions=[...]` plus every dataset column and every extra key the rollout
function returned, as lists aligned with the completions. Our rollout function returns `prediction`
(the last <answer> of the policy's own turns), so the prompt's example answer never counts; when
it is absent (plain TRL generation) the answer is extracted from the completion text. It also returns
`queries` (each trajectory's search queries), which the format credit checks.
"""

from __future__ import annotations

from zsctl.core import metrics


def _predictions(completions, prediction=None) -> list[str | None]:
    if prediction is not None:
        return [p if p else None for p in prediction]
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [metrics.extract_answer(t) for t in texts]


def f1_reward(completions, golden_answers, prediction=None, **_) -> list[float]:
    """Token F1 of the answer vs the gold answers (max over golds); no answer → 0."""
    preds = _predictions(completions, prediction)
    return [metrics.f1_score(p, g) if p is not None else 0.0 for p, g in zip(preds, golden_answers)]


def em_reward(completions, golden_answers, prediction=None, **_) -> list[float]:
    """Exact match (0/1) of the normalised answer; no answer → 0."""
    preds = _predictions(completions, prediction)
    return [metrics.exact_match(p, g) if p is not None else 0.0 for p, g in zip(preds, golden_answers)]


FORMAT_CREDIT = 0.1


def f1_format_reward(completions, golden_answers, prediction=None, queries=None, **_) -> list[float]:
    """F1, but a well-formed trajectory earns at least FORMAT_CREDIT: a small signal for small models
    that have not yet learnt the protocol. Well-formed: it gave an answer, and every query it searched
    names something (metrics.is_degenerate_query is false for each). Without the second condition a
    policy can copy its thinking ("I will look it up.") into <search> at no cost; RL then drifts into
    such searches, whose results cannot help. `queries` (each trajectory's queries) comes from the
    rollout; plain single-turn generation has none. No answer → 0."""
    preds = _predictions(completions, prediction)
    rewards = []
    for p, g, qs in zip(preds, golden_answers, queries if queries is not None else [()] * len(preds)):
        f1 = metrics.f1_score(p, g) if p is not None else 0.0
        well_formed = p is not None and not any(map(metrics.is_degenerate_query, qs))
        rewards.append(max(f1, FORMAT_CREDIT) if well_formed else f1)
    return rewards


REWARDS = {"f1": f1_reward, "em": em_reward, "f1+format": f1_format_reward}
