"""The generation module the agent loop and the simulator share: one text stop criterion, one
sampling rule, left padding."""

from __future__ import annotations

import math

import pytest

from zsctl.core.generation import NUCLEUS_K, Sampling, StopText, generate_batch, left_pad, length_groups


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from zsctl.core.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_stop_fires_first_at_the_token_that_completes_a_stop_spelled_in_many_tokens(tok):
    head = tok("<search> alpha ", add_special_tokens=False)["input_ids"]
    spelled = tok.convert_tokens_to_ids(list("</search>"))  # one token per character
    tail = tok(" and more words", add_special_tokens=False)["input_ids"]
    ids = head + spelled + tail
    stop = StopText(tok, ["</search>", "Doc 2:"])
    assert stop.window == len("</search>") + 1
    fired = [j for j in range(len(ids)) if stop.ended([ids[: j + 1]])[0]]
    assert fired[0] == len(head) + len(spelled) - 1
    # HF generate's criterion decides the same, on the new tokens only (never the prompt's)
    import torch

    crit = stop.criterion(start=len(head))
    end = len(head) + len(spelled)
    assert crit(torch.tensor([ids[: end - 1]]), None).tolist() == [False]
    assert crit(torch.tensor([ids[:end]]), None).tolist() == [True]
    assert not StopText(tok, ["</search>"]).criterion(start=len(ids))(torch.tensor([ids]), None).any()


def test_sampling_rule_on_small_distributions():
    import torch

    # nucleus 0.5 over probabilities 0.6 / 0.3 / 0.1: only the top token is left, with all the mass
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]] * 200))
    choice, logp = Sampling(1.0, 0.5).pick(logits)
    assert choice.tolist() == [0] * 200 and torch.allclose(logp, torch.zeros(200))
    choice, logp = Sampling(1.0, 1.0).pick(logits)
    assert set(choice.tolist()) == {0, 1, 2}
    assert math.isclose(float(logp[choice == 1][0]), math.log(0.3), rel_tol=1e-5)
    choice, logp = Sampling(0.0).pick(logits[:1])
    assert choice.tolist() == [0] and math.isclose(float(logp[0]), math.log(0.6), rel_tol=1e-5)


def _sorted_nucleus(logp, top_p):
    """The nucleus as a full sort finds it (the reference the top-k search must equal)."""
    import torch

    vals, order = logp.sort(dim=-1, descending=True)
    probs = vals.exp()
    vals = vals.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    out = torch.full_like(logp, float("-inf")).scatter(-1, order, vals)
    return out - torch.logsumexp(out, dim=-1, keepdim=True)


def test_nucleus_from_the_top_k_equals_a_full_sort_and_falls_back_when_wider():
    import torch

    torch.manual_seed(0)
    vocab = 4 * NUCLEUS_K
    logits = torch.randn(6, vocab) * torch.tensor([[8.0], [4.0], [2.0], [0.1], [0.0], [3.0]])
    logits[5, ::3] = float("-inf")  # banned tokens (an n-gram ban) stay out
    logp = torch.log_softmax(logits, dim=-1)
    got = Sampling(1.0, 0.9).nucleus(logp)
    want = _sorted_nucleus(logp, 0.9)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)], atol=1e-5)
    kept = (~torch.isinf(got)).sum(-1).tolist()
    assert kept[0] < NUCLEUS_K < kept[3]  # a peaked row inside the top k, flat rows past it (sorted in full)


def test_draws_follow_the_distribution():
    import torch

    torch.manual_seed(1)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    logp = torch.log(probs).expand(40000, -1)
    choice, lp = Sampling(1.0).pick(logp)
    freq = torch.bincount(choice, minlength=6).float() / len(choice)
    assert freq[1] == 0 and freq[5] == 0  # a token of probability 0 is never drawn
    assert torch.allclose(freq, probs, atol=0.01)
    assert torch.allclose(lp, torch.log(probs)[choice])
    # top_p 0.85 keeps 0.5 + 0.3 + 0.15 (0.8 falls short), renormalised
    choice, lp = Sampling(1.0, 0.85).pick(logp)
    freq = torch.bincount(choice, minlength=6).float() / len(choice)
    assert torch.allclose(freq, torch.tensor([0.5, 0, 0.3, 0.15, 0, 0]) / 0.95, atol=0.01)


def test_generate_batch_samples_with_the_same_rule(tiny_model_dir, tok):
    """generate draws through Sampling.pick, after the n-gram ban: a nucleus of one token is the
    greedy reply; a seed fixes a sampled reply; another seed changes it."""
    import torch

    from zsctl.core.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Query: alpha beta", "x")]

    def run(sampling, seed=0):
        torch.manual_seed(seed)
        return [g.text for g in generate_batch(model, tok, ids, 24, sampling=sampling, no_repeat=2)]

    greedy = run(Sampling())
    assert run(Sampling(1.0, 1e-6)) == greedy
    hot = Sampling(2.0)
    assert run(hot, seed=3) == run(hot, seed=3) != greedy
    assert run(hot, seed=4) != run(hot, seed=3)
    # one setting per row in the same batch: the greedy row writes its greedy reply, the hot row samples
    mixed = run([Sampling(), hot], seed=3)
    assert mixed[0] == greedy[0] and mixed[1] != greedy[1]


def test_a_line_past_its_word_cap_is_broken(tiny_model_dir):
    """too_long(line): once it holds for the current line, the next token is a line break.
    A tiny random model writes long lines; capped, no line holds more than w + 1 words (the token
    that showed the line was long starts one more)."""
    import torch

    from zsctl.core.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Query: alpha beta", "x y z")]

    def lines(too_long=None):
        torch.manual_seed(0)
        gens = generate_batch(model, tok, ids, 40, sampling=Sampling(2.0), no_repeat=0, too_long=too_long)
        return [line for g in gens for line in g.text.split("\n")]

    words = lambda line: len(line.split())  # noqa: E731
    assert max(map(words, lines())) > 4  # uncapped, some line runs on
    capped = lines(lambda line: words(line) > 3)
    assert len(capped) > 2 and max(map(words, capped)) <= 4
    # the predicate decides: a line never too long is never broken
    assert lines(lambda line: False) == lines()


def test_left_pad_right_aligns_every_row():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_length_groups_compute_fewer_padded_tokens():
    """Row groups (the agent's prefill, rl's loss) cover every row once, sorted by length, and never
    cost more than one padded batch."""
    import random

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 400) for _ in range(rng.randint(1, 16))]
        groups = length_groups(lengths, overhead=32)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        cost = sum(len(g) * max(lengths[i] for i in g) + 32 for g in groups)
        assert cost <= len(lengths) * max(lengths) + 32
    assert length_groups([100, 100, 100]) == [[0, 1, 2]]  # equal lengths: one pass
    assert [len(g) for g in length_groups([20, 400, 22, 390])] == [2, 2]
