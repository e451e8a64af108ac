"""RPC transport benchmark: one no-op call over slurp's transport beside the trio+TLS floor.

Not a timed test.

Two servers run in child processes on 127.0.0.1, with node certificates of a fresh CA in a
temporary directory; the client runs in this process. Each measured pass makes ``--calls``
calls (after a warm-up of ``WARMUP_CALLS``) on one connection, with 1 and with 16 in flight:

- slurp: ``node.rpc.transport`` (``RpcServer`` + ``open_rpc_client``, mutual TLS, msgpack
  frames, handshake), a handler that returns ``{"ok": True}``, and a request body of ~1.3 KB
  (``{"blob": 1,200 random bytes, "ctx": 80 characters}``);
- raw: the floor under it, a bare ``trio.SSLStream`` (same TLS contexts from ``crypto.tls``)
  carrying a 4-byte length-prefixed frame of 1,300 random bytes, answered by an 8-byte frame.
  With 16 in flight the client keeps a window of 16 frames outstanding (one task: it sends a
  new frame, with its own ``send_all``, for each answer it reads).

Rounds alternate slurp and raw (``--rounds``, default 3) so that load changes hit both; each
figure is the median over the rounds. Per call: the server's CPU (user + system from
``/proc/PID/stat``, 10 ms ticks, so a pass is long enough to make that < 2 %) and the
client's (``time.process_time``), and calls/s (wall). Ratios are slurp / raw.

Output: a table on stdout and Markdown between ``<!-- bench:rpc:start -->`` and
``<!-- bench:rpc:end -->`` in BENCHMARKS.md (``--out``). ``--serve KIND --ca DIR`` is the
child's entry point (prints its port, serves until killed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
from bench_report import git_revision, write_section  # scripts/, on sys.path

from crypto.ca import CertificateAuthority
from crypto.tls import TlsFiles, client_ssl_context, server_ssl_context
from node.rpc.transport import Peer, RpcServer, open_rpc_client

ROOT = Path(__file__).resolve().parent.parent
START_MARKER = "<!-- bench:rpc:start -->"
END_MARKER = "<!-- bench:rpc:end -->"
SERVER_NAME = "node-a"
CLIENT_NAME = "node-b"
WARMUP_CALLS = 200
RAW_REQUEST_BYTES = 1300
RAW_REPLY = struct.pack(">I", 8) + b"okokokok"
IN_FLIGHT = (1, 16)
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
KINDS = ("slurp", "raw")


def _files(ca_dir: Path, name: str) -> TlsFiles:
    return TlsFiles.in_directory(ca_dir, name)


# --- the servers (child processes) -------------------------------------------------------


async def _noop(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


async def _serve_slurp(ca_dir: Path) -> None:
    server = RpcServer(_noop, _files(ca_dir, SERVER_NAME), port=0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        print(port, flush=True)


async def _read_exact(stream: trio.abc.ReceiveStream, buffer: bytearray, size: int) -> bool:
    while len(buffer) < size:
        data = await stream.receive_some(65536)
        if not data:
            return False
        buffer += data
    return True


async def _serve_raw(ca_dir: Path) -> None:
    context = server_ssl_context(_files(ca_dir, SERVER_NAME))

    async def echo(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, context, server_side=True)
        buffer = bytearray()
        try:
            while await _read_exact(stream, buffer, 4):
                size = 4 + int.from_bytes(buffer[:4], "big")
                if not await _read_exact(stream, buffer, size):
                    break
                del buffer[:size]
                await stream.send_all(RAW_REPLY)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(echo, listeners)


# --- the client (this process) -----------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """One measured pass: per-call CPU of each side (µs) and calls per second."""

    server_us: float
    client_us: float
    calls_per_s: float


def _server_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S  # utime, stime


async def _measure(pid: int, calls: int, run: Any) -> Pass:
    await run(WARMUP_CALLS)
    server0, client0, wall0 = _server_cpu_s(pid), time.process_time(), time.perf_counter()
    await run(calls)
    wall = time.perf_counter() - wall0
    return Pass(
        server_us=(_server_cpu_s(pid) - server0) / calls * 1e6,
        client_us=(time.process_time() - client0) / calls * 1e6,
        calls_per_s=calls / wall,
    )


async def _pass_slurp(ca_dir: Path, port: int, pid: int, calls: int, in_flight: int) -> Pass:
    body = {"blob": os.urandom(1200), "ctx": "x" * 80}
    async with open_rpc_client(
        "127.0.0.1", port, _files(ca_dir, CLIENT_NAME), node=CLIENT_NAME
    ) as client:

        async def worker(n: int) -> None:
            for _ in range(n):
                await client.call("bench.noop", body, timeout_s=30.0)

        async def run(n: int) -> None:
            async with trio.open_nursery() as nursery:
                for i in range(in_flight):
                    nursery.start_soon(worker, n // in_flight + (i < n % in_flight))

        return await _measure(pid, calls, run)


async def _pass_raw(ca_dir: Path, port: int, pid: int, calls: int, in_flight: int) -> Pass:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    context = client_ssl_context(_files(ca_dir, CLIENT_NAME))
    stream = trio.SSLStream(tcp, context, server_hostname="127.0.0.1")
    message = os.urandom(RAW_REQUEST_BYTES)
    frame = struct.pack(">I", len(message)) + message
    buffer = bytearray()

    async def run(n: int) -> None:
        sent = answered = 0
        while sent < min(in_flight, n):
            await stream.send_all(frame)
            sent += 1
        while answered < n:
            if not await _read_exact(stream, buffer, len(RAW_REPLY)):
                raise RuntimeError("the raw server closed the connection")
            while len(buffer) >= len(RAW_REPLY):
                del buffer[: len(RAW_REPLY)]
                answered += 1
                if sent < n:
                    await stream.send_all(frame)
                    sent += 1

    try:
        return await _measure(pid, calls, run)
    finally:
        await stream.aclose()


def _start_server(kind: str, ca_dir: Path) -> tuple[subprocess.Popen[str], int]:
    script = Path(__file__).resolve()
    proc = subprocess.Popen(
        [sys.executable, str(script), "--serve", kind, "--ca", str(ca_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip():
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise RuntimeError(f"the {kind} server did not start")
    return proc, int(line)


def _make_ca(directory: Path) -> Path:
    ca = CertificateAuthority.init(directory / "ca")
    for name in (SERVER_NAME, CLIENT_NAME):
        ca.issue_node(name, ["127.0.0.1", "localhost"])
    return ca.directory


def run_bench(calls: int, rounds: int) -> dict[tuple[str, int], list[Pass]]:
    """Measure every (kind, in flight) ``rounds`` times, alternating kinds within a round."""
    results: dict[tuple[str, int], list[Pass]] = {(k, n): [] for k in KINDS for n in IN_FLIGHT}
    with tempfile.TemporaryDirectory(prefix="slurp-bench-rpc-") as tmp:
        ca_dir = _make_ca(Path(tmp))
        servers: dict[str, tuple[subprocess.Popen[str], int]] = {}
        try:
            for kind in KINDS:
                servers[kind] = _start_server(kind, ca_dir)
            for _ in range(rounds):
                for in_flight in IN_FLIGHT:
                    for kind in KINDS:
                        proc, port = servers[kind]
                        one = _pass_slurp if kind == "slurp" else _pass_raw
                        result = trio.run(one, ca_dir, port, proc.pid, calls, in_flight)
                        results[kind, in_flight].append(result)
        finally:
            for proc, _ in servers.values():
                proc.kill()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
    return results


def _median(passes: list[Pass]) -> Pass:
    return Pass(
        server_us=statistics.median(p.server_us for p in passes),
        client_us=statistics.median(p.client_us for p in passes),
        calls_per_s=statistics.median(p.calls_per_s for p in passes),
    )


def render(results: dict[tuple[str, int], list[Pass]], header: str, footer: str) -> str:
    """The Markdown section: one row per (in flight, side)."""
    lines = [
        "## RPC transport: one no-op call beside the trio+TLS floor (`scripts/bench rpc`)",
        "",
        header,
        "",
        "| in flight | figure | slurp transport | raw `SSLStream` echo | slurp / raw |",
        "|--:|---|--:|--:|--:|",
    ]
    for in_flight in IN_FLIGHT:
        slurp, raw = _median(results["slurp", in_flight]), _median(results["raw", in_flight])
        for label, a, b, unit in (
            ("server CPU per call", slurp.server_us, raw.server_us, "µs"),
            ("client CPU per call", slurp.client_us, raw.client_us, "µs"),
            ("calls/s (wall)", slurp.calls_per_s, raw.calls_per_s, "/s"),
        ):
            lines.append(
                f"| {in_flight} | {label} | {a:,.0f} {unit} | {b:,.0f} {unit} | {a / b:.2f}x |"
            )
    lines += ["", footer]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--serve``, one of its servers)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per measured pass")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--quick", action="store_true", help="1,000 calls, 1 round")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--ca", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        trio.run(_serve_slurp if args.serve == "slurp" else _serve_raw, args.ca)
        return 0
    calls, rounds = (1000, 1) if args.quick else (args.calls, args.rounds)
    if calls < 1 or rounds < 1:
        parser.error("--calls and --rounds must be positive")
    load_before, started = os.getloadavg()[0], time.monotonic()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results = run_bench(calls, rounds)
    elapsed, load_after = time.monotonic() - started, os.getloadavg()[0]
    header = (
        f"{when} · commit {git_revision()} · {os.cpu_count()} cores · "
        f"Python {sys.version.split()[0]} · trio {trio.__version__} · {calls:,} calls a pass, "
        f"median of {rounds} alternating rounds · request ~1.3 KB, no-op handler, one "
        "mutual-TLS connection on 127.0.0.1; server in a child process, client in the bench's"
    )
    footer = (
        f"Whole run: {elapsed:.0f} s; 1-minute load average {load_before:.2f} before, "
        f"{load_after:.2f} after (other processes on the machine skew every figure)."
    )
    body = render(results, header, footer)
    print(body)
    write_section(args.out, body, START_MARKER, END_MARKER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
