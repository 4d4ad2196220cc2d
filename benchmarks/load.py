"""Bounded load test of the inspection service on loopback: a fixed number of POST /predict requests
from concurrent clients, within a time limit. Prints requests/s, latency percentiles, errors,
whether every score under load equals the image's single-request score, and whether the server's
Prometheus counters (/metrics) moved by exactly the requests sent.

Starts its own server (``padim serve`` on 127.0.0.1, a free port, with a fresh random token) unless
--url is given (loopback only; its token from $PADIM_SERVE_TOKEN or --token-file, if it has one):

    python benchmarks/load.py --model runs/fryum/model.onnx --data ../shared/data/visa \\
        --requests 200 --concurrency 8 --time-limit 300

Exit status 1 when a request failed, did not finish in time, got a different score, or the counters
do not match.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from padim.datasets import load_split
from padim.serve.security import TOKEN_ENV, is_loopback, read_token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, token: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "padim.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port)]
    # stderr gets a log line per request and nobody reads it during the load: a file, as a full pipe would
    # block the server
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, TOKEN_ENV: token})
    server.log = log
    return server


def wait_healthy(url: str, server: subprocess.Popen | None, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            server.log.seek(0)
            raise SystemExit(f"server exited: {server.log.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no healthy server at {url} after {limit} s")


def scrape(url: str, headers: dict[str, str]) -> dict[tuple[str, frozenset], float]:
    """The server's /metrics samples, parsed by prometheus_client, keyed by (sample name, labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    response.raise_for_status()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def counter_check(before: dict, after: dict, completed: int, failed: int) -> list[str]:
    """Mismatches between the counters' growth and the /predict requests this run sent and saw answered."""
    def grew(name: str, **labels: str) -> float:
        if labels:
            return sum(v - before.get(k, 0.0) for k, v in after.items()
                       if k[0] == name and labels.items() <= dict(k[1]).items())
        key = (name, frozenset())
        return after.get(key, 0.0) - before.get(key, 0.0)

    checks = {
        "padim_serve_requests_total{route=/predict,status=200}": (
            grew("padim_serve_requests_total", route="/predict", method="POST", status="200"), completed),
        "padim_serve_requests_total{route=/predict} (all statuses)": (
            grew("padim_serve_requests_total", route="/predict", method="POST"), completed + failed),
        "padim_serve_request_duration_seconds_count{route=/predict}": (
            grew("padim_serve_request_duration_seconds_count", route="/predict"), completed + failed),
        "padim_serve_images_scored_total": (grew("padim_serve_images_scored_total"), completed),
    }
    return [f"{name}: grew by {got:.0f}, expected {want}" for name, (got, want) in checks.items() if got != want]


async def run_load(url: str, bodies: list[bytes], n: int, concurrency: int, time_limit: float,
                   headers: dict[str, str] | None = None) -> dict:
    """Send ``n`` POST /predict requests (``bodies`` round robin) from ``concurrency`` clients."""
    latencies, scores, errors = [], [], []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            k = i % len(bodies)
            start = time.perf_counter()
            try:
                r = await client.post("/predict", content=bodies[k],
                                      headers={"Content-Type": "image/jpeg", **(headers or {})})
                elapsed = time.perf_counter() - start
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    continue
                latencies.append(elapsed)
                scores.append((k, r.json()["score"]))
            except httpx.HTTPError as exc:
                errors.append(repr(exc))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=time_limit, limits=limits) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(worker(client)) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        for task in pending:
            task.cancel()
        wall = time.perf_counter() - start
    return {"latencies": latencies, "scores": scores, "errors": errors, "wall": wall,
            "unfinished": n - len(latencies) - len(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model to serve (.safetensors or .onnx); or give --url")
    parser.add_argument("--url", help="an already running service on loopback, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token-file", type=Path, help=f"the --url server's token (else ${TOKEN_ENV})")
    parser.add_argument("--data", type=Path, help="DATA_ROOT: use 2 normal + 2 anomalous test images")
    parser.add_argument("--category", default="fryum")
    parser.add_argument("--images", type=Path, nargs="*", default=[], help="image files to send (instead of --data)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=300, help="seconds for the whole load phase")
    args = parser.parse_args()
    if (args.model is None) == (args.url is None):
        parser.error("give exactly one of --model and --url")
    if args.url is not None and not is_loopback(httpx.URL(args.url).host):
        parser.error(f"{args.url}: the load test runs on loopback only (127.0.0.0/8, ::1, localhost)")
    paths = list(args.images)
    if args.data is not None:
        test = load_split(args.data, args.category).test
        paths += [s.path for s in test if s.label == 0][:2] + [s.path for s in test if s.label == 1][:2]
    if not paths:
        parser.error("give --data or --images")
    bodies = [p.read_bytes() for p in paths]

    server = None
    url = args.url
    if url is None:
        url = f"http://127.0.0.1:{free_port()}"
        token = secrets.token_urlsafe(32)
        server = start_server(args.model, int(url.rsplit(":", 1)[1]), token)
    else:
        token = read_token(args.token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        wait_healthy(url, server)
        reference = [httpx.post(f"{url}/predict", content=b, headers=headers, timeout=120).json()["score"]
                     for b in bodies]
        before = scrape(url, headers)
        result = asyncio.run(run_load(url, bodies, args.requests, args.concurrency, args.time_limit, headers))
        # an error answered over HTTP is counted by the server; a dropped connection is not
        answered = sum(e.startswith("HTTP ") for e in result["errors"])
        mismatched = counter_check(before, scrape(url, headers), len(result["latencies"]), answered)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    lat = np.array(result["latencies"]) * 1000
    diffs = [abs(score - reference[k]) for k, score in result["scores"]]
    mismatches = sum(d != 0 for d in diffs)
    print(f"target {url} ({'own server, ' + str(args.model) if server else 'external'}); "
          f"{len(paths)} images; {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}")
    print(f"requests {args.requests}, concurrency {args.concurrency}, time limit {args.time_limit:.0f} s")
    print(f"completed {len(lat)}, errors {len(result['errors'])}, unfinished {result['unfinished']}, "
          f"wall {result['wall']:.1f} s, {len(lat) / result['wall']:.2f} requests/s")
    if len(lat):
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        print(f"latency ms: p50 {p50:.0f}, p95 {p95:.0f}, p99 {p99:.0f}, max {lat.max():.0f}")
    print(f"scores equal to the single-request score: {len(diffs) - mismatches}/{len(diffs)}"
          f" (max abs diff {max(diffs, default=0.0):.3g})")
    print(f"metrics counters match the requests sent: {'yes' if not mismatched else 'NO'}"
          f" ({'token' if headers else 'no token'})")
    for line in mismatched:
        print(f"counter mismatch: {line}")
    for error in result["errors"][:5]:
        print(f"error: {error}")
    if result["errors"] or result["unfinished"] or mismatches or mismatched:
        sys.exit(1)


if __name__ == "__main__":
    main()
