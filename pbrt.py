"""pbrt: a realtime backend in one file that speaks the PocketBase API.

pbrt answers the HTTP API of PocketBase 0.40 (health, collections, records,
auth and the Server-Sent Events realtime API) so that the official PocketBase
SDKs work against it unchanged. It needs Python 3.11+ and nothing else.

Run a server (data in ./pb_data, listening on 127.0.0.1:8090)::

    python pbrt.py
    python pbrt.py serve --http 0.0.0.0:8090 --dir ./pb_data

Embed it in a script::

    import pbrt
    app = pbrt.App(dir="pb_data", port=0)
    with app.run_in_thread() as url:
        ...  # talk to `url` with any HTTP client or SDK

Sections, read top to bottom (each uses only names from above it):

     1. constants and defaults          7. (auth)
     2. errors                          8. (realtime broker)
     3. HTTP/1.1 wire format            9. routes and handlers
     4. (Server-Sent Events frames)    10. connection loop
     5. (rule language)                11. Config, App, serve()
     6. store                          12. command line
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.utils
import http
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ApiError",
    "App",
    "BadRequestError",
    "Config",
    "ForbiddenError",
    "InternalServerError",
    "NotFoundError",
    "PbrtError",
    "ProtocolError",
    "Request",
    "Response",
    "TooManyRequestsError",
    "UnauthorizedError",
    "ValidationError",
    "main",
    "serve",
]

__version__ = "0.1.0"

JSON = Any
Headers = dict[str, str]

# ==========================================================================
# 1. Constants and defaults
# ==========================================================================
# Every limit a client can push against lives here, with its unit in the name.

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090  # PocketBase's default `--http 127.0.0.1:8090`
DEFAULT_DATA_DIR = "pb_data"
DATABASE_FILE = "data.db"

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; over it -> 431
MAX_HEADER_COUNT = 100  # nginx and Go both cap header count around this order
MAX_BODY_BYTES = 32 * 1024 * 1024  # PocketBase's default body limit (32 MiB)
MAX_FORM_FIELDS = 10_000  # fields of one urlencoded or multipart body
HEAD_TIMEOUT_S = 10.0  # a head must be complete this long after its first byte
BODY_TIMEOUT_S = 60.0  # the whole body must arrive within this time
KEEPALIVE_TIMEOUT_S = 75.0  # idle keep-alive connections close (nginx's default)
SHUTDOWN_GRACE_S = 5.0  # requests in flight get this long to finish on shutdown
DISCARD_AFTER_REJECT_BYTES = 256 * 1024  # read so a 413 is not lost to a TCP reset

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
FILE_NOT_FOUND_MESSAGE = "File not found."  # PocketBase's static handler: unknown routes

# ==========================================================================
# 2. Errors
# ==========================================================================
# Lower layers raise what they know (a malformed request, a failed validation);
# only `to_api_error` in section 9 turns them into HTTP statuses.


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


class BodyError(PbrtError):
    """A request body that cannot be decoded for its content type."""


class ValidationError(PbrtError):
    """Values failed validation.

    `errors` maps a field name to PocketBase's `{"code", "message"[, "params"]}`
    object, or to a dict of such objects keyed by list index.
    """

    def __init__(self, errors: dict[str, JSON], message: str | None = None) -> None:
        super().__init__(message or "Validation failed.")
        self.errors = errors
        self.message = message


def validation_entry(code: str, message: str, params: dict[str, JSON] | None = None) -> JSON:
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


class ForbiddenError(ApiError):
    """403 Forbidden."""

    status = 403


class NotFoundError(ApiError):
    """404 Not Found."""

    status = 404


class TooManyRequestsError(ApiError):
    """429 Too Many Requests."""

    status = 429


class InternalServerError(ApiError):
    """500 Internal Server Error; the cause is logged, never sent."""

    status = 500


# ==========================================================================
# 3. HTTP/1.1 wire format
# ==========================================================================
# Bytes in, `Request` out; `Response` in, bytes out (RFC 9112). Nothing here
# reads a socket or a clock: the connection loop (section 10) feeds the bytes.

# RFC 9110 §5.6.2 token characters.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION_RE = re.compile(rb"HTTP/(\d)\.(\d)")
# Field values: visible ASCII, obs-text, SP and HTAB (RFC 9110 §5.5).
_BAD_FIELD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;.*)?")


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
    def keep_alive(self) -> bool:
        """Whether the connection stays open after this request (RFC 9112 §9.3)."""
        tokens = {token.strip().lower() for token in self.header("connection").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    @property
    def expects_continue(self) -> bool:
        """Whether the client waits for `100 Continue` before sending the body."""
        return self.header("expect").lower() == "100-continue" and self.version == "HTTP/1.1"


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
    headers, CORS, Date and framing. A response with a `stream` sends its
    chunks as they come (Server-Sent Events) instead of `body`.
    """

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    stream: AsyncIterator[bytes] | None = None


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
    lines.extend(f"{name}: {value}" for name, value in sorted(headers, key=lambda item: item[0]))
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
    if isinstance(number, int) and not -_MAX_SAFE_INTEGER <= number <= _MAX_SAFE_INTEGER:
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
    """A file part of a multipart body."""

    filename: str
    content_type: str
    content: bytes


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
JSON_PAYLOAD_FIELD = "@jsonPayload"  # PocketBase's multipart field holding a JSON object


def _parse_header_params(value: str) -> tuple[str, dict[str, str]]:
    """Split `type/sub; a=1; b="x"` into the lower-case main value and params."""
    main, _, rest = value.partition(";")
    params = {}
    for match in _PARAM_RE.finditer(";" + rest):
        raw = match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[match.group(1).lower()] = raw
    return main.strip().lower(), params


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
    return {key: values[0] if len(values) == 1 else values for key, values in grouped.items()}


def _parse_multipart(body: bytes, boundary: bytes) -> Body:
    """Decode a multipart/form-data body (RFC 7578)."""
    delimiter = b"--" + boundary
    sections = body.split(delimiter)
    if len(sections) < 3 or not sections[-1].startswith(b"--"):
        raise BodyError("malformed multipart body")
    if len(sections) - 2 > MAX_FORM_FIELDS:
        raise BodyError("too many multipart parts")
    pairs: list[tuple[str, str]] = []
    files: dict[str, list[UploadedFile]] = {}
    json_payload: dict[str, JSON] = {}
    for section in sections[1:-1]:
        if not section.startswith(b"\r\n") or not section.endswith(b"\r\n"):
            raise BodyError("malformed multipart part")
        raw_head, sep, content = section[2:-2].partition(b"\r\n\r\n")
        if not sep:
            if not section[2:-2].endswith(b"\r\n"):
                raise BodyError("malformed multipart part")
            raw_head, content = section[2:-4], b""
        part_headers = {}
        for line in raw_head.split(b"\r\n"):
            name, colon, value = line.decode("utf-8", "replace").partition(":")
            if not colon:
                raise BodyError("malformed multipart header")
            part_headers[name.strip().lower()] = value.strip()
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
            text = content.decode("utf-8")
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


# ==========================================================================
# 6. Store
# ==========================================================================
# The sqlite3 database in the data dir. Synchronous and short: handlers call
# it inside one transaction each. Knows nothing of HTTP.


class Store:
    """The sqlite3 database of one data dir (`<dir>/data.db`).

    Opened in WAL mode with foreign keys on and a busy timeout, so the
    `sqlite3` shell and other processes can read it while pbrt runs.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode = WAL")
        self.connection.execute("PRAGMA foreign_keys = ON")
        self.connection.execute("PRAGMA busy_timeout = 5000")
        self.connection.execute("PRAGMA synchronous = NORMAL")

    @classmethod
    def open_dir(cls, directory: str) -> Store:
        """Create `directory` if needed and open its database."""
        os.makedirs(directory, exist_ok=True)
        return cls(os.path.join(directory, DATABASE_FILE))

    def close(self) -> None:
        """Close the database; later calls fail."""
        self.connection.close()


# ==========================================================================
# 9. Routes and handlers
# ==========================================================================
# A request context in, a `Response` out. Handlers raise; `to_api_error` is
# the one place that turns any exception into PocketBase's envelope.

log = logging.getLogger("pbrt")

Handler = Callable[["RequestContext"], Awaitable[Response]]


@dataclass(slots=True)
class RequestContext:
    """What a handler knows about one request."""

    app: App
    request: Request
    raw_body: bytes
    remote_ip: str
    params: dict[str, str] = field(default_factory=dict)
    _body: Body | None = None

    @property
    def body(self) -> Body:
        """The body decoded for its Content-Type (once; BodyError if invalid)."""
        if self._body is None:
            self._body = parse_body(self.request.header("content-type"), self.raw_body)
        return self._body


def json_response(value: JSON, status: int = 200) -> Response:
    """Return a JSON response encoded as PocketBase encodes it."""
    return Response(status, _json_body(value), (("Content-Type", "application/json"),))


def error_response(error: ApiError) -> Response:
    """Return the JSON envelope of `error`."""
    return json_response(error.payload(), error.status)


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
    if isinstance(exc, BodyError):
        return BadRequestError()
    if isinstance(exc, ProtocolError):
        return ApiError(status=exc.status_hint)
    log.error("unexpected error", exc_info=exc)
    return InternalServerError()


class Router:
    """Maps a method and a path to a handler and its path parameters.

    A path no route knows answers PocketBase's static-file 404 ("File not
    found."); a known path with another method answers the default 404.
    HEAD is served by the GET handler.
    """

    _PARAM_RE = re.compile(r"\{(\w+)\}")

    def __init__(self) -> None:
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """Register `handler` for `method` on a path like `/api/x/{id}`."""
        pieces = self._PARAM_RE.split(pattern)  # literal, name, literal, name, ...
        regex = re.compile(
            "".join(
                re.escape(piece) if index % 2 == 0 else f"(?P<{piece}>[^/]+)"
                for index, piece in enumerate(pieces)
            )
            + r"\Z"
        )
        for existing, handlers in self._routes:
            if existing.pattern == regex.pattern:
                handlers[method] = handler
                return
        self._routes.append((regex, {method: handler}))

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
        raise NotFoundError(None if path_known else FILE_NOT_FOUND_MESSAGE)


async def handle_health(context: RequestContext) -> Response:
    """GET /api/health: PocketBase's liveness answer."""
    return json_response({"message": "API is healthy.", "code": 200, "data": {}})


def build_router() -> Router:
    """Return the router with every API route."""
    router = Router()
    router.add("GET", "/api/health", handle_health)
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
# 10. Connection loop
# ==========================================================================
# Moves bytes between a socket and the pure parser/encoder: read a head under
# a limit and a deadline, read the body, dispatch, write, repeat. Nothing a
# client sends may raise out of `serve_connection`.


class _Connection:
    """One client connection and whether a request is in flight on it."""

    __slots__ = ("writer", "task", "busy")

    def __init__(self, writer: asyncio.StreamWriter, task: asyncio.Task[None] | None) -> None:
        self.writer = writer
        self.task = task
        self.busy = False


class _Closed(Exception):
    """The peer went away or timed out; close without answering."""


async def _read_head(reader: asyncio.StreamReader, config: Config, first: bool) -> bytes | None:
    """Read one request head; None when the peer closed between requests."""
    idle_timeout = config.head_timeout_s if first else config.keepalive_timeout_s
    try:
        start = await asyncio.wait_for(reader.read(1), idle_timeout)
    except (TimeoutError, ConnectionError):
        return None
    if not start:
        return None
    try:
        rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), config.head_timeout_s)
    except asyncio.LimitOverrunError:
        raise ProtocolError("request head too large", 431) from None
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        raise _Closed from None
    head = start + rest
    if len(head) > MAX_HEAD_BYTES:
        raise ProtocolError("request head too large", 431)
    return head


async def _read_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request, config: Config
) -> bytes:
    """Read the body framed by Content-Length or chunked encoding."""
    length = request.body_length
    if length is not None and length > config.max_body_bytes:
        raise ProtocolError("request body too large", 413)
    if request.expects_continue and length != 0:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    try:
        async with asyncio.timeout(config.body_timeout_s):
            if length is not None:
                return await reader.readexactly(length) if length else b""
            return await _read_chunked(reader, config.max_body_bytes)
    except asyncio.LimitOverrunError:
        raise ProtocolError("chunk line too long") from None
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        raise _Closed from None


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


async def _discard_input(reader: asyncio.StreamReader) -> None:
    """Read and drop what a rejected client is still sending, briefly."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            remaining = DISCARD_AFTER_REJECT_BYTES
            while remaining > 0 and (data := await reader.read(min(remaining, 65536))):
                remaining -= len(data)


# ==========================================================================
# 11. Config, App, serve()
# ==========================================================================
# The embedding API: one frozen Config, one App that owns the store, the
# router and the listening socket. Only this section starts or stops things.


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of a pbrt server; CLI flags map one to one onto fields."""

    #: Data directory; `data.db` is created inside it.
    dir: str = DEFAULT_DATA_DIR
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
    #: Seconds requests in flight get to finish on shutdown.
    shutdown_grace_s: float = SHUTDOWN_GRACE_S


class App:
    """A pbrt server: its store, routes and listening socket.

    `App(dir=..., port=...)` takes a Config or its fields as keywords. Use
    `await app.start()` / `await app.stop()` inside a running event loop,
    `app.serve()` to block until SIGINT/SIGTERM, or `app.run_in_thread()`
    from synchronous code.
    """

    def __init__(self, config: Config | None = None, **settings: Any) -> None:
        base = config or Config()
        self.config = dataclasses.replace(base, **settings) if settings else base
        self.router = build_router()
        self.store: Store | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._date_cache: tuple[int, str] = (0, "")

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> int:
        """Open the store and start listening; return the bound port."""
        self.store = Store.open_dir(self.config.dir)
        try:
            self._server = await asyncio.start_server(
                self._accept, self.config.host, self.config.port, limit=MAX_HEAD_BYTES
            )
        except BaseException:
            self.store.close()
            self.store = None
            raise
        port: int = self._server.sockets[0].getsockname()[1]
        log.info("Server started at http://%s:%d", self.config.host, port)
        return port

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish, close the store."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            if not connection.busy and connection.task is not None:
                connection.task.cancel()
        deadline = time.monotonic() + self.config.shutdown_grace_s
        while any(c.busy for c in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        tasks = [c.task for c in self._connections if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        if self.store is not None:
            self.store.close()
            self.store = None

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def serve_forever(self, stop: asyncio.Event | None = None) -> None:
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
            await stop.wait()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            await self.stop()

    def serve(self) -> None:
        """Run the server until SIGINT/SIGTERM (what `python pbrt.py serve` does)."""
        asyncio.run(self.serve_forever())

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

        thread = threading.Thread(target=asyncio.run, args=(run(),), name="pbrt", daemon=True)
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

    # --- connections -----------------------------------------------------------

    def _http_date(self) -> str:
        """Return the Date header value, formatted at most once per second."""
        now = int(time.time())
        if self._date_cache[0] != now:
            self._date_cache = (now, email.utils.formatdate(now, usegmt=True))
        return self._date_cache[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(writer, asyncio.current_task())
        self._connections.add(connection)
        try:
            await self._serve_connection(reader, writer, connection)
        except (_Closed, ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # the last guard: a bug must not kill the server
            log.exception("connection handler failed")
        finally:
            self._connections.discard(connection)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        peer = writer.get_extra_info("peername")
        remote_ip = peer[0] if isinstance(peer, tuple) else ""
        first = True
        while True:
            connection.busy = False
            try:
                head = await _read_head(reader, self.config, first)
                if head is None:
                    return
                connection.busy = True
                started = time.perf_counter()
                request = parse_request_head(head)
                raw_body = await _read_body(reader, writer, request, self.config)
            except ProtocolError as exc:
                await self._reject(reader, writer, exc)
                return
            first = False
            response = await self._dispatch(request, raw_body, remote_ip)
            keep_alive = request.keep_alive and self._server is not None and self._server.is_serving()
            await self._write_response(writer, request, response, keep_alive)
            log.info(
                "%s %s %d %.2fms",
                request.method,
                request.target,
                response.status,
                (time.perf_counter() - started) * 1000,
            )
            if not keep_alive:
                return

    async def _dispatch(self, request: Request, raw_body: bytes, remote_ip: str) -> Response:
        """Route one request; every exception becomes an error envelope."""
        if request.method == "OPTIONS":
            return Response(204, headers=tuple(cors_preflight_headers(request)))
        context = RequestContext(self, request, raw_body, remote_ip)
        try:
            handler, context.params = self.router.match(request.method, request.path)
            return await handler(context)
        except Exception as exc:
            return error_response(to_api_error(exc))

    async def _write_response(
        self, writer: asyncio.StreamWriter, request: Request, response: Response, keep_alive: bool
    ) -> None:
        headers = list(response.headers)
        if request.method != "OPTIONS":
            headers.extend(SECURITY_HEADERS)
            if request.header("origin"):
                headers.append(("Access-Control-Allow-Origin", "*"))
        head_only = request.method == "HEAD"
        if response.stream is None:
            writer.write(
                encode_response_head(
                    response.status,
                    headers,
                    date=self._http_date(),
                    version=request.version,
                    content_length=len(response.body),
                    close=not keep_alive,
                )
            )
            if not head_only and response.body:
                writer.write(response.body)
            await writer.drain()
            return
        writer.write(
            encode_response_head(response.status, headers, date=self._http_date(), version=request.version)
        )
        async for chunk in response.stream:
            writer.write(encode_chunk(chunk))
            await writer.drain()
        writer.write(encode_chunk(b""))
        await writer.drain()

    async def _reject(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exc: ProtocolError
    ) -> None:
        """Answer a protocol error with its status, then close."""
        error = to_api_error(exc)
        body = _json_body(error.payload())
        headers = [("Content-Type", "application/json"), *SECURITY_HEADERS]
        writer.write(
            encode_response_head(
                error.status, headers, date=self._http_date(), content_length=len(body), close=True
            )
            + body
        )
        await writer.drain()
        log.info("rejected request: %s -> %d", exc, error.status)
        if exc.status_hint == 413:
            await _discard_input(reader)


def serve(**settings: Any) -> None:
    """Run a pbrt server until SIGINT/SIGTERM; keywords are Config fields."""
    App(**settings).serve()


# ==========================================================================
# 12. Command line
# ==========================================================================
# `python pbrt.py [serve] [--http HOST:PORT] [--dir PATH]`, shaped like
# PocketBase's CLI. Only this section reads argv or the environment.


def _parse_http_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"invalid address {value!r}, expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


COMMANDS = ("serve",)


def build_arg_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `python pbrt.py`."""
    parser = argparse.ArgumentParser(
        prog="pbrt",
        description="pbrt: a realtime backend in one file, compatible with the PocketBase API.",
    )
    parser.add_argument("--version", action="version", version=f"pbrt version {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve_parser = commands.add_parser("serve", help="start the web server (the default command)")
    serve_parser.add_argument(
        "--http",
        type=_parse_http_address,
        default=(DEFAULT_HOST, DEFAULT_PORT),
        metavar="HOST:PORT",
        help=f"TCP address to listen on (default {DEFAULT_HOST}:{DEFAULT_PORT})",
    )
    _add_common_arguments(serve_parser)
    return parser


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", default=DEFAULT_DATA_DIR, help=f"the data directory (default ./{DEFAULT_DATA_DIR})"
    )
    parser.add_argument("--quiet", action="store_true", help="log only warnings and errors")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code.

    Without a command, `serve` is assumed (`python pbrt.py --dir x` serves).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_arg_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    host, port = args.http
    try:
        App(Config(dir=args.dir, host=host, port=port)).serve()
    except OSError as exc:
        log.error("cannot start the server: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
