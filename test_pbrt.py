"""Tests of pbrt.py: pure sections by tables, the server through real sockets.

Run: python -X dev -W error -m pytest -q
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import doctest
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import pbrt

HERE = Path(__file__).resolve().parent


def run(coroutine: Awaitable[Any], timeout: float = 60.0) -> Any:
    """Run one async test body under a deadline."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coroutine

    return asyncio.run(bounded())


# ==========================================================================
# 0. The module itself
# ==========================================================================


def test_module_imports_only_the_standard_library() -> None:
    tree = ast.parse((HERE / "pbrt.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"__future__"} - set(sys.stdlib_module_names)
    assert "sqlite3" in imported and "asyncio" in imported


def test_module_doctests_pass() -> None:
    result = doctest.testmod(pbrt)
    assert result.attempted >= 8
    assert result.failed == 0


def test_module_public_names_have_docstrings() -> None:
    for name in pbrt.__all__:
        assert getattr(pbrt, name).__doc__, name


# ==========================================================================
# 3. HTTP/1.1 wire format
# ==========================================================================

GOOD_HEADS = [
    pytest.param(
        b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n",
        dict(method="GET", path="/api/health", query={}, version="HTTP/1.1", body_length=0),
        id="simple-get",
    ),
    pytest.param(
        b"GET /api/h%65alth?a=1&b=&a=2 HTTP/1.1\r\nHost: x\r\n\r\n",
        dict(path="/api/health", query={"a": ["1", "2"], "b": [""]}),
        id="percent-decoded-path-repeated-query",
    ),
    pytest.param(
        b"GET /p?q=%C3%A9+x HTTP/1.1\r\nHost: x\r\n\r\n",
        dict(query={"q": ["\u00e9 x"]}),
        id="query-utf8-and-plus",
    ),
    pytest.param(
        b"GET /api/health HTTP/1.0\r\n\r\n",
        dict(version="HTTP/1.0", keep_alive=False),
        id="http10-without-host",
    ),
    pytest.param(
        b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
        dict(keep_alive=True),
        id="http10-keep-alive",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        dict(keep_alive=False),
        id="connection-close",
    ),
    pytest.param(
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        dict(body_length=5),
        id="repeated-equal-content-length",
    ),
    pytest.param(
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n",
        dict(body_length=None),
        id="chunked",
    ),
    pytest.param(
        b"GET http://example.test/api/health?x=1 HTTP/1.1\r\nHost: example.test\r\n\r\n",
        dict(path="/api/health", query={"x": ["1"]}),
        id="absolute-form",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\nX-B:  \t padded \t\r\n\r\n",
        dict(headers={"host": "x", "x-a": "1, 2", "x-b": "padded"}),
        id="repeated-headers-joined-and-trimmed",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        dict(expects_continue=True),
        id="expect-continue",
    ),
    pytest.param(
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        dict(path="*"),
        id="options-asterisk",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Name: caf\xe9\r\n\r\n",
        dict(headers={"host": "x", "x-name": "caf\u00e9"}),
        id="obs-text-header-value",
    ),
]


@pytest.mark.parametrize(("head", "expected"), GOOD_HEADS)
def test_http_parse_request_head_accepts(head: bytes, expected: dict[str, Any]) -> None:
    request = pbrt.parse_request_head(head)
    for name, value in expected.items():
        assert getattr(request, name) == value, name


BAD_HEADS = [
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="no-spaces"),
    pytest.param(b"GET /  HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="double-space"),
    pytest.param(b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="bad-method-token"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="http11-without-host"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, id="http2"),
    pytest.param(b"GET / HTTX/1.1\r\nHost: x\r\n\r\n", 400, id="bad-protocol"),
    pytest.param(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, id="space-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400, id="obs-fold"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400, id="header-without-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\x00y\r\n\r\n", 400, id="nul-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\ny\r\n\r\n", 400, id="bare-lf-in-value"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        400,
        id="two-different-content-lengths",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n", 400, id="content-length-list"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, id="negative-length"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
        400,
        id="huge-length",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
        id="smuggling-cl-and-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        400,
        id="unsupported-transfer-coding",
    ),
    pytest.param(b"GET nohost HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="relative-target"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431, id="too-many-headers"
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n", 400, id="unterminated"),
]


@pytest.mark.parametrize(("head", "status"), BAD_HEADS)
def test_http_parse_request_head_rejects(head: bytes, status: int) -> None:
    with pytest.raises(pbrt.ProtocolError) as caught:
        pbrt.parse_request_head(head)
    assert caught.value.status_hint == status


@pytest.mark.parametrize(
    ("line", "size"),
    [(b"0", 0), (b"a", 10), (b"FF", 255), (b"10;ext=1", 16), (b"1 ; x", 1)],
)
def test_http_parse_chunk_size_accepts(line: bytes, size: int) -> None:
    assert pbrt.parse_chunk_size(line) == size


@pytest.mark.parametrize("line", [b"", b"x", b"-1", b"0x10", b"1" * 17, b" 1"])
def test_http_parse_chunk_size_rejects(line: bytes) -> None:
    with pytest.raises(pbrt.ProtocolError):
        pbrt.parse_chunk_size(line)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param(
            dict(status=200, headers=[("X-B", "2"), ("Content-Type", "application/json")], content_length=2),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-B: 2\r\nDate: D\r\n"
            b"Content-Length: 2\r\n\r\n",
            id="sorted-then-date-then-length",
        ),
        pytest.param(
            dict(status=404, headers=[], content_length=0, close=True),
            b"HTTP/1.1 404 Not Found\r\nDate: D\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            id="close",
        ),
        pytest.param(
            dict(status=200, headers=[("Content-Type", "text/event-stream")]),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nDate: D\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            id="stream-is-chunked",
        ),
        pytest.param(
            dict(status=204, headers=[], content_length=0),
            b"HTTP/1.1 204 No Content\r\nDate: D\r\n\r\n",
            id="no-content-has-no-framing",
        ),
        pytest.param(
            dict(status=200, headers=[], content_length=1, version="HTTP/1.0", close=True),
            b"HTTP/1.0 200 OK\r\nDate: D\r\nContent-Length: 1\r\n\r\n",
            id="http10",
        ),
    ],
)
def test_http_encode_response_head(kwargs: dict[str, Any], expected: bytes) -> None:
    assert pbrt.encode_response_head(date="D", **kwargs) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"data": {}, "message": "x", "status": 400}, b'{"data":{},"message":"x","status":400}'),
        ({"s": "é☃\u2028<>&"}, '{"s":"é☃\u2028<>&"}'.encode()),
        ({"s": 'q"\\\n\t\x01'}, b'{"s":"q\\"\\\\\\n\\t\\u0001"}'),
        ([pbrt._js_number(1.0), pbrt._js_number(1e20), 0.5], b"[1,100000000000000000000,0.5]"),
        (pbrt.parse_json('{"n":12345678901234567890,"f":2.50}'), b'{"n":12345678901234567168,"f":2.5}'),
    ],
    ids=["envelope", "raw-utf8", "escapes", "whole-numbers", "parsed-numbers"],
)
def test_http_json_body_matches_pocketbase(value: Any, expected: bytes) -> None:
    assert pbrt._json_body(value) == expected


MULTIPART = (
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="title"\r\n\r\n'
    b"hello\r\n"
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="tags"\r\n\r\na\r\n'
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="tags"\r\n\r\nb\r\n'
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="@jsonPayload"\r\n\r\n{"views":9,"title":"json"}\r\n'
    b"--XyZ\r\n"
    b'Content-Disposition: form-data; name="files"; filename="a.txt"\r\n'
    b"Content-Type: text/plain\r\n\r\nfile\r\ndata\r\n"
    b"--XyZ--\r\n"
)


@pytest.mark.parametrize(
    ("content_type", "body", "data", "is_form"),
    [
        pytest.param("application/json", b'{"a":[1,2.0]}', {"a": [1, 2]}, False, id="json"),
        pytest.param("application/json; charset=utf-8", b'{"a":1} tail', {"a": 1}, False, id="trailing"),
        pytest.param("", b"", {}, False, id="empty"),
        pytest.param(
            "application/x-www-form-urlencoded",
            b"a=1&b=x&b=y&c=%2F*",
            {"a": "1", "b": ["x", "y"], "c": "/*"},
            True,
            id="urlencoded",
        ),
        pytest.param(
            'multipart/form-data; boundary="XyZ"',
            MULTIPART,
            {"title": "json", "tags": ["a", "b"], "views": 9},
            True,
            id="multipart-with-json-payload",
        ),
    ],
)
def test_http_parse_body_accepts(content_type: str, body: bytes, data: Any, is_form: bool) -> None:
    parsed = pbrt.parse_body(content_type, body)
    assert parsed.data == data
    assert parsed.is_form is is_form


def test_http_parse_body_keeps_multipart_files() -> None:
    parsed = pbrt.parse_body("multipart/form-data; boundary=XyZ", MULTIPART)
    assert parsed.files == {"files": [pbrt.UploadedFile("a.txt", "text/plain", b"file\r\ndata")]}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        pytest.param("application/json", b"{", id="truncated-json"),
        pytest.param("application/json", b"[1,2]", id="json-array"),
        pytest.param("application/json", b'{"a":NaN}', id="nan"),
        pytest.param("application/json", b'{"a":1e400}', id="infinite"),
        pytest.param("application/json", b"[" * 100_000, id="deep-nesting"),
        pytest.param("application/json", b'{"a":"\xff"}', id="not-utf8"),
        pytest.param("text/plain", b"x", id="unknown-type"),
        pytest.param("", b'{"a":1}', id="missing-type"),
        pytest.param("multipart/form-data", MULTIPART, id="no-boundary"),
        pytest.param("multipart/form-data; boundary=XyZ", MULTIPART[:-9], id="unterminated-multipart"),
        pytest.param(
            "multipart/form-data; boundary=b",
            b"--b\r\nContent-Disposition: attachment\r\n\r\nx\r\n--b--\r\n",
            id="part-without-name",
        ),
        pytest.param(
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="@jsonPayload"\r\n\r\n[1]\r\n--b--\r\n',
            id="json-payload-not-object",
        ),
        pytest.param(
            "application/x-www-form-urlencoded", b"a=1&" * (pbrt.MAX_FORM_FIELDS + 1), id="too-many-fields"
        ),
    ],
)
def test_http_parse_body_rejects(content_type: str, body: bytes) -> None:
    with pytest.raises(pbrt.BodyError):
        pbrt.parse_body(content_type, body)


# ==========================================================================
# 9. Routes (through real sockets)
# ==========================================================================


@contextlib.asynccontextmanager
async def running_app(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[pbrt.App, int]]:
    """Start an App on 127.0.0.1 port 0 with its data in tmp_path."""
    app = pbrt.App(dir=str(tmp_path / "pb_data"), port=0, **settings)
    port = await app.start()
    try:
        yield app, port
    finally:
        await app.stop()


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes, head_only: bool = False, methods: list[str] = ()) -> list[RawResponse]:
    """Split raw bytes into responses (Content-Length or chunked framing).

    A response to HEAD (`head_only`, or "HEAD" at its index in `methods`)
    has no body whatever its Content-Length says.
    """
    responses: list[RawResponse] = []
    while data:
        if len(responses) < len(methods):
            head_only = methods[len(responses)] == "HEAD"
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete head: {head!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
        response = RawResponse(status, headers, b"")  # type: ignore[arg-type]
        if status == 100:
            continue
        length = response.header("Content-Length")
        if response.header("Transfer-Encoding") == "chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                body, data = body + data[:size], data[size + 2 :]
                if size == 0:
                    break
            response.body = body
        elif length is not None and not head_only:
            response.body, data = data[: int(length)], data[int(length) :]
        responses.append(response)
    return responses


async def exchange(port: int, data: bytes, *, half_close: bool = True, timeout: float = 10.0) -> bytes:
    """Send raw bytes, then read everything until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        chunks = []
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def http_request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None, close: bool = True
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class KeepAliveClient:
    """One persistent connection sending requests one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int) -> AsyncIterator[KeepAliveClient]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            yield cls(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def request(self, method: str, path: str, body: bytes = b"", **headers: str) -> RawResponse:
        self.writer.write(http_request(method, path, body, headers, close=False))
        head = await self.reader.readuntil(b"\r\n\r\n")
        response = parse_responses(head, head_only=True)[0]
        length = int(response.header("Content-Length") or 0)
        if method != "HEAD":
            response.body = await self.reader.readexactly(length)
        return response


SECURITY_HEADER_LINES = (
    "Cross-Origin-Opener-Policy: same-origin\r\nVary: Origin\r\nX-Content-Type-Options: nosniff\r\n"
    "X-Frame-Options: SAMEORIGIN\r\nX-Xss-Protection: 1; mode=block\r\n"
)


@dataclass
class Scenario:
    """One request and what PocketBase answers to it."""

    name: str
    method: str
    path: str
    status: int
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    request_body: bytes = b""
    expect_headers: list[tuple[str, str]] = field(default_factory=list)
    absent_headers: list[str] = field(default_factory=list)


ROUTE_SCENARIOS = [
    Scenario(
        "health", "GET", "/api/health", 200, b'{"message":"API is healthy.","code":200,"data":{}}',
        expect_headers=[("Content-Type", "application/json"), ("Content-Length", "50")],
        absent_headers=["Access-Control-Allow-Origin"],
    ),
    Scenario("health-head", "HEAD", "/api/health", 200, b"", expect_headers=[("Content-Length", "50")]),
    Scenario(
        "unknown-path", "GET", "/api/nosuch", 404, b'{"data":{},"message":"File not found.","status":404}'
    ),
    Scenario("root", "GET", "/", 404, b'{"data":{},"message":"File not found.","status":404}'),
    Scenario(
        "wrong-method", "PUT", "/api/health", 404,
        b'{"data":{},"message":"The requested resource wasn\'t found.","status":404}',
    ),
    Scenario(
        "origin-gets-acao", "GET", "/api/health", 200, headers={"Origin": "http://example.test"},
        expect_headers=[("Access-Control-Allow-Origin", "*")],
    ),
    Scenario(
        "preflight", "OPTIONS", "/api/realtime", 204, b"",
        headers={
            "Origin": "http://example.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
        expect_headers=[
            ("Access-Control-Allow-Headers", "content-type,authorization"),
            ("Access-Control-Allow-Methods", "GET,HEAD,PUT,PATCH,POST,DELETE"),
            ("Access-Control-Allow-Origin", "*"),
            ("Vary", "Access-Control-Request-Method"),
        ],
        absent_headers=["X-Frame-Options", "Content-Length"],
    ),
    Scenario(
        "options-without-origin", "OPTIONS", "/api/nosuch", 204, b"",
        expect_headers=[("Vary", "Origin")], absent_headers=["Access-Control-Allow-Origin"],
    ),
]


@pytest.mark.parametrize("scenario", ROUTE_SCENARIOS, ids=lambda s: s.name)
def test_routes_answer_like_pocketbase(tmp_path: Path, scenario: Scenario) -> None:
    async def body() -> None:
        async with running_app(tmp_path) as (_, port):
            raw = await exchange(
                port, http_request(scenario.method, scenario.path, scenario.request_body, scenario.headers)
            )
        (response,) = parse_responses(raw, head_only=scenario.method == "HEAD")
        assert response.status == scenario.status
        if scenario.body is not None:
            assert response.body == scenario.body
        for expected in scenario.expect_headers:
            assert expected in response.headers
        for name in scenario.absent_headers:
            assert response.header(name) is None

    run(body())


def test_routes_json_response_head_bytes_match_pocketbase(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_app(tmp_path) as (_, port):
            raw = await exchange(port, http_request("GET", "/api/nosuch"))
        head = re.sub(rb"Date: [^\r]+", b"Date: D", raw.partition(b"\r\n\r\n")[0])
        assert head.decode() == (
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
            + SECURITY_HEADER_LINES
            + "Date: D\r\nContent-Length: 52\r\nConnection: close"
        )

    run(body())


async def echo_handler(context: pbrt.RequestContext) -> pbrt.Response:
    """A test route that answers with the decoded body and the query."""
    return pbrt.json_response({"data": context.body.data, "query": context.request.query})


async def failing_handler(context: pbrt.RequestContext) -> pbrt.Response:
    raise RuntimeError("secret internals")


def add_test_routes(app: pbrt.App) -> None:
    app.router.add("POST", "/test/echo", echo_handler)
    app.router.add("GET", "/test/fail", failing_handler)


def test_routes_unexpected_error_is_generic_500_with_traceback_in_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with running_app(tmp_path) as (app, port):
            add_test_routes(app)
            raw = await exchange(port, http_request("GET", "/test/fail"))
        (response,) = parse_responses(raw)
        assert response.status == 500
        assert response.body == (
            b'{"data":{},"message":"Something went wrong while processing your request.","status":500}'
        )

    with caplog.at_level(logging.ERROR, logger="pbrt"):
        run(body())
    assert any("secret internals" in (r.exc_text or "") for r in caplog.records)


@pytest.mark.parametrize(
    ("content_type", "request_body", "status", "data"),
    [
        ("application/json", b'{"a":[1,2.5]}', 200, {"a": [1, 2.5]}),
        ("application/x-www-form-urlencoded", b"s=a&s=b", 200, {"s": ["a", "b"]}),
        ("multipart/form-data; boundary=XyZ", MULTIPART, 200, {"title": "json", "tags": ["a", "b"], "views": 9}),
        ("application/json", b'{"a":', 400, None),
        ("text/plain", b"x", 400, None),
    ],
    ids=["json", "urlencoded", "multipart", "invalid-json", "unknown-type"],
)
def test_routes_parse_each_body_kind(
    tmp_path: Path, content_type: str, request_body: bytes, status: int, data: Any
) -> None:
    async def body() -> None:
        async with running_app(tmp_path) as (app, port):
            add_test_routes(app)
            raw = await exchange(
                port, http_request("POST", "/test/echo?k=1&k=2", request_body, {"Content-Type": content_type})
            )
        (response,) = parse_responses(raw)
        assert response.status == status
        if status == 200:
            assert response.json() == {"data": data, "query": {"k": ["1", "2"]}}
        else:
            assert response.body == (
                b'{"data":{},"message":"Something went wrong while processing your request.","status":400}'
            )

    run(body())


# ==========================================================================
# 10. Connection loop
# ==========================================================================


def test_connection_answers_pipelined_requests_in_order(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_app(tmp_path) as (app, port):
            add_test_routes(app)
            requests = b"".join(
                [
                    http_request("GET", "/api/health", close=False),
                    http_request("POST", "/test/echo?n=1", b'{"x":1}', {"Content-Type": "application/json"}, False),
                    http_request("GET", "/api/nosuch", close=False),
                    http_request("HEAD", "/api/health", close=False),
                    http_request("POST", "/test/echo?n=2", b"{}", {"Content-Type": "application/json"}),
                ]
            )
            raw = await exchange(port, requests)
        responses = parse_responses(raw, methods=["GET", "POST", "GET", "HEAD", "POST"])
        assert [r.status for r in responses] == [200, 200, 404, 200, 200]
        assert responses[1].json() == {"data": {"x": 1}, "query": {"n": ["1"]}}
        assert responses[4].json() == {"data": {}, "query": {"n": ["2"]}}
        assert responses[4].header("Connection") == "close"

    run(body())


def test_connection_reads_chunked_bodies(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_app(tmp_path) as (app, port):
            add_test_routes(app)
            request = (
                b"POST /test/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"4;ext=1\r\n{\"a\"\r\n3\r\n:[1\r\n2\r\n]}\r\n0\r\nTrailer: x\r\n\r\n"
            )
            raw = await exchange(port, request)
        (response,) = parse_responses(raw)
        assert response.json()["data"] == {"a": [1]}

    run(body())


def test_connection_sends_100_continue_before_reading_the_body(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_app(tmp_path) as (app, port):
            add_test_routes(app)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /test/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: 7\r\nConnection: close\r\n\r\n"
            )
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b'{"a":1}')
            (response,) = parse_responses(await reader.read())
            writer.close()
            await writer.wait_closed()
        assert response.json()["data"] == {"a": 1}

    run(body())


def test_connection_http10_closes_after_the_response(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_app(tmp_path) as (_, port):
            raw = await exchange(port, b"GET /api/health HTTP/1.0\r\n\r\n", half_close=False)
        assert raw.startswith(b"HTTP/1.0 200 OK\r\n")
        assert raw.endswith(b'{"message":"API is healthy.","code":200,"data":{}}')

    run(body())


HOSTILE_REQUESTS = [
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431, id="head-over-64k"),
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="malformed-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400, id="malformed-header"),
    pytest.param(
        b"POST /api/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
        id="bad-chunk-size",
    ),
    pytest.param(
        b"POST /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        400,
        id="two-content-lengths",
    ),
    pytest.param(
        b"POST /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /api/health HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        id="smuggling-cl-te",
    ),
    pytest.param(
        b"POST /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n", 413, id="body-over-limit"
    ),
    pytest.param(
        b"POST /api/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"a" * 2000,
        413,
        id="chunked-body-over-limit",
    ),
    pytest.param(b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", 505, id="http3"),
]


@pytest.mark.parametrize(("request_bytes", "status"), HOSTILE_REQUESTS)
def test_connection_hostile_request_gets_status_and_close_while_others_are_served(
    tmp_path: Path, request_bytes: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with running_app(tmp_path, max_body_bytes=1000) as (_, port):
            async with KeepAliveClient.connect(port) as good:
                assert (await good.request("GET", "/api/health")).status == 200
                raw = await exchange(port, request_bytes, half_close=False)
                assert (await good.request("GET", "/api/health")).status == 200
        (response,) = parse_responses(raw)
        assert response.status == status
        assert response.header("Connection") == "close"
        assert response.json()["status"] == status

    with caplog.at_level(logging.WARNING, logger="pbrt"):
        run(body())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_connection_rejects_oversized_body_without_reading_it(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_app(tmp_path, max_body_bytes=1000) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            await writer.wait_closed()
        assert head.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")

    run(body())


def test_connection_closes_slowloris_head_while_others_are_served(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_app(tmp_path, head_timeout_s=0.3) as (_, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            async with KeepAliveClient.connect(port) as good:
                for _ in range(3):
                    assert (await good.request("GET", "/api/health")).status == 200
                    await asyncio.sleep(0.05)
                assert await reader.read() == b""
            elapsed = time.monotonic() - started
            writer.close()
            await writer.wait_closed()
        assert 0.25 < elapsed < 3

    run(body())


def test_connection_closes_idle_keepalive_connection(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_app(tmp_path, keepalive_timeout_s=0.2) as (_, port):
            async with KeepAliveClient.connect(port) as client:
                assert (await client.request("GET", "/api/health")).status == 200
                assert await asyncio.wait_for(client.reader.read(), 3) == b""

    run(body())


def test_connection_shutdown_finishes_requests_in_flight(tmp_path: Path) -> None:
    release = asyncio.Event

    async def body() -> None:
        gate = release()

        async def slow_handler(context: pbrt.RequestContext) -> pbrt.Response:
            gate.set()
            await asyncio.sleep(0.2)
            return pbrt.json_response({"done": True})

        app = pbrt.App(dir=str(tmp_path / "pb_data"), port=0)
        port = await app.start()
        app.router.add("GET", "/test/slow", slow_handler)
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        in_flight = asyncio.create_task(exchange(port, http_request("GET", "/test/slow"), half_close=False))
        await gate.wait()
        await app.stop()
        (response,) = parse_responses(await in_flight)
        assert response.json() == {"done": True}
        assert await idle_reader.read() == b""
        idle_writer.close()
        await idle_writer.wait_closed()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(body())


# --- fuzz -------------------------------------------------------------------

FUZZ_SEEDS = [
    http_request("GET", "/api/health?a=1&a=2", close=False),
    http_request("POST", "/test/echo", b'{"a":[1,2,{"b":"c"}]}', {"Content-Type": "application/json"}),
    b"POST /test/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n5\r\na=1&b\r\n3\r\n=%2\r\n0\r\n\r\n",
    http_request("POST", "/test/echo", MULTIPART, {"Content-Type": "multipart/form-data; boundary=XyZ"}),
    http_request("OPTIONS", "/api/realtime", headers={"Origin": "o", "Access-Control-Request-Method": "POST"})
    + http_request("HEAD", "/api/health"),
    b"GET /api/%zz%00/\xff HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
]
FUZZ_TOKENS = [
    b"\r\n", b"\r\n\r\n", b":", b" ", b"\x00", b"%", b"\xff", b"0\r\n\r\n", b"Content-Length: 3\r\n",
    b"Content-Length: 99999999999\r\n", b"Transfer-Encoding: chunked\r\n", b"Expect: 100-continue\r\n",
    b"HTTP/1.0", b"HTTP/9.9", b'{"', b"--XyZ", b";", b"ffffffff\r\n", b"\t",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Apply one to four random byte-level mutations."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(buffer) + 1)
        kind = rng.randrange(6)
        if kind == 0 and buffer:
            buffer[min(position, len(buffer) - 1)] = rng.randrange(256)
        elif kind == 1:
            buffer[position:position] = rng.choice(FUZZ_TOKENS)
        elif kind == 2:
            del buffer[position : position + rng.randint(1, 16)]
        elif kind == 3:
            buffer[position:position] = buffer[position : position + rng.randint(1, 64)]
        elif kind == 4:
            del buffer[position:]
        else:
            buffer[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(buffer)


FUZZ_CASES = 5_000
STATUS_LINE_RE = re.compile(rb"HTTP/1\.[01] [1-5]\d\d ")


def test_connection_survives_seeded_mutation_fuzz(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(20261128)
    inputs = [mutate(rng, rng.choice(FUZZ_SEEDS)) for _ in range(FUZZ_CASES)]

    for data in inputs:  # the pure parser alone: a Request or a ProtocolError
        head = data.partition(b"\r\n\r\n")
        with contextlib.suppress(pbrt.ProtocolError):
            pbrt.parse_request_head(head[0] + head[1])

    async def body() -> None:
        async with running_app(tmp_path, head_timeout_s=2, body_timeout_s=2) as (app, port):
            add_test_routes(app)
            limit = asyncio.Semaphore(16)
            answered = 0

            async def one(data: bytes) -> None:
                nonlocal answered
                async with limit:
                    raw = await exchange(port, data, timeout=10)
                assert raw == b"" or STATUS_LINE_RE.match(raw), raw[:100]
                answered += bool(raw)

            deadline = time.monotonic() + 120
            for start in range(0, len(inputs), 500):
                assert time.monotonic() < deadline, "fuzz exceeded its time bound"
                await asyncio.gather(*(one(data) for data in inputs[start : start + 500]))
            async with KeepAliveClient.connect(port) as good:
                assert (await good.request("GET", "/api/health")).status == 200
        assert answered > FUZZ_CASES // 2

    with caplog.at_level(logging.WARNING, logger="pbrt"):
        run(body(), timeout=180)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ==========================================================================
# 12. Command line
# ==========================================================================


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", str(HERE / "pbrt.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_help_and_version() -> None:
    help_result = run_cli("--help")
    assert help_result.returncode == 0
    assert "serve" in help_result.stdout
    serve_help = run_cli("serve", "--help")
    assert "--http" in serve_help.stdout and "--dir" in serve_help.stdout
    version = run_cli("--version")
    assert version.stdout.strip() == f"pbrt version {pbrt.__version__}"


def test_cli_rejects_bad_address() -> None:
    result = run_cli("serve", "--http", "nonsense")
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr


def start_cli_server(cwd: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    """Start `python pbrt.py ARGS` and return it with the port it logged."""
    process = subprocess.Popen(
        [sys.executable, "-X", "dev", "-W", "error", str(HERE / "pbrt.py"), *args],
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        match = re.search(r"Server started at http://[^:]+:(\d+)", line)
        if match:
            return process, int(match.group(1))
        if not line and process.poll() is not None:
            break
    process.kill()
    process.communicate()
    raise AssertionError("server did not start")


def test_cli_serves_in_an_empty_folder_and_exits_0_on_sigint(tmp_path: Path) -> None:
    process, port = start_cli_server(tmp_path, "--http", "127.0.0.1:0")
    try:
        raw = run(exchange(port, http_request("GET", "/api/health")))
        assert parse_responses(raw)[0].json() == {"message": "API is healthy.", "code": 200, "data": {}}
        assert (tmp_path / "pb_data" / "data.db").exists()
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=10)
        assert time.monotonic() - started < 1.0
        assert process.returncode == 0
        assert "GET /api/health 200" in stderr
        assert "Traceback" not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_cli_quiet_serve_on_given_dir_exits_0_on_sigterm(tmp_path: Path) -> None:
    data_dir = tmp_path / "elsewhere"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(HERE / "pbrt.py"), "serve", f"--http=127.0.0.1:{port}", "--dir", str(data_dir), "--quiet"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        raw = b""
        deadline = time.monotonic() + 20
        while not raw and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                raw = run(exchange(port, http_request("GET", "/api/health")))
            time.sleep(0.05)
        assert parse_responses(raw)[0].status == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=10)
        assert process.returncode == 0
        assert stderr == ""
        assert (data_dir / "data.db").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


# ==========================================================================
# 11. Embedding
# ==========================================================================


def test_app_run_in_thread_serves_and_stops(tmp_path: Path) -> None:
    import urllib.request

    app = pbrt.App(dir=str(tmp_path / "pb_data"), port=0)
    with app.run_in_thread() as url:
        with urllib.request.urlopen(url + "/api/health", timeout=10) as response:
            assert json.load(response)["message"] == "API is healthy."
    assert app.store is None
