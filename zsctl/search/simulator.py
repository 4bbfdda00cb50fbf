"""Simulated search engines: an LLM writes the documents (ZeroSearch).

`sim:MODEL` runs the simulator in-process; `sim+http://HOST:PORT/v1[,http://…]` sends the same
prompts to OpenAI-compatible servers (vLLM, SGLang, `zsctl serve --model`), as completions or, for a
released simulator served through its chat template, as chat completions. The same sampling settings
(temperature, top_p) go both ways; the in-process n-gram ban (`no_repeat`, default 4) reaches a server
only when the spec sets it (zsctl serve applies its default anyway; vLLM has no such setting).
Documents end at `doc_words` words (train-sim records the length it trained on, which `sim:` reads;
`sim+http:` cuts what comes back at `?doc_words=N`, as the server cannot stop at it).
A template with a system message (e.g. `zerosearch-sft`) is a chat: its prompt is the user turn.

Every query gets its own sample's question and first gold answer, and a mode: useful or noisy,
taken from `QueryContext.mode` when set, else drawn from the search's `Noise` (RL passes the
curriculum's p_i each step; by default the engine's own `noise_p` and seeded generator). Each
query's `SearchResult` carries the mode, the reply, its format and verification. All queries of one
`search()` call go through one batched generate (in-process) or one round of batched requests (HTTP).

Two prompt styles (`sim_mode`): `tuned` feeds the template a train-sim simulator was trained on
(recorded in its manifest; else the built-in `SIMULATOR_TEMPLATE`), byte for byte as it was trained;
`prompt` wraps the few-shot template in the tokenizer's chat template, for an untuned instruct model
(the paper's prompt-based baseline).

Verified generation (`?verify=N`, beyond the paper, whose simulator output is used as written): a
useful reply must hold a gold answer (metrics.docs_hold_answer) AND share a content word with the
query (metrics.content_words); a noisy reply must not hold a gold answer. Each failing useful row
gets N more candidates, those of all failing rows sampled together in ONE batch at RETRY_TEMPERATURE
(a greedy retry would repeat the same text) from a prompt whose query line names the answer on both
sides of the query (`steered_query`); the first candidate that passes is kept. A reply that
never passes is replaced by its last candidate with every answer-holding sentence removed, so it
holds no answer. A failing noisy reply is mended that way at once, not regenerated: cutting the
answer out fixes it exactly, while a missing answer can only be regenerated — and regenerating
noisy rows too measured 1.5–2.4× the unverified generation time; useful-only retries cost 1.44× in
CPU time at 16 queries a call (README, "The simulator"). Without gold answers (or with
yes/no golds, which containment cannot judge) only the useful reply's link to the query is checked.
A small batch in this process draws every useful row's candidates beside the first replies, in
the same generate (`draws_ahead`): cheaper on a CPU than a second pass. Generations per query are in
`SearchResult.tries` (1 = first reply kept and no candidate drawn, else 1 + N), pass/fail in
`SearchResult.verified`.

With or without verification, a query that names nothing (metrics.is_degenerate_query) is written
from the noisy prompt (and, verified, checked as noisy): a policy gains nothing from a degenerate
query. The useful prompt holds the gold answer, and a small simulator copies it whatever the query
says (a 135M simulator after 80 steps: 67 % of useful replies to degenerate queries held it).

Hop by hop (`?chain=1`, beyond the paper; for the bundled multi-hop questions, whose supporting
documents are known): the useful prompt names the gold answer only when the query names the entity
of the supporting document that holds it; any other useful query gets that entity as its answer
line instead, so its reply leads one hop on (a first-hop search about "Kiss and Tell" learns of
Shirley Temple, and only a search that names her finds "Chief of Protocol"), as a real engine
would. Without it a small simulator hands the answer to any query about the question, and RL learns
to search once. Verified, such a useful reply must hold that entity and not the answer. A hop is
set only where exactly one supporting document holds the answer and its title does not name it (a
comparison whose answer is one of its own entities, or a question both documents answer, is one
search away on a real engine too). Verified, a useful reply that never passes takes the question's
supporting document that would pass in its place, as its first document, cut around what it must
hold (the first-hop document naming the next entity; the answer's document once that entity is
named) — the real paragraph a real engine would have returned — provided it shares a content word
with the query: a query about nothing in the question still gets its reply without the answer
(before this, in the demo's RL rollouts, useful replies to queries about the question named the
next entity in 3 of 24; README, "Why RL's per-search hit rate falls"). Other questions: as without it.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qsl, urlsplit

from zsctl.core import artifacts, data, metrics, prompts
from zsctl.core.errors import BadInput
from zsctl.core.generation import NO_REPEAT_NGRAM, Sampling, cut_at_stop, first_lines, generate_batch
from zsctl.search.base import Document, Noise, QueryContext, SearchEngine, SearchResult, cut_words

SIM_STYLES = ("tuned", "prompt")
# Generation budget per requested document when the simulator does not say (train-sim records the
# length of the documents it was trained on in its manifest, `tokens_per_doc`, and that wins).
TOKENS_PER_DOC = 64
# A simulator that writes more than asked, starts a new few-shot example, or chats after its
# documents (a blank line: documents are one per line, texts never hold line breaks) is cut there.
_STOP_HEAD = ("\n\n", "\nQuestion:", "\nQuery:", "\nExample", "\nNow (")
# System message for chat-wrapped prompts; without one SmolLM2's template inserts its own default.
SIM_SYSTEM = "You are a search engine."
# Servers that keep OpenAI's limit refuse more than four stop strings (HTTP 400): the first four go
# in the request, the rest are applied here to what comes back.
MAX_SENT_STOPS = 4
# An endpoint that failed (after its retries) gets no requests for this many seconds; its work goes
# to the endpoints that answer.
COOLDOWN_S = 30.0
HTTP_APIS = ("completions", "chat")
# Prompt mode starts the reply for the model: an untuned model then keeps the 'Doc i:' format far
# more often than when it is only told to (the primer is put back in front of what it writes).
PRIMER = "Doc 1:"
# Verified generation: retries sample (the first reply keeps the engine's own temperature) and are
# bounded; a retry at temperature 0 would reproduce the failed text token for token.
RETRY_TEMPERATURE = 0.8
RETRY_TOP_P = 0.95
MAX_VERIFY = 10
DRAW_AHEAD_ROWS = 16  # verification: at most this many rows draw the candidates with the first replies
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def stop_strings(k: int) -> list[str]:
    return [f"Doc {k + 1}:", *_STOP_HEAD]


class _Simulated(SearchEngine):
    """What both simulated engines share: mode choice, prompt rendering, output normalisation."""

    simulated = True

    def __init__(self, *, sim_mode: str = "tuned", template: str | None = None, noise_p: float = 0.0,
                 seed: int = 0, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, verify: int = 0, no_repeat: int | None = None, chain: int = 0,
                 doc_words: int | None = None):
        super().__init__()
        if sim_mode not in SIM_STYLES:
            raise BadInput(f"simulator mode '{sim_mode}' is not one of {', '.join(SIM_STYLES)}")
        if not 0.0 <= float(noise_p) <= 1.0:
            raise BadInput(f"simulator noise_p={noise_p} is outside [0, 1]")
        if not 0 <= int(verify) <= MAX_VERIFY:
            raise BadInput(f"simulator option verify={verify} must be between 0 (off) and {MAX_VERIFY} retries")
        if int(chain) not in (0, 1):
            raise BadInput(f"simulator option chain={chain} must be 0 (off) or 1 (useful replies lead hop by hop)")
        if doc_words is not None and int(doc_words) < 0:
            raise BadInput(f"simulator option doc_words={doc_words} must be 0 (documents as written) or a word count")
        if no_repeat is not None and int(no_repeat) < 0:
            raise BadInput(f"simulator option no_repeat={no_repeat} must be 0 (off) or an n-gram length")
        default = prompts.SIMULATOR_TEMPLATE if sim_mode == "tuned" else prompts.SIMULATOR_FEWSHOT_TEMPLATE
        self.sim_mode = sim_mode
        self.template = prompts.load_template(template, default)
        # A template with a system message is a chat (released simulators): its prompt goes as the user
        # turn after that message and the reply is taken as written. Prompt mode chats too, with our
        # system message, and starts the reply with the primer. Tuned mode sends the raw text.
        if self.template.system is not None:
            self.chat_system, self.primer = self.template.system, ""
        else:
            self.chat_system, self.primer = (None, "") if sim_mode == "tuned" else (SIM_SYSTEM, PRIMER)
        # no n-gram of this many tokens repeats within a reply; None: the default where it is applied
        self.no_repeat = None if no_repeat is None else int(no_repeat)
        self.noise_p = float(noise_p)  # for searches that pass no Noise of their own
        self.rng = random.Random(seed)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else None
        self.tokens_per_doc = TOKENS_PER_DOC
        # words of text per document the simulator was trained on (`sim:` reads it from the manifest;
        # 0: documents as written): a reply's document runs no further (`write`)
        self.doc_words = int(doc_words or 0)
        self.sampling = Sampling(float(temperature), float(top_p))
        hot = self.sampling.temperature >= RETRY_TEMPERATURE  # already sampling hot: keep its top_p
        self.retry_sampling = Sampling(max(self.sampling.temperature, RETRY_TEMPERATURE),
                                       self.sampling.top_p if hot else RETRY_TOP_P)
        self.outputs = 0  # generations parsed so far
        self.well_formed = 0  # of which held exactly k numbered documents
        self.tok = None  # set by subclasses; prompt mode needs it for the chat template
        self.verify = int(verify)
        self.chain = bool(int(chain))
        self.hops = 0  # useful queries given the next hop's entity instead of the answer (chain)
        self.regenerated = 0  # rows generated again by verification
        self.fallbacks = 0  # replies that never passed and had their answer removed
        self.supported = 0  # replies that never passed and were led on by a supporting document (chain)
        self.generation_s = 0.0  # wall time inside the model or its servers
        self.generation_cpu_s = 0.0  # this process's CPU time meanwhile: comparable on a busy machine

    def _choose_mode(self, ctx: QueryContext | None, noise: Noise) -> str:
        if ctx is not None and ctx.mode:
            if ctx.mode not in prompts.SIM_MODES:
                raise BadInput(f"simulated search mode '{ctx.mode}' is not one of {', '.join(prompts.SIM_MODES)}")
            return ctx.mode
        return noise.draw()

    def render(self, query: str, ctx: QueryContext | None, mode: str, k: int, answer: str | None = None) -> str:
        """The prompt text for one query (before any chat wrapping); `answer` replaces the gold one."""
        question = (ctx.question if ctx and ctx.question else query)
        if answer is None:
            answer = ctx.golden_answers[0] if ctx and ctx.golden_answers else ""
        return prompts.render_simulator_prompt(query, question, str(answer), mode, k, self.template)

    def next_hop(self, query: str, ctx: QueryContext | None) -> str | None:
        """With chain: the entity of the supporting document that holds the answer, when the query
        does not name it yet (what a useful reply leads to instead of the answer); else None."""
        golds = _golds(ctx)
        if not self.chain or not golds:
            return None
        holders = [d for d in data.supporting_docs(ctx.question)
                   if metrics.docs_hold_answer([{"title": d.entity, "text": d.text}], golds)]
        # one hop only when exactly one document holds the answer and is not named by it (a comparison's
        # answer is an entity of its own: its reply could never name it without the answer)
        if len(holders) != 1 or metrics.find_answer([holders[0].entity], golds):
            return None
        holder = holders[0]
        needed = set(metrics.content_words(holder.entity))
        return holder.entity if needed and not needed <= set(metrics.content_words(query)) else None

    def messages(self, prompt: str) -> list[dict]:
        return [{"role": "system", "content": self.chat_system}, {"role": "user", "content": prompt}]

    def model_input(self, prompt: str) -> str:
        """What the model is given as text: tuned → the prompt itself, exactly as train-sim trains on
        it; a chat → the prompt as the user turn in the model's chat template, then the primer."""
        if self.chat_system is None:
            return prompt
        if self.tok is None:  # no tokenizer to apply the template with: said loudly, once
            prompts.warn_once(f"the chat template of simulator {self.spec} cannot be applied (its tokenizer "
                              "does not load here); prompts go as plain text (sim+http: ?api=chat lets the "
                              "server apply it)")
            return "\n\n".join(m["content"] for m in self.messages(prompt) if m["content"]) + self.primer
        return prompts.render_chat(self.tok, self.messages(prompt), who=f"simulator {self.spec}") + self.primer

    def stops(self, k: int) -> list[str]:
        """Where a reply ends. A released simulator may leave blank lines between its documents, so a
        chat template's reply is only cut at the first document too many (as ZeroSearch cuts it)."""
        return [f"Doc {k + 1}"] if self.template.system is not None else stop_strings(k)

    def _search(self, queries, k, contexts, noise):
        ctxs = contexts or [None] * len(queries)
        noise = noise or Noise(self.noise_p, self.rng)
        asked = [self._choose_mode(c, noise) for c in ctxs]
        # a query that names nothing is written from the noisy prompt (its result keeps the mode asked
        # for): the useful prompt carries the answer, which a small simulator copies whatever the query
        modes = ["noisy" if m == "useful" and metrics.is_degenerate_query(q) else m
                 for q, m in zip(queries, asked)]
        hops = [self.next_hop(q, c) if m == "useful" else None for q, c, m in zip(queries, ctxs, modes)]
        rendered = [self.render(q, c, m, k, h) for q, c, m, h in zip(queries, ctxs, modes, hops)]
        inputs = [self.model_input(p) for p in rendered]
        n, v = len(queries), self.verify
        # a retry's prompt names what its reply must hold on the query line too
        steered = {i: self.render(steered_query(queries[i], hops[i] or next(iter(_golds(ctxs[i])), "")), ctxs[i],
                                  modes[i], k, hops[i]) for i in range(n) if v and modes[i] == "useful"}
        # Only a useful reply is generated again: a noisy one that holds the answer is mended exactly
        # by cutting out the sentences that hold it (below), at no generation cost. All `verify`
        # candidates of every failing row go in ONE batch: the same chances as retrying round after
        # round, in one call. A batch small enough (`draws_ahead`) draws every useful row's candidates
        # beside the first replies instead: a decode step of 16 rows costs a CPU less than two of 8,
        # and most rounds of RL's small batches have a useful reply that fails.
        ahead = sorted(steered) if steered and self.draws_ahead(n + v * len(steered)) else []
        if ahead:  # greedy first replies and sampled candidates, side by side
            replies = self.write(inputs + [self.model_input(steered[i]) for i in ahead], k,
                                 [self.sampling] * n + [self.retry_sampling] * len(ahead), [1] * n + [v] * len(ahead))
        else:
            replies = self.write(inputs, k, self.sampling)
        texts, drawn = replies[:n], {i: replies[n + j * v:n + (j + 1) * v] for j, i in enumerate(ahead)}
        tries = [1 + v if i in drawn else 1 for i in range(n)]  # what was generated, whether used or not
        failed: set[int] = set()  # rows whose kept reply did not pass
        if v:
            failed = {i for i in range(n) if not self._passes(texts[i], queries[i], ctxs[i], modes[i], k, hops[i])}
            retry = sorted(i for i in failed if modes[i] == "useful")
            later = [i for i in retry if i not in drawn]
            if later:
                tried = self.write([self.model_input(steered[i]) for i in later], k, self.retry_sampling, copies=v)
                drawn.update({i: tried[j * v:(j + 1) * v] for j, i in enumerate(later)})
            for i in retry:
                rendered[i] = steered[i]
                for text in drawn[i]:
                    texts[i] = text  # a row that never passes keeps its last candidate
                    if self._passes(text, queries[i], ctxs[i], modes[i], k, hops[i]):
                        failed.discard(i)
                        break
                tries[i] = 1 + v  # every candidate was generated, whichever passed first
            with self.stats_lock:
                self.regenerated += (len(ahead) + len(later)) * v
        results = []
        for i, text in enumerate(texts):
            docs, ok = prompts.parse_documents(text, k)
            passed = None
            if self.verify:
                passed = i not in failed
                if not passed:
                    found = self.supporting_reply(docs, queries[i], ctxs[i], modes[i], hops[i])
                    passed = found is not None
                    docs = found or _without_answer(docs, _golds(ctxs[i]))
                    text = prompts.format_documents(docs)
            results.append(SearchResult([Document(d["title"], d["text"], d["score"]) for d in docs], mode=asked[i],
                                        text=text, well_formed=ok, tries=tries[i], verified=passed, prompt=rendered[i]))
        with self.stats_lock:
            self.stats.calls += n
            self.fallbacks += sum(r.verified is False for r in results)
            self.supported += sum(r.verified is True and i in failed for i, r in enumerate(results))
            self.hops += sum(h is not None for h in hops)
            self.outputs += n
            self.well_formed += sum(r.well_formed for r in results)
        return results

    def write(self, inputs: list[str], k: int, sampling: Sampling | list[Sampling],
              copies: int | list[int] = 1) -> list[str]:
        """The replies to model inputs, `copies` per input (or per input its own number, and its own
        Sampling) in ONE batch, an input's copies side by side, each cut where a reply of k documents
        ends."""
        budget = self.max_new_tokens or self.tokens_per_doc * k
        # a trained simulator writes one document per line: its reply is whole at the k-th line break
        lines = k if self.chat_system is None else 0
        counts = copies if isinstance(copies, list) else [copies] * len(inputs)
        if not isinstance(sampling, Sampling):  # one per input: one per generated row
            sampling = [s for s, c in zip(sampling, counts) for _ in range(c)]
        replies = self._timed_complete([x for x, c in zip(inputs, counts) for _ in range(c)], budget, self.stops(k),
                                       sampling, lines)
        replies = [self.primer + first_lines(text, lines) for text in replies]
        return [prompts.cut_document_lines(t, self.doc_words) for t in replies] if self.doc_words else replies

    def draws_ahead(self, rows: int) -> bool:
        """Whether a batch of this many rows (first replies and every useful row's candidates) is
        generated at once. Only in this process, only small: measured on one CPU thread (SmolLM2-135M),
        a decode step costs ~38 ms + ~3 ms a row, so 16 rows cost less than a second pass of 8."""
        return False

    def supporting_reply(self, docs: list[dict], query: str, ctx: QueryContext | None, mode: str,
                         hop: str | None) -> list[dict] | None:
        """With chain, for a useful reply that never passed: the question's supporting document that
        would pass in its place (cut around what it must hold), first, then the reply's other documents
        without the answer; None when chain is off or no supporting document passes (module docstring)."""
        if not self.chain or mode != "useful" or ctx is None:
            return None
        golds = _golds(ctx)
        needles = [hop] if hop else golds
        for d in data.supporting_docs(ctx.question):
            if hop and d.entity == hop:  # the answer's own document, cut short of it, is no first hop
                continue
            found = {"title": d.entity, "text": _around(d.text, needles, self.doc_words), "score": 0.0}
            reply = [found, *_without_answer(docs[1:], golds)]
            if self._docs_pass(reply, query, ctx, mode, hop):
                return reply
        return None

    def _passes(self, text: str, query: str, ctx: QueryContext | None, mode: str, k: int,
                hop: str | None = None) -> bool:
        return self._docs_pass(prompts.parse_documents(text, k)[0], query, ctx, mode, hop)

    def _docs_pass(self, docs: list[dict], query: str, ctx: QueryContext | None, mode: str,
                   hop: str | None = None) -> bool:
        """Verification of one reply: useful → holds a gold answer (or, led one hop on, the next
        entity and not the answer) and is about the query; noisy → holds no gold answer (module docstring)."""
        golds = _golds(ctx)
        holds = metrics.docs_hold_answer(docs, golds)
        if mode == "noisy":
            return not holds
        about = set(metrics.content_words(query)) & {
            w for d in docs for w in metrics.content_words(f"{d['title']} {d['text']}")
        }
        if hop:
            return bool(about) and metrics.docs_hold_answer(docs, [hop]) and not holds
        return bool(about) and (holds or not golds)

    def _timed_complete(self, texts: list[str], max_new_tokens: int, stop: list[str], sampling: Sampling,
                        lines: int = 0) -> list[str]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return self._complete(texts, max_new_tokens, stop, sampling, lines)
        finally:
            # summed over concurrent searches (serve); process CPU time then covers them all
            with self.stats_lock:
                self.generation_s += time.perf_counter() - t0
                self.generation_cpu_s += time.process_time() - c0

    def _complete(self, texts: list[str], max_new_tokens: int, stop: list[str], sampling: Sampling,
                  lines: int = 0) -> list[str]:
        """The replies; `lines` > 0: each may end at its `lines`-th line break (the caller cuts there)."""
        raise NotImplementedError


def steered_query(query: str, answer: str) -> str:
    """The query line of a verification retry: the answer on both sides of the policy's query.

    A small simulator echoes its query line far more readily than the prompt's Answer line: on the
    37 useful prompts whose greedy reply lacked the answer (SmolLM2-135M of sim_cpu.sh, 4 candidates
    each at temperature 0.8; README, "The simulator") a candidate passed 18 % of the time with the
    plain query and 36 % with this one. The reply is still judged against the policy's own query,
    so it must share a content word with that. No answer to name: the query as it is.
    """
    return f"{answer} {query} {answer}" if answer else query


def _golds(ctx: QueryContext | None) -> list[str]:
    """The gold answers verification can judge by containment: none for yes/no golds."""
    golds = list(ctx.golden_answers) if ctx and ctx.golden_answers else []
    return [] if metrics.yes_no(golds) else golds


def _around(text: str, needles: list[str], words: int) -> str:
    """A supporting document's text from the sentence that first names one of `needles`, cut to
    `words` words (0: as it is) and begun a little before the name where the sentence is longer."""
    sentences = _SENTENCE_END.split(" ".join(text.split()))
    at = next((i for i, x in enumerate(sentences) if metrics.find_answer([x], needles)), 0)
    rest = " ".join(sentences[at:])
    if not words or metrics.find_answer([cut_words(rest, words)], needles):
        return cut_words(rest, words)
    tokens = rest.split()
    end = next((j for j in range(len(tokens)) if metrics.find_answer([" ".join(tokens[:j + 1])], needles)), 0)
    return " ".join(tokens[max(0, end - words // 2):][:words])


def _without_answer(docs: list[dict], golds: list[str]) -> list[dict]:
    """Documents with every sentence (and title) that holds a gold answer removed."""
    out = []
    for d in docs:
        title = "" if metrics.find_answer([d["title"]], golds) else d["title"]
        kept = [x for x in _SENTENCE_END.split(d["text"]) if not metrics.find_answer([x], golds)]
        out.append({**d, "title": title, "text": " ".join(kept)})
    if metrics.docs_hold_answer(out, golds):  # an answer across a sentence break: drop every text
        out = [{**d, "title": "", "text": ""} for d in out]
    return out


class SimulatorEngine(_Simulated):
    """`sim:MODEL`: the simulator model runs in this process."""

    name = "sim"

    def __init__(self, model_spec: str, *, model=None, tokenizer=None, **kw):
        # the manifest train-sim wrote beside it ({} for other models)
        trained = artifacts.model_manifest(model_spec, "simulator") if model is None else {}
        if kw.get("template") is None and kw.get("sim_mode", "tuned") == "tuned":
            kw["template"] = prompts.SimTemplate.recorded(trained)  # the prompt it was trained on, if recorded
        if kw.get("doc_words") is None:
            kw["doc_words"] = trained.get("doc_words")
        super().__init__(**kw)
        self.spec = f"sim:{model_spec}"
        if model is None:
            from zsctl.core.models import load_model

            model, tokenizer = load_model(model_spec)
            self.tokens_per_doc = trained.get("tokens_per_doc") or self.tokens_per_doc
        self.model, self.tok = model, tokenizer
        self.lock = threading.Lock()  # generate is not thread-safe (serve answers from threads)
        self.generate_calls = 0
        self.generated_tokens = 0

    def draws_ahead(self, rows: int) -> bool:
        return rows <= DRAW_AHEAD_ROWS

    def _too_long(self, line: str) -> bool:
        return prompts.line_words(line) > self.doc_words

    def encode(self, model_input: str) -> list[int]:
        if self.chat_system is not None and getattr(self.tok, "chat_template", None):
            return self.tok(model_input, add_special_tokens=False)["input_ids"]  # the template has them
        # tuned: exactly as TRL's SFTTrainer tokenises a plain-text prompt column
        return self.tok(model_input)["input_ids"]

    def _complete(self, texts, max_new_tokens, stop, sampling, lines=0):
        ids = [self.encode(t) for t in texts]
        with self.lock:  # one model: concurrent searches take turns
            self.generate_calls += 1
            gens = generate_batch(self.model, self.tok, ids, max_new_tokens, sampling=sampling, stop=stop,
                                  no_repeat=NO_REPEAT_NGRAM if self.no_repeat is None else self.no_repeat,
                                  lines=lines, too_long=self._too_long if lines and self.doc_words else None)
            self.generated_tokens += sum(g.tokens for g in gens)
        return [g.text for g in gens]


# --- spec parsing --------------------------------------------------------------------------------

# Options a spec may carry after '?', e.g. `sim:smollm2-135m?sim_mode=prompt&noise_p=0.3`, so stages
# that only take a --search string (rl, eval) can still configure the simulator.
_OPTIONS = {
    "sim_mode": str, "template": str, "noise_p": float, "seed": int, "max_new_tokens": int,
    "temperature": float, "top_p": float, "batch_size": int, "timeout": float, "tries": int, "backoff": float,
    "model": str, "verify": int, "no_repeat": int, "api": str, "cooldown": float, "chain": int, "doc_words": int,
}
_HTTP_ONLY = {"batch_size", "timeout", "tries", "backoff", "model", "api", "cooldown"}


def split_options(spec: str) -> tuple[str, dict]:
    """'base?key=value&…' → (base, typed options); BadInput on an unknown key or a bad value."""
    base, sep, query = spec.partition("?")
    if not sep:
        return spec, {}
    opts = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _OPTIONS:
            raise BadInput(f"search spec '{spec}': unknown option '{key}'; known: {', '.join(sorted(_OPTIONS))}")
        try:
            opts[key] = _OPTIONS[key](value)
        except ValueError as e:
            raise BadInput(f"search spec '{spec}': option {key}={value!r} is not a {_OPTIONS[key].__name__}") from e
    return base, opts


def make_sim(spec: str, **kw) -> SimulatorEngine:
    """`sim:MODEL[?options]` → in-process simulator; spec options win over keyword defaults."""
    base, opts = split_options(spec)
    model_spec = base[len("sim:"):]
    if not model_spec:
        raise BadInput(f"search spec '{spec}' names no model; use sim:MODEL (an HF dir, hub id or smollm2-135m)")
    wrong = sorted(set(opts) & _HTTP_ONLY)
    if wrong:
        raise BadInput(f"search spec '{spec}': option(s) {', '.join(wrong)} apply only to sim+http:// engines")
    kw = {k: v for k, v in {**kw, **opts}.items() if k not in _HTTP_ONLY and v is not None}
    return SimulatorEngine(model_spec, **kw)


# --- over HTTP -----------------------------------------------------------------------------------


class SimulatorHTTPEngine(_Simulated):
    """`sim+http://HOST:PORT/v1[,http://HOST2:PORT/v1]`: OpenAI-compatible servers (vLLM, SGLang,
    `zsctl serve --model`).

    `api=completions` (the default) sends prompt texts, at most `batch_size` per request; `api=chat`
    (the default for a template with a system message, i.e. a released simulator) sends each prompt as
    a chat to /chat/completions and the server applies the model's chat template. Requests are spread
    round-robin over the endpoints and run concurrently; each is retried with backoff (the policy the
    other network engines use, `_net.request_json`). An endpoint whose request still fails is left
    alone for `cooldown` seconds and the request goes to another endpoint: the run goes on while one
    answers. At most MAX_SENT_STOPS stop strings are sent; all of them are applied to the replies.
    """

    name = "sim+http"

    def __init__(self, urls: list[str], *, model: str | None = None, batch_size: int = 32,
                 timeout: float = 120.0, tries: int = 3, backoff: float = 0.5, tokenizer=None,
                 api: str | None = None, cooldown: float = COOLDOWN_S, **kw):
        import httpx

        from zsctl.search._net import RetryPolicy

        super().__init__(**kw)
        if batch_size < 1 or tries < 1 or timeout <= 0 or backoff < 0 or cooldown < 0:
            raise BadInput(
                "sim+http options need batch_size >= 1, tries >= 1, timeout > 0, backoff >= 0 and cooldown >= 0"
            )
        self.api = api or ("chat" if self.template.system is not None else "completions")
        if self.api not in HTTP_APIS:
            raise BadInput(f"sim+http option api={self.api} is not one of {', '.join(HTTP_APIS)}")
        if self.api == "chat":
            if self.chat_system is None:  # tuned text sent as a chat: at least no system message of ours
                self.chat_system = ""
            self.primer = ""  # a chat reply cannot be started for the model
        self.urls = [u.rstrip("/") for u in urls]
        self.spec = "sim+" + ",".join(self.urls)
        self.batch_size, self.timeout, self.cooldown = int(batch_size), float(timeout), float(cooldown)
        self.policy = RetryPolicy(tries=int(tries), backoff=float(backoff), timeout=self.timeout)
        self.client = httpx.Client(timeout=self.timeout)
        self.requests_per_url = {u: 0 for u in self.urls}
        self.down_until = {u: 0.0 for u in self.urls}  # time.monotonic() before which a failed endpoint rests
        self.failovers = 0  # requests moved to another endpoint after theirs failed
        self._rr = itertools.count()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=16)
        try:
            self.model_name = model or self._probe()
        except BadInput:
            self.close()
            raise
        # a chat sent as text needs the served model's chat template, from its tokenizer when it loads
        # here; when it does not, model_input says so once and sends plain text
        self.tok = tokenizer
        if self.api == "completions" and self.chat_system is not None and tokenizer is None and self.model_name:
            try:
                from zsctl.core.models import load_tokenizer

                self.tok = load_tokenizer(self.model_name)
            except (BadInput, OSError, ValueError):
                self.tok = None

    def _probe(self) -> str | None:
        """Check every endpoint answers, and learn the served model's name."""
        import httpx

        names = set()
        for url in self.urls:
            try:
                r = self.client.get(f"{url}/models", timeout=min(self.timeout, 10.0))
                if r.status_code == 404:  # servers without /v1/models: /health then
                    r = self.client.get(f"{url.removesuffix('/v1')}/health", timeout=min(self.timeout, 10.0))
                    r.raise_for_status()
                    continue
                r.raise_for_status()
                data = r.json().get("data") or []
                if data:
                    names.add(data[0]["id"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                raise BadInput(
                    f"simulator endpoint {url} is not usable ({type(e).__name__}: {e}); start the server "
                    "(vllm serve / zsctl serve --model) or fix the URL") from e
        if len(names) > 1:
            raise BadInput(f"simulator endpoints {', '.join(self.urls)} serve different models {sorted(names)}; "
                           "pass ?model=NAME")
        return names.pop() if names else None

    def model_input(self, prompt: str) -> str:
        return prompt if self.api == "chat" else super().model_input(prompt)

    def _complete(self, texts, max_new_tokens, stop, sampling, lines=0):  # the server cannot stop at a line count
        body = {"max_tokens": int(max_new_tokens), "temperature": sampling.temperature, "top_p": sampling.top_p,
                "stop": list(stop[:MAX_SENT_STOPS])}
        if self.no_repeat is not None:  # an extension zsctl serve honours (vLLM ignores it, older ones refuse it)
            body["no_repeat_ngram_size"] = self.no_repeat
        if self.model_name:
            body["model"] = self.model_name
        if self.api == "chat":  # one conversation per request
            jobs = [[t] for t in texts]
        else:  # spread even a small batch over every endpoint so they all work on each turn
            size = min(self.batch_size, math.ceil(len(texts) / len(self.urls)))
            jobs = [texts[i:i + size] for i in range(0, len(texts), size)]
        # the first job goes from this thread, so concurrent searches (serve) never queue for the pool
        futures = [self._pool.submit(self._send, job, body) for job in jobs[1:]]
        first = self._send(jobs[0], body)
        return [cut_at_stop(text, stop) for texts in [first, *(f.result() for f in futures)] for text in texts]

    def _send(self, job: list[str], body: dict) -> list[str]:
        """One request, moved to another endpoint while the one it went to fails."""
        from zsctl.core.errors import RunFailure

        payload = {**body, "messages": self.messages(job[0])} if self.api == "chat" else {**body, "prompt": job}
        tried: list[str] = []
        failures: list[str] = []
        while (url := self._pick(tried)) is not None:
            try:
                return self._request(url, payload, len(job))
            except RunFailure as e:
                if _REFUSED.search(str(e)):  # the request itself is wrong: no endpoint will take it
                    raise
                tried.append(url)
                failures.append(str(e))
                with self._lock:
                    self.down_until[url] = time.monotonic() + self.cooldown
                    self.failovers += 1
                if len(tried) < len(self.urls):
                    prompts.warn_once(f"simulator endpoint {url} failed; it rests {self.cooldown:g} s while the "
                                      "other endpoints take its requests")
        raise RunFailure(f"every simulator endpoint failed: {' | '.join(failures)}")

    def _pick(self, tried: list[str]) -> str | None:
        """The next endpoint round-robin that is not resting; if all rest, the one back soonest."""
        left = [u for u in self.urls if u not in tried]
        if not left:
            return None
        with self._lock:
            now, start = time.monotonic(), next(self._rr)
            order = [self.urls[(start + i) % len(self.urls)] for i in range(len(self.urls))]
            live = [u for u in order if u in left and self.down_until[u] <= now]
            return live[0] if live else min(left, key=self.down_until.__getitem__)

    def _request(self, url: str, body: dict, n: int) -> list[str]:
        from zsctl.search._net import Fatal, request_json

        def parse(data) -> list[str]:
            if self.api == "chat":
                return [str(data["choices"][0]["message"].get("content") or "")]
            choices = sorted(data["choices"], key=lambda c: c["index"])
            if len(choices) != n:
                raise Fatal(f"{len(choices)} choices came back for {n} prompts")
            return [str(c.get("text") or "") for c in choices]

        path = "/chat/completions" if self.api == "chat" else "/completions"
        with self.stats_lock:
            self.requests_per_url[url] += 1
        return request_json(self.client, "POST", f"{url}{path}", parse, json=body, policy=self.policy,
                            stats=self.stats, lock=self.stats_lock, what=f"simulator endpoint {url}{path}")

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.client.close()


# A final failure that was an HTTP 4xx other than 429: the server refused the request itself.
_REFUSED = re.compile(r"HTTP 4(?!29)\d\d")


def make_sim_http(spec: str, **kw) -> SimulatorHTTPEngine:
    """`sim+http://HOST:PORT/v1[,http://HOST2:PORT/v1][?options]` → HTTP simulator."""
    base, opts = split_options(spec)
    urls = [u.strip().removeprefix("sim+").rstrip("/") for u in base.split(",") if u.strip()]
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if not urls or bad:
        raise BadInput(f"search spec '{spec}': expected sim+http://HOST:PORT/v1[,http://HOST2:PORT/v1]")
    # a bare server address means its OpenAI routes under /v1, as vLLM and `zsctl serve` put them
    urls = [u if urlsplit(u).path not in ("", "/") else f"{u}/v1" for u in urls]
    kw = {k: v for k, v in {**kw, **opts}.items() if v is not None}
    return SimulatorHTTPEngine(urls, **kw)
