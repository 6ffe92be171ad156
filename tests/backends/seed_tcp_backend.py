#!/usr/bin/env python3
"""A per-session TCP game server, as written for the Go gateway's TCP mode.

Written from the wire contract in docs/BACKENDS.md (section 3, "seed_tcp")
alone, the way an existing game server behaves, so the gateway's `seed_tcp`
backend protocol can be tested against it.

Contract (what this server assumes of the gateway):

* Every accepted TCP connection carries one client session at a time; the
  gateway may reuse the connection for a later session without closing it,
  so the server just keeps reading.
* Gateway -> server: 20-byte header (i32 length = bytes after the header,
  i32 type = client msg_id, u32 server_id (the Go gateway sends 0),
  i64 object_id = session id; little-endian), then the gate header: u8 opcode
  (always 1), i64 session_id, plus 24 trace bytes (16 trace id + 8 span id)
  when a trace context is present. The server cannot tell from the frame
  whether the trace bytes are there; start it with --trace when the gateway
  route propagates traces. Everything after the gate header is the payload.
* Server -> gateway: the same 20-byte header and a plain 9-byte gate header
  (opcode 1, session id), then the payload; `type` becomes the client's
  msg_id. There are no connect/disconnect/keep-alive frames in this mode.

Behaviour, chosen by the payload text (for tests):

* anything        -> echoed back (same type) to the session that sent it
* b"push:N:..."   -> the echo, then N extra frames, type 100+i, payload
                     b"pushed-<i>"
* b"close"        -> no reply; the server closes that TCP connection
* b"late:MS"      -> the echo, MS milliseconds later (a slow reply that may
                     arrive after its session ended)

CLI: --listen HOST:PORT (port 0 picks one; the first stdout line is
`LISTENING host:port`), --log FILE (append; line-buffered), --trace.

Log lines (one per event; fields are key=value, space separated):
  OPEN conn=<n> peer=<ip:port>
  conn=<n> object_id=<id> type=<t> payload=<hex> server_id=<u32> session_id=<id> len=<length>
  BAD opcode=<op> conn=<n> object_id=<id> type=<t> payload=<hex> server_id=<u32> session_id=<id> len=<length>
  BAD short_frame conn=<n> length=<length>
  CLOSE conn=<n> by=<peer|server>
Every frame whose opcode is not 1 (CONNECT, DISCONNECT, PING, ...) is logged
as a BAD line and not answered, so tests can assert none ever arrived.
"""

import argparse
import asyncio
import itertools
import struct
import sys

HDR = struct.Struct("<iiIq")  # length, type, server_id, object_id
GATE = struct.Struct("<Bq")  # opcode, session_id
TRACE_LEN = 24
OP_TRANS = 1


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1) if path else None

    def line(self, text):
        if self.f:
            self.f.write(text + "\n")
            self.f.flush()


def frame(msg_type, session_id, payload):
    """A server -> gateway frame with the plain 9-byte gate header."""
    return (
        HDR.pack(GATE.size + len(payload), msg_type, 0, session_id)
        + GATE.pack(OP_TRANS, session_id)
        + payload
    )



async def late_reply(writer, ms, data):
    await asyncio.sleep(ms / 1000)
    try:
        writer.write(data)
        await writer.drain()
    except (ConnectionError, OSError):
        pass

async def serve_conn(reader, writer, n, log, trace):
    peer = writer.get_extra_info("peername")
    log.line(f"OPEN conn={n} peer={peer[0]}:{peer[1]}")
    gate_len = GATE.size + (TRACE_LEN if trace else 0)
    by = "peer"
    try:
        while True:
            try:
                head = await reader.readexactly(HDR.size)
            except asyncio.IncompleteReadError:
                break
            length, msg_type, server_id, object_id = HDR.unpack(head)
            if length < GATE.size:
                log.line(f"BAD short_frame conn={n} length={length}")
                by = "server"
                break
            try:
                body = await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                break
            opcode, session_id = GATE.unpack_from(body, 0)
            payload = body[gate_len:] if opcode == OP_TRANS else body[GATE.size:]
            fields = (
                f"conn={n} object_id={object_id} type={msg_type} payload={payload.hex()} "
                f"server_id={server_id} session_id={session_id} len={length}"
            )
            if opcode != OP_TRANS:
                # The Go gateway never sends these in TCP mode; record, don't answer.
                log.line(f"BAD opcode={opcode} {fields}")
                continue
            log.line(fields)
            if payload == b"close":
                by = "server"
                break
            if payload.startswith(b"late:"):
                asyncio.get_running_loop().create_task(
                    late_reply(writer, int(payload[5:] or b"0"), frame(msg_type, object_id, payload))
                )
                continue
            out = [frame(msg_type, object_id, payload)]
            if payload.startswith(b"push:"):
                parts = payload.split(b":", 2)
                try:
                    count = int(parts[1])
                except (IndexError, ValueError):
                    count = 0
                for i in range(count):
                    out.append(frame(100 + i, object_id, f"pushed-{i}".encode()))
            writer.write(b"".join(out))
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        log.line(f"CLOSE conn={n} by={by}")
        try:
            writer.close()
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any)")
    ap.add_argument("--log", default=None, help="append one line per event to FILE")
    ap.add_argument(
        "--trace",
        action="store_true",
        help="the gateway sends the 24 trace bytes (33-byte gate header) on every frame",
    )
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    log = Log(args.log)
    counter = itertools.count(1)

    async def on_conn(reader, writer):
        sock = writer.get_extra_info("socket")
        if sock is not None:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await serve_conn(reader, writer, next(counter), log, args.trace)

    server = await asyncio.start_server(on_conn, host, int(port), reuse_address=True)
    addr = server.sockets[0].getsockname()
    print(f"LISTENING {addr[0]}:{addr[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
