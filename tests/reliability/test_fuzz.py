"""The OpenAPI schema fuzzed with schemathesis: requests made from /openapi.json, valid and invalid,
against every operation of a running server; none may get a 5xx (or a dropped connection)."""

from __future__ import annotations

import os

import pytest

from .harness import run_fuzz

EXAMPLES = int(os.environ.get("TALKGEN_FUZZ_EXAMPLES", "100"))  # per mode (valid, invalid); the soak runs more


def test_no_request_made_from_the_openapi_schema_gets_a_5xx(cluster) -> None:
    pytest.importorskip("schemathesis", reason="schemathesis is in the test extra: pip install -e '.[test]'")
    server = cluster(redis=False, embedded_workers=0)  # accepts and stores jobs, runs none
    server.start_server()
    report = run_fuzz(server.url, EXAMPLES, seed=1)
    assert report["requests"] >= EXAMPLES, report
    assert report["server_error_count"] == 0, report["server_errors"]
    assert server.server.alive() and server.http.get("/v1/health").json()["status"] == "ok"
    print(f"fuzz: {report['requests']} requests, statuses {report['statuses']}")
