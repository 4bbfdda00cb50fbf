"""Generation with HF models, the parts the agent loop and the simulator share: the sampling
settings, left padding, and the text stop criterion.

The agent decodes in its own loop over a KV cache (zsctl.agent); the simulator and `serve`'s
completions endpoint use `generate_batch` (one left-padded HF `generate`). Both pick tokens under the
same `Sampling` and stop a row under the same `StopText`, so a temperature or a stop string means
the same thing on either path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple


# Nucleus sampling looks for the nucleus among this many most likely tokens first: a partial top-k
# costs a CPU ~20x less than sorting SmolLM2's 49k-token vocabulary (at 48 rows the sort took as long
# as the forward pass itself). A row whose top tokens hold less than top_p is sorted in full.
NUCLEUS_K = 256


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Greedy at temperature 0; otherwise drawn from the full softmax
    at `temperature`, cut to the smallest set of tokens holding `top_p` of the probability and
    renormalised. No top-k: RL's losses assume the full distribution, and vLLM leaves it off too.

    `pick` is the one sampler: the agent loop calls it at each step, and `generate_batch` hands it
    to HF `generate` as its last logits processor (`PickWith`) so both paths draw alike. (HF's own
    sampler sorts the whole vocabulary for top-p and draws with torch.multinomial: on a CPU those two
    cost ~120 ms a step at 48 rows, as much as the forward pass; `pick` ~10 ms.)"""

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def pick(self, logits):
        """The next token of every row of `logits` [rows, vocab] and its log-probability under the
        distribution it was drawn from (greedy: the log-softmax at temperature 1)."""
        import torch

        if self.greedy:
            logp = torch.log_softmax(logits, dim=-1)
            choice = logits.argmax(dim=-1)
        else:
            logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            if self.top_p < 1.0:
                logp = self.nucleus(logp)
            choice = _draw(logp)
        return choice, logp.gather(1, choice[:, None])[:, 0]

    def nucleus(self, logp):
        """`logp` renormalised over each row's nucleus (the fewest most likely tokens whose
        probability reaches top_p; the top token always stays), -inf elsewhere."""
        import torch

        vals, idx = logp.topk(min(NUCLEUS_K, logp.shape[-1]), dim=-1)
        out = _keep_nucleus(vals, idx, self.top_p, logp.shape)
        wide = (vals.exp().sum(-1) < self.top_p).nonzero()[:, 0]  # nucleus reaches past the top k
        if len(wide):
            out[wide] = _keep_nucleus(*logp[wide].sort(dim=-1, descending=True), self.top_p, (len(wide), logp.shape[1]))
        return out - torch.logsumexp(out, dim=-1, keepdim=True)


def _keep_nucleus(vals, idx, top_p: float, shape):
    """Full-vocabulary rows holding the sorted `vals` (at `idx`) that lie inside the nucleus, -inf elsewhere."""
    import torch

    probs = vals.exp()
    vals = vals.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    return torch.full(shape, float("-inf"), dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)


def _draw(logp):
    """One token per row from the distribution exp(logp), by inverse transform sampling: a uniform
    draw located in the row's cumulative sums (float64, so no token's share is rounded away).
    torch.multinomial does the same job ~20x slower on a CPU."""
    import torch

    cum = logp.double().exp().cumsum(-1)
    u = torch.rand((cum.shape[0], 1), dtype=cum.dtype, device=cum.device) * cum[:, -1:]
    return torch.searchsorted(cum, u, right=True)[:, 0].clamp_(max=cum.shape[1] - 1)


class PickWith:
    """HF logits processor that draws each row's next token with `sampling.pick` (or, given one
    Sampling per row, with the row's own) and leaves only that token, for `generate` to take
    greedily. It must come last (after any ban)."""

    def __init__(self, sampling: Sampling | list[Sampling]):
        self.sampling = sampling

    def __call__(self, input_ids, scores):
        import torch

        if isinstance(self.sampling, Sampling):
            choice, _ = self.sampling.pick(scores)
        else:  # rows that share a setting are drawn together
            choice = torch.empty(scores.shape[0], dtype=torch.long, device=scores.device)
            for setting in dict.fromkeys(self.sampling):
                rows = torch.tensor([r for r, s in enumerate(self.sampling) if s == setting], device=scores.device)
                choice[rows] = setting.pick(scores[rows])[0]
        return torch.full_like(scores, float("-inf")).scatter_(1, choice[:, None], 0.0)


class StopText:
    """Whether a row's newest token completed one of `stops` (text, not token ids: a tokenizer may
    spell a stop string in many ways).

    Every token spells at least one character, so the last `window` = longest stop + 1 tokens hold
    any stop string the newest token completed; decoding just those keeps the check cheap. (HF's own
    `stop_strings` precomputes tables over the whole vocabulary on every call: seconds for SmolLM2.)
    """

    def __init__(self, tok, stops: list[str]):
        self.tok = tok
        self.stops = [s for s in stops if s]
        self.window = max((len(s) for s in self.stops), default=0) + 1

    def found(self, text: str) -> bool:
        return any(s in text for s in self.stops)

    def ended(self, rows: list[list[int]]) -> list[bool]:
        """For each row of new token ids: did its last token complete a stop string?"""
        if not self.stops:
            return [False] * len(rows)
        return [self.found(t) for t in self.tok.batch_decode([r[-self.window:] for r in rows])]

    def criterion(self, start: int):
        """An HF stopping criterion over the tokens generated after column `start`."""
        import torch
        from transformers import StoppingCriteria

        stop = self

        class Criterion(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                new = input_ids[:, max(start, input_ids.shape[1] - stop.window):].tolist()
                return torch.tensor(stop.ended(new), device=input_ids.device)

        return Criterion()


class LineBreaks:
    """HF stopping criterion: a row ends at its `lines`-th line break. For replies whose every
    document is one line, the reply is whole there, and what a small simulator writes after it
    ("Docs: …", more documents) is waste and is cut anyway (`first_lines`)."""

    def __init__(self, tok, lines: int):
        self.tok, self.lines, self.seen = tok, lines, None

    def __call__(self, input_ids, scores, **kw):
        import torch

        last = input_ids[:, -1].tolist()  # generate calls this once per new token
        if self.seen is None:
            self.seen = [0] * len(last)
        for r, text in enumerate(self.tok.batch_decode([[t] for t in last])):
            self.seen[r] += text.count("\n")
        return torch.tensor([n >= self.lines for n in self.seen], device=input_ids.device)


class EndLongLines:
    """Logits processor: a row whose current line `too_long(line)` must break the line next. A
    simulator trained on documents of N words still runs on past them now and then, and a batch
    decodes as many steps as its longest reply; what a line holds past its N-th word is cut anyway
    (its first token, the one that showed the line was long, included)."""

    def __init__(self, tok, too_long: Callable[[str], bool], start: int):
        nl = tok.encode("\n", add_special_tokens=False)
        self.tok, self.too_long, self.start = tok, too_long, start
        self.newline = nl[0] if len(nl) == 1 else None  # a tokenizer that spells it in pieces: no cap

    def __call__(self, input_ids, scores):
        if self.newline is None:
            return scores
        for r, text in enumerate(self.tok.batch_decode(input_ids[:, self.start:].tolist())):
            if self.too_long(text.rsplit("\n", 1)[-1]):
                scores[r] = float("-inf")
                scores[r, self.newline] = 0.0
        return scores


def first_lines(text: str, lines: int) -> str:
    """The text up to its `lines`-th line break (all of it when `lines` is 0)."""
    return "\n".join(text.split("\n")[:lines]) if lines else text


def left_pad(rows: list[list[int]], pad: int):
    """(ids, attention mask) tensors with every row right-aligned: the next token shares a column."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """Drop everything from the first stop string on (as OpenAI-style servers do)."""
    cut = len(text)
    for s in stop or []:
        j = text.find(s)
        if j >= 0:
            cut = min(cut, j)
    return text[:cut]


GROUP_OVERHEAD = 32  # token-equivalents one more forward pass costs (length_groups)


def length_groups(lengths: list[int], overhead: int = GROUP_OVERHEAD) -> list[list[int]]:
    """Rows split into groups of similar length so that the padded tokens computed, plus `overhead`
    token-equivalents per extra forward pass, are fewest (exact dynamic programme over the rows
    sorted by length; each group is computed at the width of its longest row)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: rows order[:j] grouped; a group order[i:j] costs (j-i) * its widest
        for i in range(j):
            c = best[i] + (j - i) * lengths[order[j - 1]] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


class Generation(NamedTuple):
    text: str  # new text, cut before the first stop string
    tokens: int  # new tokens generated (up to the EOS or the stop string's end)
    finish: str  # "stop" (EOS or a stop string) | "length"


# Small simulators decoding greedily fall into loops ("Kiss and Tell: Kiss and Tell: …") that eat the
# whole budget; no n-gram may repeat within a completion. (HF's no_repeat_ngram_size would also
# forbid repeating the prompt, i.e. writing the gold answer the prompt names.)
NO_REPEAT_NGRAM = 4


class NoRepeatInCompletion:
    """Logits processor: ban the tokens that would repeat an n-gram of the generated part."""

    def __init__(self, n: int, start: int):
        self.n, self.start = n, start

    def __call__(self, input_ids, scores):
        n = self.n
        for r, row in enumerate(input_ids[:, self.start:].tolist()):
            if len(row) < n:
                continue
            prefix = tuple(row[-(n - 1):])
            banned = {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix}
            if banned:
                scores[r, list(banned)] = float("-inf")
        return scores


def generate_batch(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, *,
                   sampling: Sampling | list[Sampling] = Sampling(), stop: list[str] | None = None,
                   no_repeat: int = NO_REPEAT_NGRAM, lines: int = 0,
                   too_long: Callable[[str], bool] | None = None) -> list[Generation]:
    """ONE left-padded `generate` over all prompts; each row's new text, cut at `stop` and, with
    `lines`, ended and cut at its `lines`-th line break; no n-gram of `no_repeat` tokens repeats within
    a completion (0: no ban). `sampling` may give each row its own setting. With `too_long`, a line
    for which it holds is broken there (EndLongLines)."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
    input_ids, attention = left_pad(prompt_ids, pad)
    width = input_ids.shape[1]
    # greedy as far as `generate` knows (None silences "flag not valid without sampling" warnings
    # from model defaults); a sampled draw is made by PickWith, the last processor
    processors = [NoRepeatInCompletion(no_repeat, width)] if no_repeat > 0 else []
    processors += [EndLongLines(tok, too_long, width)] if too_long else []
    greedy = sampling.greedy if isinstance(sampling, Sampling) else all(s.greedy for s in sampling)
    processors += [] if greedy else [PickWith(sampling)]
    kw = dict(max_new_tokens=max(1, int(max_new_tokens)), pad_token_id=pad, do_sample=False, temperature=None,
              top_p=None, top_k=None, logits_processor=processors)
    criteria = [StopText(tok, list(stop)).criterion(width)] if stop else []
    criteria += [LineBreaks(tok, lines)] if lines else []
    if criteria:
        kw.update(stopping_criteria=criteria)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kw)
    results = []
    for row in out[:, width:].tolist():
        end = next((j for j, t in enumerate(row) if t in eos_ids or t == pad), None)
        full = tok.decode(row[:end], skip_special_tokens=True)
        text = first_lines(cut_at_stop(full, stop), lines)
        ended = end is not None or len(text) < len(full)
        results.append(Generation(text, end if end is not None else len(row), "stop" if ended else "length"))
    return results
