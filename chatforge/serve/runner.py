"""The engine's own thread: continuous batching for HTTP requests.

The engine is not thread-safe and knows nothing of asyncio. One background thread owns it: it
adds submitted requests, applies cancellations, runs `engine.step()` while any work exists (so
concurrent requests share each decode step), and hands what each step produced to the request's
asyncio queue with `loop.call_soon_threadsafe` — one list of messages per job per step. Route
handlers never touch the engine.

A job is one HTTP request: one or more engine requests ("subs": a completions request with a
list of prompts has one per prompt). Its queue receives lists of messages (`Message`):

    Started(sub, prompt_logprobs)        the sub left the waiting queue and has a slot (prefilled)
    Generated(sub, event)                what one step produced for one sequence of the sub (a StreamEvent)
    Finished(sub, completion)            the sub finished (engine.pop_result)
    Cancelled(sub, completion_tokens)    the sub was cancelled after that many generated tokens
    Failed(sub | None, error)            the sub (None: the whole job) failed; nothing more follows

Admission control: at most `max_queue` jobs wait for a slot (`submit` raises QueueFull: the
server's 429; a job that fits the free slots is always taken); after `begin_shutdown` (SIGTERM)
`submit` raises ShuttingDown (503) while admitted jobs run to the end. If `engine.step()` raises
(a bug, out of memory), every job in the engine gets an "error" and the engine's scheduler state
is reset, so the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from chatforge.generate.engine import Completion, Engine, StreamEvent, TokenLogprob
from chatforge.generate.params import MAX_LOGPROBS, SamplingParams
from chatforge.generate.tool_loop import ToolUse

log = logging.getLogger("chatforge.serve")



@dataclass(frozen=True)
class Started:
    """Sub `sub` left the waiting queue and holds a slot; with echo, its prompt's logprobs (None first)."""

    sub: int
    prompt_logprobs: list[TokenLogprob | None] | None


@dataclass(frozen=True)
class Generated:
    """What one engine step produced for one sequence of sub `sub`."""

    sub: int
    event: StreamEvent


@dataclass(frozen=True)
class Finished:
    """Sub `sub` is done: its whole result."""

    sub: int
    completion: Completion


@dataclass(frozen=True)
class Cancelled:
    """Sub `sub` was cancelled after `completion_tokens` generated tokens (they still count as usage)."""

    sub: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """Sub `sub` (None: the whole job) failed with `error`; nothing more follows for the job."""

    sub: int | None
    error: BaseException


Message = Started | Generated | Finished | Cancelled | Failed


class QueueFull(Exception):
    """Too many requests wait for a slot."""


class ShuttingDown(Exception):
    """The server is draining: no new requests."""


@dataclass
class SubRequest:
    prompt_ids: list[int]
    params: SamplingParams
    logprobs_limit: int = MAX_LOGPROBS
    tool_use: ToolUse | None = None


def _rows_needed(params: SamplingParams) -> int:
    """Engine rows (KV-cache slots) a request holds; beam search and echo-only scoring hold none."""
    if params.num_beams > 1 or params.max_tokens == 0:
        return 0
    return max(params.best_of or params.n, params.n)


class Job:
    """One HTTP request's engine requests and the queue its messages arrive on."""

    def __init__(self, job_id: str, subs: list[SubRequest], loop: asyncio.AbstractEventLoop) -> None:
        self.id = job_id
        self.subs = subs
        self.rids = [f"{job_id}/{i}" for i in range(len(subs))]
        self.loop = loop
        self.queue: asyncio.Queue[list[Message]] = asyncio.Queue()
        self.created = time.monotonic()
        self.rows = sum(_rows_needed(sub.params) for sub in subs)  # engine slots it will take
        self.closed = False  # finished, failed or cancelled (guarded by the runner's lock)
        self._waiting = True  # counted in the runner's queue length
        self._started = [False] * len(subs)  # the rest is owned by the engine thread
        self._open = set(range(len(subs)))

    async def get(self) -> list[Message]:
        return await self.queue.get()


class EngineRunner:
    def __init__(self, engine: Engine, max_queue: int = 64) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.draining = False
        self.steps = 0
        self._cond = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._cancels: list[tuple[Job, int | None]] = []
        self._jobs: dict[str, Job] = {}  # jobs with requests in the engine (engine thread only)
        self._owner: dict[str, tuple[Job, int]] = {}  # engine request id -> (job, sub)
        self._queued = 0
        self._queued_rows = 0
        self._active = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()

    # ---- the event loop's side ---------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="chatforge-engine", daemon=True)
                self._thread.start()

    def submit(self, subs: list[SubRequest], loop: asyncio.AbstractEventLoop | None = None) -> Job:
        """Queue a job (already validated); raises QueueFull or ShuttingDown."""
        loop = loop or asyncio.get_running_loop()
        with self._cond:
            if self.draining or self._stopping:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            job = Job(f"job-{next(self._ids)}", subs, loop)
            fits_now = self._queued_rows + job.rows + self.engine.num_running <= self.engine.max_batch_size
            if self._queued >= self.max_queue and not fits_now:
                raise QueueFull(f"{self._queued} requests are already waiting (the limit is {self.max_queue})")
            self._queued += 1
            self._queued_rows += job.rows
            self._active += 1
            self._inbox.append(job)
            self._cond.notify_all()
        self.start()
        return job

    def cancel(self, job: Job, sub: int | None = None) -> None:
        """Stop a job (or one of its subs): the client went away, or moderation cut the output."""
        with self._cond:
            if job.closed:
                return
            if sub is None and job in self._inbox:
                self._inbox.remove(job)
                self._close(job)
                return
            self._cancels.append((job, sub))
            self._cond.notify_all()

    def begin_shutdown(self) -> None:
        """Stop admitting (new submits raise ShuttingDown); admitted jobs run to the end."""
        with self._cond:
            self.draining = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread; jobs still open get ShuttingDown."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @property
    def num_queued(self) -> int:
        return self._queued

    @property
    def num_active(self) -> int:
        return self._active

    def gauges(self) -> dict[str, float]:
        with self._cond:
            queued, active = self._queued, self._active
        return {"queue_length": queued, "running_requests": active - queued,
                "running_sequences": self.engine.num_running}

    # ---- the engine thread ---------------------------------------------------------------------

    def _close(self, job: Job) -> None:  # with self._cond held
        if not job.closed:
            job.closed = True
            if job._waiting:
                job._waiting = False
                self._queued -= 1
                self._queued_rows -= job.rows
            self._active -= 1
            self._cond.notify_all()

    def _finish(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        for rid in job.rids:
            self._owner.pop(rid, None)
        with self._cond:
            self._close(job)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._cancels or self._stopping or self.engine.has_unfinished()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    inbox, cancels = list(self._inbox), self._cancels
                    self._inbox.clear()
                    self._cancels = []
                posts: dict[Job, list[Message]] = defaultdict(list)
                for job in inbox:
                    self._add(job, posts)
                for job, sub in cancels:
                    self._cancel_in_engine(job, sub, posts)
                if self.engine.has_unfinished():
                    try:
                        events = self.engine.step()
                        self.steps += 1
                    except Exception as e:  # keep serving: fail what was running, reset the scheduler
                        log.exception("engine step failed; failing %d running request(s)", len(self._jobs))
                        self._fail_all(e, posts)
                    else:
                        self._collect(events, posts)
                self._post(posts)
        finally:
            posts = defaultdict(list)
            with self._cond:
                leftover = list(self._inbox)
                self._inbox.clear()
            for job in leftover:
                posts[job].append(Failed(None, ShuttingDown("the server stopped")))
                with self._cond:
                    self._close(job)
            self._fail_all(ShuttingDown("the server stopped before the request finished"), posts)
            self._post(posts)

    def _add(self, job: Job, posts: dict[Job, list[Message]]) -> None:
        added = []
        for i, (sub, rid) in enumerate(zip(job.subs, job.rids)):
            try:
                self.engine.add_request(sub.prompt_ids, sub.params, request_id=rid, logprobs_limit=sub.logprobs_limit,
                                        tool_use=sub.tool_use)
            except Exception as e:  # validated before submit, so unexpected: fail this job only
                for r in added:
                    self.engine.cancel(r)
                posts[job].append(Failed(i, e))
                self._finish(job)
                return
            added.append(rid)
            self._owner[rid] = (job, i)
        self._jobs[job.id] = job

    def _cancel_in_engine(self, job: Job, sub: int | None, posts: dict[Job, list[Message]]) -> None:
        if job.closed or job.id not in self._jobs:
            return
        for i in range(len(job.subs)) if sub is None else [sub]:
            if i not in job._open:
                continue
            rid = job.rids[i]
            request = self.engine.requests.get(rid)
            self.engine.cancel(rid)
            job._open.discard(i)
            self._owner.pop(rid, None)
            posts[job].append(Cancelled(i, request.completion_tokens if request is not None else 0))
        if not job._open:
            self._finish(job)
        else:
            self._mark_started(job)

    def _mark_started(self, job: Job) -> None:
        if job._waiting and all(job._started[i] or i not in job._open for i in range(len(job.subs))):
            with self._cond:
                if job._waiting:
                    job._waiting = False
                    self._queued -= 1
                    self._queued_rows -= job.rows

    def _collect(self, events: list, posts: dict[Job, list[Message]]) -> None:
        waiting = {r.id for r in self.engine.waiting}
        for job in list(self._jobs.values()):
            if not job._waiting:
                continue
            for i, rid in enumerate(job.rids):
                if not job._started[i] and i in job._open and rid not in waiting:
                    job._started[i] = True
                    request = self.engine.requests.get(rid)
                    posts[job].append(Started(i, request.prompt_logprobs if request is not None else None))
            self._mark_started(job)
        for event in events:
            owner = self._owner.get(event.request_id)
            if owner is not None:
                posts[owner[0]].append(Generated(owner[1], event))
        for job in list(posts):
            for i in sorted(job._open):
                request = self.engine.requests.get(job.rids[i])
                if request is not None and request.done:
                    posts[job].append(Finished(i, self.engine.pop_result(job.rids[i])))
                    job._open.discard(i)
            if not job._open and not job.closed:
                self._finish(job)

    def _fail_all(self, error: Exception, posts: dict[Job, list[Message]]) -> None:
        for job in list(self._jobs.values()):
            posts[job].append(Failed(None, error))
            self._finish(job)
        self._jobs.clear()
        self._owner.clear()
        self._reset_engine()

    def _reset_engine(self) -> None:
        """Forget every request and row (after a failed step the scheduler state is unknown)."""
        e = self.engine
        e.rows = []
        e.waiting.clear()
        e.requests.clear()
        e.history = None
        e.pipeline = None
        if getattr(e.cache, "positions", None) is not None:
            e.cache.positions = None

    @staticmethod
    def _post(posts: dict[Job, list[Message]]) -> None:
        for job, messages in posts.items():
            if messages:
                with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens any more
                    job.loop.call_soon_threadsafe(job.queue.put_nowait, messages)
