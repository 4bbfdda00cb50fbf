"""`zsctl serve`: any engine behind the Search-R1 retrieval API, plus an optional OpenAI-style
completions endpoint for a local HF model.

POST /retrieve      {"queries": [...], "topk": k, "return_scores": bool, "noise": p | "useful" | "noisy",
                     "questions": [...], "golden_answers": [[...], ...]}
                    → {"result": [[{"document": {"id", "contents"}, "score"}, ...], ...]}
                    (items are the bare document dicts when return_scores is false). `noise` and the
                    per-query question/answer lists only mean something to simulated engines.
POST /v1/completions, GET /v1/models   (with --model) so `sim+http://` works without vLLM.
GET /health

Binds 127.0.0.1 by default. Every request is capped (query count and length, prompt count and
length, tokens, body size); bad requests get a 4xx with a message, engine failures a 502.
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
from zsctl.core.progress import Progress
from zsctl.search.base import Noise, QueryContext
from zsctl.search.simulator import SIM_STYLES


@dataclass
class Caps:
    max_queries: int = 64  # queries per /retrieve request (also prompts per /v1/completions request)
    max_query_chars: int = 512
    max_topk: int = 50
    max_prompt_chars: int = 16000
    max_tokens: int = 2048  # completion tokens per prompt
    max_body_bytes: int = 4 << 20


@dataclass(kw_only=True)
class ServeConfig(Options):
    search: str = option(help="Engine to serve: bm25:PATH | sim:MODEL | sim+http://... | http://... | serpapi")
    host: str = option("127.0.0.1", "Interface to bind (0.0.0.0 exposes it to the network).")
    port: int = option(8000, "TCP port (0 = any free port).", ge=0, le=65535)
    model: str | None = option(None, "Also serve this model at /v1/completions (for sim+http://).")
    max_queries: int = option(64, "Queries (or prompts) per request.", ge=1, le=100_000)
    max_query_chars: int = option(512, "Characters per query.", ge=1, le=1_000_000)
    sim_mode: str = option("tuned", "For sim: engines: tuned (a train-sim model) | prompt (untuned instruct model, "
                                "few-shot).", flag="sim-style", aliases=("sim-mode",), choices=SIM_STYLES)
    sim_template: str | None = option(None, "Simulator prompt template file (fields {query} {question} {answer} "
                                        "{mode} {k}).")
    noise_p: float = option(0.0, "Simulators: share of noisy answers when a request names no noise.", ge=0, le=1)
    seed: int = option(0, "Random seed.", ge=0)


class RetrieveRequest(BaseModel):
    """Search-R1's request, plus optional simulator fields."""

    queries: list[str]
    topk: int = 3
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


def make_app(engine, model=None, tok=None, caps: Caps | None = None, model_name: str | None = None):
    """The FastAPI app over `engine` (and `model`/`tok` for /v1/completions when given)."""
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
        n = len(req.queries)
        if n > caps.max_queries:
            raise HTTPException(413, f"{n} queries in one request; at most {caps.max_queries}")
        long = [i for i, q in enumerate(req.queries) if len(q) > caps.max_query_chars]
        if long:
            raise HTTPException(413, f"query {long[0]} is over {caps.max_query_chars} characters")
        if not 1 <= req.topk <= caps.max_topk:
            raise HTTPException(400, f"topk must be between 1 and {caps.max_topk}")
        for field in ("questions", "golden_answers"):
            given = getattr(req, field)
            if given is not None and len(given) != n:
                raise HTTPException(400, f"'{field}' has {len(given)} entries for {n} queries; give one per query")
        if req.noise is not None and not simulated:
            raise HTTPException(400, "'noise' applies only to simulated engines (sim:…, sim+http://…)")
        if isinstance(req.noise, float) and not 0.0 <= req.noise <= 1.0:
            raise HTTPException(400, "'noise' must be a probability in [0, 1], 'useful' or 'noisy'")
        contexts, noise = _contexts(req, engine) if simulated else (None, None)
        results = engine.search(req.queries, req.topk, contexts, noise)
        with count_lock:
            app.state.requests["retrieve"] += 1
        out = []
        for r in results:
            items = []
            for d in r.docs:
                doc = {"id": doc_id(d.title, d.text), "contents": contents(d.title, d.text)}
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

        @app.post("/v1/completions")
        def completions(req: CompletionRequest):
            from zsctl.core.generation import Sampling, generate_batch

            if req.model not in (None, served):
                raise HTTPException(404, f"model '{req.model}' is not served here; this server has '{served}'")
            prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
            if not prompts:
                raise HTTPException(400, "'prompt' is empty")
            if len(prompts) > caps.max_queries:
                raise HTTPException(413, f"{len(prompts)} prompts in one request; at most {caps.max_queries}")
            if any(len(p) > caps.max_prompt_chars for p in prompts):
                raise HTTPException(413, f"a prompt is over {caps.max_prompt_chars} characters")
            if not 1 <= req.max_tokens <= caps.max_tokens:
                raise HTTPException(400, f"max_tokens must be between 1 and {caps.max_tokens}")
            if req.n != 1:
                raise HTTPException(400, "only n=1 is supported")
            if req.temperature < 0 or not 0 < req.top_p <= 1:
                raise HTTPException(400, "temperature must be >= 0 and top_p in (0, 1]")
            stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
            ids = [tok(p)["input_ids"] for p in prompts]  # special tokens added, as vLLM does
            if not all(ids):
                raise HTTPException(400, "a prompt is empty")
            with model_lock:
                if req.seed is not None:
                    import torch

                    torch.manual_seed(req.seed)
                gens = generate_batch(model, tok, ids, req.max_tokens, sampling=Sampling(req.temperature, req.top_p),
                                      stop=stop)
                app.state.requests["completions"] += 1
            choices = [{"index": i, "text": g.text, "finish_reason": g.finish, "logprobs": None}
                       for i, g in enumerate(gens)]
            used = sum(g.tokens for g in gens)
            prompt_tokens = sum(len(x) for x in ids)
            return {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": served,
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": used,
                    "total_tokens": prompt_tokens + used,
                },
            }

    return app


def _contexts(req, engine) -> tuple[list[QueryContext], Noise | None]:
    """Per-query contexts, and the noise for this request only: a mode fixes every query's, a
    probability is drawn from the engine's seeded generator (None: the engine's own setting)."""
    n = len(req.queries)
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
    app = make_app(engine, model, tok, caps, model_name=cfg.model)
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
