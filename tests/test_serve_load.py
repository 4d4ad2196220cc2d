"""A bounded load test on loopback (fixed counts and time limit) of a service with a token: reports
p50/p99 latency and checks that the Prometheus counters grew by exactly the requests sent. It uses
benchmarks/load.py, the load test run on real models."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import numpy as np

from conftest import require
from live_server import running_server
from test_serve import png_bytes
from test_serve_auth import AUTH, TOKEN, tiny  # noqa: F401 (fixture)

REQUESTS, CONCURRENCY, TIME_LIMIT = 60, 6, 120.0


def load_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("padim_benchmark_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bounded_load_counts_every_request_in_the_metrics(tiny, capsys):  # noqa: F811
    require("httpx")
    require("prometheus_client")
    from padim.serve import Inspector
    from padim.serve.app import create_app

    bench = load_benchmark()
    bodies = [png_bytes(image) for image in tiny[1]]
    with running_server(create_app(Inspector.open(tiny[0]), token=TOKEN)) as url:
        refused = asyncio.run(bench.run_load(url, bodies[:1], 3, 1, TIME_LIMIT))  # no token: counted as 401s
        assert refused["errors"] and all(e.startswith("HTTP 401") for e in refused["errors"])
        before = bench.scrape(url, AUTH)
        result = asyncio.run(bench.run_load(url, bodies, REQUESTS, CONCURRENCY, TIME_LIMIT, AUTH))
        after = bench.scrape(url, AUTH)
    assert not result["errors"] and result["unfinished"] == 0 and len(result["latencies"]) == REQUESTS
    assert result["wall"] < TIME_LIMIT
    assert bench.counter_check(before, after, REQUESTS, 0) == []
    assert bench.counter_check(before, after, REQUESTS - 1, 0)  # the check does notice a difference
    p50, p99 = np.percentile(np.array(result["latencies"]) * 1000, [50, 99])
    with capsys.disabled():
        print(f"\nload: {REQUESTS} requests, {CONCURRENCY} clients, {result['wall']:.1f} s, "
              f"p50 {p50:.0f} ms, p99 {p99:.0f} ms; counters match")
