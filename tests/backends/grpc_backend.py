#!/usr/bin/env python3
"""A gRPC game server, as written for the Go gateway's gRPC streaming mode.

Written from the wire contract in docs/BACKENDS.md (section 4, "grpc")
and proto/gateway.proto alone, the way an existing game server
behaves, so the gateway's `grpc` backend protocol can be tested against it.

It serves `/gateway.GameGatewayService/StreamPackets`. The Python code for
the messages is generated at start-up from proto/gateway.proto with
grpc_tools.protoc into a temporary directory (nothing generated is kept).

Per stream (one per gateway worker and backend address), per packet:

* metadata packet_type = "connect"    -> remember the session (client_ip,
  protocol), reply packet_type = "server_connect" for it
* metadata packet_type = "disconnect" -> forget the session
* metadata packet_type = "ping"       -> reply packet_type = "pong" (the
  contract names "pong" as the server's heartbeat answer)
* any other packet is data:
    payload b"push:N:..." -> the echo, then N packets msg_id 100+i, payload
                             b"pushed-<i>"
    payload b"fanout"     -> one packet, payload b"fanout-to-all", msg_id of
                             the request, target_session_ids = every session
                             connected on this stream (session_id is left set
                             to the sender: the gateway must ignore it)
    payload b"kickme"     -> a packet_type = "server_disconnect" packet with
                             reason "kicked" for that session
    anything else         -> echoed (same msg_id, same payload, session_id)

CLI: --listen HOST:PORT (port 0 picks one; first stdout line is
`LISTENING host:port`), --log FILE (append, line-buffered), --proto PATH.

Log lines (fields key=value, space separated):
  STREAM_OPEN stream=<k> gateway-name=<name or -> peer=<peer>
  STREAM_CLOSE stream=<k> why=<eof|cancelled|error:...>
  CONNECT stream=<k> session=<id> client_ip=<ip> protocol=<p> connect_time=<ms> known=<0|1>
  DISCONNECT stream=<k> session=<id> reason=<r> disconnect_time=<ms> known=<0|1>
  DATA stream=<k> session=<id> msg_id=<m> payload=<hex> known=<0|1> targets=<n> trace_id=<..> span_id=<..>
  PING stream=<k> session=<id>
`known=0` on DATA means no `connect` was seen for that session on that stream
before the data (a contract violation by the gateway).
Values are written without spaces (spaces in reasons become '_').
"""

import argparse
import asyncio
import itertools
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO = os.path.normpath(os.path.join(HERE, "..", "..", "proto", "gateway.proto"))


def load_stubs(proto_path):
    """Generates gateway_pb2 / gateway_pb2_grpc into a temp dir and imports them."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="gw-grpc-stubs-")
    proto_dir = os.path.dirname(os.path.abspath(proto_path))
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.abspath(proto_path),
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed on {proto_path} (rc {rc})")
    sys.path.insert(0, out)
    import gateway_pb2  # noqa: E402
    import gateway_pb2_grpc  # noqa: E402

    return gateway_pb2, gateway_pb2_grpc


def clean(v):
    v = str(v)
    return v.replace(" ", "_").replace("\n", "_") if v else "-"


class Log:
    def __init__(self, path):
        self.f = open(path, "a", buffering=1) if path else None

    def line(self, text):
        if self.f:
            self.f.write(text + "\n")
            self.f.flush()


def make_servicer(pb2, pb2_grpc, log):
    streams = itertools.count(1)

    class Service(pb2_grpc.GameGatewayServiceServicer):
        async def StreamPackets(self, request_iterator, context):
            k = next(streams)
            md = dict(context.invocation_metadata() or ())
            name = md.get("gateway-name", "")
            log.line(f"STREAM_OPEN stream={k} gateway-name={clean(name)} peer={clean(context.peer())}")
            sessions = {}  # session id -> (client_ip, protocol)
            why = "eof"
            try:
                async for pkt in request_iterator:
                    meta = dict(pkt.metadata)
                    kind = meta.get("packet_type", "")
                    s = pkt.session_id
                    if kind == "connect":
                        known = int(s in sessions)
                        sessions[s] = (meta.get("client_ip", ""), meta.get("protocol", ""))
                        log.line(
                            f"CONNECT stream={k} session={s} client_ip={clean(meta.get('client_ip', ''))} "
                            f"protocol={clean(meta.get('protocol', ''))} "
                            f"connect_time={clean(meta.get('connect_time', ''))} known={known}"
                        )
                        yield pb2.GamePacket(session_id=s, metadata={"packet_type": "server_connect"})
                    elif kind == "disconnect":
                        known = int(sessions.pop(s, None) is not None)
                        log.line(
                            f"DISCONNECT stream={k} session={s} reason={clean(meta.get('reason', ''))} "
                            f"disconnect_time={clean(meta.get('disconnect_time', ''))} known={known}"
                        )
                    elif kind == "ping":
                        log.line(f"PING stream={k} session={s}")
                        yield pb2.GamePacket(session_id=s, metadata={"packet_type": "pong"})
                    else:
                        p = bytes(pkt.payload)
                        log.line(
                            f"DATA stream={k} session={s} msg_id={pkt.msg_id} payload={p.hex() or '-'} "
                            f"known={int(s in sessions)} targets={len(pkt.target_session_ids)} "
                            f"packet_type={clean(kind)} trace_id={clean(meta.get('trace_id', ''))} "
                            f"span_id={clean(meta.get('span_id', ''))}"
                        )
                        if p == b"fanout":
                            yield pb2.GamePacket(
                                session_id=s,
                                msg_id=pkt.msg_id,
                                payload=b"fanout-to-all",
                                target_session_ids=sorted(sessions),
                            )
                        elif p == b"kickme":
                            yield pb2.GamePacket(
                                session_id=s,
                                metadata={"packet_type": "server_disconnect", "reason": "kicked"},
                            )
                        else:
                            yield pb2.GamePacket(session_id=s, msg_id=pkt.msg_id, payload=p)
                            if p.startswith(b"push:"):
                                parts = p.split(b":", 2)
                                try:
                                    count = int(parts[1])
                                except (IndexError, ValueError):
                                    count = 0
                                for i in range(count):
                                    yield pb2.GamePacket(
                                        session_id=s, msg_id=100 + i, payload=f"pushed-{i}".encode()
                                    )
            except asyncio.CancelledError:
                why = "cancelled"
                raise
            except Exception as e:  # the gateway reset the stream, ...
                why = f"error:{type(e).__name__}"
            finally:
                log.line(f"STREAM_CLOSE stream={k} why={why} sessions_left={len(sessions)}")

    return Service()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 = any)")
    ap.add_argument("--log", default=None, help="append one line per event to FILE")
    ap.add_argument("--proto", default=DEFAULT_PROTO, help="path of gateway.proto")
    args = ap.parse_args()
    pb2, pb2_grpc = load_stubs(args.proto)
    import grpc

    log = Log(args.log)
    # Like a Go server set up for the Go gateway: keep-alive pings are
    # allowed, also without active streams, and never punished.
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 100),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb2_grpc.add_GameGatewayServiceServicer_to_server(make_servicer(pb2, pb2_grpc, log), server)
    port = server.add_insecure_port(args.listen)
    if port == 0:
        raise SystemExit(f"cannot listen on {args.listen}")
    host = args.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
    await server.start()
    print(f"LISTENING {host}:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
