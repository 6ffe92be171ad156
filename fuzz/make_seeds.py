#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/ (committed; deterministic).

Run from anywhere: python3 fuzz/make_seeds.py. It rewrites only the files it
names (seed-*), so seeds added by hand or kept from a fuzzing run stay.

The input formats are those of src/fuzzing.rs:
- client_frame: flags byte (bits 0-1: max payload mode), 2 bytes, the stream;
- backend_frame: flags byte (bit 0: trace extension, bits 1-2: max mode),
  2 bytes, the stream (read as gate, seed and gRPC framing);
- front_door: flags byte (bit 0: origin allow-list, bit 1: subprotocols,
  bits 2-3: WebSocket max size, bits 4-7: chunking), the first bytes;
- route_json: rules JSON, optionally NUL and realm lines `id=host:port`;
- config: TOML text;
- shard: a program of events for ShardDriver (see `Shard` below).
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes(data))


# --- wire encoders (PROTOCOL.md) ---------------------------------------------

def sid(world, st, inst, zip_=False):
    return (int(zip_) << 31) | ((world & 0x7FFF) << 16) | (st << 8) | inst


def client(msg_id, server_id, payload=b""):
    return struct.pack("<HHI", len(payload), msg_id, server_id) + payload


def backend(opcode, session, body=b"", msg_type=9, server_id=0x0001_0A00, object_id=None):
    object_id = session if object_id is None else object_id
    return struct.pack("<iiIqBq", 9 + len(body), msg_type, server_id, object_id, opcode, session) + body


def connect_body(transport, ip16, port):
    return bytes([transport]) + ip16 + struct.pack("<H", port)


V4MAPPED = bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
V6 = bytes.fromhex("20010db8000000000000000000000001")


def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb_field(tag, wire, payload):
    key = varint(tag << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def game_packet(session=0, msg_id=0, payload=b"", metadata=(), targets=()):
    m = b""
    if session:
        m += pb_field(1, 0, session)
    if msg_id:
        m += pb_field(2, 0, msg_id)
    if payload:
        m += pb_field(3, 2, payload)
    for k, v in metadata:
        m += pb_field(4, 2, pb_field(1, 2, k.encode()) + pb_field(2, 2, v.encode()))
    if targets:
        m += pb_field(5, 2, b"".join(varint(t) for t in targets))
    return b"\x00" + struct.pack(">I", len(m)) + m


def ws(opcode, payload, fin=True, masked=True):
    head = bytes([(0x80 if fin else 0) | opcode])
    m = 0x80 if masked else 0
    if len(payload) < 126:
        head += bytes([m | len(payload)])
    elif len(payload) < 65536:
        head += bytes([m | 126]) + struct.pack(">H", len(payload))
    else:
        head += bytes([m | 127]) + struct.pack(">Q", len(payload))
    if not masked:
        return head + payload
    mask = b"\x11\x22\x33\x44"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


UPGRADE = (
    "GET /play HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    "Origin: https://game.example\r\nSec-WebSocket-Protocol: chat, game.v1\r\n\r\n"
).encode()
PROXY_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def client_frame_seeds():
    t = "client_frame"
    two = client(1, sid(1, 10, 2), b"hello") + client(7, sid(7, 200, 1, True), b"")
    write(t, "two-frames-and-partial", b"\x00\x00\x00" + two + client(3, 0, b"abcdef")[:9])
    write(t, "chunked", b"\xfc\x37\x00" + two * 4)
    write(t, "too-large-for-max-4", b"\x02\x04\x00" + client(1, 0, b"hello"))
    write(t, "max-from-u16", b"\x01\x05\x00" + client(1, 0, b"hello") + client(2, 0, b"toolong"))
    write(t, "header-only-max-len", b"\x03\x00\x00" + b"\xff\xff\x01\x00" + struct.pack("<I", sid(1, 10, 0)))
    write(t, "zero-length-frames", b"\x00\x00\x00" + client(0, 0) * 3)
    write(t, "empty-stream", b"\x00\x00\x00")


def backend_frame_seeds():
    t = "backend_frame"
    allops = (
        backend(1, 77, b"reply")
        + backend(2, 5, connect_body(1, V4MAPPED, 4567))
        + backend(2, 6, connect_body(2, V6, 80))
        + backend(3, 5, b"\x05")
        + backend(4, 5, b"bye")
        + backend(5, 0, struct.pack("<H", 3) + struct.pack("<qqq", 1, 2, 3) + b"hi")
        + backend(6, 0, b"all")
        + backend(7, 9)
        + backend(8, 9)
    )
    write(t, "every-opcode", b"\x00\x00\x00" + allops)
    write(t, "trace-trans", b"\x01\x00\x00" + backend(1, 3, bytes(range(24)) + b"xy"))
    write(t, "trace-too-short", b"\x01\x00\x00" + backend(1, 3, b"short"))
    write(t, "too-short-length", b"\x00\x00\x00" + struct.pack("<i", 8) + bytes(30))
    write(t, "negative-length", b"\x00\x00\x00" + struct.pack("<i", -1) + bytes(30))
    write(t, "too-large-for-small-max", b"\x04\x10\x00" + backend(1, 1, b"x" * 40))
    write(t, "unknown-opcode", b"\x00\x00\x00" + backend(99, 1, b"x"))
    write(t, "multicast-count-beyond", b"\x00\x00\x00" + backend(5, 0, struct.pack("<H", 9) + bytes(8)))
    write(t, "bad-connect-and-disconnect", b"\x00\x00\x00" + backend(2, 1, b"short") + backend(3, 1, b"\x01\x02"))
    write(t, "partial-frame", b"\x00\x00\x00" + backend(1, 77, b"reply")[:25])
    seed_frame = bytearray(backend(1, 999, b"seed-reply", msg_type=33, server_id=0))
    seed_frame[20] = 0xEE
    write(t, "seed-frame-any-opcode", b"\x00\x00\x00" + bytes(seed_frame))
    grpc = (
        game_packet(7, 3, b"abc", [("trace_id", "ab" * 16)])
        + game_packet(1, 2, b"x", targets=[5, 6])
        + game_packet(9, metadata=[("packet_type", "server_disconnect"), ("reason", "kicked")])
        + game_packet(9, metadata=[("packet_type", "pong")])
        + game_packet(-1, -5, b"neg", targets=[-1, 2**63 - 1])
    )
    write(t, "grpc-packets", b"\x00\x00\x00" + grpc)
    write(t, "grpc-undecodable", b"\x00\x00\x00" + b"\x00\x00\x00\x00\x02\xff\xff")
    write(t, "grpc-compressed", b"\x00\x00\x00" + b"\x01\x00\x00\x00\x01\x08")
    write(t, "grpc-too-large", b"\x06\x00\x00" + b"\x00\x7f\xff\xff\xff")


def front_door_seeds():
    t = "front_door"
    write(t, "upgrade", b"\x03" + UPGRADE)
    write(t, "upgrade-origin-refused", b"\x01" + UPGRADE.replace(b"game.example", b"evil.example"))
    write(t, "upgrade-chunked", b"\xf2" + UPGRADE + ws(2, client(1, sid(1, 10, 0), b"ws")))
    write(t, "plain-get", b"\x00GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    write(t, "post-upgrade", b"\x00" + UPGRADE.replace(b"GET", b"POST", 1))
    write(t, "version-8", b"\x00" + UPGRADE.replace(b"Version: 13", b"Version: 8"))
    write(t, "no-key", b"\x00" + UPGRADE.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""))
    write(t, "malformed-head", b"\x00GET /\x01 HTTP/1.1\r\n\r\n")
    write(t, "head-too-large", b"\x00GET / HTTP/1.1\r\nX: " + b"a" * 8200)
    write(t, "proxy-v1-tcp4", b"\x00PROXY TCP4 10.1.2.3 10.0.0.1 4567 8080\r\nrest")
    write(t, "proxy-v1-tcp6", b"\x00PROXY TCP6 2001:db8::1 ::1 4567 8080\r\n")
    write(t, "proxy-v1-unknown", b"\x00PROXY UNKNOWN\r\n")
    write(t, "proxy-v1-bad", b"\x00PROXY TCP4 nonsense\r\n")
    v2 = PROXY_V2_SIG + bytes([0x21, 0x11, 0, 12, 192, 168, 1, 9, 10, 0, 0, 1, 0x1F, 0x90, 0x00, 0x50])
    write(t, "proxy-v2-ipv4", b"\x00" + v2 + b"game")
    v26 = PROXY_V2_SIG + bytes([0x21, 0x21, 0, 36]) + V6 + V6 + bytes([0x1F, 0x90, 0x00, 0x50])
    write(t, "proxy-v2-ipv6", b"\x00" + v26)
    write(t, "proxy-v2-local", b"\x00" + PROXY_V2_SIG + bytes([0x20, 0x00, 0, 0]))
    write(t, "game-frame", b"\x00" + client(1, sid(1, 10, 2), b"hello"))
    frames = ws(2, b"abc") + ws(9, b"hi") + ws(10, b"") + ws(2, b"de", fin=False) + ws(0, b"f")
    write(t, "ws-binary-ping-fragments", b"\x00" + frames)
    write(t, "ws-binary-chunked", b"\xe8" + frames + ws(8, b"\x03\xe8bye"))
    write(t, "ws-text", b"\x00" + ws(1, b"text"))
    write(t, "ws-unmasked", b"\x00" + ws(2, b"unmasked", masked=False))
    write(t, "ws-too-large", b"\x04" + ws(2, bytes(300)))
    write(t, "ws-16bit-length", b"\x08" + ws(2, bytes(1000)))
    write(t, "ws-close", b"\x00" + ws(8, b"\x03\xe8"))


RULES_OBJECT = """{
    "10": {"server_type": 10, "service_name": "account", "strategy": "round_robin", "endpoints": ["127.0.0.1:19711"]},
    "15": {"server_type": 15, "service_name": "version", "strategy": "round_robin", "endpoints": ["127.0.0.1:19712"]},
    "200": {"server_type": 200, "service_name": "game", "strategy": "consistent_hash", "endpoints": []}
}"""
RULES_ARRAY = """[{"server_type": 10, "strategy": "round_robin", "endpoints": ["127.0.0.1:1", "[::1]:2"]},
 {"server_type": 10, "world_id": 7, "strategy": "consistent_hash", "hash_key": "session", "endpoints": ["127.0.0.1:2"]},
 {"server_type": 11, "strategy": "round_robin", "endpoints": ["127.0.0.1:3"], "backend_protocol": "grpc",
  "on_backend_loss": "rebind", "notify_sessions": false, "trace_propagation": true, "binding": "connection"},
 {"server_type": 12, "strategy": "round_robin", "endpoints": ["127.0.0.1:4"], "backend_protocol": "seed_tcp"},
 {"server_type": 30, "strategy": "realm_based"}]"""


def route_json_seeds():
    t = "route_json"
    write(t, "object-form", RULES_OBJECT)
    write(t, "array-form-every-key", RULES_ARRAY)
    write(t, "object-key-supplies-type", '{"12": {"strategy": "round_robin", "endpoints": []}}')
    write(t, "with-realms", RULES_ARRAY + "\x007=127.0.0.1:7007\n8= 127.0.0.1:7008 \n")
    write(t, "bad-realms", "[]\x00x=127.0.0.1:1\n7=nope\n40000=127.0.0.1:1\n7\n")
    write(t, "bundle", '{"rules": [{"server_type": 30, "strategy": "realm_based"}], "realm_mapping": {"7": "127.0.0.1:7007"}}')
    write(t, "bundle-unknown-key", '{"rules": [], "extra": 1, "realm_mapping": []}')
    write(t, "duplicate-rule", '[{"server_type": 10, "strategy": "round_robin"}, {"server_type": 10, "strategy": "round_robin"}]')
    write(t, "type-mismatch", '{"10": {"server_type": 11, "strategy": "round_robin"}, "x": {}, "300": {}}')
    write(t, "bad-values", '[{"server_type": -1, "world_id": 40000, "strategy": "random", "endpoints": ["127.0.0.1:0", "nohost"], "hash_key": "x", "on_backend_loss": "x", "backend_protocol": "x", "binding": "x"}]')
    write(t, "not-json", "{not json")
    write(t, "scalar", "42")


def config_seeds(repo):
    t = "config"
    with open(os.path.join(repo, "config", "gateway.toml"), "rb") as f:
        write(t, "default-gateway-toml", f.read())
    write(t, "empty", "")
    write(t, "every-problem", (
        '[server]\nlisten = "nope"\nio_driver = "kqueue"\n\n[limits]\nidle_timeout = "forever"\n\n'
        '[[routes]]\nserver_type = 10\nservice_name = "a"\nstrategy = "random"\nendpoints = ["127.0.0.1:1"]\n\n'
        '[[routes]]\nserver_type = 10\nservice_name = "b"\nstrategy = "round_robin"\nendpoints = ["127.0.0.1:99999"]\n'))
    write(t, "unknown-key", "[limits]\nmax_conections = 5\n")
    write(t, "everything-set", (
        '[server]\nlisten = "[::]:8080"\nadmin_listen = "127.0.0.1:9090"\nnode_id = 7\nworkers = 2\ncpus = [0, 1]\n'
        'io_driver = "epoll"\ndrain_timeout = "1m"\nproxy_protocol = true\nproxy_trusted = ["10.0.0.0/8", "::1/128", "192.0.2.1"]\n'
        '[limits]\nmax_connections = 10\nmax_connections_per_ip = 2\nconnection_rate_per_ip = 5\nmax_message_size = 1024\n'
        'messages_per_second = 10\nmessages_burst = 0\non_rate_limit = "close"\nhandshake_timeout = "250ms"\n'
        'idle_timeout = "1h"\nmax_queued_bytes_per_session = 65544\n'
        '[backend]\nconnections_per_endpoint = 4\ndial_timeout = "1s"\ncircuit_failure_threshold = 2\n'
        'circuit_open_duration = "3s"\nkeepalive_interval = "0s"\nkeepalive_timeout = "5s"\nmax_frame_size = 65544\n'
        'reconnect_backoff_min = "10ms"\nreconnect_backoff_max = "1s"\nmax_queued_bytes = 65536\nseed_pool_max = 1\n'
        'seed_idle_timeout = "5m"\n'
        '[redis]\nurl = "redis://127.0.0.1/0"\nkey_prefix = "gw:"\nrefresh_interval = "10s"\n'
        '[log]\nlevel = "debug"\nformat = "text"\naccess_log = false\naccess_log_path = "/tmp/x.log"\n'
        '[websocket]\nenabled = false\nallowed_origins = ["https://a"]\nsubprotocols = ["game.v1"]\nmax_message_size = 16\n'
        + RULES_TOML))
    write(t, "duplicate-rules", (
        '[[routes]]\nserver_type = 10\nservice_name = "a"\nstrategy = "round_robin"\nendpoints = []\n'
        '[[routes]]\nserver_type = 10\nservice_name = "a"\nstrategy = "round_robin"\nendpoints = []\n'))
    write(t, "out-of-range", '[server]\nworkers = 99999\nnode_id = -1\ncpus = [0]\n[limits]\nmax_message_size = 70000\n'
          '[backend]\nreconnect_backoff_min = "10s"\nreconnect_backoff_max = "1s"\nkeepalive_timeout = "0s"\n')
    write(t, "syntax-error", '[server\nlisten = "0.0.0.0:1"\n')
    write(t, "wrong-types", '[server]\nworkers = "two"\n[[routes]]\nserver_type = "x"\n')


RULES_TOML = (
    '[[routes]]\nserver_type = 10\nworld_id = 3\nservice_name = "s"\nstrategy = "consistent_hash"\nhash_key = "client_ip"\n'
    'endpoints = ["127.0.0.1:7001", "[::1]:7002"]\nnotify_sessions = false\ntrace_propagation = true\n'
    'on_backend_loss = "rebind"\nbackend_protocol = "grpc"\nbinding = "connection"\n'
    '[[routes]]\nserver_type = 12\nservice_name = "seed"\nstrategy = "round_robin"\nendpoints = ["127.0.0.1:7003"]\n'
    'backend_protocol = "seed_tcp"\n'
)


# --- shard programs ------------------------------------------------------------
# Event bytes, as ShardDriver::event reads them (first byte % 32).

TYPES = [10, 11, 12, 13, 14, 15, 16, 17, 18, 99, 10, 13]
WORLDS = [0, 1, 7, 3]
GATE_TYPES = [10, 11, 15, 17, 99]


class Shard:
    """Builds an event program. `accept` returns a client handle; the other
    client events take one and emit its index among the live clients (as
    the driver picks them). A client that the event itself closes (an error,
    a refused header) is marked with `closes=True`; `eof` closes it too.
    Streams are named by their index among the streams not yet closed (Up or
    Dialing, in dial order), which the program tracks by hand."""

    def __init__(self):
        self.b = bytearray()
        self.live = []
        self.n = 0

    def raw(self, *bs):
        self.b += bytes(bs)
        return self

    def pick(self, c):
        return self.live.index(c)

    def close(self, c, closes):
        if closes:
            self.live.remove(c)

    def accept(self, peer=0):
        self.raw(0, peer)
        self.n += 1
        self.live.append(self.n)
        return self.n

    def frames(self, c, frames, ws_cut=None, split=None, closes=False):
        """frames (at most 4): [(type, world, inst, msg_id, len_byte)]; the
        payload is len_byte bytes (< 200; above, (b - 200) * 64) of len_byte."""
        assert 1 <= len(frames) <= 4
        self.raw(3, self.pick(c), len(frames) - 1)
        for st, world, inst, msg_id, lenb in frames:
            self.raw(TYPES.index(st), WORLDS.index(world), 0, inst)
            self.b += struct.pack("<H", msg_id)
            self.raw(lenb)
        if ws_cut is not None:
            self.raw(ws_cut)
        self.split(split)
        self.close(c, closes)
        return self

    def split(self, cut):
        return self.raw(0) if cut is None else self.raw(1, cut)

    def client_raw(self, c, data, split=None, closes=False):
        self.raw(8, len(data))
        self.b += data
        self.raw(self.pick(c))
        self.split(split)
        self.close(c, closes)
        return self

    def http(self, c, variant=0, split=None, closes=False):
        """variant 0, 1, 2: upgrades (2 with origin and subprotocols); 3-7 refused."""
        self.raw(9, variant, self.pick(c)).split(split)
        self.close(c, closes)
        return self

    def proxy(self, c, variant=0, port=4567, extra=(), split=None, closes=False):
        self.raw(10)
        self.b += struct.pack("<H", port)
        self.raw(variant, *extra, self.pick(c))
        self.split(split)
        self.close(c, closes)
        return self

    def ws_control(self, c, variant, payload=b"", closes=False):
        self.raw(11, len(payload))
        self.b += payload
        self.raw(variant, self.pick(c)).split(None)
        self.close(c, closes)
        return self

    def eof(self, c):
        self.raw(12, self.pick(c))
        self.live.remove(c)
        return self

    def connect(self, stream):
        return self.raw(14, stream)

    def dial_failed(self, stream):
        return self.raw(16, stream, 0)

    def backend(self, stream, body, split=None):
        self.raw(17, stream)
        self.b += body
        return self.split(split)

    def lost(self, stream):
        return self.raw(23, stream, 0)

    def tick(self, step, sweep=True, evict=True):
        """step: index into [0, 10ms, 100ms, 500ms, 1s, 1s, 2.5s, 6s, 31s, 5min]."""
        return self.raw(24, step, (0 if sweep else 1) | (0 if evict else 2))

    def routes(self, k):
        return self.raw(26, k)

    def config(self, k):
        return self.raw(27, k)

    def begin_drain(self):
        return self.raw(28, 0)

    def close_all(self, reason=0):
        return self.raw(28, 2, reason)

    def hang_stream(self, stream):
        return self.raw(29, 0, stream)

    def hang_client(self, c):
        return self.raw(29, 1, self.pick(c))

    def client_write_failed(self, c):
        return self.raw(30, 1, self.pick(c))

    def backend_write_failed(self, stream):
        return self.raw(30, 0, stream)

    def close_backends(self):
        return self.raw(31, 1)


def gate(*frames):
    """frames: byte strings from the g_* helpers; returns the gate body."""
    return bytes([len(frames) - 1]) + b"".join(frames)


def g_head(kind, msg=9, st=10):
    return struct.pack("<H", msg) + bytes([GATE_TYPES.index(st), kind])


def g_trans(id_pick, lenb=5, fill=0x61):
    return g_head(0) + bytes([id_pick, lenb, fill])


def g_kick(id_pick, lenb=3):
    return g_head(4) + bytes([id_pick, lenb, 0x62])


def g_multicast(id_picks, lenb=4):
    return g_head(5) + bytes([len(id_picks), *id_picks, lenb, 0x63])


def g_broadcast(lenb=3):
    return g_head(6) + bytes([lenb, 0x64])


def g_ping():
    return g_head(7) + bytes([1])


def g_corrupt(id_pick, variant):
    """variant 0: length below 9; 1: length over the max; 2: unknown opcode;
    3: a TRANS turned MULTICAST with a bad count."""
    extra = bytes([3]) if variant == 0 else bytes([200]) if variant == 2 else b""
    return g_head(10) + bytes([id_pick, 2, 0x65, variant]) + extra


def grpc(*packets):
    return bytes([len(packets) - 1]) + b"".join(packets)


def p_data(id_pick, lenb=4, kind=0, targets=()):
    # kind: 0 none, 1 server_connect, 2 server_disconnect, 3 pong, 4 data, 5 connect, 6 disconnect
    return bytes([0, id_pick]) + struct.pack("<H", 105) + bytes([lenb, 0x70, kind, len(targets), *targets])


def seed(*frames):
    return bytes([len(frames) - 1]) + b"".join(frames)


def s_reply(id_pick=0, lenb=5, variant=3):
    """variant 0: another opcode; 1: length below 9; 2: trailing garbage; 3+: as is."""
    extra = {0: bytes([0xEE]), 1: bytes([4]), 2: bytes([3, 1, 2, 3])}.get(variant, b"")
    return bytes([id_pick]) + struct.pack("<H", 33) + bytes([lenb, 0x71, variant]) + extra


# Session id picks index [sessions in accept order..., then 8 ids nobody has].
def shard_seeds():
    t = "shard"
    F = (10, 0, 0, 1, 2)  # a small frame for server type 10

    # Gate: bind, reply, multicast, broadcast, kick, close.
    p = Shard()
    a, b = p.accept(0), p.accept(3)
    p.frames(a, [(10, 0, 0, 1, 5)]).connect(0)
    p.frames(b, [(10, 0, 0, 2, 5), (15, 0, 0, 3, 1)])
    p.backend(0, gate(g_trans(0), g_trans(1), g_multicast([0, 1, 5]), g_broadcast()))
    p.backend(0, gate(g_ping(), g_trans(6), g_kick(0)))
    p.eof(a).eof(b)
    write(t, "gate-bind-reply-fanout-kick", p.b)

    # Two endpoints (round robin), world rule, realm rule, unrouted types.
    p = Shard()
    a, b = p.accept(0), p.accept(1)
    p.frames(a, [(10, 0, 0, 1, 3), (10, 7, 0, 1, 3), (17, 1, 0, 1, 3), (18, 0, 0, 1, 3)])
    p.frames(a, [(99, 0, 0, 1, 3), (17, 7, 0, 1, 3), (17, 3, 0, 1, 3)])
    p.frames(b, [(10, 0, 0, 1, 3), (11, 0, 0, 1, 3)])
    p.connect(0).connect(0).connect(0)
    p.backend(0, gate(g_trans(0), g_trans(1)), split=30)
    p.backend(1, gate(g_trans(0), g_trans(1)))
    write(t, "gate-routing-variety", p.b)

    # gRPC: connect, data, fan-out lists, server_disconnect, malformed.
    p = Shard()
    a, b = p.accept(0), p.accept(2)
    p.frames(a, [(13, 0, 0, 1, 4)]).frames(b, [(13, 0, 0, 1, 4), (14, 0, 5, 1, 4)])
    p.connect(0).connect(0)
    p.backend(0, grpc(p_data(0), p_data(1, targets=[0, 1, 9]), p_data(0, kind=3)))
    p.backend(0, grpc(p_data(1, kind=2), bytes([7, 3, 1, 2, 3])))
    p.eof(b)
    write(t, "grpc-lifecycle-fanout", p.b)

    # seed_tcp: one connection per session, reuse after close, pool bound.
    p = Shard()
    cs = [p.accept(i) for i in range(4)]
    for c in cs:
        p.frames(c, [(12, 0, 0, 1, 3)])
    p.connect(0).connect(0).connect(0)
    p.backend(0, seed(s_reply(), s_reply(variant=0), s_reply(variant=2)))
    p.eof(cs[0])
    d = p.accept(0)
    p.frames(d, [(12, 0, 0, 1, 3), (16, 0, 0, 1, 3)])
    p.backend(1, seed(s_reply(variant=1)))
    write(t, "seed-tcp-pool", p.b)

    # WebSocket: upgrade, frames in binary messages, control frames, reply.
    p = Shard()
    a = p.accept(0)
    p.http(a, 0, split=20)
    p.frames(a, [(10, 0, 0, 1, 4), (11, 0, 0, 2, 4)], ws_cut=5)
    p.connect(0).backend(0, gate(g_trans(0), g_trans(0)))
    p.ws_control(a, 0, b"hi").ws_control(a, 5, b"ab").ws_control(a, 2, closes=True)
    write(t, "websocket-session", p.b)

    # HTTP refusals and WebSocket violations.
    p = Shard()
    for v in range(3, 8):
        c = p.accept(v % 6)
        p.http(c, v, closes=True)
    for variant in (3, 4, 6):
        c = p.accept(0)
        p.http(c, 0).ws_control(c, variant, closes=True)
    write(t, "http-refusals-ws-violations", p.b)

    # PROXY headers: trusted v1/v2, untrusted, malformed, disabled by config.
    p = Shard()
    a = p.accept(0)
    p.proxy(a, 0, split=10).frames(a, [F])
    b = p.accept(0)
    p.proxy(b, 5, extra=(9,)).frames(b, [(15, 0, 0, 1, 2)])
    c = p.accept(3)
    p.proxy(c, 0, closes=True)
    c = p.accept(0)
    p.proxy(c, 4, closes=True)
    c = p.accept(4)
    p.proxy(c, 2, extra=(1, 0)).http(c, 0)
    c = p.accept(0)
    p.proxy(c, 6).proxy(c, 0, closes=True)
    p.config(2)
    c = p.accept(0)
    p.proxy(c, 3, closes=True)
    write(t, "proxy-headers", p.b)

    # Backend loss: close policy and rebind policy; redial after backoff.
    p = Shard()
    a, b = p.accept(0), p.accept(1)
    p.frames(a, [F]).frames(b, [(11, 0, 0, 1, 2)])
    p.connect(0).connect(0)
    p.lost(0)
    p.frames(b, [(11, 0, 0, 1, 2)]).tick(7).frames(b, [(11, 0, 0, 1, 2)]).connect(0)
    p.backend(0, gate(g_trans(0), g_trans(1)))
    p.frames(b, [(13, 0, 0, 1, 2)]).dial_failed(0)
    write(t, "backend-loss-and-rebind", p.b)

    # Route changes: unbind (reason 8), retire, move, empty table, back.
    p = Shard()
    a, b = p.accept(0), p.accept(1)
    p.frames(a, [(10, 0, 0, 1, 2), (11, 0, 0, 1, 2), (13, 0, 0, 1, 2), (12, 0, 0, 1, 2)])
    p.frames(b, [(16, 0, 0, 1, 2), (15, 0, 0, 1, 2)])
    p.connect(0).connect(0).connect(0).connect(0)
    p.routes(1).tick(0).frames(a, [(10, 0, 0, 1, 2), (13, 0, 0, 1, 2)])
    p.connect(0).backend(3, gate(g_trans(0)))
    p.routes(2).routes(3).frames(a, [F]).routes(4).frames(b, [F])
    p.tick(6)
    write(t, "route-changes", p.b)

    # Drain: refuse accepts, close_all, frames after close, close_backends.
    p = Shard()
    a, b = p.accept(0), p.accept(1)
    p.frames(a, [F]).connect(0)
    p.begin_drain().raw(0, 2).close_all(0).frames(a, [F])
    p.eof(a).eof(b).close_backends()
    write(t, "drain", p.b)

    # Keep-alive, idle and handshake timeouts, config reloads.
    p = Shard().config(1)
    a, b = p.accept(0), p.accept(1)
    p.frames(a, [F]).connect(0)
    p.tick(4).tick(4).tick(4).tick(4)
    p.frames(a, [F] * 4).frames(a, [F] * 4, closes=True)
    p.config(2).tick(6).tick(8).config(0).tick(9)
    write(t, "timeouts-keepalive-reload", p.b)

    # Stalled writers: a backend queue that fills, a client that does not read.
    p = Shard()
    a, b = p.accept(0), p.accept(1)
    p.frames(a, [F]).connect(0).hang_stream(0)
    for _ in range(24):
        p.frames(a, [(10, 0, 0, 1, 250)] * 4)
    p.frames(b, [F])
    p.backend(0, gate(g_trans(0), g_trans(1)))
    p.hang_client(a)
    for _ in range(8):
        p.backend(0, gate(g_multicast([0, 0, 0, 0, 0], lenb=250)))
    p.backend_write_failed(0).client_write_failed(b)
    write(t, "stalled-writers", p.b)

    # Corrupt backend frames: unexpected opcodes, bad lengths, unknown opcode.
    p = Shard()
    a = p.accept(0)
    p.frames(a, [F]).connect(0)
    p.backend(0, gate(g_head(9) + bytes([0, 1]), g_head(9) + bytes([0, 0]), g_corrupt(0, 3)))
    p.frames(a, [F]).tick(7).frames(a, [F]).connect(0).backend(0, gate(g_corrupt(0, 2)))
    b = p.accept(0)
    p.frames(b, [(11, 0, 0, 1, 2)]).connect(0).backend(0, gate(g_corrupt(1, 0)))
    write(t, "corrupt-backend-frames", p.b)

    # Client protocol errors and rate limits.
    p = Shard()
    a = p.accept(0)
    p.client_raw(a, b"\xff\xff\x00\x00\x00\x0a\x00\x00", closes=True)
    p.config(1)
    a = p.accept(0)
    p.frames(a, [F] * 4).frames(a, [F] * 4, closes=True)
    p.config(0)
    for _ in range(14):
        p.accept(0)
    write(t, "client-errors-and-limits", p.b)


def main():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    client_frame_seeds()
    backend_frame_seeds()
    front_door_seeds()
    route_json_seeds()
    config_seeds(repo)
    shard_seeds()


if __name__ == "__main__":
    main()
