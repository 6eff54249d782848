# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
emloc serve: many task memories behind one OpenAI-compatible API, on one machine or on a Ray cluster.

    emloc serve --model REPO --memory NAME=DIR_OR_HUB_ID [--memory ...] [--api-keys FILE] [--host 127.0.0.1] [--port 8000]
    emloc serve ... --ray [--replicas N] [--ray-address auto]        Ray Serve (`pip install "emloc[ray]"`)
    emloc serve --api-keys FILE --add-key NAME=MEMORY[,MEMORY...]    adds a key (printed once; the file keeps its hash)

The request's `model` names a memory, as vLLM and LoRAX name adapters: `GET /v1/models` lists the memories the caller's
key may use, `POST /v1/completions` and `POST /v1/chat/completions` answer from one (streamed as server-sent events with
`"stream": true`). A completion's `prompt` (or the chat's one user message) is a query in the demonstrations' format,
rendered as the memory's demonstrations were. Extensions: `"retrieve": K` (attend to the memory's K nearest
demonstrations only) and `POST /v1/score` (the log-probability of each of `"choices"` as the answer, `model.score_choices`).

How it runs (one machine). `create_app` checks the key, the body and every field, and hands a plain job (a dict) to a
backend. The backend, `Engine`, loads memories on demand with `model.load_memory` (fingerprint and rendering checked)
into an LRU cache bounded in bytes (`MemoryCache`; concurrent first requests for a memory load it once). A micro-batcher
gathers waiting requests for up to `--batch-wait-ms` (or `--max-batch-size` rows) and runs them as one
`model.generate(memory=[a memory per row])` call on one worker thread: rows of different memories share every forward
pass, each row seeing only its own memory. transformers' own loop decodes; each row keeps its own sampling settings
(transformers' temperature and top-p warpers applied to its row, `RowSampling`) and its own length, stop strings and
cancellation (a stopping criterion that answers per row, `RowStopping`); a row that is done is masked (it feeds padding)
until the batch ends. Requests that arrive while a batch runs wait for the next batch. A failing batch is retried one
request at a time, so one bad request fails alone. On SIGTERM uvicorn stops accepting connections and lets the requests
in flight finish, then the batcher drains and the process exits.

On Ray Serve (`--ray`) the same application is the ingress deployment; the model runs in `--replicas` replica
deployments, each with its own `Engine`, and memories load through `serve.multiplexed`, so a request goes to a replica
that already holds its memory.
"""
# Not remote code (an Emloc repo does not carry it): an installed module beside the *_emloc.py files it calls.


import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import secrets
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

logger = logging.getLogger("emloc.serve")


class UsageError(ValueError):
    """A server option cannot be used; the message names it (the command line exits with status 2)."""


# ---------------------------------------------------------------------------------------------------------------------
# Settings, errors, keys
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ServeSettings:
    """What `emloc serve` was started with (plain data: it travels to Ray replicas).

    `memories` maps each served name to a memory directory or Hub repo id: the only names a request can use; nothing
    from a request is ever read as a path.
    """

    model: str
    memories: dict[str, str]
    device: str | None = None
    threads: int | None = None
    memory_cache_mb: float = 2048.0
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_n: int = 8
    max_choices: int = 64
    drain_seconds: float = 30.0


class ApiError(Exception):
    """An answer other than 200, with an OpenAI-style body: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def event(self) -> dict:
        return {"type": "error", "status": self.status, "message": self.message, "param": self.param,
                "code": self.code, "kind": self.kind, "headers": self.headers}

    @classmethod
    def from_event(cls, event: dict) -> "ApiError":
        return cls(event["status"], event["message"], event.get("param"), event.get("code"), event.get("kind", "server_error"),
                   event.get("headers"))


def model_not_found(name: str) -> ApiError:
    """The same answer for a memory that does not exist and one the key may not use: no one learns which exist."""
    return ApiError(404, f"The model `{name}` does not exist or you do not have access to it.", "model", "model_not_found")


def hash_api_key(key: str) -> str:
    """What the keys file stores of a key: its SHA-256 (keys are long random tokens, so a fast hash suffices)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class ApiKeys:
    """The keys file: `{"keys": [{"name": "alice", "sha256": "<hash of the key>", "memories": ["iris", ...] | "*"}]}`.

    Only hashes are stored; `memories` lists the served names a key may use (`"*"`: all of them)."""

    entries: dict[str, dict] = field(default_factory=dict)  # sha256 -> {"name", "memories"}

    @classmethod
    def load(cls, path: str | os.PathLike, served: set[str] | None = None) -> "ApiKeys":
        path = Path(path)
        try:
            records = json.loads(path.read_text()).get("keys")
        except FileNotFoundError:
            raise UsageError(f"--api-keys {path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise UsageError(f"--api-keys {path}: not a keys file ({error})") from None
        if not isinstance(records, list):
            raise UsageError(f'--api-keys {path}: expected {{"keys": [...]}}')
        entries = {}
        for number, record in enumerate(records):
            where = f"--api-keys {path}: keys[{number}]"
            digest = record.get("sha256") if isinstance(record, dict) else None
            if not isinstance(digest, str) or len(digest) != 64:
                raise UsageError(f"{where}: needs 'sha256', the hex SHA-256 of the key")
            memories = record.get("memories")
            if memories != "*" and not (isinstance(memories, list) and all(isinstance(m, str) for m in memories)):
                raise UsageError(f"{where}: 'memories' must be a list of served names or \"*\"")
            unknown = sorted(set(memories) - served) if served is not None and memories != "*" else []
            if unknown:
                raise UsageError(f"{where}: memory {unknown[0]!r} is not served (no --memory {unknown[0]}=...)")
            entries[digest.lower()] = {"name": record.get("name", f"key {number}"), "memories": memories}
        return cls(entries)

    def identify(self, key: str | None) -> dict | None:
        return self.entries.get(hash_api_key(key)) if key else None

    @staticmethod
    def allows(entry: dict | None, memory: str) -> bool:
        return entry is None or entry["memories"] == "*" or memory in entry["memories"]


def add_api_key(path: str | os.PathLike, name: str, memories: list[str] | Literal["*"]) -> str:
    """Adds a new random key to the keys file (created if missing, replaced atomically) and returns it: the only time
    the key is shown."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {"keys": []}
    key = "sk-emloc-" + secrets.token_urlsafe(32)
    data.setdefault("keys", []).append({"name": name, "sha256": hash_api_key(key), "memories": memories})
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    with os.fdopen(handle, "w") as file:
        file.write(json.dumps(data, indent=2) + "\n")
    os.chmod(staging, 0o600)
    os.replace(staging, path)
    return key


# ---------------------------------------------------------------------------------------------------------------------
# Memories, loaded on demand
# ---------------------------------------------------------------------------------------------------------------------


def memory_bytes(memory) -> int:
    """Bytes a memory's tensors take (keys, values, positions, token types, retrieval keys)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in memory.state_dict().values())


class MemoryCache:
    """The served memories, loaded on first use into an LRU cache bounded in bytes.

    A memory loads with `model.load_memory` (the base model's fingerprint checked) and its demonstrations' rendering is
    checked against the processor that will render its queries (`check_rendering`, as `load_memory` does); the model
    keeps it as `serve:NAME` among its memories until it is evicted. Concurrent first requests for one memory
    wait for one load. A load that fails is not cached (the next request tries again)."""

    def __init__(self, model, processor, sources: dict[str, str], budget_bytes: int):
        self.model, self.processor, self.sources, self.budget = model, processor, dict(sources), int(budget_bytes)
        self._entries: collections.OrderedDict[str, tuple[Any, Any, int]] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self._processors: dict[tuple, Any] = {}
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="emloc-memory-loader")
        self.loads: collections.Counter = collections.Counter()

    @property
    def used_bytes(self) -> int:
        return sum(size for _, _, size in self._entries.values())

    def cached(self) -> list[str]:
        return list(self._entries)

    async def get(self, name: str) -> tuple[Any, Any]:
        """`(memory, processor)` for the served name `name` (which the caller has checked is served)."""
        if name in self._entries:
            self._entries.move_to_end(name)
            memory, processor, _ = self._entries[name]
            return memory, processor
        future = self._loading.get(name)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._loading[name] = loop.run_in_executor(self._loader, self._load, name)
            future.add_done_callback(lambda done: self._loaded(name, done))
        memory, processor, _ = await asyncio.shield(future)
        return memory, processor

    def _processor_for(self, rendering: dict):
        """The processor that renders queries as the memory's demonstrations were (template and instruction)."""
        key = (rendering.get("template") or self.processor.template, rendering.get("instruction"))
        if key == (self.processor.template, self.processor.instruction):
            return self.processor
        if key not in self._processors:
            self._processors[key] = type(self.processor)(self.processor.base_processor, template=key[0], instruction=key[1])
        return self._processors[key]

    def _load(self, name: str) -> tuple[Any, Any, int]:
        from memory_emloc import MemoryLoadError, check_rendering

        started, registered = time.perf_counter(), f"serve:{name}"
        memory = self.model.load_memory(self.sources[name], name=registered, activate=False)
        try:
            processor = self._processor_for(memory.stats.get("rendering") or {})
            try:
                check_rendering(memory.stats, processor.rendering())
            except MemoryLoadError as error:
                raise MemoryLoadError(f"{self.sources[name]}: {error}") from None
            size = memory_bytes(memory)
            if size > self.budget:
                raise MemoryLoadError(f"memory {name!r} takes {size / 2**20:.1f} MB, more than the whole memory cache "
                                      f"(--memory-cache-mb {self.budget / 2**20:g})")
            # once on the model's device and dtype, rather than at every batch
            memory = self.model.load_memory(memory.to(device=self.model.device, dtype=self.model.dtype),
                                            name=registered, activate=False)
        except BaseException:
            self.model.delete_memory(registered)
            raise
        self.loads[name] += 1
        logger.info("loaded memory %r (%.1f MB) in %.2f s", name, size / 2**20, time.perf_counter() - started)
        return memory, processor, size

    def _loaded(self, name: str, future: asyncio.Future) -> None:
        """On the event loop, once a load ends: cache it, evicting the least recently used memories until it fits."""
        self._loading.pop(name, None)
        if future.cancelled() or future.exception() is not None:
            if not future.cancelled():
                logger.error("memory %r cannot be loaded: %s", name, future.exception())
            return
        memory, processor, size = future.result()
        while self._entries and self.used_bytes + size > self.budget:
            evicted, _ = self._entries.popitem(last=False)
            self.model.delete_memory(f"serve:{evicted}")
            logger.info("evicted memory %r", evicted)
        self._entries[name] = (memory, processor, size)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------------------------------
# Rows of a batch: each with its own sampling, length, stop strings and cancellation
# ---------------------------------------------------------------------------------------------------------------------


class Ticket:
    """A submitted job as its caller sees it: `async for event in ticket` (events are plain dicts, see `Engine.submit`)
    and `cancel()`, which any thread may call (a row sees it at its next decoding step)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop or asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def emit(self, event: dict) -> None:
        """Thread-safe: queue `event` for the consumer (`None` ends the stream)."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def end(self) -> None:
        self.emit(None)

    def fail(self, error: ApiError) -> None:
        self.emit(error.event())
        self.end()

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        event = await self._events.get()
        if event is None:
            self._events.put_nowait(None)  # stays ended
            raise StopAsyncIteration
        return event


@dataclass
class Row:
    """One sequence to generate: a prompt's `n`-th choice. `index` is its place among the response's choices."""

    index: int
    span: Any  # the query, encoded (`EmlocProcessor.encode_query`)
    memory: Any
    ticket: Ticket
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    top_logprobs: int | None = None
    retrieve: int | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted (kept if the row is retried)
    sent_logprobs: int = 0
    finish_reason: str | None = None

    def restart(self) -> None:
        self.tokens, self.logprobs, self.text, self.finish_reason = [], [], "", None

    def add(self, token: int, tokenizer, logprob: dict | None) -> None:
        """Takes the row's next token: its text, then a stop string or the length may end the row."""
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.stop:  # a stop string may end across tokens: look back as far as the longest one
            at = text.find(stop, max(0, len(self.text) - len(stop)))
            if at >= 0:
                self.text = text[:at]
                self.finish("stop")
                return
        self.text = text
        if len(self.tokens) >= self.max_tokens:
            self.finish("length")
        else:
            self.publish()

    def publish(self) -> None:
        """Emits the text not yet sent, holding back what a stop string could still claim and a broken character."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= max((len(stop) - 1 for stop in self.stop), default=0)
            while end > self.sent and self.text[end - 1] == "\ufffd":  # a character whose bytes are not all decoded
                end -= 1
        if end > self.sent or len(self.logprobs) > self.sent_logprobs:
            self.ticket.emit({"type": "delta", "index": self.index, "text": self.text[self.sent:max(end, self.sent)],
                              "logprobs": self.logprobs[self.sent_logprobs:] if self.top_logprobs is not None else None})
            self.sent, self.sent_logprobs = max(end, self.sent), len(self.logprobs)

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        if reason == "cancelled":
            return
        self.publish()
        self.ticket.emit({"type": "finish", "index": self.index, "reason": reason, "completion_tokens": len(self.tokens)})


def _row_processors(rows: list[Row], tokenizer, eos_token_ids: set[int]):
    """A `LogitsProcessor` and a `StoppingCriteria` for transformers' generation loop that treat each row of the batch
    by its own request: its temperature and top-p (transformers' warpers, applied to its rows), its logprobs, its length,
    stop strings and cancellation."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria, TemperatureLogitsWarper, TopPLogitsWarper

    sampled = collections.defaultdict(list)
    for number, row in enumerate(rows):
        if row.temperature > 0:
            sampled[(row.temperature, row.top_p)].append(number)
    greedy = [number for number, row in enumerate(rows) if row.temperature == 0]

    class RowSampling(LogitsProcessor):
        """Sees the model's scores first (the batch itself asks for no warper): records them for logprobs, then warps
        each sampled row with its own settings and pins each greedy row to its best token."""

        log_probs = None

        def __call__(self, input_ids, scores):
            if any(row.top_logprobs is not None for row in rows):
                self.log_probs = torch.log_softmax(scores.float(), dim=-1)
            if not sampled:
                return scores  # the batch decodes greedily
            scores = scores.clone()
            for (temperature, top_p), numbers in sampled.items():
                index = torch.tensor(numbers, device=scores.device)
                part = TemperatureLogitsWarper(temperature)(input_ids[index], scores[index])
                if top_p < 1:
                    part = TopPLogitsWarper(top_p)(input_ids[index], part)
                scores[index] = part
            if greedy:
                index = torch.tensor(greedy, device=scores.device)
                best = scores[index].argmax(dim=-1, keepdim=True)
                scores[index] = torch.full_like(scores[index], -math.inf).scatter_(1, best, 0.0)
            return scores

    class RowStopping(StoppingCriteria):
        """Per row: takes its new token (text, stop strings, streaming) and says whether it is done."""

        def __call__(self, input_ids, scores, **kwargs):
            last = input_ids[:, -1].tolist()
            for number, row in enumerate(rows):
                if row.finish_reason is not None:
                    continue
                if row.ticket.cancelled:
                    row.finish("cancelled")
                elif last[number] in eos_token_ids:
                    row.finish("stop")
                else:
                    row.add(last[number], tokenizer, self._logprob(number, last[number], row))
            return torch.tensor([row.finish_reason is not None for row in rows], device=input_ids.device)

        @staticmethod
        def _logprob(number: int, token: int, row: Row) -> dict | None:
            if row.top_logprobs is None or sampling.log_probs is None:
                return None
            log_probs = sampling.log_probs[number]
            top = log_probs.topk(row.top_logprobs) if row.top_logprobs else None
            return {"token": tokenizer.decode([token]), "logprob": float(log_probs[token]),
                    "top": [] if top is None else [[tokenizer.decode([i]), float(v)]
                                                   for v, i in zip(top.values.tolist(), top.indices.tolist())]}

    sampling = RowSampling()
    return sampling, RowStopping()


# ---------------------------------------------------------------------------------------------------------------------
# The engine: a micro-batcher over one model
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    key: tuple  # jobs of one key may share a batch
    ticket: Ticket
    rows: list[Row] = field(default_factory=list)  # generation
    score: dict | None = None  # scoring: the job with its "memory" and "processor"
    prompt_tokens: list[int] = field(default_factory=list)
    arrival: float = 0.0
    calibrated: bool = False  # scoring: whether the scores are calibrated (asked, or the memory's recipe)

    @property
    def size(self) -> int:
        return len(self.rows) or 1


class Engine:
    """Answers jobs from one model: memories on demand (`MemoryCache`), requests batched across memories.

    `await submit(job)` returns a `Ticket` whose events are plain dicts: first `{"type": "accepted", "prompt_tokens":
    [...]}` or `{"type": "error", "status", "message", "param", ...}`; then, for generation, `{"type": "delta", "index",
    "text", "logprobs"}` and one `{"type": "finish", "index", "reason", "completion_tokens"}` per row; for scoring, one
    `{"type": "scores", "scores": [...]}`.
    """

    def __init__(self, model, processor, settings: ServeSettings):
        self.model, self.processor, self.settings = model, processor, settings
        self.memories = MemoryCache(model, processor, settings.memories, int(settings.memory_cache_mb * 2**20))
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._pending: collections.deque[_Job] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="emloc-batch")
        self._closing = False
        self.running_rows = 0  # rows of the batch on the worker now
        # batches, rows, mixed_batches, largest_batch, score_batches, cancelled_rows (and their cancelled_tokens),
        # retried_batches, failed_jobs
        self.stats = collections.Counter()

    # -- admission ------------------------------------------------------------------------------------------------------

    def waiting_rows(self) -> int:
        return sum(job.size for job in self._pending if not job.ticket.cancelled)

    def _admit(self, size: int) -> None:
        if self._closing:
            raise ApiError(503, "the server is shutting down", kind="server_error", headers={"Retry-After": "5"})
        if self.waiting_rows() + size > self.settings.max_queue:
            raise ApiError(429, f"the server is busy: {self.waiting_rows()} rows are waiting (--max-queue "
                                f"{self.settings.max_queue}); retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error", headers={"Retry-After": "1"})

    async def submit(self, job: dict, memory: tuple | None = None) -> Ticket:
        """Queues a job (see `create_app` for its fields); `memory`, when given, is the `(memory, processor)` to use
        (Ray replicas load it through `serve.multiplexed`)."""
        ticket = Ticket()
        try:
            self._start()
            size = len(job.get("queries", [None])) * job.get("n", 1)
            self._admit(size)
            if memory is None:
                memory = await self._memory(job["model"])
            queued = self._job(job, ticket, *memory)
            self._admit(size)  # again: others may have queued while the memory loaded
        except ApiError as error:
            ticket.fail(error)
            return ticket
        ticket.emit({"type": "accepted", "prompt_tokens": queued.prompt_tokens, "calibrated": queued.calibrated})
        queued.arrival = asyncio.get_running_loop().time()
        self._pending.append(queued)
        self._wakeup.set()
        return ticket

    async def _memory(self, name: str) -> tuple:
        try:
            return await self.memories.get(name)
        except Exception:  # the reason is logged by the cache: paths and fingerprints are the operator's business
            raise ApiError(503, f"memory {name!r} cannot be loaded now (the server's log says why)", "model",
                           kind="server_error") from None

    def _encode(self, processor, query: dict, param: str):
        from processing_emloc import load_examples

        try:
            span = processor.encode_query(load_examples([query], require_answer=False)[0])
        except ValueError as error:
            raise ApiError(400, f"{param}: {error}", param) from None
        if len(span) > self.settings.max_prompt_tokens:
            raise ApiError(400, f"{param}: {len(span)} tokens, more than this server takes "
                                f"({self.settings.max_prompt_tokens}, --max-prompt-tokens)", param, "context_length_exceeded")
        return span

    def _job(self, job: dict, ticket: Ticket, memory, processor) -> _Job:
        from certificate_emloc import Recipe

        retrieve = job.get("retrieve")
        if retrieve is not None and memory.retrieval is None:
            raise ApiError(400, f"retrieve: memory {job['model']!r} has no retrieval index", "retrieve")
        if retrieve is None and job.get("calibrate") is None:  # asked as the memory's certificate chose
            recipe = Recipe.parse((memory.stats.get("certificate") or {}).get("recipe") or "scored")
            retrieve = recipe.retrieve
            job = dict(job, retrieve=retrieve, calibrate=recipe.calibrate if job["kind"] == "score" else None)
        param = job.get("param", "prompt")
        if job["kind"] == "score":
            span = self._encode(processor, job["query"], param)
            if job.get("calibrate"):
                priors = (memory.stats.get("calibration") or {}).get("priors", [])
                if not any(entry["choices"] == job["choices"] for entry in priors):
                    raise ApiError(400, f"calibrate: memory {job['model']!r} records no label prior for these choices",
                                   "calibrate")
            queued = _Job(("score", job["model"], retrieve, bool(job.get("calibrate"))), ticket,
                          score=dict(job, memory=memory, processor=processor), calibrated=bool(job.get("calibrate")))
            queued.prompt_tokens = [len(span)]
            return queued
        spans = [self._encode(processor, query, param) for query in job["queries"]]
        # retrieval gives each row its own view of one memory: such rows share a batch with their memory's only
        key = ("generate", retrieve, job["model"] if retrieve is not None else None)
        queued = _Job(key, ticket)
        for number, span in enumerate(spans):
            for copy_number in range(job.get("n", 1)):
                queued.rows.append(Row(
                    index=number * job.get("n", 1) + copy_number, span=span, memory=memory, ticket=ticket,
                    max_tokens=job["max_tokens"], temperature=job.get("temperature", 1.0), top_p=job.get("top_p", 1.0),
                    stop=tuple(job.get("stop") or ()), top_logprobs=job.get("logprobs"), retrieve=retrieve))
        queued.prompt_tokens = [len(span) for span in spans]
        return queued

    # -- batching ---------------------------------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._batcher is None:
            self._wakeup = asyncio.Event()
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self.settings.batch_wait_ms / 1000
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._pending[0]
            # wait for company: until the batch is full or the oldest request has waited long enough
            while self._rows_for(first.key) < self.settings.max_batch_size and not self._closing:
                remaining = first.arrival + wait - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take(first.key)
            if batch:
                self.running_rows = sum(job.size for job in batch)
                try:
                    await loop.run_in_executor(self._worker, self._run, batch)
                finally:
                    self.running_rows = 0

    def _rows_for(self, key: tuple) -> int:
        return sum(job.size for job in self._pending if job.key == key)

    def _take(self, key: tuple) -> list[_Job]:
        """The oldest waiting jobs of `key`, up to a batch (whole requests: the first is taken whatever its size);
        cancelled jobs leave the queue unanswered."""
        batch, rows, kept = [], 0, collections.deque()
        while self._pending:
            job = self._pending.popleft()
            if job.ticket.cancelled:
                self.stats["cancelled_rows"] += job.size
                continue
            if job.key == key and (not batch or rows + job.size <= self.settings.max_batch_size):
                batch.append(job)
                rows += job.size
            else:
                kept.append(job)
        self._pending = kept
        return batch

    def _run(self, jobs: list[_Job]) -> None:
        """On the worker thread: answers a batch; if it fails, each request alone, so only a failing one fails."""
        try:
            if jobs[0].score is not None:
                self._score(jobs)
            else:
                self._generate([row for job in jobs for row in job.rows if row.finish_reason is None])
                for job in jobs:
                    job.ticket.end()
        except Exception as error:  # noqa: BLE001 - a request's failure is answered, the server goes on
            if len(jobs) > 1:
                self.stats["retried_batches"] += 1
                logger.warning("a batch of %d requests failed (%s: %s); answering them one at a time",
                               len(jobs), type(error).__name__, error)
                for job in jobs:
                    self._run([job])
                return
            logger.exception("request failed")
            self.stats["failed_jobs"] += 1
            jobs[0].ticket.fail(ApiError(500, f"the server could not answer this request ({type(error).__name__})",
                                         kind="server_error"))

    def _generate(self, rows: list[Row]) -> None:
        if not rows:
            return
        for row in rows:
            row.restart()
        memories = [row.memory for row in rows]
        same = all(memory is memories[0] for memory in memories)
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["mixed_batches"] += 0 if same else 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        batch = self.processor.collate([row.span for row in rows])  # left-padded
        sampling, stopping = _row_processors(rows, self.processor.tokenizer, self.eos_token_ids)
        config = copy.deepcopy(self.model.generation_config)
        # the batch asks for no warper of its own: `RowSampling` warps each row as its request asked
        config.update(max_new_tokens=max(row.max_tokens for row in rows), do_sample=any(r.temperature > 0 for r in rows),
                      temperature=1.0, top_p=1.0, top_k=None, num_beams=1, num_return_sequences=1)
        self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            memory=memories[0] if same else memories, retrieve=rows[0].retrieve,
                            generation_config=config, logits_processor=[sampling], stopping_criteria=[stopping])
        for row in rows:  # transformers stopped at the batch's max_new_tokens: every row is done by then
            if row.finish_reason is None:
                row.finish("length")
            if row.finish_reason == "cancelled":
                self.stats["cancelled_rows"] += 1
                self.stats["cancelled_tokens"] += len(row.tokens)

    def _score(self, jobs: list[_Job]) -> None:
        first = jobs[0].score
        queries = [dict(job.score["query"], choices=job.score["choices"]) for job in jobs]
        self.stats["score_batches"] += 1
        scores = self.model.score_choices(queries, memory=first["memory"], processor=first["processor"],
                                          retrieve=first.get("retrieve"), calibrate=bool(first.get("calibrate")),
                                          batch_size=len(queries))
        for job, row in zip(jobs, scores):
            job.ticket.emit({"type": "scores", "scores": row})
            job.ticket.end()

    async def close(self) -> None:
        """Answers every request already queued, then stops."""
        self._closing = True
        if self._batcher is not None:
            self._wakeup.set()
            await self._batcher
        self._worker.shutdown(wait=True)
        self.memories.close()


def load_engine(settings: ServeSettings) -> Engine:
    """The model (an Emloc repo, or a base model wrapped with `from_base`), its processor and an `Engine` over them."""
    from emloc_cli import _load_model

    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    model, processor = _load_model(settings.model, device=settings.device)
    return Engine(model, processor, settings)


# ---------------------------------------------------------------------------------------------------------------------
# Requests (OpenAI's fields, validated) -> jobs
# ---------------------------------------------------------------------------------------------------------------------


def _request_models():
    """The pydantic models of the three requests (built on first use: pydantic is imported with FastAPI)."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: str
        content: str | list[dict] | None = None

    class Common(BaseModel):
        model_config = ConfigDict(extra="ignore")  # fields no one reads (`user`, `metadata`, ...) are let through
        model: str
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        n: int | None = Field(None, ge=1)
        stop: str | list[str] | None = None
        stream: bool | None = False
        stream_options: StreamOptions | None = None
        retrieve: int | None = Field(None, ge=1)  # emloc: attend to the memory's `retrieve` nearest demonstrations
        # fields that would change the answer and that this server does not honour: refused rather than ignored
        presence_penalty: float | None = None
        frequency_penalty: float | None = None
        logit_bias: dict | None = None
        seed: int | None = None
        tools: list | None = None
        functions: list | None = None
        response_format: dict | None = None

        @field_validator("stop")
        @classmethod
        def _stops(cls, value):
            stops = [value] if isinstance(value, str) else value or []
            if len(stops) > 4 or any(not stop for stop in stops):
                raise ValueError("up to 4 non-empty strings")
            return stops

        @field_validator("presence_penalty", "frequency_penalty")
        @classmethod
        def _no_penalty(cls, value):
            if value not in (None, 0):
                raise ValueError("not supported by this server (leave it 0)")
            return value

        @field_validator("logit_bias", "seed", "tools", "functions", "response_format")
        @classmethod
        def _unsupported(cls, value):
            if value not in (None, {}, []):
                raise ValueError("not supported by this server")
            return value

    class Completion(Common):
        prompt: str | list[str]
        logprobs: int | None = Field(None, ge=0, le=5)
        echo: bool | None = False
        suffix: str | None = None
        best_of: int | None = None

        @field_validator("prompt")
        @classmethod
        def _prompts(cls, value):
            if isinstance(value, list) and not value:
                raise ValueError("at least one prompt")
            return value

        @field_validator("echo", "suffix")
        @classmethod
        def _off(cls, value):
            if value:
                raise ValueError("not supported by this server")
            return value

        @field_validator("best_of")
        @classmethod
        def _one(cls, value):
            if value not in (None, 1):
                raise ValueError("not supported by this server")
            return value

    class Chat(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool | None = False
        top_logprobs: int | None = Field(None, ge=0, le=5)

    class Score(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        prompt: str | None = None
        messages: list[Message] | None = None
        choices: list[str] = Field(min_length=1)
        retrieve: int | None = Field(None, ge=1)
        calibrate: bool | None = None  # None: as the memory's certificate chose

    return Completion, Chat, Score


def _chat_query(messages) -> dict:
    """The chat's messages as a query: one user message (text parts); a memory holds the demonstrations and the
    template's system turn, so there is no other turn to give."""
    if len(messages) != 1 or messages[0].role != "user":
        raise ApiError(400, "messages: send exactly one user message; the memory holds the demonstrations (and the "
                            "template's system turn), and a query is one user turn", "messages")
    content = messages[0].content
    if isinstance(content, list):
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages: content part of type {part.get('type')!r} is not served (text only)",
                               "messages")
    if not content:
        raise ApiError(400, "messages: the user message is empty", "messages")
    return {"messages": [{"role": "user", "content": content}]}


def _generation_job(request, settings: ServeSettings, chat: bool) -> dict:
    if chat:
        queries, param = [_chat_query(request.messages)], "messages"
        max_tokens = request.max_completion_tokens or request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        default_tokens = settings.max_tokens
    else:
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        queries, param = [{"question": prompt} for prompt in prompts], "prompt"
        max_tokens, logprobs, default_tokens = request.max_tokens, request.logprobs, min(16, settings.max_tokens)
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise ApiError(400, f"max_tokens: {max_tokens} is more than this server gives ({settings.max_tokens})",
                       "max_completion_tokens" if chat and request.max_completion_tokens else "max_tokens")
    n = request.n or 1
    if n > settings.max_n:
        raise ApiError(400, f"n: {n} is more than this server gives ({settings.max_n})", "n")
    if len(queries) * n > settings.max_n:
        raise ApiError(400, f"prompt: {len(queries)} prompts × n={n} is more than {settings.max_n} answers", "prompt")
    return {"kind": "generate", "model": request.model, "queries": queries, "param": param, "n": n,
            "max_tokens": max_tokens or default_tokens,
            "temperature": 1.0 if request.temperature is None else request.temperature,
            "top_p": 1.0 if request.top_p is None else request.top_p,
            "stop": request.stop or [], "logprobs": logprobs, "retrieve": request.retrieve, "stream": bool(request.stream),
            "include_usage": bool(request.stream_options and request.stream_options.include_usage)}


def _score_job(request, settings: ServeSettings) -> dict:
    if (request.prompt is None) == (request.messages is None):
        raise ApiError(400, "prompt: give either 'prompt' or 'messages'", "prompt")
    if len(request.choices) > settings.max_choices or any(not choice for choice in request.choices):
        raise ApiError(400, f"choices: 1 to {settings.max_choices} non-empty strings", "choices")
    query = {"question": request.prompt} if request.prompt is not None else _chat_query(request.messages)
    return {"kind": "score", "model": request.model, "query": query, "choices": list(request.choices),
            "param": "prompt" if request.prompt is not None else "messages", "retrieve": request.retrieve,
            "calibrate": request.calibrate}


# ---------------------------------------------------------------------------------------------------------------------
# Responses in OpenAI's shapes
# ---------------------------------------------------------------------------------------------------------------------


class _Answer:
    """Turns a generation job's events into OpenAI completion / chat completion objects and stream chunks."""

    def __init__(self, job: dict, chat: bool, prompt_tokens: list[int]):
        self.chat, self.model = chat, job["model"]
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.rows = len(job["queries"]) * job["n"]
        self.prompt_tokens = sum(prompt_tokens)
        self.texts = [""] * self.rows
        self.logprobs: list[list[dict] | None] = [None] * self.rows
        self.finish: list[str | None] = [None] * self.rows
        self.completion_tokens = 0
        self.started: set[int] = set()

    def take(self, event: dict) -> None:
        index = event["index"]
        if event["type"] == "delta":
            self.texts[index] += event["text"]
            if event.get("logprobs") is not None:
                self.logprobs[index] = (self.logprobs[index] or []) + event["logprobs"]
        elif event["type"] == "finish":
            self.finish[index] = event["reason"]
            self.completion_tokens += event["completion_tokens"]

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _logprobs(self, entries: list[dict] | None, offset: int = 0):
        if entries is None:
            return None
        if self.chat:
            def item(token, logprob):
                return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

            return {"content": [dict(item(e["token"], e["logprob"]), top_logprobs=[item(t, v) for t, v in e["top"]])
                                for e in entries]}
        offsets, at = [], offset
        for entry in entries:
            offsets.append(at)
            at += len(entry["token"])
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}

    def response(self) -> dict:
        choices = []
        for index in range(self.rows):
            choice = {"index": index, "logprobs": self._logprobs(self.logprobs[index]), "finish_reason": self.finish[index]}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": self.texts[index]}
            else:
                choice["text"] = self.texts[index]
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": None, "choices": choices, "usage": self.usage()}

    def chunk(self, event: dict) -> dict:
        """One stream chunk for a delta or finish event."""
        index = event["index"]
        finish = event["reason"] if event["type"] == "finish" else None
        text = event.get("text", "")
        choice = {"index": index, "logprobs": None, "finish_reason": finish}
        if event.get("logprobs"):
            choice["logprobs"] = self._logprobs(event["logprobs"], offset=len(self.texts[index]) - len(text))
        if self.chat:
            delta = {} if finish else {"content": text}
            if index not in self.started:
                delta["role"] = "assistant"
                self.started.add(index)
            choice["delta"] = delta
        else:
            choice["text"] = text
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": None, "choices": [choice]}

    def usage_chunk(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}


# ---------------------------------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------------------------------


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before the application sees it, whether its size
    is declared (Content-Length) or not (chunked). The body, at most `limit` bytes, is read here and handed on."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = _error_response(ApiError(413, f"the request body is larger than this server takes ({self.limit} "
                                                  f"bytes)", "body", "request_too_large"))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the application see it
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], receive):
    """An ASGI `receive` that gives `messages` first, then reads on (a disconnect, later)."""
    messages = list(messages)

    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


def _error_response(error: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class LocalBackend:
    """The `Engine` in this process, started and drained with the application."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def submit(self, job: dict) -> Ticket:
        return await self.engine.submit(job)

    async def close(self) -> None:
        await self.engine.close()


def create_app(backend, settings: ServeSettings, keys: ApiKeys | None = None):
    """The FastAPI application: OpenAI's `/v1/models`, `/v1/completions`, `/v1/chat/completions`, and `/v1/score`.

    `backend.submit(job) -> Ticket` answers jobs (`LocalBackend`, or Ray replicas); `keys` (None: no key needed)
    says which served memories each API key may use. Every check happens here, in this order: the key (401), the body
    (413, then 400 naming the field), the memory (404, the same for unknown and forbidden), then the backend's own
    (400 for a prompt too long, 429 with `Retry-After` when the queue is full).
    """
    import contextlib

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError

    Completion, Chat, Score = _request_models()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await backend.close()  # after uvicorn has let the requests in flight finish
        logger.info("drained: every request in flight was answered")

    app = FastAPI(title="emloc serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return _error_response(error)

    def authorize(request: Request) -> dict | None:
        if keys is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        entry = keys.identify(key.strip()) if scheme.lower() == "bearer" else None
        if entry is None:
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return entry

    def memory_name(name: str, entry: dict | None) -> str:
        if name not in settings.memories or not ApiKeys.allows(entry, name):
            raise model_not_found(name)
        return name

    async def parse(request: Request, model):
        body = await request.body()
        try:
            return model.model_validate_json(body)
        except ValidationError as error:
            first = error.errors()[0]
            if first["type"] == "json_invalid":
                raise ApiError(400, "the body is not valid JSON", None) from None
            where = [str(part) for part in first["loc"] if not isinstance(part, int)]
            param = where[0] if where else None
            raise ApiError(400, f"{'.'.join(where) or 'body'}: {first['msg']}", param) from None

    def listed(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "emloc"}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        entry = authorize(request)
        return {"object": "list", "data": [listed(name) for name in settings.memories if ApiKeys.allows(entry, name)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        return listed(memory_name(name, authorize(request)))

    async def answer(request: Request, job: dict, chat: bool):
        ticket = await backend.submit(job)
        first = await ticket.__anext__()
        if first["type"] == "error":
            raise ApiError.from_event(first)
        formatter = _Answer(job, chat, first["prompt_tokens"])
        if job["stream"]:
            return StreamingResponse(_stream(ticket, formatter, job["include_usage"]), media_type="text/event-stream",
                                     headers=_replica_header(first))
        async for event in _until_disconnected(request, ticket):
            if event["type"] == "error":
                raise ApiError.from_event(event)
            formatter.take(event)
        return JSONResponse(formatter.response(), headers=_replica_header(first))

    async def admitted(request: Request, schema):
        """The request's body, once its key, its fields and its memory have passed (401, 413/400, 404 otherwise)."""
        entry = authorize(request)
        body = await parse(request, schema)
        memory_name(body.model, entry)
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await admitted(request, Completion)
        return await answer(request, _generation_job(body, settings, chat=False), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await admitted(request, Chat)
        return await answer(request, _generation_job(body, settings, chat=True), chat=True)

    @app.post("/v1/score")
    async def score(request: Request):
        body = await admitted(request, Score)
        job = _score_job(body, settings)
        ticket = await backend.submit(job)
        accepted = await ticket.__anext__()
        if accepted["type"] == "error":
            raise ApiError.from_event(accepted)
        result = None
        async for event in _until_disconnected(request, ticket):
            if event["type"] == "error":
                raise ApiError.from_event(event)
            result = event["scores"]
        ranked = sorted(range(len(result)), key=lambda i: -result[i])
        return JSONResponse({
            "id": "score-" + uuid.uuid4().hex, "object": "score", "created": int(time.time()), "model": job["model"],
            "choices": [{"index": i, "text": job["choices"][i], "logprob": result[i]} for i in range(len(result))],
            "best": job["choices"][ranked[0]], "calibrated": bool(accepted.get("calibrated")),
            "usage": {"prompt_tokens": sum(accepted["prompt_tokens"]), "total_tokens": sum(accepted["prompt_tokens"])},
        }, headers=_replica_header(accepted))

    return _BodyLimit(app, settings.max_body_bytes)


def _replica_header(accepted: dict) -> dict:
    return {"x-emloc-replica": accepted["replica"]} if accepted.get("replica") else {}


async def _until_disconnected(request, ticket: Ticket) -> AsyncIterator[dict]:
    """The ticket's events; a client that goes away cancels the ticket (its rows stop at their next step)."""

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        ticket.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for event in ticket:
            yield event
    finally:
        watcher.cancel()


async def _stream(ticket: Ticket, formatter: _Answer, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per delta and per finish, then `[DONE]`. A client that disconnects cancels the
    ticket (the generator is closed or cancelled; `cancel` needs no await)."""
    try:
        async for event in ticket:
            if event["type"] == "error":
                yield f"data: {json.dumps(ApiError.from_event(event).body())}\n\n"
                return
            formatter.take(event)
            if event["type"] == "delta" and not event["text"] and not event.get("logprobs"):
                continue
            yield f"data: {json.dumps(formatter.chunk(event))}\n\n"
        if include_usage:
            yield f"data: {json.dumps(formatter.usage_chunk())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """Serves `app` with uvicorn on a background thread (a notebook, a test, a benchmark) and yields its base URL
    (`http://host:port/v1`; port 0 takes a free one); on exit, stops it as SIGTERM would (requests in flight finish)."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="emloc-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout)


# ---------------------------------------------------------------------------------------------------------------------
# Ray Serve: the same application as the ingress, the model in replicas, memories multiplexed
# ---------------------------------------------------------------------------------------------------------------------


class RayBackend:
    """Jobs go to the replica deployment through a handle; `multiplexed_model_id` (the memory's name) routes each to a
    replica that already holds its memory."""

    def __init__(self, handle):
        self.handle = handle

    async def submit(self, job: dict) -> Ticket:
        ticket = Ticket()
        response = self.handle.options(stream=True, multiplexed_model_id=job["model"]).run.remote(job)

        async def relay():
            try:
                async for event in response:
                    if ticket.cancelled:
                        break
                    ticket.emit(event)
            except Exception as error:  # noqa: BLE001 - a replica that died answers as a server error
                logger.error("replica call failed: %s", error)
                ticket.emit(ApiError(503, "the replica answering this request failed", kind="server_error").event())
            finally:
                if ticket.cancelled:
                    response.cancel()
                ticket.end()

        asyncio.get_running_loop().create_task(relay())
        return ticket

    async def close(self) -> None:
        pass


def ray_application(settings: ServeSettings, keys: ApiKeys | None, replicas: int = 1, replica_cpus: float = 1.0,
                    replica_gpus: float = 0.0, memories_per_replica: int = 8):
    """The Ray Serve application: an ingress deployment running `create_app` over a `RayBackend`, and `replicas`
    replicas of the model, each with an `Engine` whose memories load through `serve.multiplexed`."""
    from ray import serve

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus})
    class EmlocReplica:
        def __init__(self, settings: ServeSettings):
            self.engine = load_engine(settings)
            self.name = serve.get_replica_context().replica_id.unique_id

        @serve.multiplexed(max_num_models_per_replica=memories_per_replica)
        async def memory(self, name: str):
            return await self.engine.memories.get(name)

        async def run(self, job: dict):
            try:
                memory = await self.memory(serve.get_multiplexed_model_id())
            except Exception:  # noqa: BLE001 - the cache logged why
                yield ApiError(503, f"memory {job['model']!r} cannot be loaded now (the server's log says why)", "model",
                               kind="server_error").event()
                return
            ticket = await self.engine.submit(job, memory=memory)
            try:
                async for event in ticket:
                    if event["type"] == "accepted":
                        event = dict(event, replica=self.name)
                    yield event
            finally:
                ticket.cancel()

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class EmlocIngress:
        def __init__(self, replica, settings: ServeSettings, keys: ApiKeys | None):
            self.backend, self.settings, self.keys = RayBackend(replica), settings, keys

        def __serve_build_asgi_app__(self):
            return create_app(self.backend, self.settings, self.keys)

    return EmlocIngress.bind(EmlocReplica.bind(settings), settings, keys)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    defaults = ServeSettings(model="", memories={})
    parser = argparse.ArgumentParser(prog="emloc serve", description=__doc__.split("\n\n")[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="REPO", help="the Emloc repo (or base model) the memories were built with")
    parser.add_argument("--memory", action="append", default=[], metavar="NAME=DIR_OR_HUB_ID",
                        help="serve a memory under NAME (a request's `model`); repeat for several")
    parser.add_argument("--api-keys", metavar="FILE", help="keys file (hashed keys and the memories each may use); "
                                                           "without it, no key is needed")
    parser.add_argument("--add-key", metavar="NAME=MEMORY[,MEMORY]", help="add a new key to --api-keys for these "
                        "memories (* for all), print it once and exit")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", help="where the model runs (cuda, cpu, ...; default: where it loads)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--memory-cache-mb", type=float, default=defaults.memory_cache_mb,
                        help="bytes of memories kept loaded (least recently used evicted first)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size, help="rows per forward pass "
                        "(1: no batching)")
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                        help="how long the oldest waiting request waits for others to share its batch")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, help="rows waiting before requests get 429")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="the most max_tokens a request gets")
    parser.add_argument("--max-n", type=int, default=defaults.max_n, help="the most answers (prompts × n) per request")
    parser.add_argument("--drain-seconds", type=float, default=defaults.drain_seconds,
                        help="on SIGTERM, how long requests in flight may take to finish")
    parser.add_argument("--ray", action="store_true", help="deploy on Ray Serve (pip install 'emloc[ray]')")
    parser.add_argument("--ray-address", default=None, help="the Ray cluster to join (default: start a local one)")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas (with --ray)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (with --ray)")
    parser.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica (with --ray)")
    parser.add_argument("--memories-per-replica", type=int, default=8,
                        help="memories a replica keeps for routing (serve.multiplexed; with --ray)")
    return parser


def _settings(args) -> ServeSettings:
    from memory_emloc import hub_name

    if not args.model:
        raise UsageError("--model: give the Emloc repo (or base model) the memories were built with")
    if not args.memory:
        raise UsageError("--memory NAME=DIR_OR_HUB_ID: give at least one memory to serve")
    memories = {}
    for spec in args.memory:
        name, equals, source = spec.partition("=")
        if not equals or not name or not source:
            raise UsageError(f"--memory {spec}: expected NAME=DIR_OR_HUB_ID")
        if name in memories:
            raise UsageError(f"--memory {spec}: the name {name!r} is served twice")
        if not Path(source).is_dir() and hub_name(source) is None:
            raise UsageError(f"--memory {spec}: {source} is neither a directory nor a Hub repo id")
        memories[name] = source
    for option in ("max_batch_size", "max_queue", "max_body_bytes", "max_prompt_tokens", "max_tokens", "max_n", "replicas"):
        if getattr(args, option) < 1:
            raise UsageError(f"--{option.replace('_', '-')}: must be at least 1")
    return ServeSettings(model=args.model, memories=memories, device=args.device, threads=args.threads,
                         memory_cache_mb=args.memory_cache_mb, max_batch_size=args.max_batch_size,
                         batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                         max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_n=args.max_n,
                         drain_seconds=args.drain_seconds)


def main(argv: list[str] | None = None) -> int:
    """`emloc serve`: parses the options, then serves until SIGTERM or Ctrl-C."""
    args = _parser().parse_args(argv)
    if args.add_key:
        if not args.api_keys:
            raise UsageError("--add-key: give the keys file with --api-keys FILE")
        name, _, listed = args.add_key.partition("=")
        memories = "*" if listed.strip() == "*" else [m.strip() for m in listed.split(",") if m.strip()]
        if not name or not memories:
            raise UsageError(f"--add-key {args.add_key}: expected NAME=MEMORY[,MEMORY...] (or NAME=*)")
        print(add_api_key(args.api_keys, name, memories))
        return 0
    settings = _settings(args)
    keys = ApiKeys.load(args.api_keys, set(settings.memories)) if args.api_keys else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if keys is None:
        logger.warning("no --api-keys: every memory is served to anyone who can reach %s:%d", args.host, args.port)
    if args.ray:
        return _serve_on_ray(settings, keys, args)
    import uvicorn

    app = create_app(LocalBackend(load_engine(settings)), settings, keys)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=settings.drain_seconds,
                log_level="info")
    return 0


def _serve_on_ray(settings: ServeSettings, keys: ApiKeys | None, args) -> int:
    """Deploys on Ray Serve and blocks until SIGTERM or Ctrl-C, then shuts the deployment down (Serve lets each
    replica finish the requests it holds first)."""
    import signal

    try:
        import ray
        from ray import serve
    except ImportError:
        raise UsageError("--ray: Ray Serve is not installed (pip install 'emloc[ray]')") from None

    class Stopped(Exception):
        pass

    def stop(*_):
        raise Stopped

    ray.init(address=args.ray_address, ignore_reinit_error=True)
    for number in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets its own; before the deployment waits
        signal.signal(number, stop)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(ray_application(settings, keys, replicas=args.replicas, replica_cpus=args.replica_cpus,
                                  replica_gpus=args.replica_gpus, memories_per_replica=args.memories_per_replica),
                  name="emloc", route_prefix="/")
        logger.info("serving on http://%s:%d (Ray Serve, %d replicas)", args.host, args.port, args.replicas)
        while True:
            time.sleep(3600)
    except Stopped:
        logger.info("stopping: Ray Serve lets the replicas finish their requests")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except UsageError as error:
        print(f"emloc serve: error: {error}", file=sys.stderr)
        sys.exit(2)
