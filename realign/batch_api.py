"""OpenAI's Batch API as a transport of the request engine (reformat.py ``--batch_api``).

OpenAI's Batch API answers within 24 hours at half the online price, from a rate-limit
pool of its own: the mode for tens of thousands of records and more. The requests, their
cache keys, the reply handler and the spend rules are the engine's and the stage's, as
online; :class:`BatchTransport` only replaces the engine's pool by rounds of request
files (:meth:`BatchTransport.run`). The stage hands over a re-iterable of requests, each
with a stable ``name`` (its custom id base: the record id and the fingerprint of its
request), and rebuilds them on every pass; a request the reply handler asks again for
(the same body) goes into the next round, its ``state`` kept in the record file. A chunk's
life:

1. **Request files.** The requests not answered by the cache and not in a batch already
   recorded are written to ``<output_directory>/batches_{i}_of_{N}/requests_0001.jsonl``,
   ... of at most ``--batch_max_requests`` lines and ``--batch_max_bytes`` bytes. A line is
   ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``; the body is
   what the online transport would send, so the reply is cached under the online request's
   key. Before the first file, requests are asked online until one succeeds (one,
   normally): the parameters the model refuses are learned before thousands of lines are
   sent the wrong way.
2. **Upload and create**, each recorded the moment it returns in
   ``<output_directory>/batches_{i}_of_{N}.json`` (written atomically). The calls go through
   the engine's retry loop; before each retry, and on a rerun after a crash between a call
   and its record, the server's list is searched (the upload by its name, the batch by its
   input file), so that a call the server did carry out is adopted, never made twice.
3. **Poll** every ``--poll_interval`` seconds; once a batch is completed, expired,
   cancelled or failed, its output and error files are downloaded and each line handed to
   its request's reply handler (by custom id).
4. **Resubmission.** A line in the error file is sent again in a new round, up to
   ``--max_retries`` errors; a reply the handler asks again for, as it decides (reformat:
   ``--max_parse_retries``). With ``--batch_fallback_online`` the last try goes online.

A rerun after a kill at any moment picks up the record file. ``--batch_cancel`` cancels
the chunk's running batches; the next run keeps what they answered and sends the rest
again. The API key is in no file written here.
"""

import asyncio
import collections
import hashlib
import json
import logging
import os
import re
import time

from dataclasses import dataclass

from realign.cli import FatalError, progress_bar
from realign.engine import ADAPTABLE_CODES, Refusal, RequestFailed, Response, call_with_retries, error_of
from realign.pool import Stopped, run_pool, sleep_unless_stopped
from realign.pricing import Spend
from realign.records import InputError, write_json_atomic

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


@dataclass
class BatchSettings:
    """What the Batch API mode of one chunk needs of the command line."""

    record_path: str  # batches_{i}_of_{N}.json
    requests_folder: str  # batches_{i}_of_{N}/
    chunk: str  # "{i}_of_{N}", in upload names and batch metadata
    label: str  # the progress bar's name
    model: str
    max_requests: int = 50_000
    max_bytes: int = 200_000_000
    poll_interval: float = 60.0
    fallback_online: bool = False
    max_retries: int = 8
    max_parse_retries: int = 2
    concurrency: int = 16
    max_cost: float | None = None


def settings_from_args(args):
    folder, i, n = args.output_directory, args.dataset_batch_id, args.dataset_batch_num
    return BatchSettings(record_path=record_path(folder, i, n),
                         requests_folder=os.path.join(folder, REQUESTS_FOLDER.format(batch_id=i, batch_num=n)),
                         chunk=f"{i}_of_{n}", label=f"batches of chunk {i}", model=args.model,
                         max_requests=args.batch_max_requests, max_bytes=args.batch_max_bytes,
                         poll_interval=args.poll_interval, fallback_online=args.batch_fallback_online,
                         max_retries=args.max_retries, max_parse_retries=args.max_parse_retries,
                         concurrency=args.concurrency, max_cost=args.max_cost)


def add_batch_arguments(parser):
    """The Batch API flags of reformat.py."""
    import argparse

    from realign.cli import positive_float, positive_int

    group = parser.add_argument_group("Batch API (half price, results within 24 h)")
    group.add_argument("--batch_api", action=argparse.BooleanOptionalAction, default=False,
                       help="send the requests through OpenAI's Batch API instead of one by one: half the price, "
                            "its own rate limits, results within 24 hours; every step is recorded in "
                            "<output_directory>/batches_{i}_of_{N}.json, and a rerun continues from it (default: off)")
    group.add_argument("--batch_max_requests", type=positive_int, default=DEFAULT_MAX_REQUESTS,
                       help=f"lines per request file, i.e. per batch (default: {DEFAULT_MAX_REQUESTS:,}, "
                            "OpenAI's limit)")
    group.add_argument("--batch_max_bytes", type=positive_int, default=DEFAULT_MAX_BYTES,
                       help=f"bytes per request file (default: {DEFAULT_MAX_BYTES:,}, OpenAI's 200 MB limit)")
    group.add_argument("--poll_interval", type=positive_float, default=DEFAULT_POLL_INTERVAL,
                       help=f"seconds between two looks at the running batches (default: {DEFAULT_POLL_INTERVAL:g})")
    group.add_argument("--batch_fallback_online", action=argparse.BooleanOptionalAction, default=False,
                       help="send a failed line's last try online instead of in one more batch, so that the "
                            "last stragglers do not wait for another batch (default: off)")
    group.add_argument("--batch_cancel", action="store_true",
                       help="cancel this chunk's running batches (those recorded in batches_{i}_of_{N}.json) "
                            "and exit; a later run keeps what they answered and sends the rest again (default: off)")
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


class BatchCalls:
    """Files and batches through the online transport's SDK, each call through the engine's
    retry loop; an error that will not heal stops the run (FatalError)."""

    def __init__(self, online, max_retries, stopper, record_path):
        self.online = online
        self.sdk = online.sdk
        self.server = online.server
        self.max_retries = max_retries
        self.stopper = stopper
        self.record_path = record_path
        self.stats = collections.Counter()

    async def call(self, what, request, recover=None, harmless=(), hint=""):
        """``(result, adopted)``: ``await request()`` (an SDK call), retried while what fails is
        transient; before a retry, ``recover()`` may find what the failed call did after all
        (then ``adopted`` is True). An HTTP status in ``harmless`` gives ``(None, False)``."""
        adopted = []

        async def found_after_all():
            found = await recover()
            if found is None:
                return None
            adopted.append(True)
            return Response(200, {}, found)

        try:
            response = await call_with_retries(
                lambda: self.online.call(request), self, what=what, max_retries=self.max_retries,
                stopper=self.stopper, stats=self.stats, accept=(200, 404, *harmless),
                recover=found_after_all if recover is not None else None)
        except (Refusal, RequestFailed) as e:
            status = getattr(e, "status", None)
            if isinstance(e, RequestFailed) and not e.refused:
                raise FatalError(f"{what}: {e}; what was done is recorded in {self.record_path}: rerun to "
                                 "continue") from None
            message = e.message if isinstance(e, Refusal) else str(e)
            raise FatalError(f"{what}: HTTP {status}: {message[:300] or 'refused'}{hint}") from None
        if response.status == 404:  # no such path or object here: not the Batch API we need
            message = str(error_of(response.body).get("message") or "not found")[:300]
            raise FatalError(f"{what}: HTTP 404: {message}{hint}")
        if response.status != 200:
            return None, False
        return response.body, bool(adopted)

    # What the engine's retry loop asks of a transport, for these calls.
    name = "the API server"

    @staticmethod
    def is_reply(body):
        return True

    def fatal_message(self, verdict, status, error):
        return self.online.fatal_message(verdict, status, error)

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


class BatchTransport:
    """The Batch API in front of the online transport (which it borrows for keys, bodies and
    adaptation, and for the online probe and last tries); priced at the batch price."""

    def __init__(self, online, settings, price):
        self.online = online
        self.settings = settings
        self.price = price  # the batch price, or None

    def __getattr__(self, name):  # key, wire, learn, estimate_prompt, ...: the online transport's
        return getattr(self.online, name)

    async def run(self, run, requests):
        """The engine's send step in this mode: rounds of request files (a dry run counts them)."""
        mode = BatchMode(self, run, requests)
        run.usage.extra = mode
        if run.dry is not None:
            await mode.count()
        else:
            await mode.work()


class BatchMode:
    """The Batch API mode of one chunk: ``await BatchMode(transport, run, requests).work()``."""

    def __init__(self, transport, run, requests):
        self.transport = transport
        self.online = transport.online
        self.settings = transport.settings
        self.run = run
        self.requests = requests  # re-iterable: rebuilt at each pass, without the finished ones
        self.price = transport.price
        self.spend = Spend(self.price)  # what the batch lines used
        self.record = BatchRecord(self.settings.record_path, self.settings.chunk)
        self.stopper = run.stopper
        self.api = None
        self.parts = {}  # entry index -> {base custom id: lines}, for the entries this run waits for
        self.stats = collections.Counter()
        self.probing = True
        self.held_back = set()  # lines of a batch refused for the enqueued-token limit: wait for room
        self.bar = None
        self.plan = None  # the DryPlan of a dry run

    # -- the loop ------------------------------------------------------------------

    async def work(self):
        self.api = BatchCalls(self.online, self.settings.max_retries, self.stopper, self.record.path)
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        hard_stop = self.stopper.on_hard_stop(lambda: loop.call_soon_threadsafe(task.cancel))
        try:
            await self._loop()
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
                self.stopper.message = f"budget reached: ${self.committed():.4f} of ${self.settings.max_cost:.4f}"

    async def _loop(self):
        await self._resume()
        dirty = True
        while True:
            if dirty:
                await self._submit()
                dirty = False
            if self.stopper.requests_blocked() or not self.parts:
                if not self.parts and self.record.uncollected() and not self.stats["answered"]:
                    logger.info("%s: every line of the chunk is done; batches recorded there and not collected "
                                "are left alone (--batch_cancel cancels them)", self.record.path)
                return
            finished = await self._poll()
            for index in finished:
                await self._collect(index)
                dirty = True
            if not finished:
                await sleep_unless_stopped(self.stopper, self.settings.poll_interval)

    def _wanted(self):
        """``{base custom id: request}`` of the requests still wanted (one pass over the chunk)."""
        return {request.name: request for request in self.requests}

    async def _resume(self):
        """Carry on with the request files and batches an earlier run recorded."""
        uncollected = self.record.uncollected()
        if not uncollected:
            return
        wanted = {request.name for request in self.requests}
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
        return self.spend.cost + self.run.spend.cost + self._running_estimate()

    def _estimate(self, request):
        """A line's expected cost at the batch price, learning from the replies as the engine's budget does."""
        if self.price is None:
            return 0.0
        return self.price.cost(self.run.estimate(request.body)[0], request.expected_output * self.run.budget.ratio())

    def _online_budget(self):
        """Let the online requests spend what the batches leave of ``--max_cost``."""
        if self.settings.max_cost is not None:
            self.run.budget.cap = self.settings.max_cost - self.spend.cost - self._running_estimate()

    def _over_budget(self, estimate):
        return self.settings.max_cost is not None and self.committed() + estimate > self.settings.max_cost

    def _stop_for_budget(self):
        self.stopper.stop("budget", f"budget reached: ${self.committed():.4f} of ${self.settings.max_cost:.4f}")
        logger.warning("--max_cost %.4f: no more batches are created (spent and running: $%.4f); the running ones "
                       "are collected", self.settings.max_cost, self.committed())

    # -- the state of a line across rounds ---------------------------------------------

    def _attempt(self, base):
        tried = self.record.attempts.setdefault(base, {})
        for name in ("sent", "errors", "replies"):
            tried.setdefault(name, 0)
        return tried

    def _restore(self, request):
        """The request as the stage rebuilt it, with what earlier rounds left in its ``state``."""
        tried = self.record.attempts.get(request.name)
        if tried and isinstance(tried.get("state"), dict):
            request.state.update(tried["state"])
        return tried

    def _last_try(self, tried):
        return (tried.get("errors", 0) >= self.settings.max_retries
                or tried.get("replies", 0) >= self.settings.max_parse_retries)

    # -- writing request files, uploading, creating -------------------------------------

    async def _submit(self):
        """One pass over the chunk: answers from the cache, the online probe, request files."""
        settings = self.settings
        in_batches = {base for parts in self.parts.values() for base in parts}
        if any(self.record.entries[i].get("batch_id") for i in self.parts):
            in_batches |= self.held_back  # sent again once this chunk's running batches are done
        else:
            self.held_back.clear()
        current, online, files, resent = None, [], 0, False
        for request in self.requests:
            base = request.name
            if base in in_batches or self.stopper.is_set():
                continue
            tried = self._restore(request)
            if await self._from_cache(request):
                continue
            if tried and settings.fallback_online and self._last_try(tried):
                online.append(request)
                continue
            if self.probing:
                await self._probe(request)
                continue
            bodies = self.online.wire(request.body)
            data = b"".join(request_line(part_id(base, k, len(bodies)), body) for k, body in enumerate(bodies))
            if len(data) > settings.max_bytes or len(bodies) > settings.max_requests:
                await self.run.fail(request, RequestFailed(
                    f"its request is {len(data):,} bytes in {len(bodies)} lines, more than --batch_max_bytes / "
                    "--batch_max_requests allow"))
                continue
            estimate = self._estimate(request)
            if self._over_budget((current.estimate if current else 0.0) + estimate):
                self._stop_for_budget()
                continue
            if current is not None and not current.fits(len(bodies), len(data), settings.max_requests,
                                                        settings.max_bytes):
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

    async def _from_cache(self, request):
        """Whether the cache answered the request for good (a reply the stage used)."""
        hit = await self.run.cached_reply(request)
        if hit is None:
            return False
        self.run.stats["cache_hits"] += 1
        follow = await self.run.deliver(request, hit, cached=True)
        if follow is not None:  # the stage did not use it: the request goes into a batch, fresh
            request.state = follow.state
            return False
        self.stats["cached"] += 1
        self.record.attempts.pop(request.name, None)
        return True

    async def _probe(self, request):
        """Ask one request online, so the online transport learns what the model refuses
        before the first batch; stop probing after a success or an error that was not a refusal."""
        run = self.run
        held = len(run.held)
        self._online_budget()
        try:
            await run.converse(request)
        except Stopped:
            return
        self.stats["probes"] += 1
        if run.succeeded or len(run.held) == held:
            self.probing = False
            notes = self.online.adaptations()
            if notes != "none":
                logger.info("the batch lines are sent as the server accepts them: %s", notes)

    async def _online(self, requests):
        """The last try of failed lines, online (``--batch_fallback_online``)."""
        logger.info("sending the last try of %d lines online (--batch_fallback_online)", len(requests))
        self._online_budget()
        self.stats["fallback"] += len(requests)
        await run_pool(requests, self.run.converse, self.settings.concurrency, self.stopper)
        for request in requests:
            self.record.attempts.pop(request.name, None)

    def _next_request_path(self):
        return os.path.join(self.settings.requests_folder, f"requests_{len(self.record.entries) + 1:04d}.jsonl")

    async def _finish_file(self, current):
        """Record a complete request file and send it."""
        current.close()
        sha = current.sha256.hexdigest()
        name = os.path.basename(current.path)
        entry = {"request_file": os.path.relpath(current.path, self.record.folder), "sha256": sha,
                 "bytes": current.bytes, "lines": current.lines, "records": current.records,
                 "round": self.record.data["rounds"] + 1, "resubmitted_lines": current.resubmitted,
                 "server": self.api.server, "model": self.settings.model,
                 "upload_name": f"realign_{self.settings.chunk}_{name[:-len('.jsonl')]}_{sha[:12]}.jsonl",
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
            metadata = {"realign_chunk": self.settings.chunk, "realign_request_file": entry["request_file"][-500:]}
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
            self.bar = progress_bar(total=total, unit="line", desc=self.settings.label)
        statuses = collections.Counter(e.get("status") for e in entries)
        self.bar.total = total
        self.bar.n = min(done, total)
        self.bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in sorted(statuses.items())), refresh=False)
        self.bar.refresh()

    async def _collect(self, index):
        """Download a finished batch's results and hand them to the requests' handlers."""
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
            await self.run.note_success()
        refused = {cid for cid, line in results.items() if line_error(line)[0] in (400, 413, 422)}
        sent = self._sent_bodies(entry, refused) if refused else {}
        parts = self.parts[index]
        for request in self.requests:
            base = request.name
            if base not in parts:
                continue
            self._restore(request)
            ids = [part_id(base, k, parts[base]) for k in range(parts[base])]
            lines = [results.get(cid) for cid in ids]
            if any(line is None for line in lines):
                outcome[await self._unanswered(request, entry)] += 1
                continue
            replies = [line_reply(line) for line in lines]
            if all(reply is not None for reply in replies):
                reply = replies[0] if len(replies) == 1 else self.online.merge(replies)
                outcome[await self._answered(request, reply)] += 1
                continue
            status, error = next(line_error(line) for line, reply in zip(lines, replies) if reply is None)
            outcome[await self._failed(request, status, error, [sent.get(cid) for cid in ids])] += 1
        entry.update(collected=True, collected_at=time.time())
        del self.parts[index]
        self.record.save()
        if entry["status"] == "failed":
            logger.warning("batch %s failed: %s", entry["batch_id"], "; ".join(
                f"{e.get('code')}: {e.get('message')}" for e in entry.get("errors") or []) or "no reason given")
        logger.info("batch %s (%s, %s): %s", entry["batch_id"], entry["request_file"], entry["status"],
                    ", ".join(f"{n:,} {what}" for what, n in outcome.most_common()) or "no line still wanted")

    async def _answered(self, request, reply):
        usage = reply.get("usage") or {}
        self.run.budget.learn(request.expected_output, int(usage.get("completion_tokens") or 0))
        self.stats["answered"] += 1
        follow = await self.run.deliver(request, reply, cached=False)
        if follow is None:
            self.record.attempts.pop(request.name, None)
            return "answered"
        tried = self._attempt(request.name)
        tried["sent"] += 1
        tried["replies"] += 1
        tried["state"] = follow.state
        return "to send again (the reply was not used)"

    async def _failed(self, request, status, error, sent):
        """A line in the error file (or a non-200 response in the output file)."""
        message = str(error.get("message") or f"HTTP {status}")[:300]
        if status in (401, 403):
            raise FatalError(f"the API server refused the credentials for the batch lines (HTTP {status}); "
                             "check OPENAI_API_KEY")
        if status == 404:
            raise FatalError(f"the API server answered HTTP 404 to the batch lines: {message} (check --model and "
                             "--base_url)")
        tried = self._attempt(request.name)
        tried["sent"] += 1
        if status in (400, 413, 422):
            refusal = Refusal(status, error)
            bodies = self.online.wire(request.body)
            adapts = not self.run.succeeded or refusal.code in ADAPTABLE_CODES
            adapted = None not in sent and (bodies != sent or (adapts and self.online.learn(sent[0], refusal)))
            if not adapted:
                self.record.attempts.pop(request.name, None)
                await self.run.converse(await self.run.fail(request, RequestFailed(
                    f"HTTP {status}: {message}", status, refused=True)))
                return "refused"
        tried["errors"] += 1
        tried["error"] = describe_problem(status, error)
        if tried["errors"] > self.settings.max_retries:
            self.record.attempts.pop(request.name, None)
            await self.run.converse(await self.run.fail(request, RequestFailed(
                f"failed after {tried['errors']} attempts: {tried['error']}")))
            return "failed (errors)"
        return f"to send again ({tried['error']})"

    async def _unanswered(self, request, entry):
        """A line of the batch in neither result file: never run (a cancelled batch), or the
        whole batch failed (its validation errors count as an error of each line)."""
        status = entry.get("status")
        if status == "cancelled":
            self._attempt(request.name)["sent"] += 1
            return "to send again (cancelled)"
        errors = entry.get("errors") or [{}]
        code = "batch_expired" if status == "expired" else f"batch {status}: {errors[0].get('code') or 'no result'}"
        if any(e.get("code") == TOKEN_LIMIT for e in errors):
            self.held_back.add(request.name)
        return await self._failed(request, None, {"code": code}, [None])

    # -- the dry run -----------------------------------------------------------------

    async def count(self):
        """A dry run: the engine's count of every request, and the request files they would make."""
        self.plan = DryPlan(self.settings, self.online)
        for request in self.requests:
            if self.plan.is_in_a_batch(request.name):
                continue
            if await self.run.cached_reply(request) is not None:
                self.run.dry.cached += 1
                continue
            await self.run.ask(request)
            self.plan.add(request)

    # -- reporting -------------------------------------------------------------------

    def tokens(self):
        online = self.run.spend
        return (self.spend.prompt_tokens + online.prompt_tokens, self.spend.cached_tokens + online.cached_tokens,
                self.spend.completion_tokens + online.completion_tokens)

    def cost(self):
        """``(total, batch, online)`` USD, or None when no price is known."""
        if self.price is None:
            return None
        online = self.run.spend.cost
        return self.spend.cost + online, self.spend.cost, online

    def describe(self):
        """The summary line's part of this mode."""
        stats, run = self.stats, self.run
        prompt, cached, completion = self.tokens()
        cost = self.cost()
        spend = ("spend: unknown (no price for this model)" if cost is None else
                 f"spend: ${cost[0]:.4f} (batch lines ${cost[1]:.4f} at batch prices, online ${cost[2]:.4f})")
        adopted = stats["adopted_uploads"] + stats["adopted_batches"]
        return (f"batch API: uploads: {stats['uploads']:,}, batches: {stats['batches']:,} "
                f"(and {stats['resumed']:,} of earlier runs, {adopted:,} adopted after a crash), "
                f"resubmission rounds: {stats['resubmission_rounds']:,}, lines from batches: {stats['answered']:,}, "
                f"lines from the cache: {stats['cached']:,}, online requests: {run.stats['requests']:,} "
                f"({stats['probes']:,} probes, {stats['fallback']:,} last tries), "
                f"retries: {(self.api.stats['retries'] if self.api else 0) + run.stats['retries']:,}, "
                f"adaptations: {self.online.adaptations()}, prompt tokens: {prompt:,} "
                f"({cached:,} cached), completion tokens: {completion:,}, {spend}")

    def as_dict(self):
        """This mode's part of ``--usage_path``."""
        if self.plan is not None:
            return self.plan.as_dict()
        prompt, _, completion = self.tokens()
        cost = self.cost()
        return {"mode": "batch_api", "uploads": self.stats["uploads"], "batches": self.stats["batches"],
                "resubmission_rounds": self.stats["resubmission_rounds"], "batch_lines": self.stats["answered"],
                "cache_hits": self.stats["cached"], "prompt_tokens": prompt, "completion_tokens": completion,
                "cost_usd": cost[0] if cost else None}

    def report(self):
        return self.plan.report()


# -- cancelling ----------------------------------------------------------------------


def cancel(args, api_key, lock_path):
    """``--batch_cancel``: cancel the chunk's running batches and record it; 0. Holds the
    lock of the chunk's batch file (``lock_path``): a run still working on the chunk would
    send the cancelled lines again, so it must be stopped first."""
    from realign.client import OpenAITransport
    from realign.pool import Stopper
    from realign.records import OutputLock

    path = record_path(args.output_directory, args.dataset_batch_id, args.dataset_batch_num)
    if not os.path.exists(path):
        logger.info("%s does not exist: no batch of chunk %d of %d to cancel", path, args.dataset_batch_id,
                    args.dataset_batch_num)
        return 0
    record = BatchRecord(path, None)
    stopper = Stopper()
    counts = collections.Counter()

    async def cancel_all():
        online = OpenAITransport(args.base_url, api_key, timeout=args.request_timeout)
        api = BatchCalls(online, args.max_retries, stopper, path)
        try:
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
            await online.close()

    with OutputLock(lock_path), stopper.signals_handled():
        asyncio.run(cancel_all())
    counts["collected"] = sum(1 for entry in record.entries if entry.get("collected"))
    logger.info("#batches of chunk %d of %d: cancelled: %d, already finished: %d, never created: %d, results "
                "already in the batch file: %d; a rerun without --batch_cancel keeps what they answered and sends "
                "the rest again", args.dataset_batch_id, args.dataset_batch_num, counts["cancelled"],
                counts["already finished"], counts["not created"], counts["collected"])
    return 0


# -- the dry run ---------------------------------------------------------------------


class DryPlan:
    """What a run in this mode would write and create (``--dry_run``): nothing is sent."""

    def __init__(self, settings, online):
        self.settings = settings
        self.online = online
        self.files = self.lines = self.bytes = self.online_requests = 0
        self._lines = self._bytes = 0
        self.in_batches = set()
        self.running = 0
        if os.path.exists(settings.record_path):
            record = BatchRecord(settings.record_path, None)
            for _, entry in record.uncollected():
                try:
                    with open(record.local_path(entry), "rb") as f:
                        bases = {base_of(json.loads(raw)["custom_id"]) for raw in f if raw.strip()}
                except (OSError, ValueError):
                    continue
                self.in_batches |= bases
                self.running += entry.get("batch_id") is not None

    def is_in_a_batch(self, base):
        return base in self.in_batches

    def add(self, request):
        if not self.online_requests:  # the probe
            self.online_requests = 1
            return
        bodies = self.online.wire(request.body)
        size = sum(len(request_line(part_id(request.name, k, len(bodies)), body)) for k, body in enumerate(bodies))
        if not self.files or self._lines + len(bodies) > self.settings.max_requests or \
                self._bytes + size > self.settings.max_bytes:
            self.files += 1
            self._lines = self._bytes = 0
        self._lines += len(bodies)
        self._bytes += size
        self.lines += len(bodies)
        self.bytes += size

    def as_dict(self):
        return {"mode": "batch_api", "online_requests": self.online_requests, "batch_lines": self.lines,
                "batches": self.files, "minutes": None}

    def report(self):
        lines = [(f"  batch API: {self.lines:,} request lines ({self.bytes:,} bytes) in {self.files:,} request "
                  f"files, i.e. {self.files:,} batches (at most {self.settings.max_requests:,} lines and "
                  f"{self.settings.max_bytes:,} bytes each)")]
        if self.online_requests:
            lines.append("  the first request is sent online (at the online price), to learn which parameters the "
                         "model accepts before the batches")
        if self.in_batches:
            lines.append(f"  already in batches recorded by earlier runs: {len(self.in_batches):,} records "
                         f"({self.running:,} batches created)")
        lines.append(f"  expected time: each batch within its {COMPLETION_WINDOW} completion window, often much sooner")
        return lines
