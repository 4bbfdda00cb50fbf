"""The multi-turn search agent loop, shared by collect, eval and rl.

Works on token ids for a whole batch, in rounds (Search-R1 style): `max_turns` rounds in which a
search is executed, then one last round (announced by a short note) in which only an answer counts.
In each round every still-active trajectory writes one turn, which ends at its FIRST `</search>` or
`</answer>`, at EOS, or at the round's token budget; the engine then answers all searches of the
round in ONE call; the documents are tokenised once and appended as `<information>` tokens that
carry mask 0 (attended to, never trained on). An invalid action (neither a search nor an answer)
gets a short corrective note and uses up its round. Earlier turns are never decoded and re-encoded,
so the token ids RL trains on are exactly the ones the policy produced.

HF models decode in our own loop over a KV cache instead of `model.generate`, because static
batching wasted most of the work on a CPU:
- a row leaves the batch at the step it stops, so no forward pass is spent on a finished row
  (`generate` ran every row until the longest one finished);
- a trajectory keeps its keys/values between rounds, so a round prefills only what was inserted
  since (documents, notes), not the whole context again;
- rows whose inserted tokens differ in length prefill in groups of similar length (one padded pass
  at the longest computed ~1.5x the real tokens), then decode as one batch;
- on a CPU, a decode step's attention is two plain matmuls, not SDPA (`models.fast_decode`, which
  load_model sets up: SDPA is slow there for a batch with no padded row).
Greedy outputs equal batched `generate`'s token for token (tests/test_agent.py keeps the reference).
Another backend (e.g. vLLM) plugs in as `generate_fn`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from zsctl.core import metrics, prompts
from zsctl.core.generation import Sampling, StopText, left_pad, length_groups
from zsctl.core.models import adapt_threads, cache_kwarg
from zsctl.search.base import Document, Noise, QueryContext, SearchEngine, cut_words


@dataclass
class AgentConfig:
    max_turns: int = 4  # searches allowed per trajectory
    max_new_tokens: int = 128  # per generation round
    max_response_tokens: int = 1024  # whole response budget (model + inserted tokens)
    topk: int = 3
    max_doc_words: int | None = None  # documents are cut to this many words; None: the prompt style's
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    prompt_style: str = "zsctl"  # prompts.PROMPT_STYLES: instruction, document lines and notes


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)  # 1 = policy token, 0 = inserted by the environment
    # Per response token: the log-probability the sampler gave a policy token, 0.0 for inserted ones.
    # Empty when the generation backend does not report them.
    logprobs: list[float] = field(default_factory=list)
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


@dataclass
class _Turn:
    ids: list[int]
    logprobs: list[float] | None
    hit_eos: bool


class _RowCache:
    """One trajectory's keys/values without padding: `layers[l] = (keys, values)`, each [heads, length, dim]."""

    __slots__ = ("layers", "length")

    def __init__(self, layers: list, length: int):
        self.layers = layers
        self.length = length


# Fresh prompts that share at least this many leading tokens (the policy instruction does) get
# them prefilled once and copied to every row; below it a separate forward pass is not worth it.
SHARED_PREFIX_MIN = 16


def _common_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens all sequences share, leaving each at least one of its own (its
    last token's logits give its first new token)."""
    k = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        j = 0
        while j < k and s[j] == first[j]:
            j += 1
        k = j
    return max(k, 0)


def _trim(docs: list[Document], max_words: int | None) -> list[Document]:
    return [Document(d.title, cut_words(d.text, max_words), d.score) for d in docs]


class AgentLoop:
    """Batched multi-turn rollouts of `model` against `engine`."""

    def __init__(self, model, tokenizer, engine: SearchEngine, cfg: AgentConfig | None = None):
        self.model = model
        self.tok = tokenizer
        self.engine = engine
        self.cfg = cfg or AgentConfig()
        self.style = prompts.style_of(self.cfg.prompt_style)
        self.doc_words = self.cfg.max_doc_words if self.cfg.max_doc_words is not None else self.style.doc_words
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.stop = StopText(tokenizer, list(prompts.STOP_STRINGS))  # a turn ends at the first one
        self.cache_kw = cache_kwarg(model)  # forward()'s name for the KV cache in this transformers
        # Another backend (e.g. TRL's vLLM engine): `generate_fn(seqs)` takes the token ids of each
        # row and returns (new token ids per row, their logprobs per row or None). It should stop
        # at `stop_strings`; the loop cuts each row at the first one anyway.
        self.generate_fn = None
        # With generate_fn: call it in every round, with an empty list once this process has no
        # row left, so processes that share a collective inside it never wait on each other.
        self.lockstep = False
        # HF logits processors applied at each decode step to the same view `generate` gives them;
        # None = those found on the model as `rollout_logits_processor` (tests script a policy so,
        # without the stages knowing).
        self.logits_processor = None
        self.generate_calls = 0  # generation rounds
        self.generated_tokens = 0  # policy tokens kept in the trajectories
        self.decode_steps = 0  # tokens the backend produced (HF: rows x forward passes that sampled)
        self.forward_passes = 0  # HF: batched passes that sampled (a round's prefill counts once, in any groups)
        self.prefill_tokens = 0  # HF: tokens fed through the model to build or extend caches
        self.shared_prefix_tokens = 0  # HF: prompt tokens not fed again, their keys/values copied
        # wall seconds by kind of work: where a rollout's time goes (bench/agent_speed.py prints it)
        self.seconds = {"prefill": 0.0, "decode": 0.0, "search": 0.0}
        self._note_cache: dict[str, list[int]] = {}

    def _encode_note(self, text: str) -> list[int]:
        if text not in self._note_cache:
            self._note_cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._note_cache[text]

    def render_prompts(self, questions: list[str], template: str | None = None,
                       chats: list[list[dict] | None] | None = None) -> list[str]:
        """Prompt texts in the loop's style; a row with its own chat messages (`chats[i]`, a question
        file's prompt column) is given exactly those, through the chat template."""
        chats = chats or [None] * len(questions)
        return [
            prompts.render_chat(self.tok, c) if c else prompts.render_policy_prompt(self.tok, q, template, self.style)
            for q, c in zip(questions, chats)
        ]

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]

    def encode_prompts(self, questions: list[str], template: str | None = None,
                       chats: list[list[dict] | None] | None = None) -> list[list[int]]:
        return self.encode_texts(self.render_prompts(questions, template, chats))

    def run(self, prompt_ids: list[list[int]], contexts: list[QueryContext] | None = None,
            noise: Noise | None = None) -> list[Trajectory]:
        """Roll out every prompt; `contexts[i]` goes with every search of sample i (simulators need it),
        `noise` with every search (a simulator's useful/noisy draw; None = the engine's own)."""
        cfg = self.cfg
        adapt_threads()  # --threads auto: the cores others leave free
        trajs = [Trajectory(prompt_ids=list(p)) for p in prompt_ids]
        caches: dict[int, _RowCache] = {}  # HF backend: each live trajectory's keys/values
        with_logprobs = True
        active = list(range(len(trajs)))
        for rnd in range(cfg.max_turns + 1):
            if not active and not (self.lockstep and self.generate_fn):
                break
            last = rnd == cfg.max_turns
            searches: list[tuple[int, str]] = []
            still: list[int] = []
            for i, turn in zip(active, self._generate(active, trajs, caches, keep_cache=not last)):
                t = trajs[i]
                t.response_ids += turn.ids
                t.env_mask += [1] * len(turn.ids)
                with_logprobs &= turn.logprobs is not None
                t.logprobs += turn.logprobs or [0.0] * len(turn.ids)
                kind, payload = prompts.parse_action(self.tok.decode(turn.ids, skip_special_tokens=True))
                if kind == "answer":
                    t.prediction, t.stop = payload, "answer"
                elif turn.hit_eos:
                    t.stop = "eos"
                elif last:
                    t.stop = "turns"
                elif kind == "search":
                    searches.append((i, payload))
                    still.append(i)
                else:  # neither a search nor an answer: a short corrective note, and go on
                    self._insert(t, self._encode_note(self.style.invalid_action))
                    still.append(i)
            if searches:
                self._search(trajs, searches, contexts, noise)
            active = []
            for i in still:
                if len(trajs[i].response_ids) >= cfg.max_response_tokens:
                    trajs[i].stop = "length"
                    continue
                if rnd + 1 == cfg.max_turns:  # the next round is the last: no more searches
                    self._insert(trajs[i], self._encode_note(self.style.final_turn))
                active.append(i)
            for i in set(caches) - set(active):  # finished trajectories free their memory at once
                del caches[i]
        for t in trajs:
            t.response = self.tok.decode(t.response_ids, skip_special_tokens=True)
            if not with_logprobs:
                t.logprobs = []
        return trajs

    def _insert(self, t: Trajectory, ids: list[int]) -> None:
        t.response_ids += ids
        t.env_mask += [0] * len(ids)
        t.logprobs += [0.0] * len(ids)

    def _search(self, trajs: list[Trajectory], searches: list[tuple[int, str]], contexts: list[QueryContext],
                noise: Noise | None) -> None:
        """The round's searches in one engine call. A query its trajectory already made (case and
        spacing aside) gets that search's documents and mode again with no call: a real engine returns
        the same page, and a simulator must not draw useful/noisy afresh (in RL, repeating a query until
        the reply came back useful would pay)."""
        earlier = [{metrics.query_key(s["query"]): s for s in trajs[i].searches} for i, _ in searches]
        new = [(i, q) for (i, q), seen in zip(searches, earlier) if metrics.query_key(q) not in seen]
        t0 = time.perf_counter()
        results = self.engine.search(
            [q for _, q in new], self.cfg.topk, [contexts[i] for i, _ in new] if contexts else None, noise
        )
        self.seconds["search"] += time.perf_counter() - t0
        fresh = iter(results)
        for (i, query), seen in zip(searches, earlier):
            again = seen.get(metrics.query_key(query))
            if again is None:
                result = next(fresh)
                docs, mode = _trim(result.docs, self.doc_words), result.mode
            else:
                docs, mode = [Document(**d) for d in again["documents"]], again["mode"]
            trajs[i].searches.append({"query": query, "documents": [d.as_dict() for d in docs], "mode": mode})
            block = self.style.information_block(docs)
            self._insert(trajs[i], self.tok(block, add_special_tokens=False)["input_ids"])

    def _generate(self, rows: list[int], trajs: list[Trajectory], caches: dict, keep_cache: bool) -> list[_Turn]:
        """One turn for every row of the round, each cut at its first stop."""
        seqs = [trajs[i].prompt_ids + trajs[i].response_ids for i in rows]
        self.generate_calls += 1
        if self.generate_fn is not None:
            out = self.generate_fn(seqs)
            new, lps = out if isinstance(out, tuple) else (out, None)  # a backend may return just the ids
            turns = []
            for r, row in enumerate(new):
                row = list(row)
                self.decode_steps += len(row)
                n, hit_eos = self._first_stop(row)
                turns.append(_Turn(row[:n], list(lps[r][:n]) if lps is not None else None, hit_eos))
        else:
            batch = [trajs[i] for i in rows]
            budget = min(self.cfg.max_new_tokens,
                         max(1, self.cfg.max_response_tokens - min(len(t.response_ids) for t in batch)))
            turns = self._hf_round(rows, seqs, caches, budget, keep_cache)
        self.generated_tokens += sum(len(t.ids) for t in turns)
        return turns

    # --- stops --------------------------------------------------------------------------------

    @property
    def stop_strings(self) -> list[str]:
        return self.stop.stops

    @stop_strings.setter
    def stop_strings(self, stops: list[str]) -> None:
        self.stop = StopText(self.tok, list(stops))

    def _first_stop(self, row: list[int]) -> tuple[int, bool]:
        """(length of the turn up to its first stop, whether that stop is EOS) for a backend's row.

        EOS is kept (the policy ended the turn); a pad token is dropped (a backend's padding); a stop
        string ends the turn with the token that completes it, and whatever followed is discarded.
        """
        has_stop = self.stop.found(self.tok.decode(row))
        w = self.stop.window
        for j, tok in enumerate(row):
            if tok in self.eos_ids:
                return j + 1, True
            if tok == self.pad_id:
                return j, False
            if has_stop and self.stop.found(self.tok.decode(row[max(0, j + 1 - w): j + 1])):
                return j + 1, False
        return len(row), False

    # --- HF decoding ----------------------------------------------------------------------------

    def _hf_round(self, rows: list[int], seqs: list[list[int]], caches: dict, budget: int,
                  keep_cache: bool) -> list[_Turn]:
        """Decode one turn per row; rows leave the batch as they stop; caches carry to the next round."""
        import torch

        model = self.model
        device = next(model.parameters()).device
        t0 = time.perf_counter()
        n = len(seqs)
        old = [caches.get(i) for i in rows]
        if n > 1 and not any(old):  # fresh prompts: their shared head (instruction, template) once
            k = _common_prefix(seqs)
            if k >= SHARED_PREFIX_MIN:
                old = [self._prefill_one(seqs[0][:k])] * n
                self.shared_prefix_tokens += (n - 1) * k
        cached = [c.length if c else 0 for c in old]
        pending = [s[c:] for s, c in zip(seqs, cached)]
        base = [c + len(p) for c, p in zip(cached, pending)]  # position of each row's first new token
        self.prefill_tokens += sum(len(p) for p in pending)
        # Inserted documents differ in length: one pass at the longest would compute mostly padding
        # (a second round measured 4,928 computed tokens for 3,189 real ones), so rows of similar
        # length extend their caches together, and then all rows decode in one batch.
        groups = length_groups([len(p) for p in pending])
        with torch.no_grad():
            if len(groups) == 1:  # the pass's batch cache is the decode cache: no copy out and back
                cache, mask, logits = self._extend(old, pending)
            else:
                grown: list[_RowCache | None] = [None] * n
                firsts = [None] * n
                for g in groups:
                    part, part_mask, part_logits = self._extend([old[r] for r in g], [pending[r] for r in g])
                    for j, r in enumerate(g):
                        grown[r], firsts[r] = self._row_cache(part, part_mask, j), part_logits[j]
                cache, mask = self._stack(grown)
                logits = torch.stack(firsts)
        mask = mask.to(device)
        self.forward_passes += 1  # the pass (in however many groups) that gives every row its first token

        def forward(input_ids, positions):
            out = model(input_ids=input_ids.to(device), attention_mask=mask, position_ids=positions.to(device),
                        use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
            self.forward_passes += 1
            return out.logits[:, -1, :].float()

        with torch.no_grad():
            t1 = time.perf_counter()
            self.seconds["prefill"] += t1 - t0  # the batch cache built, inserted tokens fed
            alive = list(range(n))  # batch row -> row of this round
            gen: list[list[int]] = [[] for _ in range(n)]
            lps: list[list[float]] = [[] for _ in range(n)]
            eos_hit = [False] * n
            view = None
            procs = self.logits_processor or getattr(model, "rollout_logits_processor", None)
            if procs is not None:
                view = left_pad(seqs, self.pad_id)[0]
            window = self.stop.window
            while alive:
                if view is not None:  # processors see every row of the round, as under `generate`
                    full = torch.zeros((n, logits.shape[1]))
                    full[alive] = logits.cpu()
                    logits = procs(view, full)[alive].to(logits.device)
                choice, chosen = self._pick(logits)
                toks, chosen = choice.tolist(), chosen.tolist()
                self.decode_steps += len(alive)
                stopped = self.stop.ended([gen[r][-(window - 1):] + [t] for r, t in zip(alive, toks)])
                stay = []
                for j, (r, tok) in enumerate(zip(alive, toks)):
                    gen[r].append(tok)
                    lps[r].append(chosen[j])
                    if tok in self.eos_ids:
                        eos_hit[r] = True
                    elif tok == self.pad_id:  # not a token of the turn (a model with a separate pad)
                        gen[r].pop()
                        lps[r].pop()
                    elif not stopped[j] and len(gen[r]) < budget:
                        stay.append(j)
                        continue
                    if keep_cache and not eos_hit[r]:
                        caches[rows[r]] = self._row_cache(cache, mask, j)
                if view is not None:
                    col = torch.full((n, 1), self.pad_id, dtype=torch.long)
                    col[alive, 0] = torch.tensor(toks)
                    view = torch.cat([view, col], dim=1)
                if not stay:
                    break
                if len(stay) < len(alive):
                    keep = torch.tensor(stay, device=device)
                    cache.batch_select_indices(keep)
                    mask = mask[keep]
                    choice = choice[keep]
                    alive = [alive[j] for j in stay]
                    self._drop_empty_columns(cache, mask)
                    mask = mask[:, int(mask.any(0).int().argmax()):]
                mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
                positions = torch.tensor([[base[r] + len(gen[r]) - 1] for r in alive])
                logits = forward(choice[:, None], positions)
        self.seconds["decode"] += time.perf_counter() - t1
        return [_Turn(gen[r], lps[r], eos_hit[r]) for r in range(n)]

    def _stack(self, rows: list[_RowCache | None]):
        """(one batch cache holding each row's keys/values left-padded to the longest, its mask)."""
        import torch
        from transformers import DynamicCache

        width = max((c.length if c else 0) for c in rows)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        data = None
        if width:
            data = []
            ref = next(c for c in rows if c and c.length)
            for layer in range(len(ref.layers)):
                kv = []
                for part in (0, 1):
                    h, _, d = ref.layers[layer][part].shape
                    t = ref.layers[layer][part].new_zeros((len(rows), h, width, d))
                    for r, c in enumerate(rows):
                        if c and c.length:
                            t[r, :, width - c.length:] = c.layers[layer][part]
                    kv.append(t)
                data.append(tuple(kv))
            for r, c in enumerate(rows):
                if c and c.length:
                    mask[r, width - c.length:] = 1
        return DynamicCache(ddp_cache_data=data, config=self.model.config), mask

    def _extend(self, old: list[_RowCache | None], pending: list[list[int]]):
        """Feed each row its pending tokens after its cache, in one batched forward pass: (the batch
        cache, its mask, each row's last logits). Pending tokens sit right-aligned in a chunk as wide
        as the longest (the holes masked), so every row's next token shares a column."""
        import torch

        device = next(self.model.parameters()).device
        cache, mask = self._stack(old)
        width, chunk = mask.shape[1], max(len(p) for p in pending)
        cached = [c.length if c else 0 for c in old]
        mask = torch.cat([mask, torch.zeros((len(old), chunk), dtype=torch.long)], dim=1)
        ids = torch.full((len(old), chunk), self.pad_id, dtype=torch.long)
        pos = torch.zeros((len(old), chunk), dtype=torch.long)
        for r, (c, p) in enumerate(zip(cached, pending)):
            mask[r, width + chunk - len(p):] = 1
            ids[r, chunk - len(p):] = torch.tensor(p)
            pos[r, chunk - len(p):] = torch.arange(c, c + len(p))
        mask = mask.to(device)
        out = self.model(input_ids=ids.to(device), attention_mask=mask, position_ids=pos.to(device), use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: cache})
        return cache, mask, out.logits[:, -1, :].float()

    def _prefill_one(self, ids: list[int]) -> _RowCache:
        """The keys/values of one sequence, from one forward pass."""
        import torch
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1,
                       **{self.cache_kw: cache})
        self.prefill_tokens += len(ids)
        return _RowCache([(layer.keys[0], layer.values[0]) for layer in cache.layers], len(ids))

    def _pick(self, logits):
        """The next token of every row and its log-probability (generation.Sampling, from the config)."""
        return Sampling(self.cfg.temperature, self.cfg.top_p).pick(logits)

    @staticmethod
    def _row_cache(cache, mask, j: int) -> _RowCache:
        """Row j's keys/values without its padding and holes, to continue in the next round."""
        cols = mask[j].nonzero()[:, 0]
        layers = [(layer.keys[j][:, cols], layer.values[j][:, cols]) for layer in cache.layers]
        return _RowCache(layers, len(cols))

    @staticmethod
    def _drop_empty_columns(cache, mask) -> None:
        """After rows left, drop the leading columns no remaining row uses (their left padding)."""
        first = int(mask.any(0).int().argmax())
        if first:
            for layer in cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]


class QuestionAsQuery:
    """No policy at all (`collect --policy none`): each question is searched once, the question as query.

    The same interface as AgentLoop, so collect can log real search calls without a model: cheap
    material for the simulator corpus and for answer-grounded warm-start demonstrations.
    """

    def __init__(self, engine: SearchEngine, cfg: AgentConfig | None = None):
        self.engine = engine
        self.cfg = cfg or AgentConfig()
        self.style = prompts.style_of(self.cfg.prompt_style)
        self.doc_words = self.cfg.max_doc_words if self.cfg.max_doc_words is not None else self.style.doc_words
        self.generated_tokens = 0

    def render_prompts(self, questions: list[str], template: str | None = None, chats=None) -> list[str]:
        return ["" for _ in questions]

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [[] for _ in texts]

    def encode_prompts(self, questions: list[str], template: str | None = None, chats=None) -> list[list[int]]:
        return [[] for _ in questions]

    def run(self, prompt_ids: list[list[int]], contexts: list[QueryContext] | None = None,
            noise: Noise | None = None) -> list[Trajectory]:
        queries = [c.question for c in contexts or []]
        results = self.engine.search(queries, self.cfg.topk, contexts, noise)
        trajs = []
        for query, result in zip(queries, results):
            docs = _trim(result.docs, self.doc_words)
            t = Trajectory(prompt_ids=[], stop="turns")
            t.searches.append({"query": query, "documents": [d.as_dict() for d in docs], "mode": None})
            t.response = f"<search> {query} </search>" + self.style.information_block(docs)
            trajs.append(t)
        return trajs
