"""`zsctl serve`: any engine behind the Search-R1 retrieval API, plus an optional OpenAI-style
completions endpoint for a local HF model.

POST /retrieve      {"queries": [...], "topk": k, "return_scores": bool, "noise": p | "useful" | "noisy",
                     "questions": [...], "golden_answers": [[...], ...]}
                    → {"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}
                    Search-R1's API: items are the bare document dicts when return_scores is false;
                    `topk` null, 0 or absent means the server's --topk; `id` is the corpus id where
                    the engine has one. `noise` and the per-query question/answer lists only mean
                    something to simulated engines (without them a simulator writes blind: warned once).
POST /retrieve      {"query": "...", "top_k": k}  → [{"id", "title", "text", "contents", "score"}, ...]
                    ZeroSearch's wiki retriever API (one query; its client reads `text`).
POST /v1/completions, POST /v1/chat/completions, GET /v1/models   (with --model) so `sim+http://`
                    and ZeroSearch's simulator client work without vLLM.
GET /health

Binds 127.0.0.1 by default. Every request is capped (query count and length, prompt count and
length, tokens, body size), the caps sized for a whole rollout batch in one request (Search-R1's
512 prompts × 5 samples = 2,560 queries); bad requests get a 4xx with a JSON `detail`, engine
failures a 502.
/retrieve requests run concurrently (engines keep no per-call state; a `sim+http://` backend gets
them in parallel); model calls are serialised (HF `generate` is not thread-safe).
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Union

from pydantic import BaseModel

from zsctl.core.config import Options, option
from zsctl.core.errors import BadInput, RunFailure, redact
from zsctl.core import prompts
from zsctl.core.progress import Progress
from zsctl.search.base import Noise, QueryContext
from zsctl.search.simulator import SIM_STYLES


@dataclass
class Caps:
    # queries per /retrieve request (also prompts per /v1/completions request): Search-R1 posts a whole
    # rollout batch at once, 512 prompts x 5 samples = 2,560 queries, with room to spare
    max_queries: int = 4096
    max_query_chars: int = 512
    max_topk: int = 50
    max_prompt_chars: int = 16000
    max_tokens: int = 2048  # completion tokens per prompt
    max_body_bytes: int = 16 << 20  # 4,096 queries of 512 characters with their questions and answers


@dataclass(kw_only=True)
class ServeConfig(Options):
    search: str = option(help="Engine to serve: bm25:PATH | sim:MODEL | sim+http://... | http://... | serpapi")
    host: str = option("127.0.0.1", "Interface to bind (0.0.0.0 exposes it to the network).")
    port: int = option(8000, "TCP port (0 = any free port).", ge=0, le=65535)
    model: str | None = option(None, "Also serve this model at /v1/completions (for sim+http://).")
    max_queries: int = option(4096, "Queries (or prompts) per request (a Search-R1 rollout batch of 512 prompts x 5 "
                              "samples is 2,560).", ge=1, le=100_000)
    topk: int = option(3, "Documents per query when a request gives none (topk null or 0), as Search-R1's retrieval "
                       "server's --topk.", ge=1)
    max_query_chars: int = option(512, "Characters per query.", ge=1, le=1_000_000)
    sim_mode: str = option("tuned", "For sim: engines: tuned (a train-sim model) | prompt (untuned instruct model, "
                                "few-shot).", flag="sim-style", aliases=("sim-mode",), choices=SIM_STYLES)
    sim_template: str | None = option(None, prompts.SIM_TEMPLATE_HELP)
    noise_p: float = option(0.0, "Simulators: share of noisy answers when a request names no noise.", ge=0, le=1)
    seed: int = option(0, "Random seed.", ge=0)


class RetrieveRequest(BaseModel):
    """Search-R1's request (`queries`, `topk`) or ZeroSearch's wiki request (`query`, `top_k`), plus
    optional simulator fields."""

    queries: Optional[list[str]] = None
    topk: Optional[int] = None  # None or 0: the server's default, as Search-R1's server reads it
    query: Optional[str] = None
    top_k: Optional[int] = None
    return_scores: bool = False
    noise: Optional[Union[float, Literal["useful", "noisy"]]] = None
    questions: Optional[list[str]] = None
    golden_answers: Optional[list[Union[list[str], str]]] = None


class CompletionRequest(BaseModel):
    """The part of OpenAI's /v1/completions request we honour."""

    model: Optional[str] = None
    prompt: Union[str, list[str]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Optional[Union[str, list[str]]] = None
    n: int = 1
    seed: Optional[int] = None
    no_repeat_ngram_size: Optional[int] = None  # an extension: no n-gram of this many tokens repeats (default 4)


class ChatRequest(CompletionRequest):
    """The part of OpenAI's /v1/chat/completions request we honour: `messages` instead of `prompt`,
    a message's content a string or a list of text parts."""

    prompt: Optional[str] = None
    messages: list[dict]
    max_tokens: int = 512


def message_text(content) -> str:
    """A chat message's text: the string itself, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def contents(title: str, text: str) -> str:
    """Search-R1's document text: the quoted title on the first line, then the passage."""
    return f'"{title}"\n{text}'


def doc_id(title: str, text: str) -> str:
    """A stable id for a document our Document type carries none for (same text → same id)."""
    return hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:12]


class BodyCap:
    """ASGI middleware: a request body over `limit` bytes gets 413, counted while it streams in, so a
    chunked body (no Content-Length) cannot bypass the cap; the rest is never read."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        too_big = f"request body over {self.limit} bytes"
        close = {"connection": "close"}  # uvicorn then hangs up instead of reading the rest
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": too_big}, status_code=413, headers=close)(scope, receive, send)
        seen = 0

        async def capped_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, too_big, headers=close)  # FastAPI answers it
            return message

        await self.app(scope, capped_receive, send)


def make_app(engine, model=None, tok=None, caps: Caps | None = None, model_name: str | None = None,
             default_topk: int = 3):
    """The FastAPI app over `engine` (and `model`/`tok` for the OpenAI routes when given)."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    caps = caps or Caps()
    # generate is not thread-safe: an in-process simulator on the same model shares its lock
    shares_model = model is not None and getattr(engine, "model", None) is model
    model_lock = engine.lock if shares_model else threading.Lock()
    count_lock = threading.Lock()
    simulated = engine.simulated
    served = model_name or "model"
    app = FastAPI(title="zsctl serve", docs_url=None, redoc_url=None)
    app.state.requests = {"retrieve": 0, "completions": 0}

    app.add_middleware(BodyCap, limit=caps.max_body_bytes)

    @app.exception_handler(RunFailure)
    async def upstream_failed(request: Request, exc: RunFailure):
        return JSONResponse({"detail": f"search engine failed: {exc}"}, status_code=502)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/health")
    def health():
        return {"status": "ok", "engine": redact(getattr(engine, "spec", "") or engine.name), "model": model_name}

    @app.post("/retrieve")
    def retrieve(req: RetrieveRequest):
        if (req.queries is None) == (req.query is None):
            raise HTTPException(400, "give either 'queries' (a list: Search-R1's API) or 'query' (one: ZeroSearch's "
                                     "wiki API)")
        wiki = req.query is not None
        queries = [req.query] if wiki else req.queries
        k = (req.top_k if wiki else req.topk) or default_topk  # null or 0: the default, as Search-R1 reads it
        n = len(queries)
        if n > caps.max_queries:
            raise HTTPException(413, f"{n} queries in one request; at most {caps.max_queries}")
        long = [i for i, q in enumerate(queries) if len(q) > caps.max_query_chars]
        if long:
            raise HTTPException(413, f"query {long[0]} is over {caps.max_query_chars} characters")
        if not 1 <= k <= caps.max_topk:
            raise HTTPException(400, f"topk must be between 1 and {caps.max_topk} (null or 0: the default, "
                                     f"{default_topk})")
        for field in ("questions", "golden_answers"):
            given = getattr(req, field)
            if given is not None and len(given) != n:
                raise HTTPException(400, f"'{field}' has {len(given)} entries for {n} queries; give one per query")
        if req.noise is not None and not simulated:
            raise HTTPException(400, "'noise' applies only to simulated engines (sim:…, sim+http://…)")
        if isinstance(req.noise, float) and not 0.0 <= req.noise <= 1.0:
            raise HTTPException(400, "'noise' must be a probability in [0, 1], 'useful' or 'noisy'")
        if simulated and req.questions is None:
            prompts.warn_once("a /retrieve request to this simulated engine has no 'questions'/'golden_answers': "
                              "the simulator then writes without the question and its answer; send them per query")
        contexts, noise = _contexts(req, queries, engine) if simulated else (None, None)
        results = engine.search(queries, k, contexts, noise)
        with count_lock:
            app.state.requests["retrieve"] += 1
        if wiki:  # ZeroSearch's wiki client reads each document's `text`
            return [{"id": d.id or doc_id(d.title, d.text), "title": d.title, "text": d.text,
                     "contents": contents(d.title, d.text), "score": float(d.score)} for d in results[0].docs]
        out = []
        for r in results:
            items = []
            for d in r.docs:
                doc = {"id": d.id or doc_id(d.title, d.text), "contents": contents(d.title, d.text)}
                items.append({"document": doc, "score": float(d.score)} if req.return_scores else doc)
            out.append(items)
        body = {"result": out}
        if simulated:
            # which mode wrote each query's documents (an extra key, ignored by clients)
            body["modes"] = [r.mode for r in results]
        return body

    if model is not None:

        @app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": served, "object": "model", "owned_by": "zsctl"}]}

        def generate(req: CompletionRequest, texts: list[str], special_tokens: bool):
            """Checks shared by both routes, then one batched generate; (gens, usage)."""
            from zsctl.core.generation import NO_REPEAT_NGRAM, Sampling, generate_batch

            if req.model not in (None, "", served):  # ZeroSearch's client sends model ''
                raise HTTPException(404, f"model '{req.model}' is not served here; this server has '{served}'")
            if len(texts) > caps.max_queries:
                raise HTTPException(413, f"{len(texts)} prompts in one request; at most {caps.max_queries}")
            if any(len(p) > caps.max_prompt_chars for p in texts):
                raise HTTPException(413, f"a prompt is over {caps.max_prompt_chars} characters")
            if not 1 <= req.max_tokens <= caps.max_tokens:
                raise HTTPException(400, f"max_tokens must be between 1 and {caps.max_tokens}")
            if req.n != 1:
                raise HTTPException(400, "only n=1 is supported")
            if req.temperature < 0 or not 0 < req.top_p <= 1:
                raise HTTPException(400, "temperature must be >= 0 and top_p in (0, 1]")
            if req.no_repeat_ngram_size is not None and req.no_repeat_ngram_size < 0:
                raise HTTPException(400, "no_repeat_ngram_size must be 0 (off) or more")
            stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
            ids = [tok(p, add_special_tokens=special_tokens)["input_ids"] for p in texts]
            if not texts or not all(ids):
                raise HTTPException(400, "a prompt is empty")
            no_repeat = NO_REPEAT_NGRAM if req.no_repeat_ngram_size is None else req.no_repeat_ngram_size
            with model_lock:
                if req.seed is not None:
                    import torch

                    torch.manual_seed(req.seed)
                gens = generate_batch(model, tok, ids, req.max_tokens, sampling=Sampling(req.temperature, req.top_p),
                                      stop=stop, no_repeat=no_repeat)
                app.state.requests["completions"] += 1
            used, prompt_tokens = sum(g.tokens for g in gens), sum(len(x) for x in ids)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": used, "total_tokens": prompt_tokens + used}
            return gens, usage

        @app.post("/v1/completions")
        def completions(req: CompletionRequest):
            texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
            gens, usage = generate(req, texts, special_tokens=True)  # special tokens added, as vLLM does
            choices = [{"index": i, "text": g.text, "finish_reason": g.finish, "logprobs": None}
                       for i, g in enumerate(gens)]
            return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                    "model": served, "choices": choices, "usage": usage}

        @app.post("/v1/chat/completions")
        def chat_completions(req: ChatRequest):
            messages = [{"role": str(m.get("role", "user")), "content": message_text(m.get("content"))}
                        for m in req.messages if isinstance(m, dict)]
            if not messages:
                raise HTTPException(400, "'messages' holds no message")
            # the model's chat template (said once if it has none); its text already holds the special tokens
            text = prompts.render_chat(tok, messages, who=f"served model {served}")
            gens, usage = generate(req, [text], special_tokens=not getattr(tok, "chat_template", None))
            choice = {"index": 0, "message": {"role": "assistant", "content": gens[0].text},
                      "finish_reason": gens[0].finish, "logprobs": None}
            return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                    "created": int(time.time()), "model": served, "choices": [choice], "usage": usage}

    return app


def _contexts(req, queries: list[str], engine) -> tuple[list[QueryContext], Noise | None]:
    """Per-query contexts, and the noise for this request only: a mode fixes every query's, a
    probability is drawn from the engine's seeded generator (None: the engine's own setting)."""
    n = len(queries)
    questions = req.questions or [""] * n
    golds = [[g] if isinstance(g, str) else list(g) for g in (req.golden_answers or [[]] * n)]
    mode = req.noise if isinstance(req.noise, str) else None
    noise = Noise(req.noise, engine.rng) if isinstance(req.noise, float) else None
    return [QueryContext(q, g, mode) for q, g in zip(questions, golds)], noise


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves so a taken port is a one-line error, and port 0 works."""
    if not 0 <= port <= 65535:
        raise BadInput(f"--port {port} is not a TCP port; pass 0 (any free port) to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Run `app` under uvicorn in a daemon thread; returns (server, base_url). Stop with
    `server.should_exit = True`. Used by tests and benchmarks."""
    import uvicorn

    sock = bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RunFailure("the HTTP server did not start")
        time.sleep(0.02)
    real_port = sock.getsockname()[1]
    server.thread = thread
    return server, f"http://{host}:{real_port}"


def build_engine(cfg: ServeConfig, model=None, tok=None):
    """The engine for --search; a `sim:` engine on the --model spec shares the loaded model."""
    from zsctl.search import is_simulated, make_engine
    from zsctl.search.simulator import SimulatorEngine

    sim_kw = dict(sim_mode=cfg.sim_mode, template=cfg.sim_template, noise_p=cfg.noise_p, seed=cfg.seed)
    if cfg.search.startswith("sim:") and model is not None and cfg.search[4:] == cfg.model:
        return SimulatorEngine(cfg.model, model=model, tokenizer=tok, **sim_kw)
    if is_simulated(cfg.search):
        return make_engine(cfg.search, **sim_kw)
    return make_engine(cfg.search)


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: only localhost is known to stay local
        return False


def run(cfg: ServeConfig, progress: Progress | None = None) -> dict:
    """Serve until interrupted; returns how many requests were answered."""
    import uvicorn

    progress = progress or Progress()
    if not _loopback(cfg.host):  # said even with --quiet: an open engine is a decision, not progress
        print(f"warning: --host {cfg.host} makes this server reachable from the network, without "
              "authentication; use --host 127.0.0.1 to keep it on this machine", file=sys.stderr, flush=True)
    sock = bind(cfg.host, cfg.port)  # before loading anything: a taken port fails fast
    model = tok = None
    if cfg.model:
        from zsctl.core.models import load_model

        model, tok = load_model(cfg.model)
    engine = build_engine(cfg, model, tok)
    caps = Caps(max_queries=cfg.max_queries, max_query_chars=cfg.max_query_chars)
    app = make_app(engine, model, tok, caps, model_name=cfg.model, default_topk=cfg.topk)
    url = f"http://{cfg.host}:{sock.getsockname()[1]}"
    progress.log(f"serving {redact(engine.spec or engine.name)} on {url}/retrieve"
                 + (f" and {cfg.model} on {url}/v1/completions" if model is not None else "")
                 + " (Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
        pass
    engine.close()
    return {"url": url, "config": asdict(cfg), "requests": dict(app.state.requests),
            "search": engine.stats.as_dict()}
