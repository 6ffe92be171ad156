#!/usr/bin/env python3
"""Smoke test of the two test backends, without any gateway.

Starts seed_tcp_backend.py and grpc_backend.py as child processes and talks
to them directly, as the Go gateway would per docs/BACKENDS.md: the 20-byte
header + gate header framing for the TCP one, a StreamPackets stream for the
gRPC one. Exits 0 and prints `N passed, 0 failed` when every check holds.

Usage: python3 tests/backends/smoke.py
"""

import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

HDR = struct.Struct("<iiIq")
GATE = struct.Struct("<Bq")
T = 5.0

results = []


def check(name, cond, detail=""):
    results.append((name, bool(cond)))
    print(f"{'ok  ' if cond else 'FAIL'} {name}" + (f": {str(detail)[:400]}" if detail and not cond else ""), flush=True)


class Backend:
    def __init__(self, script, *args, listen="127.0.0.1:0"):
        self.dir = tempfile.mkdtemp(prefix="gw-smoke-")
        self.log = os.path.join(self.dir, "backend.log")
        self.p = subprocess.Popen(
            [sys.executable, os.path.join(HERE, script), "--listen", listen, "--log", self.log, *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.p.stdout.readline()
        if not line.startswith("LISTENING "):
            self.p.kill()
            raise SystemExit(f"{script}: unexpected first line {line!r}")
        h, _, port = line.split()[1].rpartition(":")
        self.addr = (h, int(port))

    def lines(self):
        try:
            with open(self.log) as f:
                return [l.rstrip("\n") for l in f]
        except FileNotFoundError:
            return []

    def wait_line(self, pred, timeout=T):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for l in self.lines():
                if pred(l):
                    return l
            time.sleep(0.02)
        return None

    def stop(self):
        self.p.kill()
        self.p.wait()


def fields(line):
    return dict(t.split("=", 1) for t in line.split() if "=" in t)


# ---------------------------------------------------------------- seed TCP


def tcp_frame(msg_type, object_id, payload, opcode=1, server_id=0, trace=None):
    gate = GATE.pack(opcode, object_id) + (trace or b"")
    return HDR.pack(len(gate) + len(payload), msg_type, server_id, object_id) + gate + payload


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        chunk = s.recv(n - len(b))
        if not chunk:
            raise EOFError(f"EOF after {len(b)} of {n} bytes")
        b += chunk
    return b


def tcp_read(s):
    """One server -> gateway frame: (type, server_id, object_id, opcode, session_id, payload)."""
    length, t, sid, oid = HDR.unpack(recv_exact(s, HDR.size))
    body = recv_exact(s, length)
    op, session = GATE.unpack_from(body, 0)
    return t, sid, oid, op, session, body[GATE.size:]


def tcp_conn(addr):
    s = socket.create_connection(addr, timeout=T)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def smoke_tcp():
    b = Backend("seed_tcp_backend.py")
    try:
        a = tcp_conn(b.addr)
        # Echo, session 1001.
        a.sendall(tcp_frame(7, 1001, b"hello"))
        r = tcp_read(a)
        check("tcp echo", r == (7, 0, 1001, 1, 1001, b"hello"), r)
        # Pushes.
        a.sendall(tcp_frame(8, 1001, b"push:3:x"))
        got = [tcp_read(a) for _ in range(4)]
        check(
            "tcp push:3: -> echo then 3 pushes",
            [(g[0], g[5]) for g in got]
            == [(8, b"push:3:x"), (100, b"pushed-0"), (101, b"pushed-1"), (102, b"pushed-2")]
            and all(g[2] == 1001 and g[4] == 1001 for g in got),
            got,
        )
        # A large payload, sent in pieces.
        big = bytes(i % 251 for i in range(100_000))
        f = tcp_frame(9, 1001, big)
        for i in range(0, len(f), 7000):
            a.sendall(f[i : i + 7000])
        r = tcp_read(a)
        check("tcp 100 KB payload in pieces", r[5] == big and r[0] == 9)
        # Negative session id (their id scheme allows it).
        a.sendall(tcp_frame(1, -42, b"neg"))
        r = tcp_read(a)
        check("tcp negative session id", r[2] == -42 and r[4] == -42 and r[5] == b"neg", r)
        # The session ends (no notice in this mode); the gateway reuses the
        # connection for session 2002: the server just keeps reading.
        a.sendall(tcp_frame(3, 2002, b"second session"))
        r = tcp_read(a)
        check("tcp reused connection serves a later session", r[2] == 2002 and r[5] == b"second session", r)
        # A concurrent second connection.
        c = tcp_conn(b.addr)
        c.sendall(tcp_frame(4, 3003, b"other"))
        r = tcp_read(c)
        check("tcp second connection", r[2] == 3003 and r[5] == b"other", r)
        # Opcodes other than 1 are never sent by the Go gateway: logged BAD, unanswered.
        c.sendall(tcp_frame(0, 3003, bytes(19), opcode=2))
        c.sendall(tcp_frame(0, 0, b"", opcode=7))
        c.sendall(tcp_frame(5, 3003, b"after bad"))
        r = tcp_read(c)
        check("tcp non-TRANS frames not answered", r[5] == b"after bad", r)
        # Pipelined frames in one write.
        c.sendall(b"".join(tcp_frame(10 + i, 3003, f"p{i}".encode()) for i in range(50)))
        got = [tcp_read(c) for _ in range(50)]
        check("tcp 50 pipelined frames in order", [g[5] for g in got] == [f"p{i}".encode() for i in range(50)])
        # "close": the server closes that connection, the other stays.
        a.sendall(tcp_frame(6, 2002, b"close"))
        a.settimeout(T)
        try:
            eof = a.recv(1) == b""
        except ConnectionResetError:
            eof = True
        check("tcp close -> server closes the connection", eof)
        c.sendall(tcp_frame(5, 3003, b"still"))
        check("tcp other connection unaffected", tcp_read(c)[5] == b"still")
        c.close()
        b.wait_line(lambda l: l.startswith("CLOSE conn=2"))
        lines = b.lines()
        frames = [fields(l) for l in lines if l.startswith("conn=")]
        bad = [l for l in lines if l.startswith("BAD")]
        check(
            "tcp log: frames per connection",
            [(f["conn"], f["object_id"]) for f in frames if f["conn"] == "1"]
            == [("1", "1001")] * 3 + [("1", "-42"), ("1", "2002"), ("1", "2002")],
            [(f["conn"], f["object_id"], f["type"]) for f in frames],
        )
        check("tcp log: payload hex", frames[0]["payload"] == b"hello".hex() and frames[0]["type"] == "7")
        check(
            "tcp log: BAD opcode lines",
            len(bad) == 2 and bad[0].startswith("BAD opcode=2 conn=2") and bad[1].startswith("BAD opcode=7"),
            bad,
        )
        check("tcp log: OPEN/CLOSE", any(l.startswith("CLOSE conn=1 by=server") for l in lines), lines)
    finally:
        b.stop()

    # --trace: 33-byte gate header on frames from the gateway.
    b = Backend("seed_tcp_backend.py", "--trace")
    try:
        a = tcp_conn(b.addr)
        a.sendall(tcp_frame(7, 55, b"traced", trace=bytes(range(1, 17)) + bytes(range(0xA1, 0xA9))))
        r = tcp_read(a)
        check("tcp --trace strips the 24 trace bytes", r[5] == b"traced" and r[2] == 55, r)
        a.close()
    finally:
        b.stop()

    # Killed and restarted on the same port.
    b = Backend("seed_tcp_backend.py")
    addr = b.addr
    a = tcp_conn(addr)
    b.stop()
    try:
        eof = a.recv(1) == b""
    except ConnectionResetError:
        eof = True
    check("tcp killed -> connection closed", eof)
    b = Backend("seed_tcp_backend.py", listen=f"{addr[0]}:{addr[1]}")
    try:
        a = tcp_conn(addr)
        a.sendall(tcp_frame(1, 9, b"again"))
        check("tcp restarted on the same port", tcp_read(a)[5] == b"again")
    finally:
        b.stop()


# ---------------------------------------------------------------- gRPC


async def smoke_grpc_async(pb2, pb2_grpc, b):
    import grpc

    def pkt(session, msg_id=0, payload=b"", **meta):
        return pb2.GamePacket(session_id=session, msg_id=msg_id, payload=payload, metadata=meta)

    async def read(call):
        return await asyncio.wait_for(call.read(), T)

    async with grpc.aio.insecure_channel(f"{b.addr[0]}:{b.addr[1]}") as ch:
        stub = pb2_grpc.GameGatewayServiceStub(ch)
        one = stub.StreamPackets(metadata=(("gateway-name", "smoke-gw-0"),))
        two = stub.StreamPackets(metadata=(("gateway-name", "smoke-gw-1"),))
        now = str(int(time.time() * 1000))
        # Sessions 11 and -12 on stream one, 21 on stream two.
        for call, s in ((one, 11), (one, -12), (two, 21)):
            await call.write(pkt(s, packet_type="connect", client_ip="127.0.0.1", protocol="tcp", connect_time=now))
            r = await read(call)
            check(
                f"grpc connect {s} -> server_connect",
                r.session_id == s and r.metadata.get("packet_type") == "server_connect",
                r,
            )
        await one.write(pkt(11, 7, b"hello"))
        r = await read(one)
        check("grpc echo", (r.session_id, r.msg_id, r.payload, len(r.target_session_ids)) == (11, 7, b"hello", 0), r)
        await one.write(pkt(-12, 8, b"push:2:", trace_id="ab" * 16, span_id="cd" * 8))
        got = [await read(one) for _ in range(3)]
        check(
            "grpc push:2: -> echo then 2 pushes",
            [(g.session_id, g.msg_id, g.payload) for g in got]
            == [(-12, 8, b"push:2:"), (-12, 100, b"pushed-0"), (-12, 101, b"pushed-1")],
            got,
        )
        await one.write(pkt(11, 9, b"fanout"))
        r = await read(one)
        check(
            "grpc fanout -> target_session_ids of this stream",
            r.payload == b"fanout-to-all" and sorted(r.target_session_ids) == [-12, 11] and r.msg_id == 9,
            r,
        )
        await two.write(pkt(21, 9, b"fanout"))
        r = await read(two)
        check("grpc fanout on the other stream", list(r.target_session_ids) == [21], r)
        await one.write(pkt(-12, 1, b"kickme"))
        r = await read(one)
        check(
            "grpc kickme -> server_disconnect kicked",
            r.session_id == -12
            and r.metadata.get("packet_type") == "server_disconnect"
            and r.metadata.get("reason") == "kicked",
            r,
        )
        await one.write(pkt(-12, packet_type="disconnect", reason="kicked", disconnect_time=now))
        await one.write(pkt(11, 9, b"fanout"))
        r = await read(one)
        check("grpc disconnect forgets the session", list(r.target_session_ids) == [11], r)
        await one.write(pkt(0, packet_type="ping"))
        r = await read(one)
        check("grpc ping -> pong", r.metadata.get("packet_type") == "pong", r)
        big = bytes(i % 253 for i in range(60_000))
        await two.write(pkt(21, 3, big))
        r = await read(two)
        check("grpc 60 KB payload", r.payload == big)
        await one.done_writing()
        await two.done_writing()
        # Server ends each stream with OK after the client half-closes.
        for call in (one, two):
            while (await asyncio.wait_for(call.read(), T)) is not grpc.aio.EOF:
                pass
            check("grpc stream ends OK", (await call.code()) == grpc.StatusCode.OK)

    b.wait_line(lambda l: l.startswith("STREAM_CLOSE stream=2"))
    lines = b.lines()
    opens = [l for l in lines if l.startswith("STREAM_OPEN")]
    check(
        "grpc log: gateway-name per stream",
        sorted(fields(l)["gateway-name"] for l in opens) == ["smoke-gw-0", "smoke-gw-1"],
        opens,
    )
    first_connect = next(i for i, l in enumerate(lines) if l.startswith("CONNECT") and "session=11 " in l)
    first_data = next(i for i, l in enumerate(lines) if l.startswith("DATA") and "session=11 " in l)
    check("grpc log: connect before data", first_connect < first_data)
    check(
        "grpc log: connect fields",
        "client_ip=127.0.0.1 protocol=tcp" in lines[first_connect],
        lines[first_connect],
    )
    check(
        "grpc log: disconnect with reason",
        any(l.startswith("DISCONNECT") and "session=-12 reason=kicked" in l and "known=1" in l for l in lines),
        lines,
    )
    check("grpc log: trace ids on data", any("trace_id=" + "ab" * 16 in l for l in lines))
    check("grpc log: every data packet known", all("known=1" in l for l in lines if l.startswith("DATA")), lines)


def smoke_grpc():
    from grpc_backend import load_stubs

    pb2, pb2_grpc = load_stubs(os.path.join(HERE, "..", "..", "proto", "gateway.proto"))
    b = Backend("grpc_backend.py")
    addr = b.addr
    try:
        asyncio.run(smoke_grpc_async(pb2, pb2_grpc, b))
    finally:
        b.stop()

    # Killed mid-stream: the stream fails; restarted on the same port: works.
    async def killed_and_restarted():
        import grpc

        nonlocal b
        b = Backend("grpc_backend.py")
        port = b.addr[1]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = pb2_grpc.GameGatewayServiceStub(ch).StreamPackets(metadata=(("gateway-name", "k"),))
            await call.write(pb2.GamePacket(session_id=1, metadata={"packet_type": "connect"}))
            await asyncio.wait_for(call.read(), T)
            b.stop()
            try:
                r = await asyncio.wait_for(call.read(), T)
                ended = r is grpc.aio.EOF
            except grpc.aio.AioRpcError:
                ended = True
            check("grpc killed -> stream ends with an error", ended and (await call.code()) != grpc.StatusCode.OK)
        b = Backend("grpc_backend.py", listen=f"127.0.0.1:{port}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = pb2_grpc.GameGatewayServiceStub(ch).StreamPackets(metadata=(("gateway-name", "k"),))
            await call.write(pb2.GamePacket(session_id=2, metadata={"packet_type": "connect"}))
            r = await asyncio.wait_for(call.read(), T)
            check("grpc restarted on the same port", r.metadata.get("packet_type") == "server_connect", r)
            await call.done_writing()

    try:
        asyncio.run(killed_and_restarted())
    finally:
        b.stop()


def main():
    for part in (smoke_tcp, smoke_grpc):
        try:
            part()
        except Exception:
            traceback.print_exc()
            check(f"{part.__name__} ran to the end", False)
    passed = sum(1 for _, ok in results if ok)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
