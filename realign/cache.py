"""The request cache: a paid reply is never paid for twice.

Every paid call (reformat and classify requests, the evaluation judges, Serper searches)
looks here before it is sent and stores the reply once it is complete and usable. The key
is a hash of what determines the answer: the endpoint and the whole request body (model,
messages, ``n``, sampling, the output cap, ...). The value is the server's reply, as JSON.

Storage is one SQLite database (``requests.sqlite3``) in the cache folder: ``--cache_dir``,
else ``$REALIGN_CACHE_DIR``, else ``$XDG_CACHE_HOME/realign``, else ``~/.cache/realign``.
SQLite's write-ahead log lets the N processes of a Slurm array read and write it at once on
one machine; each reply is stored in one transaction, so a kill leaves either the whole
entry or none. On a network filesystem (NFS, Lustre) SQLite's locking cannot be trusted
across machines: give each node its own cache folder on a local disk.

The same database remembers the rate limits a server last reported (``limits`` table), so
that a dry run can say how long a run will take.
"""

import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
import zlib

from realign.records import InputError

logger = logging.getLogger(__name__)

CACHE_FILE = "requests.sqlite3"
BUSY_TIMEOUT_MS = 60_000  # wait this long for another process's write before giving up
PAGE_CACHE_KIB = 256  # SQLite's page cache of a connection
SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, value BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS limits (server TEXT PRIMARY KEY, requests REAL, tokens REAL, updated REAL NOT NULL);
"""


def default_cache_dir():
    """``$REALIGN_CACHE_DIR``, else ``$XDG_CACHE_HOME/realign``, else ``~/.cache/realign``."""
    if os.environ.get("REALIGN_CACHE_DIR"):
        return os.environ["REALIGN_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "realign")


def request_key(endpoint, body):
    """The cache key of a request: SHA-256 of the endpoint and the canonical JSON body."""
    text = json.dumps({"endpoint": endpoint, "body": body}, sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Cache:
    """``get(key) -> reply or None``, ``put(key, reply)``; thread-safe.

    ``read=False`` never answers from the cache (``--refresh_cache``); ``write=False``
    never stores (with ``read=False`` too: ``--no-cache``, and then no file is opened, unless
    ``limits``: a dry run with ``--refresh_cache`` still reads the remembered rate limits).
    """

    def __init__(self, directory=None, read=True, write=True, limits=False):
        self.directory = directory or default_cache_dir()
        self.read = read
        self.write = write
        self.hits = 0
        self.stored = 0
        self._lock = threading.Lock()
        self._db = None
        if read or write or limits:
            self.path = os.path.join(self.directory, CACHE_FILE)
            try:
                os.makedirs(self.directory, exist_ok=True)
                self._db = self._connect()
            except (OSError, sqlite3.Error) as e:
                raise InputError(f"{self.path}: cannot use the request cache ({e}); choose another --cache_dir "
                                 "or pass --no-cache") from None
        else:
            self.path = None

    def _connect(self):
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                             check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # The N processes of a Slurm array often create the cache at the same moment. Until the
        # database is in WAL mode, SQLite answers some of them "database is locked" at once,
        # without waiting (two connections upgrading their locks would deadlock): try again.
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                # WAL: readers never wait for the writer; each commit is one atomic append.
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                db.executescript(SCHEMA)
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    db.close()
                    raise
                time.sleep(random.uniform(0.005, 0.05))
        if mode.lower() != "wal":  # pragma: no cover - a filesystem without shared memory
            logger.warning("%s: the cache cannot use SQLite's write-ahead log here (%s mode)", self.path, mode)
        db.execute("PRAGMA synchronous = NORMAL")
        # A lookup reads a few pages by key; the file system caches the file anyway. SQLite's
        # own page cache (2 MiB by default) is kept small: a reformat process's memory is
        # meant to be the interpreter's plus a tenth of its input (benchmarks/bench_memory.py).
        db.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
        return db

    @property
    def enabled(self):
        return self._db is not None

    def get(self, key):
        """The stored reply (a JSON value) for ``key``, or None."""
        if not self.read or self._db is None:
            return None
        with self._lock:
            row = self._db.execute("SELECT value FROM replies WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            value = json.loads(zlib.decompress(row[0]))
        except (zlib.error, ValueError):  # pragma: no cover - never written so; be safe anyway
            logger.warning("%s: ignoring an unreadable cache entry", self.path)
            return None
        self.hits += 1
        return value

    def contains(self, key):
        """Whether ``key`` would be answered from the cache (for a dry run: nothing is read)."""
        if not self.read or self._db is None:
            return False
        with self._lock:
            return self._db.execute("SELECT 1 FROM replies WHERE key = ?", (key,)).fetchone() is not None

    def put(self, key, reply):
        """Store ``reply`` (a JSON value) under ``key``, in one transaction."""
        if not self.write or self._db is None:
            return
        blob = zlib.compress(json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), 1)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO replies (key, value, created) VALUES (?, ?, ?)",
                             (key, blob, time.time()))
        self.stored += 1

    def remember_limits(self, server, requests=None, tokens=None):
        """Keep the per-minute limits a server reported, for later dry runs."""
        if self._db is None or not self.write or (requests is None and tokens is None):
            return
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO limits (server, requests, tokens, updated) VALUES (?, ?, ?, ?)",
                             (server, requests, tokens, time.time()))

    def known_limits(self, server):
        """``{"requests": per minute or None, "tokens": ...}`` last reported by ``server``."""
        if self._db is None:
            return {"requests": None, "tokens": None}
        with self._lock:
            row = self._db.execute("SELECT requests, tokens FROM limits WHERE server = ?", (server,)).fetchone()
        return {"requests": row[0], "tokens": row[1]} if row else {"requests": None, "tokens": None}

    def close(self):
        if self._db is not None:
            with self._lock:
                self._db.close()
            self._db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_cache(args):
    """The cache of a script's ``--cache_dir`` / ``--cache`` / ``--refresh_cache`` flags: None
    with ``--no-cache``; a dry run (``--dry_run``) only reads, and still reads the remembered
    rate limits with ``--refresh_cache``."""
    if not args.cache:
        return None
    dry = getattr(args, "dry_run", False)
    return Cache(args.cache_dir, read=not args.refresh_cache, write=not dry, limits=dry)
