"""The multi-turn search agent loop, shared by collect, eval and rl.

Works on token ids for a whole batch: each round, every still-active sample generates until
`</search>`, `</answer>` or EOS in ONE batched `generate` call; the engine then answers all searches
of the round in ONE call; the documents are tokenised once and appended as `<information>` tokens
that carry mask 0 (attended to, never trained on). Earlier turns are never decoded and re-encoded,
so the token ids RL trains on are exactly the ones the policy produced.

Round structure (Search-R1 style): `max_turns` rounds in which a search is executed, then one last
round (announced by a short note) in which only an answer counts. An invalid action (neither a
search nor an answer) gets a short corrective note and uses up its round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zsctl.core import prompts
from zsctl.search.base import Document, QueryContext, SearchEngine


@dataclass
class AgentConfig:
    max_turns: int = 4  # searches allowed per trajectory
    max_new_tokens: int = 128  # per generation round
    max_response_tokens: int = 1024  # whole response budget (model + inserted tokens)
    topk: int = 3
    max_doc_words: int = 80  # documents are cut to this many words before insertion
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)  # 1 = policy token, 0 = inserted by the environment
    searches: list[dict] = field(default_factory=list)  # {query, documents: [{title,text,score}], mode}
    prediction: str | None = None
    stop: str = ""  # answer | eos | length | turns
    response: str = ""

    @property
    def num_searches(self) -> int:
        return len(self.searches)

    @property
    def sim_labels(self) -> list[str]:
        return [s["mode"] for s in self.searches if s.get("mode")]


def _trim(docs: list[Document], max_words: int) -> list[Document]:
    out = []
    for d in docs:
        words = d.text.split()
        text = " ".join(words[:max_words]) if max_words else d.text
        out.append(Document(d.title, text, d.score))
    return out


class AgentLoop:
    """Batched multi-turn rollouts of `model` against `engine`."""

    def __init__(self, model, tokenizer, engine: SearchEngine, cfg: AgentConfig | None = None):
        self.model = model
        self.tok = tokenizer
        self.engine = engine
        self.cfg = cfg or AgentConfig()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        # Optional other backend (e.g. TRL's vLLM engine): token-id sequences in, new token ids out,
        # stopping at the stop strings. None = HF `generate` on `model`.
        self.generate_fn = None
        self.generate_calls = 0
        self.generated_tokens = 0
        self._note_cache: dict[str, list[int]] = {}

    def _encode_note(self, text: str) -> list[int]:
        if text not in self._note_cache:
            self._note_cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._note_cache[text]

    def encode_prompts(self, questions: list[str], template: str = prompts.POLICY_INSTRUCTION) -> list[list[int]]:
        texts = [prompts.render_policy_prompt(self.tok, q, template) for q in questions]
        return [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def run(self, prompt_ids: list[list[int]], contexts: list[QueryContext] | None = None) -> list[Trajectory]:
        """Roll out every prompt; `contexts[i]` goes with every search of sample i (simulators need it)."""
        cfg = self.cfg
        trajs = [Trajectory(prompt_ids=list(p)) for p in prompt_ids]
        active = list(range(len(trajs)))
        for rnd in range(cfg.max_turns + 1):
            if not active:
                break
            last = rnd == cfg.max_turns
            searches: list[tuple[int, str]] = []
            still: list[int] = []
            for i, (ids, text, hit_eos) in zip(active, self._generate([trajs[i] for i in active])):
                t = trajs[i]
                t.response_ids += ids
                t.env_mask += [1] * len(ids)
                kind, payload = prompts.parse_action(text)
                if kind == "answer":
                    t.prediction, t.stop = payload, "answer"
                elif hit_eos:
                    t.stop = "eos"
                elif last:
                    t.stop = "turns"
                elif kind == "search":
                    searches.append((i, payload))
                    still.append(i)
                else:  # neither a search nor an answer: a short corrective note, and go on
                    self._insert(t, self._encode_note(prompts.INVALID_ACTION))
                    still.append(i)
            if searches:
                self._search(trajs, searches, contexts)
            active = []
            for i in still:
                if len(trajs[i].response_ids) >= cfg.max_response_tokens:
                    trajs[i].stop = "length"
                    continue
                if rnd + 1 == cfg.max_turns:  # the next round is the last: no more searches
                    self._insert(trajs[i], self._encode_note(prompts.FINAL_TURN))
                active.append(i)
        for t in trajs:
            t.response = self.tok.decode(t.response_ids, skip_special_tokens=True)
        return trajs

    def _insert(self, t: Trajectory, ids: list[int]) -> None:
        t.response_ids += ids
        t.env_mask += [0] * len(ids)

    def _search(self, trajs: list[Trajectory], searches: list[tuple[int, str]], contexts: list[QueryContext]) -> None:
        idx = [i for i, _ in searches]
        results = self.engine.search(
            [q for _, q in searches], self.cfg.topk, [contexts[i] for i in idx] if contexts else None
        )
        modes = self.engine.last_modes or [None] * len(idx)
        for (i, query), docs, mode in zip(searches, results, modes):
            docs = _trim(docs, self.cfg.max_doc_words)
            trajs[i].searches.append(
                {"query": query, "documents": [d.as_dict() for d in docs], "mode": mode}
            )
            block = prompts.information_block(docs)
            self._insert(trajs[i], self.tok(block, add_special_tokens=False)["input_ids"])

    def _generate(self, batch: list[Trajectory]) -> list[tuple[list[int], str, bool]]:
        """One batched generate for the round; returns (new ids, their text, ended on EOS) per sample."""
        seqs = [t.prompt_ids + t.response_ids for t in batch]
        self.generate_calls += 1
        new = self.generate_fn(seqs) if self.generate_fn else self._hf_generate(seqs, batch)
        results = []
        for row in new:
            ids, hit_eos = self._cut(list(row))
            self.generated_tokens += len(ids)
            results.append((ids, self.tok.decode(ids, skip_special_tokens=True), hit_eos))
        return results

    def _hf_generate(self, seqs: list[list[int]], batch: list[Trajectory]) -> list[list[int]]:
        import torch

        width = max(len(s) for s in seqs)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):  # left padding so every row continues at the right edge
            input_ids[r, width - len(s):] = torch.tensor(s)
            attention[r, width - len(s):] = 1
        sample = self.cfg.temperature > 0
        budget = min(self.cfg.max_new_tokens, max(1, self.cfg.max_response_tokens - min(len(t.response_ids) for t in batch)))
        gen_kw = dict(
            max_new_tokens=budget,
            do_sample=sample,
            stopping_criteria=_stop_on_text(self.tok, prompts.STOP_STRINGS, start=width),
            pad_token_id=self.pad_id,
        )
        if sample:
            gen_kw.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p)
        else:  # silence "generation flags are not valid" warnings from model defaults
            gen_kw.update(temperature=None, top_p=None, top_k=None)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), **gen_kw
            )
        return out[:, width:].tolist()

    def _cut(self, row: list[int]) -> tuple[list[int], bool]:
        """Strip the padding `generate` adds after a row finished.

        With pad == EOS (common), a trailing EOS is padding when the row stopped on a stop string
        and a real policy token when the model ended the turn itself.
        """
        for j, tok in enumerate(row):
            if tok in self.eos_ids or tok == self.pad_id:
                ids = row[:j]
                text = self.tok.decode(ids, skip_special_tokens=True)
                stopped = any(s in text for s in prompts.STOP_STRINGS)
                if stopped or tok not in self.eos_ids:
                    return ids, False
                return ids + [tok], True
        return row, False


def _stop_on_text(tokenizer, stops: list[str], start: int):
    """A per-row stop criterion that decodes only each row's last few generated tokens.

    HF's `stop_strings` criterion costs more than the forward pass of a small model on a CPU; this
    one looks at a window just wide enough to hold a whole stop string, past the prompt only (the
    instruction itself mentions </search> and </answer>).
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    window = max(len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stops) + 2

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            tail = input_ids[:, max(start, input_ids.shape[1] - window):]
            texts = tokenizer.batch_decode(tail)
            return torch.tensor([any(s in t for s in stops) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


class QuestionAsQuery:
    """No policy at all (`--model none`): each question is searched once, the question as query.

    The same interface as AgentLoop, so collect can log real search calls without a model: cheap
    material for the simulator corpus and for answer-grounded warm-start demonstrations.
    """

    def __init__(self, engine: SearchEngine, cfg: AgentConfig | None = None):
        self.engine = engine
        self.cfg = cfg or AgentConfig()
        self.generated_tokens = 0

    def encode_prompts(self, questions: list[str], template: str = prompts.POLICY_INSTRUCTION) -> list[list[int]]:
        return [[] for _ in questions]

    def run(self, prompt_ids: list[list[int]], contexts: list[QueryContext] | None = None) -> list[Trajectory]:
        queries = [c.question for c in contexts or []]
        results = self.engine.search(queries, self.cfg.topk, contexts)
        trajs = []
        for query, docs in zip(queries, results):
            docs = _trim(docs, self.cfg.max_doc_words)
            t = Trajectory(prompt_ids=[], stop="turns")
            t.searches.append({"query": query, "documents": [d.as_dict() for d in docs], "mode": None})
            t.response = f"<search> {query} </search>" + prompts.information_block(docs)
            trajs.append(t)
        return trajs
