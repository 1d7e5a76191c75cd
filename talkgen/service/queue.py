"""Getting jobs to workers: in-process by default, or through Redis with dramatiq for scale-out.

**Embedded** (``talkgen serve``): one thread per GPU set, each with its own resident pipeline, fed
from an in-memory queue; the job store is the source of truth, so on start every queued job (and
every job that was running when the process died) is queued again.

**Redis** (``talkgen serve --redis URL`` + any number of ``talkgen worker --redis URL``): the
queue engine is dramatiq's Redis broker (see docs/service.md for why): a message is only removed
when the worker acknowledges it after the job ended; every worker process heartbeats from its
consumer threads while the job runs in a worker thread, and the messages of a worker that stops
heartbeating (``kill -9``, a lost machine) are put back on the queue for another worker. Each
worker runs one job at a time (one worker thread, prefetch 1) and keeps its model loaded.
Around the engine, per job, in Redis: a lock renewed while the job runs (a message delivered twice
never runs twice at once), an attempt counter (a job that kills its worker again and again ends
``failed`` after ``max_attempts``), a status (a finished job's late redelivery is dropped) and a
cancel flag. Workers report through a Redis stream that the API server applies to the job store.
"""

from __future__ import annotations

import json
import logging
import queue as queue_module
import threading
import time
import uuid

from talkgen.errors import ResourceError
from talkgen.service.jobs import TERMINAL, Job, JobStore, gave_up_message
from talkgen.service.settings import Settings
from talkgen.service.storage import Storage
from talkgen.service.worker import GenerationWorker, JobOrder, worker_devices, worker_name

log = logging.getLogger("talkgen.service.queue")

ACTOR = "talkgen_generate"
STATUS_TTL_S = 30 * 86400


def order_of(job: Job) -> JobOrder:
    return JobOrder(job_id=job.id, params=job.params, inputs=job.inputs)


# ------------------------------------------------------------------------------------------------
# Embedded: threads in the server process


class StoreReporter:
    """Reports straight into the job store (same process)."""

    def __init__(self, store: JobStore, settings: Settings, cancelled: set[str]):
        self.store, self.settings, self.cancelled = store, settings, cancelled

    def start(self, order: JobOrder, worker: str) -> bool:
        return self.store.start(order.job_id, worker, self.settings.max_attempts) is not None

    def progress(self, job_id: str, data: dict) -> None:
        self.store.record(job_id, "progress", data)

    def chunk(self, job_id: str, data: dict) -> None:
        self.store.record(job_id, "chunk", data)

    def finish(self, order: JobOrder, kind: str, data: dict) -> None:
        self.store.record(order.job_id, kind, data)
        self.cancelled.discard(order.job_id)

    def should_cancel(self, job_id: str) -> bool:
        return job_id in self.cancelled


class EmbeddedQueue:
    kind = "embedded"

    def __init__(self, settings: Settings, store: JobStore, storage: Storage):
        self.settings, self.store, self.storage = settings, store, storage
        self._queue: queue_module.Queue[str | None] = queue_module.Queue()
        self._cancelled: set[str] = set()
        self._stopping = threading.Event()
        self.reporter = StoreReporter(store, settings, self._cancelled)
        devices = worker_devices(settings) if settings.workers != 0 else []
        self.workers = [GenerationWorker(settings, storage, device, name=worker_name(device) + f"/{i}")
                        for i, device in enumerate(devices)]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        # Everything unfinished goes back in line, oldest first: queued jobs, and jobs that were
        # running when the process stopped (their attempt counts; see JobStore.start).
        for job in self.store.unfinished():
            self._queue.put(job.id)
        for worker in self.workers:
            thread = threading.Thread(target=self._loop, args=(worker,), name=f"talkgen-{worker.name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def enqueue(self, job: Job) -> None:
        self._queue.put(job.id)
        self.store.mark_dispatched(job.id)

    def cancel(self, job: Job) -> None:
        if job.status == "running":
            self._cancelled.add(job.id)

    def accepting(self) -> str | None:
        """Why new jobs cannot be run, or None."""
        if self.workers and all(w.state == "failed" for w in self.workers):
            worker = self.workers[0]
            if worker.broken:  # it loaded, then its GPUs fell out of step; queued jobs wait for a restart
                return f"No worker can run jobs: {worker.error}; jobs already queued run after the server restarts."
            return f"The model could not be loaded: {worker.error}"
        return None

    def stop(self, timeout: float = 30) -> None:
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self, worker: GenerationWorker) -> None:
        try:
            worker.load()
        except Exception:
            log.exception("worker %s could not load the model", worker.name)
            return
        while not self._stopping.is_set():
            job_id = self._queue.get()
            if job_id is None:
                return
            job = self.store.get(job_id)
            if job is None or job.terminal:
                continue
            worker.run(order_of(job), self.reporter, self._stopping)
            if worker.broken:  # a sequence-parallel group out of step: this worker takes no more jobs
                return

    def health(self) -> list[dict]:
        return [{"name": w.name, "device": w.device, "state": w.state, "job": w.current, "error": w.error}
                for w in self.workers]


# ------------------------------------------------------------------------------------------------
# Redis: dramatiq


class RedisKeys:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.events = f"{prefix}:events"

    def job(self, job_id: str, what: str) -> str:
        return f"{self.prefix}:job:{job_id}:{what}"


def make_broker(settings: Settings):
    try:
        from dramatiq.brokers.redis import RedisBroker
    except ImportError:
        raise ResourceError("The Redis queue needs dramatiq and redis: install the service extra "
                            "(`pip install 'talkgen[service]'`).") from None
    # No default middleware: no time limit (jobs last minutes to hours), no automatic retries
    # (a job that failed with a reason is not run again; a dead worker's job is requeued by the
    # broker's heartbeat check and counted by our attempt counter instead).
    broker = RedisBroker(url=settings.redis_url, middleware=[], namespace=f"{settings.queue_name}-dramatiq",
                         heartbeat_timeout=int(settings.heartbeat_timeout_s * 1000),
                         maintenance_chance=settings.redis_maintenance_chance)
    broker.declare_queue(settings.queue_name)
    return broker


def redis_client(settings: Settings):
    import redis

    # A Redis that does not answer is reported within seconds (intake's ping, health), not after
    # the OS's connect timeout; reads keep no timeout (the event stream blocks on purpose).
    return redis.Redis.from_url(settings.redis_url, decode_responses=True, health_check_interval=30,
                                socket_connect_timeout=5)


def send(broker, settings: Settings, order: JobOrder, delay_ms: int | None = None) -> None:
    from dramatiq import Message

    message = Message(queue_name=settings.queue_name, actor_name=ACTOR, args=(order.to_dict(),), kwargs={}, options={})
    broker.enqueue(message, delay=delay_ms)


class RedisQueue:
    """The API server's side: enqueue, cancel, and apply the workers' events to the job store."""

    kind = "redis"

    def __init__(self, settings: Settings, store: JobStore, storage: Storage):
        self.settings, self.store, self.storage = settings, store, storage
        self.keys = RedisKeys(settings.queue_name)
        self.broker = make_broker(settings)
        self.redis = redis_client(settings)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.workers: list = []

    def start(self) -> None:
        # Jobs stored but not yet handed to Redis (server stopped, Redis away) are handed over by
        # the event thread, at once and then every few seconds.
        self._thread = threading.Thread(target=self._apply_events, name="talkgen-events", daemon=True)
        self._thread.start()

    def enqueue(self, job: Job) -> None:
        self.redis.set(self.keys.job(job.id, "status"), "queued", ex=STATUS_TTL_S)
        send(self.broker, self.settings, order_of(job))
        self.store.mark_dispatched(job.id)

    def cancel(self, job: Job) -> None:
        # Seen by the worker at its next step (running) or before it starts (queued).
        self.redis.set(self.keys.job(job.id, "cancel"), "1", ex=STATUS_TTL_S)

    def accepting(self) -> str | None:
        try:
            self.redis.ping()
        except Exception as exc:
            return f"Redis at {self.settings.redis_url} does not answer ({exc})."
        return None

    def stop(self, timeout: float = 10) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.broker.close()

    def health(self) -> list[dict]:
        """Workers that heartbeat (dramatiq's broker ids, one per worker process)."""
        try:
            cutoff = (time.time() - self.settings.heartbeat_timeout_s) * 1000
            alive = self.redis.zrangebyscore(f"{self.settings.queue_name}-dramatiq:__heartbeats__", cutoff, "+inf")
            names = self.redis.hgetall(f"{self.settings.queue_name}:workers")
        except Exception as exc:
            return [{"name": "redis", "state": "failed", "error": str(exc)}]
        workers = []
        for broker_id in alive:
            info = json.loads(names.get(broker_id, "{}"))
            if info.get("name"):  # the API server's own broker heartbeats too; only workers register
                workers.append({"name": info["name"], "device": info.get("device"), "state": "alive"})
        return workers

    def _dispatch_pending(self, reconcile: bool = False) -> None:
        """Hand over jobs stored while Redis was away. With ``reconcile`` (at start), also jobs Redis
        has no trace of (it lost its data): a copy too many is harmless, workers drop it."""
        for job in self.store.unfinished():
            try:
                if not job.dispatched or (reconcile and self.redis.get(self.keys.job(job.id, "status")) is None):
                    self.enqueue(job)
            except Exception as exc:
                log.warning("job %s still waits to be queued: %s", job.id, exc)
                return

    def _apply_events(self) -> None:
        last = self.store.meta("events_last_id") or "0-0"
        next_dispatch, reconcile = 0.0, True
        while not self._stopping.is_set():
            if time.monotonic() >= next_dispatch:  # jobs stored while Redis was away
                self._dispatch_pending(reconcile)
                next_dispatch, reconcile = time.monotonic() + 10, False
            try:
                batches = self.redis.xread({self.keys.events: last}, count=200, block=1000)
            except Exception as exc:
                log.warning("reading worker events from Redis failed (%s); retrying", exc)
                self._stopping.wait(1.0)
                continue
            for _stream, entries in batches or []:
                for entry_id, fields in entries:
                    try:
                        self.store.apply_event(entry_id, fields["job"], fields["kind"], json.loads(fields["data"]))
                    except Exception:
                        log.exception("could not apply worker event %s %s", entry_id, fields)
                    last = entry_id


class RedisReporter:
    """A remote worker's side: decide whether to run, report through the event stream."""

    def __init__(self, settings: Settings, client, broker, name: str):
        self.settings, self.redis, self.broker, self.name = settings, client, broker, name
        self.keys = RedisKeys(settings.queue_name)
        self._lock = None
        self._renewer: threading.Thread | None = None
        self._renewing = threading.Event()

    def _emit(self, job_id: str, kind: str, data: dict | None = None) -> None:
        self.redis.xadd(self.keys.events, {"job": job_id, "kind": kind, "data": json.dumps(data or {})},
                        maxlen=200_000, approximate=True)

    def _set_status(self, job_id: str, status: str) -> None:
        self.redis.set(self.keys.job(job_id, "status"), status, ex=STATUS_TTL_S)

    def start(self, order: JobOrder, worker: str) -> bool:
        job_id = order.job_id
        if self.redis.get(self.keys.job(job_id, "status")) in TERMINAL:
            return False  # a late copy of a finished job
        if self.redis.exists(self.keys.job(job_id, "cancel")):
            self._set_status(job_id, "cancelled")
            self._emit(job_id, "cancelled")
            return False
        lock = self.redis.lock(self.keys.job(job_id, "lock"), timeout=self.settings.job_lease_s, blocking=False,
                               thread_local=False)
        if not lock.acquire(token=uuid.uuid4().hex):
            # Delivered again while a live worker still holds it: look again once its lease could
            # have run out; by then it is finished (dropped) or its worker is gone (run).
            log.info("job %s is running elsewhere; checking again later", job_id)
            send(self.broker, self.settings, order, delay_ms=int(self.settings.job_lease_s * 1000) + 1000)
            return False
        attempt = self.redis.incr(self.keys.job(job_id, "attempts"))
        self.redis.expire(self.keys.job(job_id, "attempts"), STATUS_TTL_S)
        if attempt > self.settings.max_attempts:
            self._set_status(job_id, "failed")
            self._emit(job_id, "failed", {"error": gave_up_message(attempt - 1)})
            lock.release()
            return False
        self._lock = lock
        self._renewing.clear()
        self._renewer = threading.Thread(target=self._renew, args=(lock,), name="talkgen-lease", daemon=True)
        self._renewer.start()
        self._set_status(job_id, "running")
        self._emit(job_id, "started", {"attempt": attempt, "worker": worker})
        return True

    def _renew(self, lock) -> None:
        while not self._renewing.wait(self.settings.job_lease_s / 3):
            try:
                lock.reacquire()
            except Exception as exc:  # lost the lock (Redis restarted?): the job may run elsewhere
                log.warning("could not renew the lease of %s: %s", lock.name, exc)

    def progress(self, job_id: str, data: dict) -> None:
        self._emit(job_id, "progress", data)

    def chunk(self, job_id: str, data: dict) -> None:
        self._emit(job_id, "chunk", data)

    def finish(self, order: JobOrder, kind: str, data: dict) -> None:
        job_id = order.job_id
        if kind in TERMINAL:
            self._set_status(job_id, kind)
            self._emit(job_id, kind, data)
        elif kind == "requeued":
            self.redis.decr(self.keys.job(job_id, "attempts"))  # a clean hand-back is not a failed try
            self._set_status(job_id, "queued")
            self._emit(job_id, kind, data)
            send(self.broker, self.settings, order)
        self._renewing.set()
        if self._lock is not None:
            try:
                self._lock.release()
            except Exception:
                pass
            self._lock = None

    def should_cancel(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys.job(job_id, "cancel")))


def run_redis_worker(settings: Settings, storage: Storage, stop: threading.Event) -> None:
    """``talkgen worker``: load the model, then take jobs from Redis one at a time until ``stop``."""
    import dramatiq

    for line in settings.describe():
        log.info(line)
    broker = make_broker(settings)
    client = redis_client(settings)
    device = settings.device
    generator = GenerationWorker(settings, storage, device=device)
    log.info("worker %s: loading the %s model", generator.name, settings.model)
    generator.load()
    reporter = RedisReporter(settings, client, broker, generator.name)
    stopping = threading.Event()

    def generate(order: dict) -> None:
        generator.run(JobOrder.from_dict(order), reporter, stopping)
        if generator.broken:  # exit, so that whatever supervises the worker starts a fresh one
            stop.set()

    dramatiq.actor(generate, actor_name=ACTOR, queue_name=settings.queue_name, broker=broker)
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=500)
    worker.queue_prefetch = 1  # one job in hand at a time: the rest stay in Redis for other workers
    worker.start()
    client.hset(f"{settings.queue_name}:workers", broker.broker_id,
                json.dumps({"name": generator.name, "device": device or "auto", "model": settings.model}))
    log.info("worker %s: ready for jobs on %s (queue %r)", generator.name, settings.redis_url, settings.queue_name)
    try:
        stop.wait()
    finally:
        log.info("worker %s: stopping (a running job goes back to the queue)", generator.name)
        stopping.set()
        worker.stop(timeout=60_000)
        client.hdel(f"{settings.queue_name}:workers", broker.broker_id)
        broker.close()
    if generator.broken:
        raise ResourceError(generator.error)
