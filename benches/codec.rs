//! Micro-benchmarks of the hot pure pieces, each beside a naive baseline:
//! client frame decode, backend frame encode, route pick per strategy, the
//! session table, the token bucket.
//! Reports only; never decides whether CI passes.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use game_gateway::protocol::backend as bproto;
use game_gateway::protocol::{client as cproto, ServerId};
use game_gateway::routing::{Endpoint, PickInput, RawRule, RouteTable};

fn frames(n: usize, payload: usize) -> BytesMut {
    let mut b = BytesMut::new();
    for i in 0..n {
        cproto::encode(&mut b, i as u16, ServerId::new(false, 1, 10, 2), &vec![7u8; payload]);
    }
    b
}

/// The naive way: parse each frame into an owned struct with a fresh Vec.
fn naive_decode(mut buf: &[u8]) -> usize {
    let mut n = 0;
    while buf.len() >= 8 {
        let len = u16::from_le_bytes([buf[0], buf[1]]) as usize;
        if buf.len() < 8 + len {
            break;
        }
        let payload: Vec<u8> = buf[8..8 + len].to_vec();
        n += payload.len();
        buf = &buf[8 + len..];
    }
    n
}

fn decode(c: &mut Criterion) {
    let input = frames(1000, 64);
    let mut g = c.benchmark_group("client_decode_1000x64B");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("check (in place, borrowed payload)", |b| {
        b.iter(|| {
            let mut buf: &[u8] = &input;
            let mut n = 0;
            while let Ok(Some(h)) = cproto::check(buf, cproto::MAX_PAYLOAD) {
                n += black_box(&buf[cproto::HEADER_LEN..h.frame_len()]).len();
                buf = &buf[h.frame_len()..];
            }
            black_box(n)
        })
    });
    g.bench_function("naive (copy payload)", |b| b.iter(|| black_box(naive_decode(&input))));
    g.finish();
}

fn encode(c: &mut Criterion) {
    let payload = [7u8; 64];
    let mut g = c.benchmark_group("backend_encode_trans_64B");
    g.throughput(Throughput::Elements(1));
    let mut out = BytesMut::with_capacity(1 << 20);
    g.bench_function("encode_trans into shared buffer", |b| {
        b.iter(|| {
            if out.len() > (1 << 19) {
                out.clear();
            }
            bproto::encode_trans(&mut out, 1, 0x10a02, 42, None, black_box(&payload));
        })
    });
    g.bench_function("naive (Vec per frame)", |b| {
        b.iter(|| {
            let mut v = Vec::new();
            v.extend_from_slice(&((9 + payload.len()) as i32).to_le_bytes());
            v.extend_from_slice(&1i32.to_le_bytes());
            v.extend_from_slice(&0x10a02u32.to_le_bytes());
            v.extend_from_slice(&42i64.to_le_bytes());
            v.push(1);
            v.extend_from_slice(&42i64.to_le_bytes());
            v.extend_from_slice(black_box(&payload));
            black_box(v)
        })
    });
    g.finish();
}

fn pick(c: &mut Criterion) {
    let eps: Vec<String> = (0..16).map(|i| format!("127.0.0.1:{}", 20000 + i)).collect();
    let rule = |s: &str| RawRule::new(10, 0, s, &eps).validate().unwrap();
    let table = RouteTable::new(1, vec![], vec![(7, Endpoint::parse("127.0.0.1:30000").unwrap())]);
    let input = PickInput { session_id: 99, world_id: 3, inst_id: 4, client_ip: "10.0.0.1".parse().unwrap() };
    let all = |_: &Endpoint| true;
    let mut g = c.benchmark_group("route_pick_16_endpoints");
    for s in ["round_robin", "consistent_hash", "realm_based"] {
        let r = rule(s);
        let mut rr = 0;
        g.bench_function(s, |b| b.iter(|| black_box(table.pick(&r, black_box(&input), &mut rr, &all).unwrap().addr)));
    }
    // Baseline: the original gateway's crc32-mod-N style (here xxh3 mod N):
    // cheaper, but moves almost every key when N changes.
    let r = rule("consistent_hash");
    g.bench_function("hash mod N (baseline)", |b| {
        b.iter(|| {
            let k = xxhash_rust::xxh3::xxh3_64(&black_box(4u64).to_le_bytes());
            black_box(r.endpoints[(k % r.endpoints.len() as u64) as usize].addr)
        })
    });
    g.finish();
}

/// Inserts, looks up and removes every key.
fn churn_map<S: std::hash::BuildHasher>(mut m: std::collections::HashMap<i64, u64, S>, keys: &[i64]) -> u64 {
    for k in keys {
        m.insert(*k, 1);
    }
    let n = keys.iter().map(|k| m.get(k).copied().unwrap_or(0)).sum();
    for k in keys {
        m.remove(k);
    }
    black_box(n)
}

/// The per-worker session table (ahash map keyed by session id) against a
/// std `HashMap` with SipHash.
fn session_table(c: &mut Criterion) {
    use game_gateway::session::SessionIdGen;
    let mut ids = SessionIdGen::new(1, 0);
    let keys: Vec<i64> = (0..10_000).map(|_| ids.next_id()).collect();
    let mut g = c.benchmark_group("session_table_10k");
    g.throughput(Throughput::Elements(keys.len() as u64));
    g.bench_function("ahash insert+lookup+remove", |b| {
        b.iter(|| {
            churn_map(std::collections::HashMap::with_capacity_and_hasher(keys.len(), ahash::RandomState::new()), &keys)
        })
    });
    g.bench_function("std SipHash (baseline)", |b| {
        b.iter(|| churn_map(std::collections::HashMap::with_capacity(keys.len()), &keys))
    });
    g.finish();
}

/// Token bucket check with the caller's `now` against a naive bucket that
/// reads the clock itself on every check.
fn token_bucket(c: &mut Criterion) {
    use game_gateway::limits::TokenBucket;
    use std::time::Instant;
    let mut g = c.benchmark_group("token_bucket_check");
    g.throughput(Throughput::Elements(1));
    let now = Instant::now();
    let mut b1 = TokenBucket::full(1_000_000, now);
    g.bench_function("TokenBucket::try_take (now passed in)", |b| {
        b.iter(|| black_box(b1.try_take(1_000_000, 1_000_000, black_box(now))))
    });
    struct Naive {
        tokens: f64,
        last: Instant,
    }
    let mut n = Naive { tokens: 1e6, last: Instant::now() };
    g.bench_function("naive (clock read per check)", |b| {
        b.iter(|| {
            let t = Instant::now();
            n.tokens = (n.tokens + t.duration_since(n.last).as_secs_f64() * 1e6).min(1e6);
            n.last = t;
            let ok = n.tokens >= 1.0;
            if ok {
                n.tokens -= 1.0;
            }
            black_box(ok)
        })
    });
    g.finish();
}

criterion_group!(benches, decode, encode, pick, session_table, token_bucket);
criterion_main!(benches);
