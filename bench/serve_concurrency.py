"""`zsctl serve` under concurrent load: wall time of N concurrent /retrieve calls ÷ one call.

The engine behind serve is `sim+http://` pointed at a local stand-in completion server that sleeps
`--delay` seconds per request (a slow simulator endpoint, no model needed). A server that answered
one /retrieve at a time would take about N times as long for N calls (ratio ≈ N); one that passes
them through concurrently takes about as long as one (ratio ≈ 1).

    python bench/serve_concurrency.py --calls 8 --delay 0.5
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def standin_server(delay: float) -> ThreadingHTTPServer:
    """An OpenAI-style completion server that answers every prompt with one document after `delay` s."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._reply({"data": [{"id": "slow-sim"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            time.sleep(delay)
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            self._reply({"choices": [{"index": i, "text": "Doc 1: (Stand-in) A slow document."}
                                     for i in range(len(prompts))]})

        def _reply(self, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=8, help="concurrent /retrieve calls")
    ap.add_argument("--delay", type=float, default=0.5, help="seconds the stand-in backend takes per request")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import httpx

    from zsctl.search import make_engine
    from zsctl.stages.serve import make_app, start_in_thread

    backend = standin_server(args.delay)
    engine = make_engine(f"sim+http://127.0.0.1:{backend.server_port}/v1")
    server, url = start_in_thread(make_app(engine))
    client = httpx.Client(timeout=120)

    def call(i: int) -> None:
        r = client.post(f"{url}/retrieve", json={"queries": [f"query {i}"], "topk": 1, "questions": [f"q {i}?"],
                                                  "golden_answers": [["x"]]})
        r.raise_for_status()

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    call(-1)  # warm-up: connections, the app's first request
    pool = ThreadPoolExecutor(args.calls)
    one, many = [], []
    for _ in range(args.repeats):
        one.append(timed(lambda: call(0)))
        many.append(timed(lambda: list(pool.map(call, range(args.calls)))))
    pool.shutdown()
    server.should_exit = True
    server.thread.join(timeout=10)
    backend.shutdown()
    engine.close()
    t1, tn = statistics.median(one), statistics.median(many)
    print(json.dumps({"calls": args.calls, "delay_s": args.delay, "repeats": args.repeats,
                      "one_call_s": round(t1, 3), "concurrent_calls_s": round(tn, 3), "ratio": round(tn / t1, 2),
                      "backend_requests": sum(engine.requests_per_url.values())}))


if __name__ == "__main__":
    main()
