#!/usr/bin/env python3
"""gRPC interop through the pylon mesh with an independent implementation.

Python ``grpcio`` plays both applications of a two-sidecar mesh:

    python client -> pylon (outbound) == mTLS ==> pylon (inbound) -> python server

``server --port 0`` serves ``pylon.interop.Echo`` and ``pylon.interop.Probe``
on 127.0.0.1, prints ``LISTENING <port>`` on stdout, and serves until its
standard input closes (so it never outlives the test that started it).

``client --target HOST:PORT --authority echo.test`` runs every case against
the target and prints one ``PASS <case>`` or ``FAIL <case>: <why>`` line per
case (``SKIP <case>`` for a case whose option was not given, or that
``--only`` left out); the exit status is non-zero if any case failed.

Handlers are generic and work on raw bytes (no serializers), so the only
dependency is ``grpcio``. Control requests are small JSON documents.

Every client call carries a deadline, so nothing hangs for ever; the only
time-based waits are the deadline case itself and bounded waits for events.
"""

import argparse
import base64
import hashlib
import json
import queue
import sys
import threading
import traceback
import uuid
from concurrent import futures

import grpc

MAX_MESSAGE = 64 << 20
LARGE = (8 << 20) + 13
# A bound on any single call or wait, never a measure of speed.
PATIENCE = 30.0
# How long the server waits to hear that a call it holds was cancelled.
CANCEL_WAIT = 15.0
# A call the cancellation case cancels: its deadline is far beyond
# CANCEL_WAIT, so the server can only learn of the cancellation through the
# mesh forwarding it, not through its own deadline expiring.
LONG_DEADLINE = 120.0

ECHO = "pylon.interop.Echo"
PROBE = "pylon.interop.Probe"

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]

TRAILERS = (("x-trailer", "trailer-value"), ("x-trailer-bin", b"\x00\x01\x02\xff"))
INITIAL = (("x-initial", "initial-value"), ("x-initial-bin", b"\x00\xfe init \xff"))

# (code, status message): several codes, messages that need percent-encoding
# or that a careless proxy would trim or fold.
ERRORS = [
    (grpc.StatusCode.INVALID_ARGUMENT, "plain message"),
    (grpc.StatusCode.NOT_FOUND, "ünïcødé ✓ 日本語 🚀"),
    (grpc.StatusCode.ALREADY_EXISTS, "tab\there\tand\tthere"),
    (grpc.StatusCode.PERMISSION_DENIED, "runs   of    spaces"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "trailing space "),
    (grpc.StatusCode.FAILED_PRECONDITION, "  leading spaces"),
    (grpc.StatusCode.ABORTED, "percent %41 and %zz and 100%"),
    (grpc.StatusCode.OUT_OF_RANGE, "line\nbreak\r\nand crlf"),
    (grpc.StatusCode.UNIMPLEMENTED, "app says unimplemented"),
    (grpc.StatusCode.INTERNAL, "internal: \u0000 nul and \u007f del"),
    (grpc.StatusCode.UNAVAILABLE, "app says unavailable"),
    (grpc.StatusCode.DATA_LOSS, ""),
    (grpc.StatusCode.UNAUTHENTICATED, "who are you?"),
    (grpc.StatusCode.UNKNOWN, "unknown 🤷"),
]


def pattern(seed, size):
    """Deterministic bytes: a run of 0..250 shifted by ``seed``."""
    base = bytes((seed + i) % 251 for i in range(251))
    reps = size // 251 + 1
    return (base * reps)[:size]


def digest(chunks):
    """Count, total length and SHA-256 of ``chunks``."""
    h = hashlib.sha256()
    count = 0
    total = 0
    for c in chunks:
        h.update(c)
        count += 1
        total += len(c)
    return {"count": count, "bytes": total, "sha256": h.hexdigest()}


def encode_metadata(md):
    """Metadata as JSON-able ``[key, value]`` pairs; binary values base64."""
    out = []
    for key, value in md or ():
        if isinstance(value, bytes):
            out.append([key, "b64:" + base64.b64encode(value).decode()])
        else:
            out.append([key, value])
    return out


def values(md, key):
    """Every value of ``key`` in metadata ``md``, in order."""
    return [v for k, v in (md or ()) if k == key]


def code_by_name(name):
    return grpc.StatusCode[name]


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class CallRecord:
    """What the server saw of a call held open by a probe: whether it was
    cancelled while the handler still held it, and its deadline."""

    def __init__(self):
        self.ended = threading.Event()
        self.handler_done = False
        self.cancelled = False
        self.remaining_at_start = None
        self.remaining_at_end = None
        self.lock = threading.Lock()

    def on_terminated(self, context):
        """``context.add_callback`` hook: the call is over. If the handler
        was still holding it, the caller cancelled it (or its deadline
        passed)."""
        with self.lock:
            if not self.handler_done:
                self.cancelled = True
                self.remaining_at_end = context.time_remaining()
        self.ended.set()

    def finish_handler(self):
        with self.lock:
            self.handler_done = True

    def to_json(self):
        with self.lock:
            return {
                "cancelled": self.cancelled,
                "remaining_at_start": self.remaining_at_start,
                "remaining_at_end": self.remaining_at_end,
            }


class Records:
    """Call records by token, bounded: the client makes only a few."""

    LIMIT = 1024

    def __init__(self):
        self.lock = threading.Lock()
        self.by_token = {}
        self.arrived = threading.Condition(self.lock)

    def start(self, token, context):
        rec = CallRecord()
        rec.remaining_at_start = context.time_remaining()
        with self.lock:
            if len(self.by_token) >= self.LIMIT:
                self.by_token.pop(next(iter(self.by_token)))
            self.by_token[token] = rec
            self.arrived.notify_all()
        if not context.add_callback(lambda: rec.on_terminated(context)):
            # Too late for a callback: the call is already over.
            rec.on_terminated(context)
        return rec

    def wait(self, token, timeout):
        with self.lock:
            self.arrived.wait_for(lambda: token in self.by_token, timeout)
            return self.by_token.get(token)


class Service:
    """The server application's handlers, all on raw bytes."""

    def __init__(self):
        self.records = Records()

    # Echo -----------------------------------------------------------------

    def unary(self, request, context):
        """Replies with the request unchanged."""
        return request

    def metadata(self, request, context):
        """Replies with the request metadata it saw (JSON), sends custom
        initial metadata (echoing every ``x-`` request key as ``echo-<key>``)
        and custom trailing metadata."""
        seen = context.invocation_metadata()
        echoed = tuple(("echo-" + k, v) for k, v in seen if k.startswith("x-"))
        context.send_initial_metadata(INITIAL + echoed)
        context.set_trailing_metadata(TRAILERS)
        return json.dumps(encode_metadata(seen)).encode()

    def fail(self, request, context):
        """Fails with the code and message the request names, with custom
        trailers; ``trailers_only`` leaves out the initial metadata so the
        status travels in a single trailers-only HEADERS frame."""
        spec = json.loads(request)
        if not spec["trailers_only"]:
            context.send_initial_metadata(INITIAL)
        context.set_trailing_metadata(TRAILERS)
        context.abort(code_by_name(spec["code"]), spec["message"])

    def client_stream(self, request_iterator, context):
        """Replies with the count, length and digest of what it received."""
        return json.dumps(digest(request_iterator)).encode()

    def server_stream(self, request, context):
        """Streams ``count`` messages of ``size`` bytes (message ``i`` is
        ``pattern(i, size)``), then fails if the request says so."""
        spec = json.loads(request)
        fail = spec.get("fail")
        if fail and spec["count"] > 0:
            context.send_initial_metadata(INITIAL)
        for i in range(spec["count"]):
            yield pattern(i, spec["size"])
        if fail:
            context.set_trailing_metadata(TRAILERS)
            context.abort(code_by_name(fail["code"]), fail["message"])
        else:
            context.set_trailing_metadata(TRAILERS)

    def bidi(self, request_iterator, context):
        """Echoes each message as soon as it arrives; a message ``FAIL:<code>``
        ends the call with that code."""
        for msg in request_iterator:
            if msg.startswith(b"FAIL:"):
                context.set_trailing_metadata(TRAILERS)
                context.abort(code_by_name(msg[5:].decode()), "bidi failed on request")
            yield msg

    # Probe ----------------------------------------------------------------

    def hang(self, request, context):
        """Holds the call (the request is a token) without answering until
        the caller goes away, then returns."""
        rec = self.records.start(request.decode(), context)
        rec.ended.wait(CANCEL_WAIT + PATIENCE)
        rec.finish_handler()
        return b""

    def endless(self, request, context):
        """Streams three messages, then holds the call open until the caller
        goes away; the request is a token."""
        rec = self.records.start(request.decode(), context)
        for i in range(3):
            yield pattern(i, 100)
        rec.ended.wait(CANCEL_WAIT + PATIENCE)
        rec.finish_handler()

    def was_cancelled(self, request, context):
        """Tells (JSON) whether the call with the token in the request ended
        while its handler still held it, waiting up to ``CANCEL_WAIT``."""
        rec = self.records.wait(request.decode(), CANCEL_WAIT)
        if rec is None:
            return json.dumps({"known": False}).encode()
        rec.ended.wait(CANCEL_WAIT)
        return json.dumps(dict(known=True, **rec.to_json())).encode()


def serve(port):
    svc = Service()
    uu = grpc.unary_unary_rpc_method_handler
    us = grpc.unary_stream_rpc_method_handler
    su = grpc.stream_unary_rpc_method_handler
    ss = grpc.stream_stream_rpc_method_handler
    echo = grpc.method_handlers_generic_handler(
        ECHO,
        {
            "Unary": uu(svc.unary),
            "Metadata": uu(svc.metadata),
            "Fail": uu(svc.fail),
            "ClientStream": su(svc.client_stream),
            "ServerStream": us(svc.server_stream),
            "Bidi": ss(svc.bidi),
        },
    )
    probe = grpc.method_handlers_generic_handler(
        PROBE,
        {
            "Hang": uu(svc.hang),
            "Endless": us(svc.endless),
            "WasCancelled": uu(svc.was_cancelled),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        handlers=[echo, probe],
        options=CHANNEL_OPTIONS,
    )
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"LISTENING {bound}", flush=True)
    # Serve until whoever started us closes our stdin (or exits).
    for _ in sys.stdin:
        pass
    server.stop(grace=None)
    return 0


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------


class CaseFailed(Exception):
    pass


def check(cond, why):
    if not cond:
        raise CaseFailed(why)


def check_eq(got, want, what):
    if got != want:
        raise CaseFailed(f"{what}: got {short(got)}, want {short(want)}")


def short(v):
    r = repr(v)
    return r if len(r) <= 300 else r[:300] + f"... ({len(r)} chars)"


def expect_error(what, fn, *args, **kwargs):
    """Calls ``fn(*args, **kwargs)``, which must raise ``grpc.RpcError``;
    returns the error."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as e:
        return e
    raise CaseFailed(f"{what}: succeeded, want an error")


def check_trailers(md, what):
    check_eq(values(md, "x-trailer"), ["trailer-value"], f"{what}: x-trailer")
    check_eq(values(md, "x-trailer-bin"), [b"\x00\x01\x02\xff"], f"{what}: x-trailer-bin")


def check_initial(md, what):
    check_eq(values(md, "x-initial"), ["initial-value"], f"{what}: x-initial")
    check_eq(values(md, "x-initial-bin"), [b"\x00\xfe init \xff"], f"{what}: x-initial-bin")


def check_no_initial(md, what):
    custom = [(k, v) for k, v in (md or ()) if k.startswith("x-")]
    check_eq(custom, [], f"{what}: custom initial metadata of a trailers-only response")


class Client:
    def __init__(self, channel):
        self.ch = channel

    def uu(self, method):
        return self.ch.unary_unary(method, request_serializer=None, response_deserializer=None)

    def us(self, method):
        return self.ch.unary_stream(method, request_serializer=None, response_deserializer=None)

    def su(self, method):
        return self.ch.stream_unary(method, request_serializer=None, response_deserializer=None)

    def ss(self, method):
        return self.ch.stream_stream(method, request_serializer=None, response_deserializer=None)

    def was_cancelled(self, token):
        reply = self.uu(f"/{PROBE}/WasCancelled")(
            token.encode(), timeout=CANCEL_WAIT * 2 + PATIENCE
        )
        return json.loads(reply)


def case_unary(c, args):
    """Unary calls of a few sizes (around HTTP/2 frame and window sizes) come
    back unchanged."""
    call = c.uu(f"/{ECHO}/Unary")
    for size in (1, 5, 16384, 16385, 65535, 65536, 1 << 20):
        body = pattern(size, size)
        check_eq(call(body, timeout=PATIENCE), body, f"echo of {size} bytes")


def case_empty_message(c, args):
    """Zero-length messages in every call shape."""
    check_eq(c.uu(f"/{ECHO}/Unary")(b"", timeout=PATIENCE), b"", "unary")
    got = json.loads(c.su(f"/{ECHO}/ClientStream")(iter([b"", b"", b""]), timeout=PATIENCE))
    check_eq(got, digest([b"", b"", b""]), "client stream of empty messages")
    spec = json.dumps({"count": 3, "size": 0}).encode()
    check_eq(
        list(c.us(f"/{ECHO}/ServerStream")(spec, timeout=PATIENCE)), [b""] * 3, "server stream"
    )
    reqs = [b"", b"x", b""]
    check_eq(list(c.ss(f"/{ECHO}/Bidi")(iter(reqs), timeout=PATIENCE)), reqs, "bidi")


def case_client_streaming(c, args):
    """Many messages of mixed sizes up; one digest of them all down."""
    msgs = [pattern(i, (i * 997) % 70000) for i in range(200)]
    got = json.loads(c.su(f"/{ECHO}/ClientStream")(iter(msgs), timeout=PATIENCE))
    check_eq(got, digest(msgs), "digest")


def case_server_streaming(c, args):
    """One request up; 200 messages down, in order, then custom trailers."""
    spec = json.dumps({"count": 200, "size": 3000}).encode()
    call = c.us(f"/{ECHO}/ServerStream")(spec, timeout=PATIENCE)
    n = 0
    for msg in call:
        check_eq(msg, pattern(n, 3000), f"message {n}")
        n += 1
    check_eq(n, 200, "messages received")
    check_eq(call.code(), grpc.StatusCode.OK, "status")
    check_trailers(call.trailing_metadata(), "trailers")


def case_bidi_streaming_interleaved(c, args):
    """Each reply is read before the next request is sent, so neither
    direction may be buffered by the mesh until the other ends."""
    requests = queue.Queue()
    done = object()

    def gen():
        while True:
            try:
                item = requests.get(timeout=PATIENCE)
            except queue.Empty:
                return
            if item is done:
                return
            yield item

    call = c.ss(f"/{ECHO}/Bidi")(gen(), timeout=PATIENCE)
    for i in range(50):
        msg = pattern(i, 1 + i * 300)
        requests.put(msg)
        check_eq(next(call), msg, f"reply {i}")
    requests.put(done)
    rest = list(call)
    check_eq(rest, [], "replies after the last request")
    check_eq(call.code(), grpc.StatusCode.OK, "status")


def case_metadata_both_ways(c, args):
    """Custom request metadata (ASCII, repeated and ``-bin``) reaches the
    server; custom initial and trailing metadata (also ``-bin``) reach the
    client."""
    sent = (
        ("x-custom", "value 1"),
        ("x-data-bin", b"\x00\x01\x02\xfe\xff"),
        ("x-empty-bin", b""),
        ("x-multi", "first"),
        ("x-multi", "second"),
    )
    reply, call = c.uu(f"/{ECHO}/Metadata").with_call(b"", metadata=sent, timeout=PATIENCE)
    seen = [tuple(p) for p in json.loads(reply)]
    check_eq(values(seen, "x-custom"), ["value 1"], "server saw x-custom")
    b64 = "b64:" + base64.b64encode(b"\x00\x01\x02\xfe\xff").decode()
    check_eq(values(seen, "x-data-bin"), [b64], "server saw x-data-bin")
    check_eq(values(seen, "x-empty-bin"), ["b64:"], "server saw x-empty-bin")
    multi = values(seen, "x-multi")
    # A repeated key may arrive as two fields or as one comma-joined field
    # (RFC 9110 §5.3); both are the same metadata.
    check(
        multi in (["first", "second"], ["first,second"], ["first, second"]),
        f"server saw x-multi {multi!r}, want first and second in order",
    )
    initial = call.initial_metadata()
    check_initial(initial, "initial metadata")
    check_eq(values(initial, "echo-x-custom"), ["value 1"], "echo-x-custom")
    check_eq(values(initial, "echo-x-data-bin"), [b"\x00\x01\x02\xfe\xff"], "echo-x-data-bin")
    check_trailers(call.trailing_metadata(), "trailing metadata")
    check_eq(call.code(), grpc.StatusCode.OK, "status")


def case_peer_identity(c, args):
    """The server sees the caller's SPIFFE ID from the mesh in
    ``x-pylon-peer-identity``, and never a value the caller forged."""
    forged = (("x-pylon-peer-identity", "spiffe://evil/forged"),)
    reply = c.uu(f"/{ECHO}/Metadata")(b"", metadata=forged, timeout=PATIENCE)
    seen = [tuple(p) for p in json.loads(reply)]
    check_eq(values(seen, "x-pylon-peer-identity"), [args.peer_identity], "x-pylon-peer-identity")


def case_error_statuses(c, args):
    """Application errors after initial metadata: every code and status
    message (unicode, tabs, runs of spaces, trailing space, percent signs,
    line breaks, control characters, empty) arrives unchanged, with custom
    trailers."""
    call = c.uu(f"/{ECHO}/Fail")
    for code, message in ERRORS:
        spec = json.dumps({"code": code.name, "message": message, "trailers_only": False})
        e = expect_error(code.name, call.with_call, spec.encode(), timeout=PATIENCE)
        what = f"{code.name} {message!r}"
        check_eq(e.code(), code, f"{what}: code")
        check_eq(e.details(), message, f"{what}: message")
        check_initial(e.initial_metadata(), what)
        check_trailers(e.trailing_metadata(), what)


def case_error_trailers_only(c, args):
    """Errors the server answers before sending anything (trailers-only),
    unary and server-streaming: code, message and custom trailers arrive."""
    call = c.uu(f"/{ECHO}/Fail")
    for code, message in ERRORS:
        spec = json.dumps({"code": code.name, "message": message, "trailers_only": True})
        e = expect_error(code.name, call.with_call, spec.encode(), timeout=PATIENCE)
        what = f"unary {code.name} {message!r}"
        check_eq(e.code(), code, f"{what}: code")
        check_eq(e.details(), message, f"{what}: message")
        check_no_initial(e.initial_metadata(), what)
        check_trailers(e.trailing_metadata(), what)
    fail = {"code": "NOT_FOUND", "message": "nothing to stream ✗"}
    spec = json.dumps({"count": 0, "size": 0, "fail": fail}).encode()
    stream = c.us(f"/{ECHO}/ServerStream")(spec, timeout=PATIENCE)
    e = expect_error("server stream", list, stream)
    check_eq(e.code(), grpc.StatusCode.NOT_FOUND, "server stream: code")
    check_eq(e.details(), fail["message"], "server stream: message")
    check_no_initial(stream.initial_metadata(), "server stream")
    check_trailers(stream.trailing_metadata(), "server stream")


def case_error_after_stream_messages(c, args):
    """A server stream and a bidi stream that fail after some messages:
    the messages, then the code, message and custom trailers arrive."""
    fail = {"code": "ABORTED", "message": "failed after 5 messages\ttab  spaces "}
    spec = json.dumps({"count": 5, "size": 20000, "fail": fail}).encode()
    stream = c.us(f"/{ECHO}/ServerStream")(spec, timeout=PATIENCE)
    got = []

    def drain():
        for msg in stream:
            got.append(msg)

    e = expect_error("server stream", drain)
    check_eq(got, [pattern(i, 20000) for i in range(5)], "server stream: messages before the error")
    check_eq(e.code(), grpc.StatusCode.ABORTED, "server stream: code")
    check_eq(e.details(), fail["message"], "server stream: message")
    check_initial(stream.initial_metadata(), "server stream")
    check_trailers(stream.trailing_metadata(), "server stream")

    reqs = [b"one", b"two", b"FAIL:RESOURCE_EXHAUSTED"]
    bidi = c.ss(f"/{ECHO}/Bidi")(iter(reqs), timeout=PATIENCE)
    got = []

    def drain_bidi():
        for msg in bidi:
            got.append(msg)

    e = expect_error("bidi", drain_bidi)
    check_eq(got, [b"one", b"two"], "bidi: messages before the error")
    check_eq(e.code(), grpc.StatusCode.RESOURCE_EXHAUSTED, "bidi: code")
    check_eq(e.details(), "bidi failed on request", "bidi: message")
    check_trailers(bidi.trailing_metadata(), "bidi")


def case_deadline_exceeded(c, args):
    """A call the server never finishes, with a short deadline: the client
    gets DEADLINE_EXCEEDED, the server saw the deadline and observes that
    its call ended while it still held it."""
    timeout = 2.0
    token = f"deadline-{uuid.uuid4()}"
    hang = c.uu(f"/{PROBE}/Hang")
    e = expect_error("hang", hang, token.encode(), timeout=timeout)
    check_eq(e.code(), grpc.StatusCode.DEADLINE_EXCEEDED, "code")
    rec = c.was_cancelled(token)
    check(rec["known"], "the server never saw the call")
    check(rec["cancelled"], f"the server did not observe the end of the call: {rec}")
    start = rec["remaining_at_start"]
    # grpc-timeout is encoded rounded up, so the server may see a little more
    # than the client set; it must see a deadline of the same order.
    check(
        start is not None and 0 < start < 2 * timeout,
        f"the server saw a deadline of {start} s, want about {timeout} s",
    )


def case_cancel_server_stream(c, args):
    """The client cancels a server stream in progress: it gets CANCELLED,
    and the server observes the cancellation long before its own deadline."""
    token = f"cancel-{uuid.uuid4()}"
    stream = c.us(f"/{PROBE}/Endless")(token.encode(), timeout=LONG_DEADLINE)
    for i in range(3):
        check_eq(next(stream), pattern(i, 100), f"message {i}")
    stream.cancel()
    e = expect_error("reading after cancel", next, stream)
    check_eq(e.code(), grpc.StatusCode.CANCELLED, "code after cancel")
    rec = c.was_cancelled(token)
    check(rec["known"], "the server never saw the call")
    check(rec["cancelled"], f"the server did not observe the cancellation: {rec}")
    end = rec["remaining_at_end"]
    check(end is None or end > 0, f"the server's call ended by its own deadline: {rec}")


def case_large_message_each_way(c, args):
    """An 8 MiB+ message up and down in one unary echo, up in a client
    stream and down in a server stream."""
    body = pattern(7, LARGE)
    check(
        c.uu(f"/{ECHO}/Unary")(body, timeout=PATIENCE) == body,
        "unary echo of a large message differs",
    )
    got = json.loads(c.su(f"/{ECHO}/ClientStream")(iter([b"a", body, b"z"]), timeout=PATIENCE))
    check_eq(got, digest([b"a", body, b"z"]), "client stream digest")
    spec = json.dumps({"count": 2, "size": LARGE}).encode()
    msgs = list(c.us(f"/{ECHO}/ServerStream")(spec, timeout=PATIENCE))
    check_eq(len(msgs), 2, "server stream messages")
    for i, m in enumerate(msgs):
        check(m == pattern(i, LARGE), f"server stream message {i} differs (len {len(m)})")


def case_no_route(c, args):
    """A call to an authority with no route gets the proxy's own error:
    UNIMPLEMENTED with ``x-pylon-error: no-route``."""
    opts = CHANNEL_OPTIONS + [("grpc.default_authority", args.no_route_authority)]
    with grpc.insecure_channel(args.target, options=opts) as ch:
        call = Client(ch).uu(f"/{ECHO}/Unary")
        e = expect_error("call", call.with_call, b"hi", timeout=PATIENCE)
        check_eq(e.code(), grpc.StatusCode.UNIMPLEMENTED, "code")
        md = list(e.trailing_metadata() or ()) + list(e.initial_metadata() or ())
        check_eq(values(md, "x-pylon-error"), ["no-route"], "x-pylon-error")
        check(
            args.no_route_authority in (e.details() or ""),
            f"message {e.details()!r} does not name the authority",
        )


CASES = [
    ("unary", case_unary),
    ("empty_message", case_empty_message),
    ("client_streaming", case_client_streaming),
    ("server_streaming", case_server_streaming),
    ("bidi_streaming_interleaved", case_bidi_streaming_interleaved),
    ("metadata_both_ways", case_metadata_both_ways),
    ("peer_identity", case_peer_identity),
    ("error_statuses", case_error_statuses),
    ("error_trailers_only", case_error_trailers_only),
    ("error_after_stream_messages", case_error_after_stream_messages),
    ("deadline_exceeded", case_deadline_exceeded),
    ("cancel_server_stream", case_cancel_server_stream),
    ("large_message_each_way", case_large_message_each_way),
    ("no_route", case_no_route),
]


def run_client(args):
    opts = CHANNEL_OPTIONS + [("grpc.default_authority", args.authority)]
    skip = set()
    if not args.peer_identity:
        skip.add("peer_identity")
    if not args.no_route_authority:
        skip.add("no_route")
    only = set(args.only or [])
    failed = 0
    with grpc.insecure_channel(args.target, options=opts) as ch:
        c = Client(ch)
        for name, fn in CASES:
            if name in skip or (only and name not in only):
                print(f"SKIP {name}", flush=True)
                continue
            try:
                fn(c, args)
            except CaseFailed as e:
                failed += 1
                print(f"FAIL {name}: {e}", flush=True)
            except grpc.RpcError as e:
                failed += 1
                print(f"FAIL {name}: unexpected RPC error {e.code()}: {e.details()!r}", flush=True)
            except Exception as e:  # noqa: BLE001 - any surprise is a failure of the case
                failed += 1
                detail = traceback.format_exc().strip().replace("\n", "\n    ")
                print(f"FAIL {name}: {type(e).__name__}: {e}\n    {detail}", flush=True)
            else:
                print(f"PASS {name}", flush=True)
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server", help="serve the test application")
    s.add_argument("--port", type=int, default=0)
    c = sub.add_parser("client", help="run every case against --target")
    c.add_argument("--target", required=True, help="HOST:PORT to connect to")
    c.add_argument("--authority", required=True, help=":authority of the calls")
    c.add_argument("--peer-identity", help="the SPIFFE ID the server should see")
    c.add_argument("--no-route-authority", help="an authority the mesh has no route for")
    c.add_argument("--only", action="append", help="run only this case (repeatable)")
    args = p.parse_args()
    if args.mode == "server":
        return serve(args.port)
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
