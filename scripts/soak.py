"""Soak: the reliability figures of docs/reliability.md, measured with real processes on 127.0.0.1
and the tiny model on the CPU (redis-server, SeaweedFS, `talkgen serve`, `talkgen worker`s).

    .venv/bin/python scripts/soak.py                                  # every part, the issue's counts
    .venv/bin/python scripts/soak.py --only load --jobs 300 --clients 30 --workers 2
    .venv/bin/python scripts/soak.py --only kills --kills 20 --json soak-kills.json
    .venv/bin/python scripts/soak.py --quick                          # the CI test's small counts

Parts: load (N submissions from C clients: latency, every job's end, none lost, none run twice),
kills (kill -9 of workers while loading the model, sampling, decoding, storing), restart (the API
server killed with jobs queued and while they run), s3 (SeaweedFS stopped during an upload), disk
(the result folder full: a real full tmpfs when user namespaces allow it, and an injected ENOSPC),
oom (torch.OutOfMemoryError while sampling), bad (malformed requests), stream (a 2 GiB upload),
fuzz (schemathesis over /openapi.json), unpickle (a scan of the code). The tests in
tests/reliability/ run the same code (tests/reliability/harness.py) with small counts.

Bounded: every part has a count and a deadline, and no part starts after --time-limit-s. Prints a
report; --json writes every figure. Needs the test extra (`pip install -e '.[test]'`) and
redis-server (scripts/install_test_servers.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the harness and its helpers live with the tests

from reliability import harness as h  # noqa: E402

PARTS = ("load", "kills", "restart", "s3", "disk", "oom", "bad", "stream", "fuzz", "unpickle")


def machine() -> dict:
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"date": date.today().isoformat(), "cpus": os.cpu_count(), "cpu": model,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def part_load(args, work: Path, weights: Path, assets) -> dict:
    cluster = h.Cluster(work / "load", weights)
    try:
        cluster.start_server()
        for _ in range(args.workers):
            cluster.start_worker()
        cluster.wait_workers(args.workers)
        report = h.run_load(cluster, assets, args.jobs, args.clients, timeout=args.deadline_s)
        report["leftover_temp"] = cluster.leftover_temp()
        return report
    finally:
        cluster.stop()


def part_kills(args, work: Path, weights: Path, assets) -> dict:
    cluster = h.Cluster(work / "kills", weights)
    try:
        cluster.start_server()
        report = h.run_kills(cluster, assets, kills=args.kills, jobs=2 * args.kills, workers=args.workers,
                             seed=args.seed, timeout=args.deadline_s)
        for worker in list(cluster.workers):  # a fresh worker sweeps what the killed ones left
            worker.stop()
            cluster.workers.remove(worker)
        cluster.start_worker()
        cluster.wait_workers(1)
        report["leftover_temp_after_a_fresh_worker"] = cluster.leftover_temp()
        return report
    finally:
        cluster.stop()


def part_restart(args, work: Path, weights: Path, assets) -> dict:
    cluster = h.Cluster(work / "restart", weights)
    try:
        cluster.start_server()
        return h.run_server_restart(cluster, assets, jobs=args.restart_jobs, workers=args.workers,
                                    timeout=args.deadline_s)
    finally:
        cluster.stop()


def part_s3(args, work: Path, weights: Path, assets) -> dict:
    seaweed = h.SeaweedFS(work / "s3" / "seaweedfs")
    seaweed.start()
    cluster = h.Cluster(work / "s3", weights, redis=False, embedded_workers=1, settings={
        "storage": f"s3://{h.SeaweedFS.BUCKET}/results", **seaweed.settings(), "faults": "delay@upload:3~s3-outage",
        "storage_tries": 3, "storage_retry_delay_s": 1, "s3_max_attempts": 2})
    try:
        cluster.start_server()
        return h.run_s3_outage(cluster, seaweed, assets)
    finally:
        cluster.stop()
        seaweed.stop()


def part_disk(args, work: Path, weights: Path, assets) -> dict:
    results = {}
    why = h.unshare_available()
    for real in (True, False):
        name = "full_tmpfs" if real else "injected_enospc"
        if real and why:
            results[name] = {"skipped": why}
            continue
        inputs, control = work / f"disk-{name}" / "inputs", work / f"disk-{name}" / "control"
        inputs.mkdir(parents=True)
        control.mkdir()
        cluster = h.Cluster(work / f"disk-{name}" / "cluster", weights, settings={"input_root": inputs})
        try:
            cluster.start_server()
            if real:
                cluster.start_worker(full_disk=control)
            else:
                cluster.start_worker(faults="enospc@upload~disk-full")
            cluster.wait_workers(1)
            results[name] = h.run_disk_full(cluster, assets, real=real, control=control)
        finally:
            cluster.stop()
    return results


def part_oom(args, work: Path, weights: Path, assets) -> dict:
    cluster = h.Cluster(work / "oom", weights, redis=False, embedded_workers=1,
                        settings={"faults": "oom@sample~simulate-oom"})
    try:
        cluster.start_server()
        return h.run_oom(cluster, assets)
    finally:
        cluster.stop()


def bad_cluster(work: Path, weights: Path, assets, limit_mb: float):
    bad = h.make_bad_assets(work / "bad-assets", assets)
    cluster = h.Cluster(work / "bad", weights, redis=False, embedded_workers=1, settings={
        "input_root": work / "bad-assets" / "input-root", "input_buckets": "allowed", "max_upload_mb": limit_mb})
    cluster.start_server()
    return cluster, bad


def part_bad(args, work: Path, weights: Path, assets) -> dict:
    cluster, bad = bad_cluster(work, weights, assets, 16)
    try:
        report = h.run_bad_inputs(cluster, bad)
        report["jobs_created"] = len(cluster.jobs())
        report["leftover_temp"] = cluster.leftover_temp()
        good = cluster.submit(assets)
        report["good_job_after"] = (cluster.wait_jobs([good.json()["id"]], 120)[good.json()["id"]]["status"]
                                    if good.status_code == 202 else good.status_code)
        report["server_alive"] = cluster.server.alive()
        return report
    finally:
        cluster.stop()


def part_stream(args, work: Path, weights: Path, assets) -> dict:
    cluster, _ = bad_cluster(work / "stream", weights, assets, 16)
    try:
        before = h.rss_kib(cluster.server.pid)
        report = h.run_oversized_stream(cluster.url, total=2 * 2**30)
        report["limit_mb"] = 16
        report["server_rss_growth_mib"] = round((h.rss_kib(cluster.server.pid) - before) / 1024, 1)
        report["server_alive"] = cluster.server.alive()
        report["leftover_temp"] = cluster.leftover_temp()
        return report
    finally:
        cluster.stop()


def part_fuzz(args, work: Path, weights: Path, assets) -> dict:
    cluster = h.Cluster(work / "fuzz", weights, redis=False, embedded_workers=0)
    try:
        cluster.start_server()
        report = h.run_fuzz(cluster.url, args.fuzz_examples, seed=args.seed)
        report["server_alive"] = cluster.server.alive()
        return report
    finally:
        cluster.stop()


def part_unpickle(args, work: Path, weights: Path, assets) -> dict:
    return {"package_scripts_deploy": h.scan_unsafe_loads([REPO / "talkgen", REPO / "deploy", REPO / "scripts"]),
            "tests": h.scan_unsafe_loads([REPO / "tests"])}


# ------------------------------------------------------------------------------------------------
# The report


def ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def summary(name: str, r: dict) -> list[str]:
    if "exception" in r:
        return [f"{name}: DID NOT RUN: {r['exception'].strip().splitlines()[-1]}"]
    if name == "load":
        lat = r["submit_latency_s"]
        return [f"load: {r['jobs']} submissions from {r['clients']} clients -> {r['accepted']} accepted, "
                f"statuses {r['statuses']}, lost {len(r['lost'])}, run twice {len(r['started_more_than_once'])}, "
                f"submit errors {len(r['submit_errors'])}",
                f"  submit latency p50 {ms(lat['p50'])}, p99 {ms(lat['p99'])}, max {ms(lat['max'])}; all submitted in "
                f"{r['submitted_in_s']} s, all ended in {r['all_ended_in_s']} s ({r['jobs_per_s']} jobs/s on "
                f"{r['workers']} workers)"]
    if name == "kills":
        return [f"kills: {r['kills']} x kill -9 {r['kills_by_phase']} (missed {r['missed']}) over {r['jobs']} jobs "
                f"-> statuses {r['statuses']}, lost {len(r['lost'])}, failed without reason "
                f"{len(r['failed_without_reason'])}, attempts {r['attempts']}",
                *(f"  failed: {reason} ({n})" for reason, n in r["failure_reasons"].items()),
                f"  leftover temporary folders after a fresh worker: {len(r['leftover_temp_after_a_fresh_worker'])}"]
    if name == "restart":
        return [f"restart: {r['jobs']} jobs queued (store/redis before {r['before_restart']}, after kill -9 + "
                f"restart {r['after_restart']}); killed again mid-run -> statuses {r['statuses']}, lost "
                f"{len(r['lost'])}, run twice {len(r['started_more_than_once'])}"]
    if name == "s3":
        return [f"s3: SeaweedFS stopped during an upload -> {r['status']} after {r['failed_after_s']} s "
                f"({r['retries_logged']} retries logged): {r['error']}",
                f"  submit during the outage: {r['submit_during_outage']['status']} "
                f"{r['submit_during_outage']['body'].get('error', '')[:120]}; health {r['health_during_outage']}; "
                f"next job after S3 is back: {r['next_job_after_outage']}, same worker {r['same_worker']}"]
    if name == "disk":
        lines = []
        for kind, d in r.items():
            if not isinstance(d, dict):
                continue
            if "skipped" in d:
                lines.append(f"disk ({kind}): skipped: {d['skipped']}")
            else:
                lines.append(f"disk ({d['mechanism']}): {d['status']}: {d['error']}; worker alive {d['worker_alive']}, "
                             f"next job {d['next_job']} (same worker {d['same_worker']})")
        return lines
    if name == "oom":
        return [f"oom: {r['status']} (attempts {r['attempts']}): {r['error']}; next job {r['next_job']} "
                f"(same worker {r['same_worker']})"]
    if name == "bad":
        return [f"bad input: {r['cases']} malformed requests -> statuses {r['statuses']}, {len(r['wrong'])} not a 4xx "
                f"naming the field; jobs created {r['jobs_created']}; leftover temp {len(r['leftover_temp'])}; "
                f"a good job after: {r['good_job_after']}",
                *(f"  WRONG {w['case']}: {w['status']} {w['error'][:150]}" for w in r["wrong"])]
    if name == "stream":
        return [f"stream: {r['offered_bytes'] / 2**30:.0f} GiB offered with no Content-Length -> {r['status']} after "
                f"{r['sent_bytes'] / 2**20:.1f} MiB sent (limit {r['limit_mb']} MiB) in {r['seconds']} s; server memory "
                f"grew {r['server_rss_growth_mib']} MiB"]
    if name == "fuzz":
        return [f"fuzz: {r['requests']} schemathesis requests -> statuses {r['statuses']}, "
                f"{r['server_error_count']} server errors"]
    if name == "unpickle":
        p = r["package_scripts_deploy"]
        return [f"unpickle: {p['files']} files of talkgen/, deploy/, scripts/: {len(p['unsafe'])} unsafe loads, "
                f"{p['torch_load_safe']} torch.load(weights_only=True); tests/: {len(r['tests']['unsafe'])} "
                "torch.load without weights_only (torch >= 2.6 defaults to True)"]
    return [f"{name}: {json.dumps(r)[:300]}"]


def problems(name: str, r: dict) -> list[str]:
    """What a part's figures show going wrong (the soak exits 1 when any part has one)."""
    if "exception" in r:
        return ["did not run"]
    found = []
    if name in ("load", "restart"):
        found += [k for k in ("lost", "started_more_than_once", "submit_errors") if r.get(k)]
        if set(r.get("statuses", {})) - {"succeeded"}:
            found.append(f"statuses {r['statuses']}")
    if name == "restart" and r["before_restart"] != r["after_restart"]:
        found.append("queue changed across the restart")
    if name == "kills":
        found += [k for k in ("lost", "failed_without_reason") if r[k]]
    if name in ("s3", "oom"):
        next_job = r["next_job_after_outage"]["status"] if name == "s3" and r["next_job_after_outage"] else r.get("next_job")
        if r["status"] != "failed" or next_job != "succeeded":
            found.append(f"job {r['status']}, next job {next_job}")
    if name == "disk":
        for kind, d in r.items():
            if isinstance(d, dict) and "skipped" not in d and (d["status"] != "failed" or d["next_job"] != "succeeded"
                                                                or not d["worker_alive"] or d.get("partial_files")):
                found.append(f"{kind}: job {d['status']}, next job {d['next_job']}, worker alive {d['worker_alive']}")
    if name == "bad" and (r["wrong"] or r["jobs_created"]):
        found.append(f"{len(r['wrong'])} cases not refused as expected, {r['jobs_created']} jobs created")
    if name == "stream" and r["status"] != 413:
        found.append(f"status {r['status']}")
    if name == "fuzz" and r["server_error_count"]:
        found.append(f"{r['server_error_count']} server errors")
    if name == "unpickle" and r["package_scripts_deploy"]["unsafe"]:
        found.append("unsafe loads")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    ap.add_argument("--jobs", type=int, default=300, help="load: submissions")
    ap.add_argument("--clients", type=int, default=30, help="load: concurrent clients")
    ap.add_argument("--workers", type=int, default=2, help="talkgen worker processes (load, kills, restart)")
    ap.add_argument("--kills", type=int, default=20, help="kills: kill -9 of a worker")
    ap.add_argument("--restart-jobs", type=int, default=20, help="restart: jobs queued when the server is killed")
    ap.add_argument("--fuzz-examples", type=int, default=500, help="fuzz: examples per mode (valid, invalid)")
    ap.add_argument("--quick", action="store_true", help="the CI test's counts (30 jobs, 10 clients, 4 kills, ...)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline-s", type=float, default=1200, help="longest wait of one part for its jobs")
    ap.add_argument("--time-limit-s", type=float, default=3600, help="no part starts after this")
    ap.add_argument("--work", type=Path, help="folder for logs and data (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs of every process)")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    if args.quick:
        args.jobs, args.clients, args.kills, args.restart_jobs, args.fuzz_examples = 30, 10, 4, 6, 100
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")

    from talkgen.pipeline.tiny import ensure_tiny_weights
    from talkgen.service.settings import cache_root

    work = args.work or Path(tempfile.mkdtemp(prefix="talkgen-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    weights = ensure_tiny_weights(cache_root() / "tiny")
    assets = h.make_assets(work / "assets")
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "parts": {}}
    print(f"soak on {report['machine']['cpus']} CPUs ({report['machine']['cpu']}), load average "
          f"{report['machine']['load_average_at_start']}, work folder {work}", flush=True)
    began = time.monotonic()
    try:
        for name in parts:
            if time.monotonic() - began > args.time_limit_s:
                report["parts"][name] = {"exception": "not started: --time-limit-s reached"}
                continue
            started = time.monotonic()
            try:
                result = globals()[f"part_{name}"](args, work / name, weights, assets)
            except BaseException as exc:  # noqa: BLE001 (pytest's skip too): report it and go on
                if isinstance(exc, KeyboardInterrupt):
                    raise
                result = {"exception": "".join(traceback.format_exception(exc))[-3000:]}
            result["seconds"] = round(time.monotonic() - started, 1)
            report["parts"][name] = result
            for line in summary(name, result):
                print(line, flush=True)
            for problem in problems(name, result):
                print(f"  PROBLEM: {problem}", flush=True)
            print(f"  ({name}: {result['seconds']} s)", flush=True)
    finally:
        report["seconds"] = round(time.monotonic() - began, 1)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
            print(f"figures written to {args.json}")
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if any(problems(name, r) for name, r in report["parts"].items()) else 0


if __name__ == "__main__":
    sys.exit(main())
