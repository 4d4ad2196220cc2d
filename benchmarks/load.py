"""Bounded load test of the inspection service on loopback: a fixed number of POST /predict requests
from concurrent clients, within a time limit. Prints requests/s, latency percentiles, errors, and
whether every score under load equals the image's single-request score.

Starts its own server (``padim serve`` on 127.0.0.1, a free port) unless --url is given:

    python benchmarks/load.py --model runs/fryum/model.onnx --data ../shared/data/visa \\
        --requests 200 --concurrency 8 --time-limit 300

Exit status 1 when a request failed, did not finish in time, or got a different score.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from padim.datasets import load_split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "padim.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(port)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_healthy(url: str, server: subprocess.Popen | None, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no healthy server at {url} after {limit} s")


async def run_load(url: str, bodies: list[bytes], n: int, concurrency: int, time_limit: float) -> dict:
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
                r = await client.post("/predict", content=bodies[k], headers={"Content-Type": "image/jpeg"})
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
    parser.add_argument("--url", help="an already running service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--data", type=Path, help="DATA_ROOT: use 2 normal + 2 anomalous test images")
    parser.add_argument("--category", default="fryum")
    parser.add_argument("--images", type=Path, nargs="*", default=[], help="image files to send (instead of --data)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=300, help="seconds for the whole load phase")
    args = parser.parse_args()
    if (args.model is None) == (args.url is None):
        parser.error("give exactly one of --model and --url")
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
        server = start_server(args.model, int(url.rsplit(":", 1)[1]))
    try:
        wait_healthy(url, server)
        reference = [httpx.post(f"{url}/predict", content=b, timeout=120).json()["score"] for b in bodies]
        result = asyncio.run(run_load(url, bodies, args.requests, args.concurrency, args.time_limit))
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
    for error in result["errors"][:5]:
        print(f"error: {error}")
    if result["errors"] or result["unfinished"] or mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
