"""`talkgen serve` as a real process: jobs survive a restart and a kill -9 mid-job."""

from __future__ import annotations

import httpx

from .service_helpers import Api, free_port, service_env, wait_until


def test_queued_jobs_survive_a_restart_and_a_killed_server_runs_its_job_again(tmp_path, tiny_weights, inputs,
                                                                            processes) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = service_env(max_attempts=3)

    def serve(name: str, workers: int):
        process = processes(["serve", "--model", "tiny", "--weights", str(tiny_weights), "--data-dir",
                             str(tmp_path / "data"), "--port", str(port), "--workers", str(workers), "--device", "cpu"],
                            env, tmp_path / f"{name}.log")

        def ready():
            assert process.alive(), process.log()[-3000:]
            try:
                return httpx.get(f"{url}/v1/health").json()["status"] == "ok"
            except httpx.TransportError:
                return False
        wait_until(ready, 90, 0.25, f"server {name}")
        return process

    # 1. A server that runs nothing accepts jobs, then stops (SIGTERM) with them queued.
    first = serve("first", workers=0)
    api = Api(url)
    queued = [api.submit(inputs, seed=i) for i in range(2)]
    assert {api.job(j)["status"] for j in queued} == {"queued"}
    first.stop()

    # 2. Restarted with a worker: the queued jobs run. Then a long job is running when the server
    #    is killed with SIGKILL.
    second = serve("second", workers=1)
    assert [api.wait(j)["status"] for j in queued] == ["succeeded", "succeeded"]
    interrupted = api.submit(inputs, sample_steps=30)
    behind = api.submit(inputs)
    wait_until(lambda: (p := api.job(interrupted)["progress"]) and p["stage"] == "sample", 60, 0.05, "sampling")
    second.kill9()

    # 3. Started again: the interrupted job runs again (its second attempt), the one behind it too.
    serve("third", workers=1)
    job = api.wait(interrupted, timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    assert api.wait(behind)["status"] == "succeeded"
    assert api.http.get(f"/v1/jobs/{interrupted}/video").status_code == 200
    api.close()
