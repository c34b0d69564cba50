#!/usr/bin/env python3
"""Replays the black-box probe's attacks against one `gqlws` binary and reports what the server
process held under each: resident memory, threads and open descriptors (from /proc/<pid>), and
what the attack's clients got back.

    python3 scripts/bench/attacks.py --binary target/release/gqlws [--only NAME ...] [--json out.json]

Attacks (names for --only): huge-frame, parallel-logins, parallel-guesses, slow-bodies, batches,
sockets-no-init, half-open. Each runs against a fresh server process (its own port and SQLite
file in a temporary directory, LOG_LEVEL=warn, demo user admin/letmein), which is killed and
whose directory is deleted afterwards. While an attack runs, a background thread samples
/proc/<pid>/status (VmRSS, Threads) and counts /proc/<pid>/fd every 20 ms; the peak RSS is the
larger of the sampled maximum and VmHWM, which is reset (clear_refs 5) when the attack starts, so
the set-up (the attacker's own login, say) is not counted. "after" is read once the attack's
sockets are closed and a short settle (2 s; 5 s for slow-bodies) has passed.

Bounded: every attack gives up after ATTACK_TIMEOUT seconds (then its row says so), the whole run
takes about two minutes. Only 127.0.0.0/8 addresses are used: the server listens on 127.0.0.1,
attackers connect from other loopback addresses (the kernel routes all of 127/8 to lo), so
per-address bounds apply to each attacker alone. Standard library only (Python 3.11).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ATTACK_TIMEOUT = 40.0
RUN_BUDGET = 290.0  # attacks not started by RUN_BUDGET - 60 s are skipped
READY_TIMEOUT = 30.0
SAMPLE_INTERVAL = 0.02
MIB = 1024 * 1024
ALL_ATTACKS = [
    "huge-frame",
    "parallel-logins",
    "parallel-guesses",
    "slow-bodies",
    "batches",
    "sockets-no-init",
    "half-open",
]


def loopback(addr: str) -> str:
    """Refuses any address outside 127.0.0.0/8."""
    packed = socket.inet_aton(addr)
    if packed[0] != 127:
        raise ValueError(f"{addr} is not a loopback address")
    return addr


def counts(values) -> str:
    """`401×20 429×60`, most frequent first."""
    counter = collections.Counter(str(v) for v in values)
    return " ".join(f"{k}×{n}" for k, n in counter.most_common()) or "none"


def mib(kib) -> str:
    return "?" if kib is None else f"{kib / 1024:.1f}"


def size(n) -> str:
    if n is None:
        return "?"
    if n < MIB:
        return f"{n / 1024:.0f} KiB"
    return f"{n / MIB:.1f} MiB"


def ms(seconds) -> str:
    return "?" if seconds is None else f"{seconds * 1000:.0f} ms"


# --------------------------------------------------------------------------------------------
# /proc sampling


def proc_snapshot(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = {}
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    fields[key] = int(rest.split()[0])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError, IndexError):
        return None
    return {
        "rss_kib": fields.get("VmRSS"),
        "hwm_kib": fields.get("VmHWM"),
        "threads": fields.get("Threads"),
        "fds": fds,
    }


def reset_hwm(pid: int) -> bool:
    """Resets VmHWM to the current RSS (Linux: `echo 5 > /proc/<pid>/clear_refs`)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Maxima of RSS, threads and descriptors, sampled every SAMPLE_INTERVAL."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.stopped = threading.Event()
        self.max_rss = 0
        self.max_threads = 0
        self.max_fds = 0
        self.samples = 0

    def run(self):
        while not self.stopped.is_set():
            snap = proc_snapshot(self.pid)
            if snap is None:
                return
            self.samples += 1
            self.max_rss = max(self.max_rss, snap["rss_kib"] or 0)
            self.max_threads = max(self.max_threads, snap["threads"] or 0)
            self.max_fds = max(self.max_fds, snap["fds"])
            self.stopped.wait(SAMPLE_INTERVAL)

    def stop(self):
        self.stopped.set()
        self.join(timeout=2)


# --------------------------------------------------------------------------------------------
# The server process


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """One `gqlws` process on a free 127.0.0.1 port, with an SQLite file in a temporary
    directory of its own."""

    def __init__(self, binary: str, extra_env: dict[str, str]):
        self.binary = binary
        self.extra_env = extra_env
        self.dir = tempfile.mkdtemp(prefix="gqlws-attacks-")
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log_path = os.path.join(self.dir, "server.log")

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def start(self):
        for _ in range(3):  # the free port can be taken between the probe and the bind
            self.port = free_port()
            env = dict(os.environ)
            env.update(
                GQLWS_LISTEN_ADDR=f"127.0.0.1:{self.port}",
                GQLWS_DATABASE_URL=f"sqlite://{self.dir}/gqlws.db",
                LOG_LEVEL="warn",
            )
            env.update(self.extra_env)
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                answer = await http_request(self.port, "GET", "/readyz", timeout=1.0)
                if answer.status == 200:
                    return
                await asyncio.sleep(0.1)
            self.kill()
        raise RuntimeError(f"gqlws did not become ready; its log ends with:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except OSError:
            return ""

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def cleanup(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


LIVE_SERVERS: list[Server] = []


# --------------------------------------------------------------------------------------------
# A small HTTP/1.1 client (one request per connection)


class Response:
    def __init__(self, status, headers=None, body=b"", elapsed=None):
        self.status = status  # an int, or a word ("timeout", "reset", …) when there was none
        self.headers = headers or {}
        self.body = body
        self.elapsed = elapsed

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def error_word(err: BaseException) -> str:
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(err, ConnectionResetError):
        return "reset"
    if isinstance(err, ConnectionRefusedError):
        return "refused"
    if isinstance(err, BrokenPipeError):
        return "broken-pipe"
    if isinstance(err, asyncio.IncompleteReadError):
        return "eof"
    if isinstance(err, OSError) and err.errno:
        import errno

        return errno.errorcode.get(err.errno, str(err.errno))
    return type(err).__name__


async def connect(port: int, src: str, timeout: float):
    return await asyncio.wait_for(
        asyncio.open_connection(
            loopback("127.0.0.1"), port, local_addr=(loopback(src), 0), limit=1 << 20
        ),
        timeout,
    )


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", ""):
        body = b""
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    elif status in (101, 204, 304):
        body = b""
    else:
        body = await reader.read()
    return status, headers, body


async def http_request(
    port: int,
    method: str,
    path: str,
    *,
    src: str = "127.0.0.1",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    gate: "Gate | None" = None,
    yields_after_gate: int = 0,
) -> Response:
    """One request on a new connection from `src`. With a gate, the connection is made first and
    the request written only when the gate opens (so a burst is written at once)."""
    started = time.monotonic()
    writer = None
    try:
        try:
            reader, writer = await connect(port, src, timeout)
        finally:
            if gate:
                gate.arrive()
        if gate:
            await gate.wait()
            for _ in range(yields_after_gate):
                await asyncio.sleep(0)
        started = time.monotonic()
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        for key, value in (headers or {}).items():
            lines.append(f"{key}: {value}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        left = timeout - (time.monotonic() - started)
        status, response_headers, response_body = await asyncio.wait_for(
            read_response(reader), max(left, 0.01)
        )
        return Response(status, response_headers, response_body, time.monotonic() - started)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as err:
        return Response(error_word(err), elapsed=time.monotonic() - started)
    finally:
        if writer:
            writer.close()


class Gate:
    """Opens when `expected` tasks have arrived (or when told to)."""

    def __init__(self, expected: int):
        self.expected = expected
        self.arrived = 0
        self.all_arrived = asyncio.Event()
        self.opened = asyncio.Event()

    def arrive(self):
        self.arrived += 1
        if self.arrived >= self.expected:
            self.all_arrived.set()

    async def wait(self):
        await self.opened.wait()

    async def open_when_all_arrived(self, timeout: float):
        try:
            await asyncio.wait_for(self.all_arrived.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        self.opened.set()


def json_body(value) -> bytes:
    return json.dumps(value).encode()


async def login(port, username="admin", password="letmein", src="127.0.0.1", timeout=30.0, **kw):
    return await http_request(
        port,
        "POST",
        "/api/token/",
        src=src,
        body=json_body({"username": username, "password": password}),
        headers={"Content-Type": "application/json"},
        timeout=timeout,
        **kw,
    )


async def access_token(port) -> str:
    answer = await login(port)
    token = (answer.json() or {}).get("access") if answer.status == 200 else None
    if not token:
        raise RuntimeError(f"admin login failed: {answer.status} {answer.body[:200]!r}")
    return token


# --------------------------------------------------------------------------------------------
# A raw websocket client: handshake, masked frames (zero mask), server frame parser


def frame_header(opcode: int, declared: int) -> bytes:
    """A masked client frame header (RFC 6455 §5.2) declaring `declared` payload bytes, with a
    zero mask key, so the payload goes as it is."""
    head = bytes([0x80 | opcode])
    if declared <= 125:
        head += bytes([0x80 | declared])
    elif declared <= 0xFFFF:
        head += bytes([0x80 | 126]) + declared.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + declared.to_bytes(8, "big")
    return head + b"\0\0\0\0"


def parse_frame(buf: bytes | bytearray):
    """(opcode, payload, length used) of the server frame at the start of `buf`, or None."""
    if len(buf) < 2:
        return None
    length, at = buf[1] & 0x7F, 2
    if length == 126:
        if len(buf) < 4:
            return None
        length, at = int.from_bytes(buf[2:4], "big"), 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length, at = int.from_bytes(buf[2:10], "big"), 10
    if buf[1] & 0x80:
        at += 4
    if len(buf) < at + length:
        return None
    return buf[0] & 0x0F, bytes(buf[at : at + length]), at + length


def describe_frame(opcode: int, payload: bytes):
    if opcode == 0x8:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        return ("close", code, payload[2:].decode("utf-8", "replace"))
    if opcode == 0x9:
        return ("ping", None, "")
    if opcode == 0xA:
        return ("pong", None, "")
    return ("text", None, payload.decode("utf-8", "replace"))


UPGRADE = (
    "GET /graphql/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\n"
    "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
)


class WebSocket:
    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port, src, protocol="graphql-transport-ws", timeout=10.0, track=None):
        """(status line or error word, WebSocket when the answer was 101)."""
        try:
            reader, writer = await connect(port, src, timeout)
        except (OSError, asyncio.TimeoutError) as err:
            return f"connect: {error_word(err)}", None
        if track is not None:
            track.append(writer)
        try:
            writer.write(UPGRADE.format(port=port, protocol=protocol).encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as err:
            writer.close()
            return error_word(err), None
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        code = status.split(" ")[1] if " " in status else status
        if code != "101":
            writer.close()
            return code, None
        return code, cls(reader, writer)

    def send_text(self, text: str):
        data = text.encode()
        self.writer.write(frame_header(0x1, len(data)) + data)

    def send_init(self, access: str):
        self.send_text(
            json.dumps(
                {"type": "connection_init", "payload": {"Authorization": f"Bearer {access}"}}
            )
        )

    async def next_frame(self, timeout: float | None):
        """("text"|"ping"|"pong"|"close", code, text), ("end"|"reset", None, ""), or None when
        nothing came within `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            parsed = parse_frame(self.buf)
            if parsed:
                opcode, payload, used = parsed
                del self.buf[:used]
                return describe_frame(opcode, payload)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), left)
            except asyncio.TimeoutError:
                return None
            except OSError as err:
                return (error_word(err), None, "")
            if not chunk:
                return ("end", None, "")
            self.buf += chunk

    async def init(self, access: str, timeout: float = 10.0) -> bool:
        self.send_init(access)
        while True:
            frame = await self.next_frame(timeout)
            if frame is None or frame[0] in ("close", "end", "reset"):
                return False
            if frame[0] == "text" and "connection_ack" in frame[2]:
                return True

    def close(self):
        self.writer.close()


# --------------------------------------------------------------------------------------------
# One attack's run: a fresh server, the sampler, the row


class Run:
    def __init__(self, server: Server):
        self.server = server
        self.port = server.port
        self.pid = server.pid
        self.writers: list[asyncio.StreamWriter] = []
        self.sampler: Sampler | None = None
        self.before = None
        self.hwm_reset = False

    def begin(self):
        self.before = proc_snapshot(self.pid)
        self.hwm_reset = reset_hwm(self.pid)
        self.sampler = Sampler(self.pid)
        self.sampler.start()

    async def close_sockets(self):
        for writer in self.writers:
            try:
                writer.close()
            except Exception:
                pass
        self.writers.clear()
        await asyncio.sleep(0.05)

    async def end(self, settle: float) -> dict:
        await self.close_sockets()
        await asyncio.sleep(settle)
        after = proc_snapshot(self.pid)
        self.sampler.stop()
        peak_rss = self.sampler.max_rss
        if self.hwm_reset and after and after["hwm_kib"]:
            peak_rss = max(peak_rss, after["hwm_kib"])
        if after:  # the settle is sampled too
            peak_rss = max(peak_rss, after["rss_kib"] or 0)
        return {
            "before": self.before,
            "after": after,
            "peak_rss_kib": peak_rss or None,
            "peak_threads": max(self.sampler.max_threads, (after or {}).get("threads") or 0),
            "peak_fds": max(self.sampler.max_fds, (after or {}).get("fds") or 0),
            "hwm_reset": self.hwm_reset,
            "samples": self.sampler.samples,
        }


# --------------------------------------------------------------------------------------------
# The attacks. Each takes a Run (server up, nothing begun), calls run.begin() once its own
# set-up is done, and returns {"sent": …, "outcome": …, "details": …}. Sockets it leaves in
# run.writers are closed by the runner.


HUGE = (1 << 63) - 1


async def huge_frame_socket(run: Run, src: str, access: str | None, seconds: float, cap: int):
    status, ws = await WebSocket.connect(run.port, src, track=run.writers)
    result = {"src": src, "init": access is not None, "upgrade": status}
    if not ws:
        return result
    if access and not await ws.init(access):
        result["init_failed"] = True
        return result
    ws.writer.write(frame_header(0x1, HUGE))
    started = time.monotonic()
    closed = asyncio.Event()
    sent = 0

    async def read_close():
        while True:
            frame = await ws.next_frame(None)
            if frame[0] in ("close", "end", "reset"):
                result["close"] = frame[1] if frame[0] == "close" else frame[0]
                result["close_reason"] = frame[2]
                result["close_after_s"] = round(time.monotonic() - started, 3)
                result["bytes_sent_before_close"] = sent
                closed.set()
                return

    reading = asyncio.create_task(read_close())
    chunk = b"x" * 65536
    deadline = started + seconds
    try:
        while not closed.is_set() and sent < cap:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ws.writer.write(chunk)
            await asyncio.wait_for(ws.writer.drain(), left)
            sent += len(chunk)
            await asyncio.sleep(0)  # lets the reader see a close between chunks
    except asyncio.TimeoutError:
        pass
    except OSError as err:
        result["write_error"] = error_word(err)
    result["bytes_sent"] = sent
    result["stream_s"] = round(time.monotonic() - started, 3)
    result["capped"] = sent >= cap
    try:
        await asyncio.wait_for(closed.wait(), 2.0)
    except asyncio.TimeoutError:
        result["close"] = "none"
        result["bytes_sent_before_close"] = None
    reading.cancel()
    ws.close()
    return result


def huge_frame_summary(result) -> str:
    if result.get("upgrade") != "101":
        return f"upgrade {result.get('upgrade')}"
    if result.get("init_failed"):
        return "no ack"
    before = result.get("bytes_sent_before_close")
    if result.get("close") == "none":
        how = f"no close in {result.get('stream_s')} s, {size(result['bytes_sent'])} taken"
        return how + (" (cap)" if result.get("capped") else "")
    return f"{result['close']} after {size(before)} / {result['close_after_s']:.2f} s"


async def attack_huge_frame(run: Run, args):
    access = await access_token(run.port)
    cap = args.stream_cap_mib * MIB
    run.begin()
    no_init = await asyncio.gather(
        *(huge_frame_socket(run, f"127.0.0.{21 + n}", None, 5.0, cap) for n in range(4))
    )
    after_init = await huge_frame_socket(run, "127.0.0.25", access, 5.0, cap)
    return {
        "sent": "4 sockets w/o init, then 1 after init: text frame header declaring 2^63-1 bytes, "
        f"then 64 KiB chunks for ≤5 s (≤{args.stream_cap_mib} MiB per socket)",
        "outcome": "no init: "
        + "; ".join(huge_frame_summary(r) for r in no_init)
        + " — after init: "
        + huge_frame_summary(after_init),
        "details": {"no_init": no_init, "after_init": after_init},
    }


async def logins_burst(run: Run, srcs: list[str], usernames: list[str], password="guess"):
    gate = Gate(len(usernames))
    tasks = [
        asyncio.create_task(
            login(run.port, user, password, src=srcs[n % len(srcs)], timeout=30.0, gate=gate)
        )
        for n, user in enumerate(usernames)
    ]
    await gate.open_when_all_arrived(5.0)
    answers = await asyncio.gather(*tasks)
    return answers


def latency_summary(answers) -> dict:
    times = sorted(a.elapsed for a in answers if a.elapsed is not None)
    if not times:
        return {}
    return {"min_s": round(times[0], 3), "median_s": round(times[len(times) // 2], 3), "max_s": round(times[-1], 3)}


async def attack_logins(run: Run, args, many_addresses: bool):
    suffix = os.urandom(3).hex()
    users = [f"nobody-{suffix}-{n}" for n in range(80)]
    srcs = [f"127.0.5.{n + 1}" for n in range(80)] if many_addresses else ["127.0.0.2"]
    run.begin()
    answers = await logins_burst(run, srcs, users)
    lat = latency_summary(answers)
    codes = [(a.json() or {}).get("code") for a in answers if isinstance(a.status, int)]
    return {
        "sent": "80 simultaneous POST /api/token/, 80 unknown users, from "
        + ("80 addresses (127.0.5.1–80)" if many_addresses else "one address (127.0.0.2)"),
        "outcome": f"{counts(a.status for a in answers)}; slowest answer {ms(lat.get('max_s'))}",
        "details": {"statuses": counts(a.status for a in answers), "codes": counts(codes), "latency": lat},
    }


async def attack_parallel_guesses(run: Run, args):
    src = "127.0.0.6"
    run.begin()
    gate = Gate(41)
    tasks = [
        asyncio.create_task(login(run.port, "admin", f"wrong-{n}", src=src, gate=gate))
        for n in range(40)
    ]
    # The right password last in the same burst: written after every wrong one.
    tasks.append(
        asyncio.create_task(login(run.port, "admin", "letmein", src=src, gate=gate, yields_after_gate=3))
    )
    await gate.open_when_all_arrived(5.0)
    answers = await asyncio.gather(*tasks)
    wrong, right = answers[:40], answers[40]
    evaluated = sum(1 for a in answers if a.status in (200, 401))
    limited = sum(1 for a in answers if a.status == 429)
    return {
        "sent": "40 simultaneous wrong passwords for admin + the right one last in the burst, one address (127.0.0.6)",
        "outcome": f"evaluated (401/200) {evaluated}, 429 {limited}, other {len(answers) - evaluated - limited}; "
        f"wrong: {counts(a.status for a in wrong)}; right password got {right.status}",
        "details": {
            "wrong": counts(a.status for a in wrong),
            "right": right.status,
            "evaluated": evaluated,
            "limited": limited,
            "latency": latency_summary(answers),
        },
    }


SLOW_REQUEST = (
    b"POST /api/token/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100\r\n\r\n{"
)


async def attack_slow_bodies(run: Run, args):
    per_address = args.slow_per_address
    srcs = ["127.0.0.3", "127.0.0.4"]
    run.begin()
    semaphore = asyncio.Semaphore(200)
    # Per connection: "connecting", then "open" once the partial request is written, then what
    # it got (a status code, "closed, no answer", "reset", "connect: …", "write: …").
    states = ["connecting"] * (per_address * len(srcs))
    waited = {}  # index → seconds from the request to its answer
    finished_opening = 0

    async def slow(index: int, src: str):
        nonlocal finished_opening
        async with semaphore:
            try:
                try:
                    reader, writer = await connect(run.port, src, 10.0)
                except (OSError, asyncio.TimeoutError) as err:
                    states[index] = f"connect: {error_word(err)}"
                    return
                run.writers.append(writer)
                try:
                    writer.write(SLOW_REQUEST)
                    await asyncio.wait_for(writer.drain(), 5.0)
                except (OSError, asyncio.TimeoutError) as err:
                    states[index] = f"write: {error_word(err)}"
                    return
                states[index] = "open"
            finally:
                finished_opening += 1
        started = time.monotonic()
        try:
            line = await reader.readline()
        except OSError as err:
            states[index] = error_word(err)
            return
        parts = line.split(b" ")
        states[index] = parts[1].decode("latin-1") if len(parts) > 1 else "closed, no answer"
        waited[index] = time.monotonic() - started

    t0 = time.monotonic()
    tasks = [
        asyncio.create_task(slow(a * per_address + n, src))
        for a, src in enumerate(srcs)
        for n in range(per_address)
    ]
    # Opening: until every connection is made (or failed), at most 12 s.
    while finished_opening < len(tasks) and time.monotonic() - t0 < 12.0:
        await asyncio.sleep(0.05)
    open_s = time.monotonic() - t0
    made = sum(1 for s in states if s not in ("connecting",) and not s.startswith("connect:"))
    failures = [s for s in states if s.startswith("connect:") or s == "connecting"]
    fds_while_open = (proc_snapshot(run.pid) or {}).get("fds")
    health = await http_request(run.port, "GET", "/healthz", timeout=5.0)
    normal_login = await login(run.port, timeout=10.0)
    # What the slow connections got, with a 15 s overall deadline from the end of the opening.
    deadline = t0 + open_s + 15.0
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=max(deadline - time.monotonic(), 0.1))
    for task in tasks:
        task.cancel()
    got = [
        "no answer in 15 s" if s == "open" else s
        for s in states
        if s != "connecting" and not s.startswith("connect:")
    ]
    times_408 = [waited[i] for i, s in enumerate(states) if s == "408" and i in waited]
    return {
        "sent": f"{per_address} conns from each of 127.0.0.3 and .4: POST /api/token/ with "
        "Content-Length: 100 and a 1-byte body, kept open",
        "outcome": f"opened {made} in {open_s:.1f} s"
        + (f" (not opened: {counts(failures)})" if failures else "")
        + f"; they got: {counts(got)}"
        + (f" (408 after {min(times_408):.1f}–{max(times_408):.1f} s)" if times_408 else "")
        + f"; meanwhile healthz {health.status} in {ms(health.elapsed)}, "
        f"login {normal_login.status} in {ms(normal_login.elapsed)}; server fds 5 s after: "
        "{fds_after}",
        "details": {
            "opened": made,
            "open_s": round(open_s, 2),
            "not_opened": counts(failures),
            "statuses": counts(got),
            "seconds_to_408": {"min": round(min(times_408), 2), "max": round(max(times_408), 2)}
            if times_408
            else None,
            "server_fds_when_open": fds_while_open,
            "healthz": {"status": health.status, "s": round(health.elapsed or 0, 3)},
            "login": {"status": normal_login.status, "s": round(normal_login.elapsed or 0, 3)},
        },
        "settle": 5.0,
    }


def batch_operation(aliases: int) -> str:
    selection = " ".join(
        f"a{n}: cars {{ nodes {{ id make model variant year }} }}" for n in range(aliases)
    )
    return "{ " + selection + " }"


async def attack_batches(run: Run, args):
    access = await access_token(run.port)
    # `cars` is a page (CarPage): each alias selects cars, nodes and the 5 fields, 7 in all, so
    # 71 aliases are 497 fields, the most under the 500-field limit of one document.
    aliases = 71
    batch = json_body([{"query": batch_operation(aliases)} for _ in range(10)])
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {access}"}
    run.begin()
    gate = Gate(20)
    tasks = [
        asyncio.create_task(
            http_request(run.port, "POST", "/graphql/", src="127.0.0.7", body=batch, headers=headers,
                         timeout=30.0, gate=gate)
        )
        for _ in range(20)
    ]
    await gate.open_when_all_arrived(5.0)
    normal_login = asyncio.create_task(login(run.port, timeout=30.0))
    answers = await asyncio.gather(*tasks)
    normal = await normal_login
    sizes = [len(a.body) for a in answers if isinstance(a.status, int)]
    codes = []
    for a in answers:
        body = a.json()
        if isinstance(body, dict):
            codes.append(((body.get("errors") or [{}])[0].get("extensions") or {}).get("code"))
        elif isinstance(body, list):
            codes.append("array of %d" % len(body))
    lat = latency_summary(answers)
    return {
        "sent": f"20 parallel POST /graphql/, each a batch of 10 × {{ a0: cars {{ nodes {{ id make model variant year }} }} … }} "
        f"({aliases} aliases × 7 = {aliases * 7} fields; {len(batch)} B body)",
        "outcome": f"{counts(a.status for a in answers)} ({counts(codes)}); response bytes {sum(sizes)} in all, "
        f"≤{max(sizes) if sizes else 0} each; slowest {ms(lat.get('max_s'))}; login meanwhile {normal.status} in {ms(normal.elapsed)}",
        "details": {
            "statuses": counts(a.status for a in answers),
            "error_codes": counts(codes),
            "response_bytes_total": sum(sizes),
            "response_bytes_max": max(sizes) if sizes else 0,
            "latency": lat,
            "login": {"status": normal.status, "s": round(normal.elapsed or 0, 3)},
        },
    }


async def attack_sockets_no_init(run: Run, args):
    total = args.sockets
    src = "127.0.0.8"
    run.begin()
    semaphore = asyncio.Semaphore(200)
    statuses = []
    closes = []  # (code or word, seconds after its upgrade)
    upgraded_at = []
    watchers = []

    async def watch(ws: WebSocket, at: float):
        frame = await ws.next_frame(None)
        while frame[0] in ("text", "ping", "pong"):
            frame = await ws.next_frame(None)
        closes.append((frame[1] if frame[0] == "close" else frame[0], time.monotonic() - at))

    async def one():
        async with semaphore:
            status, ws = await WebSocket.connect(run.port, src, timeout=10.0, track=run.writers)
        statuses.append(status)
        if ws:
            at = time.monotonic()
            upgraded_at.append(at)
            watchers.append(asyncio.create_task(watch(ws, at)))

    t0 = time.monotonic()
    opening = [asyncio.create_task(one()) for _ in range(total)]
    await asyncio.wait(opening, timeout=20.0)
    for task in opening:
        task.cancel()
    open_s = time.monotonic() - t0
    last = max(upgraded_at) if upgraded_at else time.monotonic()
    fds_at_open = (proc_snapshot(run.pid) or {}).get("fds")
    await asyncio.sleep(max(last + 12.0 - time.monotonic(), 0))
    still_open = sum(1 for w in watchers if not w.done())
    for w in watchers:
        w.cancel()
    close_times = [t for _, t in closes]
    return {
        "sent": f"{total} websocket upgrades from one address (127.0.0.8), never a connection_init",
        "outcome": f"{counts(statuses)} (in {open_s:.1f} s); closed by the server: {counts(c for c, _ in closes)}"
        + (f" at {min(close_times):.1f}–{max(close_times):.1f} s after upgrade" if close_times else "")
        + f"; still open 12 s after the last upgrade: {still_open}",
        "details": {
            "statuses": counts(statuses),
            "open_s": round(open_s, 2),
            "close_codes": counts(c for c, _ in closes),
            "close_after_s": {"min": round(min(close_times), 2), "max": round(max(close_times), 2)} if close_times else None,
            "still_open_after_12s": still_open,
            "server_fds_after_opening": fds_at_open,
        },
    }


def half_open_socket(port: int, access: str, wait: float) -> dict:
    """Blocking, in a thread: init, ack, then neither reads nor writes for `wait` seconds; then
    reads what the kernel has queued."""
    sock = socket.socket()
    try:
        sock.bind((loopback("127.0.0.9"), 0))
        sock.settimeout(10)
        sock.connect((loopback("127.0.0.1"), port))
        sock.sendall(UPGRADE.format(port=port, protocol="graphql-transport-ws").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(4096)
            if not chunk:
                return {"upgrade": "eof"}
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        status = head.split(b" ")[1].decode()
        if status != "101":
            return {"upgrade": status}
        init = json.dumps({"type": "connection_init", "payload": {"Authorization": f"Bearer {access}"}}).encode()
        sock.sendall(frame_header(0x1, len(init)) + init)
        buf = bytearray(buf)
        while True:
            parsed = parse_frame(buf)
            if parsed:
                del buf[: parsed[2]]
                kind, _, text = describe_frame(parsed[0], parsed[1])
                if kind == "text" and "connection_ack" in text:
                    break
                continue
            chunk = sock.recv(4096)
            if not chunk:
                return {"upgrade": status, "ack": False}
            buf += chunk
        acked_at = time.monotonic()
        time.sleep(wait)
        # What is queued: read without waiting for more than 0.5 s of silence.
        sock.settimeout(0.5)
        ended = None
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except OSError as err:
                ended = error_word(err)
                break
            if not chunk:
                ended = "eof"
                break
            buf += chunk
        frames = []
        while True:
            parsed = parse_frame(buf)
            if not parsed:
                break
            del buf[: parsed[2]]
            kind, code, text = describe_frame(parsed[0], parsed[1])
            if kind == "text":
                try:
                    kind = "text:" + str(json.loads(text).get("type"))
                except ValueError:
                    pass
            frames.append((kind, code, text if kind == "close" else ""))
        return {
            "upgrade": status,
            "ack": True,
            "silent_s": round(time.monotonic() - acked_at, 1),
            "frames": counts(f[0] for f in frames),
            "close": next((f[1] for f in frames if f[0] == "close"), None),
            "close_reason": next((f[2] for f in frames if f[0] == "close"), None),
            "connection": ended or "still open",
        }
    finally:
        sock.close()


async def attack_half_open(run: Run, args):
    access = await access_token(run.port)
    run.begin()
    result = await asyncio.to_thread(half_open_socket, run.port, access, 10.0)
    if result.get("ack"):
        outcome = (
            f"queued after 10 s silent: {result['frames']}; close frame: "
            + (f"{result['close']} ({result['close_reason']!r})" if result["close"] is not None else "none")
            + f"; connection: {result['connection']}"
        )
    else:
        outcome = f"upgrade {result.get('upgrade')}, ack {result.get('ack')}"
    return {
        "sent": "1 socket: connection_init, read the ack, then no reads or writes for 10 s (KEEPALIVE_SECS=2)",
        "outcome": outcome,
        "details": result,
    }


# name → [(row label, server environment, coroutine)]
ATTACKS = {
    "huge-frame": [("huge-frame", {}, attack_huge_frame)],
    "parallel-logins": [
        ("parallel-logins (1 address)", {}, lambda run, args: attack_logins(run, args, False)),
        ("parallel-logins (80 addresses)", {}, lambda run, args: attack_logins(run, args, True)),
    ],
    "parallel-guesses": [("parallel-guesses", {}, attack_parallel_guesses)],
    "slow-bodies": [("slow-bodies", {}, attack_slow_bodies)],
    "batches": [("batches", {}, attack_batches)],
    "sockets-no-init": [("sockets-no-init", {}, attack_sockets_no_init)],
    "half-open": [("half-open", {"KEEPALIVE_SECS": "2"}, attack_half_open)],
}


async def run_one(label: str, env: dict, attack, args) -> dict:
    server = Server(args.binary, {**args.server_env, **env})
    LIVE_SERVERS.append(server)
    row = {"attack": label, "server_env": {**args.server_env, **env}}
    started = time.monotonic()
    try:
        await server.start()
        run = Run(server)
        try:
            result = await asyncio.wait_for(attack(run, args), ATTACK_TIMEOUT)
        except asyncio.TimeoutError:
            result = {"sent": "", "outcome": f"TIMED OUT after {ATTACK_TIMEOUT:.0f} s", "details": {}}
        except Exception as err:  # the row reports it; the other attacks still run
            result = {"sent": "", "outcome": f"ERROR: {type(err).__name__}: {err}", "details": {}}
        if run.sampler is None:
            run.begin()
        measured = await run.end(result.pop("settle", 2.0))
        row.update(result)
        row.update(measured)
        if "{fds_after}" in row["outcome"]:
            row["outcome"] = row["outcome"].replace("{fds_after}", str((measured["after"] or {}).get("fds")))
        if server.proc.poll() is not None:
            row["outcome"] += f" — SERVER EXITED ({server.proc.returncode}): {server.log_tail(5).strip()}"
            row["server_exit"] = server.proc.returncode
    except Exception as err:
        row.setdefault("sent", "")
        row["outcome"] = f"ERROR: {type(err).__name__}: {err}"
    finally:
        server.cleanup()
        LIVE_SERVERS.remove(server)
    row["duration_s"] = round(time.monotonic() - started, 1)
    return row


def markdown(rows: list[dict]) -> str:
    out = [
        "| attack | what was sent | server RSS before / peak / after (MiB) | peak threads | peak open fds | outcome |",
        "|---|---|---|---:|---:|---|",
    ]
    for row in rows:
        before = (row.get("before") or {}).get("rss_kib")
        after = (row.get("after") or {}).get("rss_kib")
        threads = row.get("peak_threads")
        threads_before = (row.get("before") or {}).get("threads")
        fds = row.get("peak_fds")
        fds_before = (row.get("before") or {}).get("fds")
        cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
        out.append(
            "| "
            + " | ".join(
                [
                    cell(row["attack"]),
                    cell(row.get("sent", "")),
                    f"{mib(before)} / {mib(row.get('peak_rss_kib'))} / {mib(after)}",
                    f"{threads} (from {threads_before})" if threads else "?",
                    f"{fds} (from {fds_before})" if fds else "?",
                    cell(row.get("outcome", "")),
                ]
            )
            + " |"
        )
    return "\n".join(out)


def file_info(path: str) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as binary:
        for block in iter(lambda: binary.read(1 << 20), b""):
            digest.update(block)
    stat = os.stat(path)
    return {
        "path": os.path.abspath(path),
        "sha256": digest.hexdigest(),
        "size": stat.st_size,
        "mtime": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(stat.st_mtime)),
    }


async def main_async(args) -> int:
    names = args.only or ALL_ATTACKS
    rows = []
    run_started = time.monotonic()
    for name in names:
        for label, env, attack in ATTACKS[name]:
            if time.monotonic() - run_started > RUN_BUDGET - 60:
                rows.append({"attack": label, "sent": "", "outcome": "SKIPPED: the run's time budget is spent"})
                continue
            print(f"… {label}", file=sys.stderr, flush=True)
            row = await run_one(label, env, attack, args)
            print(f"  {row['duration_s']} s: {row.get('outcome')}", file=sys.stderr, flush=True)
            rows.append(row)
    info = file_info(args.binary)
    header = (
        f"Binary `{info['path']}` (sha256 {info['sha256'][:12]}, {info['size'] / MIB:.0f} MiB, mtime "
        f"{info['mtime']}); {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} CPUs, load average "
        f"at start {args.loadavg}; RLIMIT_NOFILE {args.nofile}"
        + (f"; extra server env {' '.join(args.env)}" if args.env else "")
        + ". Peak RSS: the sampled maximum (every "
        f"{SAMPLE_INTERVAL * 1000:.0f} ms) or VmHWM reset at the attack's start, the larger; "
        "after: once the attack's sockets are closed, plus 2 s (5 s for slow-bodies)."
    )
    print(header + "\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {"binary": info, "loadavg_at_start": args.loadavg, "rlimit_nofile": args.nofile,
                 "attacks": rows},
                out,
                indent=2,
                default=str,
            )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", required=True, help="the gqlws binary to run")
    parser.add_argument("--only", nargs="+", choices=ALL_ATTACKS, metavar="NAME",
                        help=f"attacks to run (default: all): {', '.join(ALL_ATTACKS)}")
    parser.add_argument("--json", help="also write the measurements as JSON here")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra environment variable for every server (repeatable), "
                        "e.g. MALLOC_ARENA_MAX=2")
    parser.add_argument("--stream-cap-mib", type=int, default=256,
                        help="huge-frame: most MiB streamed per socket, so a server that buffers "
                        "everything cannot take the machine's memory (default 256)")
    parser.add_argument("--slow-per-address", type=int, default=4000,
                        help="slow-bodies: connections from each of the two addresses (default 4000)")
    parser.add_argument("--sockets", type=int, default=3000,
                        help="sockets-no-init: upgrades (default 3000)")
    args = parser.parse_args()
    try:
        args.server_env = dict(item.split("=", 1) for item in args.env)
    except ValueError:
        parser.error("--env takes KEY=VALUE")
    if not (os.path.isfile(args.binary) and os.access(args.binary, os.X_OK)):
        parser.error(f"{args.binary} is not an executable file")
    if args.slow_per_address > 4000 or args.sockets > 4000:
        parser.error("at most 4000 slow connections per address and 4000 sockets")
    # Descriptors for 8,000 client sockets; the server inherits the same limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    args.loadavg = " ".join(f"{x:.1f}" for x in os.getloadavg())

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for server in list(LIVE_SERVERS):
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
