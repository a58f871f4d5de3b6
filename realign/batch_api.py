"""The Batch API mode of reformat.py (``--batch_api``): the same requests, sent as batches.

OpenAI's Batch API answers within 24 hours at half the online price, from a rate-limit
pool of its own: the mode for tens of thousands of records and more. reformat.py chooses
the mode; the records, prompts, sampling, parsing, the choice of candidate, the batch-file
lines and their fingerprints, the cache and the model check are the online mode's, reached
through the same ``reformat.Run``. A chunk's life:

1. **Request files.** The records still to rewrite (no standing line in the batch file, no
   usable reply in the cache, not in a batch already recorded) are written to
   ``<output_directory>/batches_{i}_of_{N}/requests_0001.jsonl``, ... of at most
   ``--batch_max_requests`` lines and ``--batch_max_bytes`` bytes. A line is
   ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``; the body is
   the request the online mode would send (the client's :class:`~realign.client.Adapter`
   names its fields), so the reply is cached under the online request's key. Before the
   first file, records are asked online until one succeeds (one request, normally): the
   parameters the model refuses (a reasoning model's ``temperature``, ...) are then learned
   before thousands of lines are sent the wrong way.
2. **Upload and create**, each recorded the moment it returns in
   ``<output_directory>/batches_{i}_of_{N}.json`` (written atomically): the request file,
   its sha256, the file id, the batch id, status, request counts, rounds. A transient
   failure (5xx, 429, timeout, connection) is retried with backoff up to ``--max_retries``
   times; before each retry, and on a rerun after a crash between a call and its record,
   the server's list is searched (the upload by its name, the batch by its input file), so
   that a call the server did carry out is adopted, never made twice.
3. **Poll** every ``--poll_interval`` seconds (a progress bar of the request counts);
   once a batch is completed, expired, cancelled or failed, its output and error files are
   downloaded and joined to the records by ``custom_id`` (order is not kept; a custom id
   holds the record id and the line's fingerprint, so a reply made with other settings
   never stands for a record). Each line is appended to the batch file as online.
4. **Resubmission.** A line in the error file, or a reply without a usable candidate, is
   sent again in a new round, up to ``--max_retries`` errors and ``--max_parse_retries``
   unusable replies as online; then it is written as a failed record. With
   ``--batch_fallback_online`` the last try goes online instead. The completed lines of an
   expired or cancelled batch are kept; only the rest is sent again.

A rerun after a kill at any moment picks up the record file: request files not yet
uploaded are uploaded, uploads not yet in a batch are put in one, running batches are
polled, finished ones downloaded again (lines already in the batch file are not written
twice). ``--batch_cancel`` cancels the chunk's running batches; the next run keeps what
they answered and sends the rest again. The API key is in no file written here.
"""

import asyncio
import collections
import hashlib
import json
import logging
import os
import re
import time

from realign.cli import FatalError, progress_bar
from realign.client import CHAT, Adapter, Client, Refusal, merge_replies
from realign.pool import Stopped, run_pool, sleep_unless_stopped
from realign.pricing import Spend, price_of_run
from realign.records import InputError, write_json_atomic
from realign.retry import is_transient_status, parse_retry_after_ms, retry_delay

logger = logging.getLogger(__name__)

RECORD_FILE = "batches_{batch_id}_of_{batch_num}.json"
REQUESTS_FOLDER = "batches_{batch_id}_of_{batch_num}"
ENDPOINT = "/v1/chat/completions"
COMPLETION_WINDOW = "24h"
DEFAULT_MAX_REQUESTS = 50_000  # OpenAI's limit of lines per batch
DEFAULT_MAX_BYTES = 200_000_000  # OpenAI's limit of a batch input file (200 MB)
DEFAULT_POLL_INTERVAL = 60.0
TERMINAL = ("completed", "expired", "cancelled", "failed")
LIST_PAGE = 100  # batches or files per page when looking for one to adopt
ADOPT_MARGIN_S = 3600  # a clock difference between this machine and the server
ID_VALUE_CHARS = 32  # a longer id goes into a custom_id as its hash (OpenAI allows 64 characters)
SHOWN_ERRORS = 3
TOKEN_LIMIT = "token_limit_exceeded"  # a batch failed for the organization's enqueued-token limit
CUSTOM_ID_RE = re.compile(r"(?P<base>.*@[0-9a-f]{24})(?:#(?P<part>\d+))?")


# -- pure functions ------------------------------------------------------------------


def record_path(output_directory, batch_id, batch_num):
    return os.path.join(output_directory, RECORD_FILE.format(batch_id=batch_id, batch_num=batch_num))


def custom_id(record_id, fp):
    """The ``custom_id`` of a record's request: its id (``i:17`` for the int 17, ``s:17`` for
    the string "17"; an id longer than 32 characters by its hash, ``h:...``) and the line's
    fingerprint, so a reply made with other settings never stands for the record."""
    kind, value = ("i", str(record_id)) if isinstance(record_id, int) else ("s", str(record_id))
    if len(value) > ID_VALUE_CHARS:
        kind = "h"
        value = hashlib.sha256(json.dumps([record_id]).encode("utf-8")).hexdigest()[:ID_VALUE_CHARS]
    return f"{kind}:{value}@{fp}"


def part_id(base, part, parts):
    """The custom id of one of a record's requests (several when the server refuses ``n`` > 1)."""
    return base if parts == 1 else f"{base}#{part}"


def base_of(cid):
    """The record's custom id of a request's custom id (the part number taken off)."""
    match = CUSTOM_ID_RE.fullmatch(cid) if isinstance(cid, str) else None
    return match.group("base") if match else cid


def request_line(cid, body):
    """One line of a request file, as bytes."""
    line = {"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": body}
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def line_error(line):
    """``(HTTP status or None, {"code", "message", ...})`` of a failed line of a result file."""
    response = line.get("response") if isinstance(line.get("response"), dict) else {}
    error = line.get("error") if isinstance(line.get("error"), dict) else None
    if error is None:
        body = response.get("body") if isinstance(response.get("body"), dict) else {}
        error = body.get("error") if isinstance(body.get("error"), dict) else body
    return response.get("status_code"), error or {}


def line_reply(line):
    """The reply (a chat completion) of an answered line, or None."""
    response = line.get("response") if isinstance(line.get("response"), dict) else {}
    body = response.get("body")
    if response.get("status_code") == 200 and isinstance(body, dict) and isinstance(body.get("choices"), list):
        return body
    return None


def describe_problem(status, error):
    """"HTTP 500", "HTTP 429 rate_limit_exceeded", "batch_expired": as the online retries say it."""
    code = error.get("code")
    if status is None:
        return str(code or "no reply")
    return f"HTTP {status}" + (f" {code}" if code else "")


def add_batch_arguments(parser):
    """The Batch API flags of reformat.py."""
    import argparse

    from realign.cli import positive_float, positive_int

    group = parser.add_argument_group("Batch API (half price, results within 24 h)")
    group.add_argument("--batch_api", action=argparse.BooleanOptionalAction, default=False,
                       help="send the requests through OpenAI's Batch API instead of one by one: half the price, "
                            "its own rate limits, results within 24 hours; every step is recorded in "
                            "<output_directory>/batches_{i}_of_{N}.json, and a rerun continues from it")
    group.add_argument("--batch_max_requests", type=positive_int, default=DEFAULT_MAX_REQUESTS,
                       help=f"lines per request file, i.e. per batch (default: {DEFAULT_MAX_REQUESTS:,}, "
                            "OpenAI's limit)")
    group.add_argument("--batch_max_bytes", type=positive_int, default=DEFAULT_MAX_BYTES,
                       help=f"bytes per request file (default: {DEFAULT_MAX_BYTES:,}, OpenAI's 200 MB limit)")
    group.add_argument("--poll_interval", type=positive_float, default=DEFAULT_POLL_INTERVAL,
                       help=f"seconds between two looks at the running batches (default: {DEFAULT_POLL_INTERVAL:g})")
    group.add_argument("--batch_fallback_online", action=argparse.BooleanOptionalAction, default=False,
                       help="send a failed line's last try online instead of in one more batch, so that the "
                            "last stragglers do not wait for another batch")
    group.add_argument("--batch_cancel", action="store_true",
                       help="cancel this chunk's running batches (those recorded in batches_{i}_of_{N}.json) "
                            "and exit; a later run keeps what they answered and sends the rest again")
    return group


# -- the record file -----------------------------------------------------------------


class BatchRecord:
    """``batches_{i}_of_{N}.json``: every request file, upload and batch of one chunk.

    ``entries`` (one per request file) hold ``request_file`` (relative to the output
    folder), ``sha256``, ``bytes``, ``lines``, ``records``, ``round``, ``server``,
    ``upload_name``, then ``file_id``, ``batch_id``, ``status``, ``request_counts``,
    ``output_file_id``, ``error_file_id``, ``estimated_cost`` and ``collected`` as they
    become known. ``attempts`` holds, per custom id of a line that came back unfinished,
    its count of errors and unusable replies (what bounds its resubmissions).
    """

    def __init__(self, path, chunk):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path))
        self.data = {"chunk": chunk, "rounds": 0, "resubmission_rounds": 0, "entries": [], "attempts": {}}
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: cannot read the batch record: {e}") from None
            if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
                raise InputError(f"{path}: not a batch record (no list of entries)")
            self.data.update(data)

    @property
    def entries(self):
        return self.data["entries"]

    @property
    def attempts(self):
        return self.data["attempts"]

    def save(self):
        write_json_atomic(self.path, self.data)

    def local_path(self, entry):
        return os.path.join(self.folder, entry["request_file"])

    def uncollected(self):
        """``(index, entry)`` of the request files whose results are not joined yet."""
        return [(i, e) for i, e in enumerate(self.entries)
                if not e.get("collected") and e.get("status") != "abandoned"]


def running_batches(path):
    """How many batches recorded in ``path`` may still be running (for the online mode's warning)."""
    if not os.path.exists(path):
        return 0
    try:
        record = BatchRecord(path, None)
    except InputError:
        return 0
    return sum(1 for _, entry in record.uncollected() if entry.get("batch_id") and entry.get("status") not in TERMINAL)


# -- the Batch API calls -------------------------------------------------------------


class BatchAPI:
    """Files and batches through the client's SDK, each call retried while what fails is
    transient; an error that will not heal stops the run (FatalError)."""

    def __init__(self, client, max_retries, stopper, record_path):
        import openai

        self._openai = openai
        self.sdk = client.sdk
        self.server = client.server
        self.max_retries = max_retries
        self.stopper = stopper
        self.record_path = record_path
        self.retries = 0

    async def call(self, what, request, recover=None, harmless=(), hint=""):
        """``(result, adopted)``: ``await request()``, retried; before a retry, ``recover()``
        may find what the failed call did after all (then ``adopted`` is True). An HTTP
        status in ``harmless`` gives ``(None, False)``."""
        openai = self._openai
        attempt = 0
        while True:
            if self.stopper.requests_blocked():
                raise Stopped(self.stopper.reason)
            retry_after = None
            try:
                return await request(), False
            except openai.APIStatusError as e:
                status = e.status_code
                if status in harmless:
                    return None, False
                if status in (401, 403):
                    # The server's message may quote part of the key: do not repeat it.
                    raise FatalError(f"{what}: the API server refused the credentials (HTTP {status}); "
                                     "check OPENAI_API_KEY") from None
                body = e.body.get("error", e.body) if isinstance(e.body, dict) else None
                message = str(body.get("message") or "")[:300] if isinstance(body, dict) else ""
                if not is_transient_status(status):
                    raise FatalError(f"{what}: HTTP {status}: {message or 'refused'}{hint}") from None
                retry_after = parse_retry_after_ms(e.response.headers if e.response is not None else None)
                problem = f"HTTP {status}"
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                problem = e.__class__.__name__
            if attempt >= self.max_retries:
                raise FatalError(f"{what}: failed after {attempt + 1} attempts ({problem}); what was done is "
                                 f"recorded in {self.record_path}: rerun to continue") from None
            delay = retry_delay(attempt, retry_after)
            logger.warning("%s: %s; retry %d of %d in %.1f s", what, problem, attempt + 1, self.max_retries, delay)
            self.retries += 1
            attempt += 1
            await sleep_unless_stopped(self.stopper, delay)
            if recover is not None:
                found = await recover()
                if found is not None:
                    return found, True

    async def pages(self, list_page):
        """The items of a paginated list (newest first), page after page."""
        after = None
        while True:
            kwargs = {"limit": LIST_PAGE, **({"after": after} if after else {})}
            page, _ = await self.call("listing", lambda kwargs=kwargs: list_page(**kwargs))
            for item in page.data:
                yield item
            if not page.data or not getattr(page, "has_more", False):
                return
            after = page.data[-1].id

    async def find_upload(self, name, size, since):
        """The uploaded file of this name and size, or None (looking back to ``since``)."""
        async for item in self.pages(lambda **kw: self.sdk.files.list(purpose="batch", order="desc", **kw)):
            if item.filename == name and item.bytes == size:
                return item
            if item.created_at and item.created_at < since - ADOPT_MARGIN_S:
                return None
        return None

    async def find_batch(self, file_id, since):
        """The batch whose input is ``file_id``, or None (looking back to ``since``)."""
        async for item in self.pages(self.sdk.batches.list):
            if item.input_file_id == file_id:
                return item
            if item.created_at and item.created_at < since - ADOPT_MARGIN_S:
                return None
        return None

    async def upload(self, name, data, since, look_first):
        async def recover():
            return await self.find_upload(name, len(data), since)

        if look_first:
            found = await recover()
            if found is not None:
                return found, True
        return await self.call(f"uploading {name}", lambda: self.sdk.files.create(file=(name, data), purpose="batch"),
                               recover, hint=f" (does {self.server} offer the Batch API? Without --batch_api, "
                                             "reformat.py sends the same requests one by one)")

    async def create(self, file_id, metadata, since, look_first):
        async def recover():
            return await self.find_batch(file_id, since)

        if look_first:
            found = await recover()
            if found is not None:
                return found, True
        return await self.call(
            f"creating the batch of {metadata['realign_request_file']}",
            lambda: self.sdk.batches.create(input_file_id=file_id, endpoint=ENDPOINT,
                                            completion_window=COMPLETION_WINDOW, metadata=metadata),
            recover)

    async def retrieve(self, batch_id):
        return (await self.call(f"polling batch {batch_id}", lambda: self.sdk.batches.retrieve(batch_id)))[0]

    async def cancel(self, batch_id):
        """The batch after the cancel request, or None when it had already finished (HTTP 409)."""
        return (await self.call(f"cancelling batch {batch_id}", lambda: self.sdk.batches.cancel(batch_id),
                                harmless=(409,)))[0]

    async def download(self, file_id):
        """The content of a file, as bytes."""
        return (await self.call(f"downloading file {file_id}", lambda: self.sdk.files.content(file_id)))[0].content


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def batch_state(batch):
    """What the record keeps of a batch object."""
    counts = batch.request_counts
    state = {"status": batch.status,
             "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed}
             if counts is not None else None,
             "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id}
    errors = getattr(getattr(batch, "errors", None), "data", None)
    if errors:
        state["errors"] = [{"code": e.code, "message": e.message, "line": e.line} for e in errors[:SHOWN_ERRORS]]
    return state


# -- one chunk -----------------------------------------------------------------------


class _RequestFile:
    """A request file being written: a temporary file, renamed once complete."""

    def __init__(self, path):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._tmp = path + ".tmp"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by close()
        self.sha256 = hashlib.sha256()
        self.lines = self.bytes = self.records = 0
        self.estimate = 0.0
        self.parts = {}  # base custom id -> number of lines
        self.resubmitted = 0

    def fits(self, lines, size, max_lines, max_bytes):
        return self.lines + lines <= max_lines and self.bytes + size <= max_bytes

    def add(self, base, data, lines, estimate, resubmitted):
        self._file.write(data)
        self.sha256.update(data)
        self.lines += lines
        self.bytes += len(data)
        self.records += 1
        self.estimate += estimate
        self.parts[base] = lines
        self.resubmitted += resubmitted

    def close(self):
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)


class BatchMode:
    """The Batch API mode of one chunk: ``await BatchMode(...).work(to_rewrite)``."""

    def __init__(self, args, run, start, end, batch_lines, api_key, price):
        self.args = args
        self.run = run
        self.start, self.end = start, end
        self.batch_lines = batch_lines
        self.api_key = api_key
        self.price = price  # the batch price, or None
        self.online_price = price_of_run(args, args.model)
        self.spend = Spend(price)  # what the batch lines used
        self.chunk = f"{args.dataset_batch_id}_of_{args.dataset_batch_num}"
        self.record = BatchRecord(record_path(args.output_directory, args.dataset_batch_id, args.dataset_batch_num),
                                  self.chunk)
        self.stopper = run.stopper
        self.api = None
        self.parts = {}  # entry index -> {base custom id: lines}, for the entries this run waits for
        self.stats = collections.Counter()
        self.probing = True
        self.held_back = set()  # lines of a batch refused for the enqueued-token limit: wait for room
        self.expected_completion = self.actual_completion = 0
        self.bar = None
        run.batch = self

    # -- the loop ------------------------------------------------------------------

    async def work(self, to_rewrite):
        run = self.run
        if not to_rewrite:
            for _ in run.to_rewrite(self.start, self.end, self.batch_lines, write_passthrough=True):
                pass
            if self.record.uncollected():
                logger.info("%s: every line of the chunk is done; batches recorded there and not collected are "
                            "left alone (--batch_cancel cancels them)", self.record.path)
            return
        await run.connect(self.api_key, self.online_price)
        self.api = BatchAPI(run.client, self.args.max_retries, self.stopper, self.record.path)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        hard_stop = self.stopper.on_hard_stop(lambda: loop.call_soon_threadsafe(task.cancel))
        try:
            await self._loop()
            run.policy.finish(self.stopper)
        except (Stopped, asyncio.CancelledError):
            if not self.stopper.is_set():
                raise
        finally:
            self.stopper.forget_hard_stop(hard_stop)
            if self.bar is not None:
                self.bar.close()
            if self.stopper.interrupted and self.parts:
                logger.warning("%d batches keep running at the server; rerun to collect them (or --batch_cancel "
                               "to cancel them)", sum(1 for i in self.parts if self.record.entries[i].get("batch_id")))
            if self.stopper.reason == "budget":
                self.stopper.message = f"budget reached: ${self.committed():.4f} of ${self.args.max_cost:.4f}"
            run.client.remember_limits(self.args.model)
            await run.client.close()

    async def _loop(self):
        await self._resume()
        first, dirty = True, True
        while True:
            if dirty:
                await self._submit(write_passthrough=first)
                first, dirty = False, False
            if self.stopper.requests_blocked() or not self.parts:
                return
            finished = await self._poll()
            for index in finished:
                await self._collect(index)
                dirty = True
            if not finished:
                await sleep_unless_stopped(self.stopper, self.args.poll_interval)

    async def _resume(self):
        """Carry on with the request files and batches an earlier run recorded."""
        uncollected = self.record.uncollected()
        if not uncollected:
            return
        wanted = {custom_id(record["id"], fp)
                  for record, _, fp in self.run.to_rewrite(self.start, self.end, self.batch_lines)}
        ignored = 0
        for index, entry in uncollected:
            if entry.get("server") != self.api.server:
                logger.warning("%s: %s was sent to %s, not to %s: left alone", self.record.path,
                               entry["request_file"], entry.get("server"), self.api.server)
                continue
            parts = await self._read_parts(entry)
            if parts is None:  # never uploaded, and the local file is gone: its lines go into a new one
                self._abandon(entry, "the request file is missing or changed")
                continue
            still = sum(1 for base in parts if base in wanted)
            if entry.get("batch_id") is None:
                if still < len(parts):  # lines done meanwhile, or made with other settings: write a new file
                    self._abandon(entry, f"{len(parts) - still} of its {len(parts)} records are done or changed")
                    continue
            elif still == 0:
                if entry.get("status") in TERMINAL:  # its lines were written before a kill
                    entry["collected"] = True
                    self.record.save()
                else:
                    ignored += 1
                continue
            self.parts[index] = parts
        if ignored:
            logger.warning("%d batches recorded in %s hold no line still wanted (done, or made with other settings): "
                           "not waited for (--batch_cancel cancels those still running)", ignored, self.record.path)
        resumed = [i for i in self.parts if self.record.entries[i].get("batch_id")]
        self.stats["resumed"] = len(resumed)
        logger.info("%s: carrying on with %d batches of earlier runs and %d request files not yet in a batch",
                    self.record.path, len(resumed), len(self.parts) - len(resumed))
        for index in [i for i in self.parts if not self.record.entries[i].get("batch_id")]:
            await self._launch(index)

    def _abandon(self, entry, why):
        logger.info("%s: not sending %s: %s", self.record.path, entry["request_file"], why)
        entry["status"] = "abandoned"
        self.record.save()

    async def _read_parts(self, entry):
        """``{base custom id: lines}`` of a request file: the local copy when its sha256 is the
        recorded one, else the copy uploaded to the server; None when there is neither."""
        path = self.record.local_path(entry)
        try:
            data = await asyncio.to_thread(read_bytes, path)
        except OSError:
            data = None
        if data is None or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            if entry.get("file_id") is None:
                return None
            logger.warning("%s: missing or changed; reading the copy uploaded as %s", path, entry["file_id"])
            data = await self.api.download(entry["file_id"])
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise FatalError(f"{entry['file_id']}: the uploaded copy of {path} is not the one recorded in "
                                 f"{self.record.path}")
        parts = collections.Counter()
        for raw in data.splitlines():
            if raw.strip():
                parts[base_of(json.loads(raw)["custom_id"])] += 1
        return dict(parts)

    def _sent_bodies(self, entry, wanted):
        """``{custom id: body}`` of the request file's lines of these custom ids."""
        bodies = {}
        try:
            with open(self.record.local_path(entry), "rb") as f:
                for raw in f:
                    line = json.loads(raw)
                    if line["custom_id"] in wanted:
                        bodies[line["custom_id"]] = line["body"]
        except (OSError, ValueError):
            pass
        return bodies

    # -- costs ---------------------------------------------------------------------

    def _running_estimate(self):
        return sum(self.record.entries[i].get("estimated_cost") or 0.0 for i in self.parts
                   if self.record.entries[i].get("batch_id"))

    def committed(self):
        """Spent (batch lines and online requests) plus the estimate of the running batches, USD."""
        client = self.run.client
        return self.spend.cost + (client.spend.cost if client is not None else 0.0) + self._running_estimate()

    def _estimate(self, record, logical):
        if self.price is None:
            return 0.0
        ratio = max(1.0, self.actual_completion / self.expected_completion) if self.expected_completion else 1.0
        prompt = self.run.client.estimate_prompt_tokens(logical)[0]
        return self.price.cost(prompt, self.run.expected_output(record) * ratio)

    def _online_budget(self):
        """Let the online requests spend what the batches leave of ``--max_cost``."""
        if self.args.max_cost is not None:
            self.run.client.budget.cap = self.args.max_cost - self.spend.cost - self._running_estimate()

    def _over_budget(self, estimate):
        return self.args.max_cost is not None and self.committed() + estimate > self.args.max_cost

    def _stop_for_budget(self):
        self.stopper.stop("budget", f"budget reached: ${self.committed():.4f} of ${self.args.max_cost:.4f}")
        logger.warning("--max_cost %.4f: no more batches are created (spent and running: $%.4f); the running ones "
                       "are collected", self.args.max_cost, self.committed())

    # -- writing request files, uploading, creating -------------------------------------

    async def _submit(self, write_passthrough):
        """One pass over the chunk: lines from the cache, the online probe, request files."""
        args, run, client = self.args, self.run, self.run.client
        in_batches = {base for parts in self.parts.values() for base in parts}
        if any(self.record.entries[i].get("batch_id") for i in self.parts):
            in_batches |= self.held_back  # sent again once this chunk's running batches are done
        else:
            self.held_back.clear()
        current, online, files, resent = None, [], 0, False
        for record, messages, fp in run.to_rewrite(self.start, self.end, self.batch_lines, write_passthrough):
            base = custom_id(record["id"], fp)
            if base in in_batches or self.stopper.is_set():
                continue
            logical = Client.logical_chat(messages, run.sampling)
            if self._from_cache(record, fp, logical):
                continue
            tried = self.record.attempts.get(base)
            if tried and args.batch_fallback_online and self._last_try(tried):
                online.append((record, tried))
                continue
            if self.probing:
                await self._probe(record)
                continue
            bodies = client.adapters[CHAT].apply(logical)
            data = b"".join(request_line(part_id(base, k, len(bodies)), body) for k, body in enumerate(bodies))
            if len(data) > args.batch_max_bytes or len(bodies) > args.batch_max_requests:
                run.write(run.failed_line(record, fp, f"its request is {len(data):,} bytes in {len(bodies)} lines, "
                                                      "more than --batch_max_bytes / --batch_max_requests allow"))
                continue
            estimate = self._estimate(record, logical)
            if self._over_budget((current.estimate if current else 0.0) + estimate):
                self._stop_for_budget()
                continue
            if current is not None and not current.fits(len(bodies), len(data), args.batch_max_requests,
                                                        args.batch_max_bytes):
                files, resent = files + 1, resent or current.resubmitted > 0
                await self._finish_file(current)
                current = None
            if current is None:
                current = _RequestFile(self._next_request_path())
            current.add(base, data, len(bodies), estimate, bool(tried))
        if current is not None:
            files, resent = files + 1, resent or current.resubmitted > 0
            await self._finish_file(current)
        if online:
            await self._online(online)
        if files:
            self.record.data["rounds"] += 1
            self.stats["rounds"] += 1
            if resent:
                self.record.data["resubmission_rounds"] += 1
                self.stats["resubmission_rounds"] += 1
            self.record.save()

    def _from_cache(self, record, fp, logical):
        client = self.run.client
        if client.cache is None:
            return False
        reply = client.cache.get(client.key(CHAT, logical))
        if reply is None:
            return False
        line, _ = self.run.line_from_reply(record, fp, reply)
        if line is None:
            return False
        client.stats["cache_hits"] += 1
        self.stats["cached"] += 1
        self.run.write(line)
        return True

    def _last_try(self, tried):
        return tried["errors"] >= self.args.max_retries or tried["unusable"] >= self.args.max_parse_retries

    async def _probe(self, record):
        """Ask one record online, so the adapter learns what the model refuses before the
        first batch; stop probing after a success or an error that was not a refusal."""
        policy = self.run.policy
        held = len(policy.held)
        self._online_budget()
        try:
            await self.run.rewrite(record)
        except Stopped:
            return
        self.stats["probes"] += 1
        if policy.succeeded or len(policy.held) == held:
            self.probing = False
            notes = self.run.client.adaptations()
            if notes != "none":
                logger.info("the batch lines are sent as the server accepts them: %s", notes)

    async def _online(self, items):
        """The last try of failed lines, online (``--batch_fallback_online``)."""
        logger.info("sending the last try of %d lines online (--batch_fallback_online)", len(items))
        self._online_budget()
        args = self.args

        async def ask(item):
            record, tried = item
            self.stats["fallback"] += 1
            asked = tried["unusable"]
            await self.run.rewrite(record, asks=max(1, args.max_parse_retries + 1 - asked), asked=asked,
                                   tally=self._tally(tried))

        await run_pool(items, ask, args.concurrency, self.stopper)
        for record, _ in items:
            if record["id"] in self.run.finished:
                self.record.attempts.pop(custom_id(record["id"], self.run.plan(record)[2]), None)

    def _next_request_path(self):
        folder = REQUESTS_FOLDER.format(batch_id=self.args.dataset_batch_id, batch_num=self.args.dataset_batch_num)
        return os.path.join(self.record.folder, folder, f"requests_{len(self.record.entries) + 1:04d}.jsonl")

    async def _finish_file(self, current):
        """Record a complete request file and send it."""
        current.close()
        sha = current.sha256.hexdigest()
        name = os.path.basename(current.path)
        entry = {"request_file": os.path.relpath(current.path, self.record.folder), "sha256": sha,
                 "bytes": current.bytes, "lines": current.lines, "records": current.records,
                 "round": self.record.data["rounds"] + 1, "resubmitted_lines": current.resubmitted,
                 "server": self.api.server, "model": self.args.model,
                 "upload_name": f"realign_{self.chunk}_{name[:-len('.jsonl')]}_{sha[:12]}.jsonl",
                 "estimated_cost": round(current.estimate, 6), "written_at": time.time(), "status": "written",
                 "collected": False}
        self.record.entries.append(entry)
        self.record.save()
        index = len(self.record.entries) - 1
        self.parts[index] = current.parts
        logger.info("%s: %d requests (%d records, %s bytes)%s", current.path, current.lines, current.records,
                    f"{current.bytes:,}", f", {current.resubmitted} of them sent again" if current.resubmitted else "")
        await self._launch(index)

    async def _launch(self, index):
        """Upload the request file and create its batch, recording each; False when the
        budget does not allow the batch (it stays recorded, for a run with a higher cap)."""
        entry = self.record.entries[index]
        if entry.get("file_id") is None:
            data = await asyncio.to_thread(read_bytes, self.record.local_path(entry))
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise FatalError(f"{self.record.local_path(entry)} changed since it was written; remove its entry "
                                 f"from {self.record.path} to write it again")
            look = bool(entry.get("upload_tried"))
            entry["upload_tried"] = True
            self.record.save()
            uploaded, adopted = await self.api.upload(entry["upload_name"], data, entry["written_at"], look)
            entry.update(file_id=uploaded.id, uploaded_at=time.time(), status="uploaded", upload_adopted=adopted)
            self.record.save()
            self.stats["adopted_uploads" if adopted else "uploads"] += 1
        if entry.get("batch_id") is None:
            if self._over_budget(entry.get("estimated_cost") or 0.0):
                self._stop_for_budget()
                del self.parts[index]
                return False
            look = bool(entry.get("create_tried"))
            entry["create_tried"] = True
            self.record.save()
            metadata = {"realign_chunk": self.chunk, "realign_request_file": entry["request_file"][-500:]}
            batch, adopted = await self.api.create(entry["file_id"], metadata, entry["uploaded_at"], look)
            entry.update(batch_id=batch.id, created_at=time.time(), batch_adopted=adopted, **batch_state(batch))
            self.record.save()
            self.stats["adopted_batches" if adopted else "batches"] += 1
            logger.info("batch %s%s: %s (%d lines)", batch.id, " (adopted: it was created before a crash)"
                        if adopted else "", entry["request_file"], entry["lines"])
        return True

    # -- polling and collecting ------------------------------------------------------

    async def _poll(self):
        """Look at every running batch once; the indices of those that finished."""
        finished, changed = [], False
        for index in sorted(self.parts):
            entry = self.record.entries[index]
            if entry.get("batch_id") is None:
                continue
            state = batch_state(await self.api.retrieve(entry["batch_id"]))
            if any(entry.get(k) != v for k, v in state.items()):
                if state["status"] != entry.get("status"):
                    logger.info("batch %s (%s): %s", entry["batch_id"], entry["request_file"], state["status"])
                entry.update(state)
                changed = True
            if entry["status"] in TERMINAL:
                finished.append(index)
        if changed:
            self.record.save()
        self._show_progress()
        return finished

    def _show_progress(self):
        entries = [self.record.entries[i] for i in self.parts if self.record.entries[i].get("batch_id")]
        total = sum(e["lines"] for e in entries)
        counts = [e.get("request_counts") or {} for e in entries]
        done = sum((c.get("completed") or 0) + (c.get("failed") or 0) for c in counts)
        if self.bar is None:
            self.bar = progress_bar(total=total, unit="line", desc=f"batches of chunk {self.args.dataset_batch_id}")
        statuses = collections.Counter(e.get("status") for e in entries)
        self.bar.total = total
        self.bar.n = min(done, total)
        self.bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in sorted(statuses.items())), refresh=False)
        self.bar.refresh()

    async def _collect(self, index):
        """Download a finished batch's results and join them to the records."""
        entry = self.record.entries[index]
        results = {}
        for name in ("output_file_id", "error_file_id"):
            if entry.get(name):
                for raw in (await self.api.download(entry[name])).splitlines():
                    if raw.strip():
                        line = json.loads(raw)
                        results[line.get("custom_id")] = line
        outcome = collections.Counter()
        for line in results.values():
            reply = line_reply(line)
            if reply is not None:
                self.spend.add_usage(reply.get("usage"))
        if any(line_reply(line) is not None for line in results.values()):
            for held in self.run.policy.success():
                self.run.write(held)
        refused = {cid for cid, line in results.items() if line_error(line)[0] in (400, 413, 422)}
        sent = self._sent_bodies(entry, refused) if refused else {}
        parts = self.parts[index]
        for record, messages, fp in self.run.to_rewrite(self.start, self.end, self.batch_lines):
            base = custom_id(record["id"], fp)
            if base not in parts:
                continue
            ids = [part_id(base, k, parts[base]) for k in range(parts[base])]
            lines = [results.get(cid) for cid in ids]
            if any(line is None for line in lines):
                outcome[self._unanswered(record, fp, base, entry)] += 1
                continue
            replies = [line_reply(line) for line in lines]
            if all(reply is not None for reply in replies):
                reply = replies[0] if len(replies) == 1 else merge_replies(replies)
                outcome[self._answered(record, messages, fp, base, reply)] += 1
                continue
            status, error = next(line_error(line) for line, reply in zip(lines, replies) if reply is None)
            outcome[self._failed(record, messages, fp, base, status, error, [sent.get(cid) for cid in ids])] += 1
        entry.update(collected=True, collected_at=time.time())
        del self.parts[index]
        self.record.save()
        if entry["status"] == "failed":
            logger.warning("batch %s failed: %s", entry["batch_id"], "; ".join(
                f"{e.get('code')}: {e.get('message')}" for e in entry.get("errors") or []) or "no reason given")
        logger.info("batch %s (%s, %s): %s", entry["batch_id"], entry["request_file"], entry["status"],
                    ", ".join(f"{n:,} {what}" for what, n in outcome.most_common()) or "no line still wanted")

    def _attempt(self, base):
        return self.record.attempts.setdefault(base, {"sent": 0, "errors": 0, "unusable": 0, "candidates": 0,
                                                      "failing": 0, "problems": {}})

    @staticmethod
    def _tally(tried):
        """What the checks found among a line's candidates in earlier rounds (reformat's tally)."""
        return {"candidates": tried.get("candidates", 0), "failing": tried.get("failing", 0),
                "problems": collections.Counter(tried.get("problems") or {})}

    def _answered(self, record, messages, fp, base, reply):
        run, client = self.run, self.run.client
        usage = reply.get("usage") or {}
        self.expected_completion += run.expected_output(record)
        self.actual_completion += int(usage.get("completion_tokens") or 0)
        tried = self._attempt(base)
        line, tally = run.line_from_reply(record, fp, reply, self._tally(tried))
        if line is not None:
            if client.cache is not None:
                client.cache.put(client.key(CHAT, Client.logical_chat(messages, run.sampling)), reply)
            run.write(line)
            self.record.attempts.pop(base, None)
            self.stats["answered"] += 1
            return "answered"
        tried["sent"] += 1
        tried["unusable"] += 1
        tried["candidates"], tried["failing"] = tally["candidates"], tally["failing"]
        tried["problems"] = dict(tally["problems"])
        if tried["unusable"] > self.args.max_parse_retries:
            run.write(run.rejected_line(record, fp, tally))
            self.record.attempts.pop(base, None)
            return "kept the original (no candidate passed the checks)"
        run.stats["reasks"] += 1
        return "to send again (no usable candidate)"

    def _failed(self, record, messages, fp, base, status, error, sent):
        """A line in the error file (or a non-200 response in the output file)."""
        run = self.run
        message = str(error.get("message") or f"HTTP {status}")[:300]
        if status in (401, 403):
            raise FatalError(f"the API server refused the credentials for the batch lines (HTTP {status}); "
                             "check OPENAI_API_KEY")
        if status == 404:
            raise FatalError(f"the API server answered HTTP 404 to the batch lines: {message} (check --model and "
                             "--base_url)")
        tried = self._attempt(base)
        tried["sent"] += 1
        if status in (400, 413, 422):
            adapter = run.client.adapters[CHAT]
            bodies = adapter.apply(Client.logical_chat(messages, run.sampling))
            adapted = None not in sent and (bodies != sent or adapter.learn(
                sent[0], Refusal(status, error), run.sampling.effort_is_default))
            if not adapted:
                self.record.attempts.pop(base, None)
                refusal = f"HTTP {status}: {message}"
                for held in run.policy.refused(run.failed_line(record, fp, refusal), refusal):
                    run.write(held)
                return "refused"
        tried["errors"] += 1
        tried["error"] = describe_problem(status, error)
        if tried["errors"] > self.args.max_retries:
            run.write(run.failed_line(record, fp, f"failed after {tried['errors']} attempts: {tried['error']}"))
            self.record.attempts.pop(base, None)
            return "failed (errors)"
        return f"to send again ({tried['error']})"

    def _unanswered(self, record, fp, base, entry):
        """A line of the batch in neither result file: never run (a cancelled batch), or the
        whole batch failed (its validation errors count as an error of each line)."""
        status = entry.get("status")
        if status == "cancelled":
            self._attempt(base)["sent"] += 1
            return "to send again (cancelled)"
        errors = entry.get("errors") or [{}]
        code = "batch_expired" if status == "expired" else f"batch {status}: {errors[0].get('code') or 'no result'}"
        if any(e.get("code") == TOKEN_LIMIT for e in errors):
            self.held_back.add(base)
        return self._failed(record, None, fp, base, None, {"code": code}, [None])

    # -- reporting -------------------------------------------------------------------

    def tokens(self):
        client = self.run.client
        online = client.spend if client is not None else Spend(None)
        return (self.spend.prompt_tokens + online.prompt_tokens, self.spend.cached_tokens + online.cached_tokens,
                self.spend.completion_tokens + online.completion_tokens)

    def cost(self):
        """``(total, batch, online)`` USD, or None when no price is known."""
        client = self.run.client
        if self.price is None:
            return None
        online = client.spend.cost if client is not None else 0.0
        return self.spend.cost + online, self.spend.cost, online

    def describe(self):
        """The summary line's part of this mode."""
        stats, client = self.stats, self.run.client
        prompt, cached, completion = self.tokens()
        cost = self.cost()
        spend = ("spend: unknown (no price for this model)" if cost is None else
                 f"spend: ${cost[0]:.4f} (batch lines ${cost[1]:.4f} at batch prices, online ${cost[2]:.4f})")
        online = client.stats["requests"] if client is not None else 0
        adopted = stats["adopted_uploads"] + stats["adopted_batches"]
        return (f"batch API: uploads: {stats['uploads']:,}, batches: {stats['batches']:,} "
                f"(and {stats['resumed']:,} of earlier runs, {adopted:,} adopted after a crash), "
                f"resubmission rounds: {stats['resubmission_rounds']:,}, lines from batches: {stats['answered']:,}, "
                f"lines from the cache: {stats['cached']:,}, online requests: {online:,} "
                f"({stats['probes']:,} probes, {stats['fallback']:,} last tries), "
                f"retries: {(self.api.retries if self.api else 0) + (client.stats['retries'] if client else 0):,}, "
                f"adaptations: {client.adaptations() if client else 'none'}, prompt tokens: {prompt:,} "
                f"({cached:,} cached), completion tokens: {completion:,}, {spend}")

    def usage(self):
        """This mode's part of ``--usage_path``."""
        prompt, _, completion = self.tokens()
        cost = self.cost()
        return {"mode": "batch_api", "uploads": self.stats["uploads"], "batches": self.stats["batches"],
                "resubmission_rounds": self.stats["resubmission_rounds"], "batch_lines": self.stats["answered"],
                "cache_hits": self.stats["cached"], "prompt_tokens": prompt, "completion_tokens": completion,
                "cost_usd": cost[0] if cost else None}


async def work(args, run, start, end, batch_lines, api_key, price, to_rewrite):
    """reformat.py's second pass in this mode (the online mode's ``work``, same arguments)."""
    await BatchMode(args, run, start, end, batch_lines, api_key, price).work(to_rewrite)


# -- cancelling ----------------------------------------------------------------------


async def cancel(args, api_key, lock_path):
    """``--batch_cancel``: cancel the chunk's running batches and record it; 0. Holds the
    lock of the chunk's batch file (``lock_path``): a run still working on the chunk would
    send the cancelled lines again, so it must be stopped first."""
    path = record_path(args.output_directory, args.dataset_batch_id, args.dataset_batch_num)
    if not os.path.exists(path):
        logger.info("%s does not exist: no batch of chunk %d of %d to cancel", path, args.dataset_batch_id,
                    args.dataset_batch_num)
        return 0
    from realign.pool import Stopper
    from realign.records import OutputLock

    record = BatchRecord(path, None)
    client = Client(args.base_url, api_key, timeout=args.request_timeout, max_retries=args.max_retries)
    stopper = Stopper()
    api = BatchAPI(client, args.max_retries, stopper, path)
    counts = collections.Counter()
    try:
        with OutputLock(lock_path), stopper.signals_handled():
            for _, entry in record.uncollected():
                if entry.get("batch_id") is None:
                    entry["status"] = "abandoned"  # never sent: the next run writes its lines again
                    record.save()
                    counts["not created"] += 1
                    continue
                if entry.get("status") in TERMINAL:
                    counts["already finished"] += 1
                    continue
                batch = await api.cancel(entry["batch_id"]) or await api.retrieve(entry["batch_id"])
                entry.update(cancel_requested=time.time(), **batch_state(batch))
                record.save()
                counts["cancelled" if batch.status in ("cancelling", "cancelled") else "already finished"] += 1
                logger.info("batch %s (%s): %s", entry["batch_id"], entry["request_file"], batch.status)
    finally:
        await client.close()
    logger.info("#batches of chunk %d of %d: cancelled: %d, already finished: %d, never created: %d; a rerun "
                "without --batch_cancel keeps what they answered and sends the rest again", args.dataset_batch_id,
                args.dataset_batch_num, counts["cancelled"], counts["already finished"], counts["not created"])
    return 0


# -- the dry run ---------------------------------------------------------------------


class DryPlan:
    """What a run in this mode would write and create (``--dry_run``): nothing is sent."""

    def __init__(self, args):
        self.args = args
        self.adapter = Adapter(CHAT)
        self.files = self.lines = self.bytes = self.online = 0
        self._lines = self._bytes = 0
        self.in_batches = set()
        path = record_path(args.output_directory, args.dataset_batch_id, args.dataset_batch_num)
        self.running = 0
        if os.path.exists(path):
            record = BatchRecord(path, None)
            for _, entry in record.uncollected():
                try:
                    with open(record.local_path(entry), "rb") as f:
                        bases = {base_of(json.loads(raw)["custom_id"]) for raw in f if raw.strip()}
                except (OSError, ValueError):
                    continue
                self.in_batches |= bases
                self.running += entry.get("batch_id") is not None

    def is_in_a_batch(self, record_id, fp):
        return custom_id(record_id, fp) in self.in_batches

    def add(self, record_id, fp, logical):
        if not self.online:  # the probe
            self.online = 1
            return
        base = custom_id(record_id, fp)
        bodies = self.adapter.apply(logical)
        size = sum(len(request_line(part_id(base, k, len(bodies)), body)) for k, body in enumerate(bodies))
        if not self.files or self._lines + len(bodies) > self.args.batch_max_requests or \
                self._bytes + size > self.args.batch_max_bytes:
            self.files += 1
            self._lines = self._bytes = 0
        self._lines += len(bodies)
        self._bytes += size
        self.lines += len(bodies)
        self.bytes += size

    def as_dict(self):
        return {"mode": "batch_api", "online_requests": self.online, "batch_lines": self.lines,
                "batches": self.files, "minutes": None}

    def report(self):
        lines = [(f"  batch API: {self.lines:,} request lines ({self.bytes:,} bytes) in {self.files:,} request "
                  f"files, i.e. {self.files:,} batches (at most {self.args.batch_max_requests:,} lines and "
                  f"{self.args.batch_max_bytes:,} bytes each)")]
        if self.online:
            lines.append("  the first request is sent online (at the online price), to learn which parameters the "
                         "model accepts before the batches")
        if self.in_batches:
            lines.append(f"  already in batches recorded by earlier runs: {len(self.in_batches):,} records "
                         f"({self.running:,} batches created)")
        lines.append(f"  expected time: each batch within its {COMPLETION_WINDOW} completion window, often much sooner")
        return lines
