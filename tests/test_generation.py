"""The generation module the agent loop and the simulator share: one text stop criterion, one
sampling rule, left padding."""

from __future__ import annotations

import math

import pytest

from zsctl.core.generation import Sampling, StopText, left_pad


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


def test_sampling_settings_mean_the_same_on_both_paths():
    assert Sampling(0.0).generate_kwargs() == dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    assert Sampling(0.8, 0.95).generate_kwargs() == dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0)
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


def test_left_pad_right_aligns_every_row():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
