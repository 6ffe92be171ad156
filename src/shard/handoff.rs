//! A shard's state as a live upgrade carries it from the old process to the
//! new one (docs/OPERATIONS.md "Live upgrade"). No I/O: the driver stops the
//! sockets, adds the bytes its tasks hold, and passes the descriptors.
//!
//! Plain data only: instants become ages or time left (each process has its
//! own clock origin), connection slots become indices into the snapshot's
//! own list, and stream generations are handed out again by the new shard.
//! Encoded with postcard; [`HANDOFF_VERSION`] changes whenever these types
//! do, and a pair of processes whose versions differ refuses before anything
//! moves.
//!
//! What is not carried, and why:
//! - TLS sessions: rustls keeps its keys and record state to itself. They
//!   stay with the old process and are closed when it retires (counted as
//!   `not_carried`); the new process sends their `DISCONNECT`.
//! - gRPC streams: HTTP/2 state (HPACK tables, stream ids, flow-control
//!   windows) lives inside the h2 crate. Sessions bound to a gRPC backend are
//!   carried, their gRPC binding is not: their next frame opens a new stream
//!   (the backend sees the session's stream end and a new one begin).

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Changes whenever a snapshot type below (or the handoff protocol) does.
pub const HANDOFF_VERSION: u32 = 1;

/// One worker's sessions and backend streams.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct ShardSnapshot {
    /// The old worker's index.
    pub worker: u32,
    pub sessions: Vec<SessionSnap>,
    pub conns: Vec<ConnSnap>,
}

/// One client session. `fd` is the index of its socket among the
/// descriptors sent with this snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionSnap {
    pub fd: u32,
    pub id: i64,
    pub peer: SocketAddr,
    pub websocket_transport: bool,
    pub age_us: u64,
    pub idle_us: u64,
    pub close_reason: Option<u8>,
    pub handshaken: bool,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub first_server_type: Option<u8>,
    pub first_world: u16,
    pub trace_id: [u8; 16],
    pub bindings: Vec<BindingSnap>,
    /// Bytes for the client not yet written (a partial write's rest first).
    pub out: Vec<u8>,
    /// Client frames in `out`, for frames-per-write accounting.
    pub out_frames: u64,
    /// Bytes read from the client and not yet forwarded (a partial frame,
    /// or frames waiting for backend queue room).
    pub input: Vec<u8>,
    pub paused: bool,
    pub limiter_tokens: f64,
    pub class_buckets: Vec<(u8, f64)>,
    pub ip_counted: bool,
    /// 0 sniffing, 1 game, 2 WebSocket.
    pub mode: u8,
    pub proxy_done: bool,
    pub ws: Option<crate::protocol::ws::WsSnapshot>,
    pub sticky: Option<(u8, u16)>,
    pub fin_decided: bool,
    pub admitted_front: bool,
    pub last_forward_ago_us: Option<u64>,
    pub last_deliver_ago_us: Option<u64>,
    pub eof_ago_us: Option<u64>,
    pub hold_since_ago_us: Option<u64>,
    pub hold: Vec<u8>,
    pub hold_frames: u64,
    pub close_in_us: Option<u64>,
    pub authenticated: bool,
    pub user: Option<Vec<u8>>,
    pub tags: Vec<Vec<u8>>,
    pub last_backend: Option<String>,
    pub traced: Option<([u8; 8], u64)>,
}

/// A session's binding; `conn` indexes [`ShardSnapshot::conns`].
#[derive(Debug, Serialize, Deserialize)]
pub struct BindingSnap {
    pub server_type: u8,
    pub world: u16,
    pub conn: u32,
    pub notify: bool,
    pub trace: bool,
    /// 0 close, 1 rebind, 2 hold.
    pub on_loss: u8,
    pub held: bool,
}

/// The state of a backend stream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum ConnStateSnap {
    /// Not connected (never dialed, or a dial was in flight: the new
    /// process dials again; the backend saw no frame on the old attempt).
    Idle,
    /// Connected: its socket is among the descriptors.
    Up,
    /// Lost; may be redialed after this long.
    Backoff { left_us: u64 },
    /// No route lists it: written out and closed within this long.
    Retiring { left_us: u64 },
}

/// One backend stream with its session map. `fd` is set when `Up`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ConnSnap {
    pub fd: Option<u32>,
    pub addr: SocketAddr,
    pub name: String,
    pub hash: u64,
    /// 0 gate, 1 seed_tcp (gRPC streams are not carried).
    pub protocol: u8,
    pub pool_slot: u64,
    pub state: ConnStateSnap,
    /// Frames for the backend not yet written (a partial write's rest first).
    pub out: Vec<u8>,
    pub out_frames: u64,
    /// Bytes read from the backend and not yet handled (a partial frame).
    pub input: Vec<u8>,
    pub sessions: Vec<i64>,
    pub held: Vec<i64>,
    pub failures: u32,
    pub idle_ago_us: Option<u64>,
    pub last_rx_ago_us: u64,
    pub ping_ago_us: Option<u64>,
    pub retire_read_in_us: Option<u64>,
    pub released: Vec<(i64, u64)>,
    /// Sessions bound here that were not carried (TLS): the new process
    /// sends their `DISCONNECT` (reason 6, as a drain would).
    pub disconnect: Vec<i64>,
}

/// What an import tells the driver to start.
pub(crate) struct Imported {
    /// Sessions: their key, socket index and the bytes to feed first.
    pub(crate) sessions: Vec<(super::SessionKey, u32, Vec<u8>, bool)>,
    /// Backend streams that are up: slot, generation, socket index, and the
    /// bytes read but not handled.
    pub(crate) conns: Vec<(super::ConnId, u64, u32, Vec<u8>)>,
}

/// Microseconds since `t`.
pub(super) fn ago(now: Instant, t: Instant) -> u64 {
    now.saturating_duration_since(t).as_micros().min(u64::MAX as u128) as u64
}

/// Microseconds until `t`.
pub(super) fn until(now: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(now).as_micros().min(u64::MAX as u128) as u64
}

/// The instant `us` microseconds before `now` (now itself if the clock
/// does not reach that far back).
pub(super) fn back(now: Instant, us: u64) -> Instant {
    now.checked_sub(Duration::from_micros(us)).unwrap_or(now)
}

/// The instant `us` microseconds after `now`.
pub(super) fn ahead(now: Instant, us: u64) -> Instant {
    now + Duration::from_micros(us)
}

/// What [`super::Shard::export`] made, with what the driver needs to find
/// each part's I/O handles.
pub(crate) struct Export {
    pub(crate) snapshot: ShardSnapshot,
    /// The carried sessions, in `snapshot.sessions` order.
    pub(crate) sessions: Vec<super::SessionKey>,
    /// The carried streams, in `snapshot.conns` order: slot and generation.
    pub(crate) conns: Vec<(super::ConnId, u64)>,
    /// Sessions that cannot be carried (TLS).
    pub(crate) not_carried: Vec<super::SessionKey>,
}

impl super::Shard {
    /// Everything a live upgrade carries of this shard, as of `now`. Read
    /// only: if the upgrade fails the shard goes on as if nothing happened.
    pub(crate) fn export(&self, now: Instant) -> Export {
        let carried = |id: super::SessionId| {
            self.sessions
                .by_id
                .get(&id)
                .and_then(|&slot| self.sessions.slots[slot as usize].as_ref())
                .is_some_and(|s| s.carriable())
        };
        let (mut conns, index) = self.backends.snapshot(carried, now);
        let mut conn_keys = vec![(super::ConnId(0), 0); conns.len()];
        for (id, (generation, i)) in &index {
            conn_keys[*i as usize] = (*id, *generation);
        }
        let conn_index =
            |id: super::ConnId, generation: u64| index.get(&id).filter(|(g, _)| *g == generation).map(|(_, i)| *i);
        let mut sessions = Vec::new();
        let mut keys = Vec::new();
        let mut not_carried = Vec::new();
        for s in self.sessions.slots.iter().flatten() {
            if s.carriable() {
                sessions.push(s.snapshot(&self.ctx, conn_index, now));
                keys.push(s.key);
            } else {
                for b in s.bindings.iter().filter(|b| b.notify) {
                    if let Some(i) = conn_index(b.conn, b.generation) {
                        conns[i as usize].disconnect.push(s.info.id);
                    }
                }
                not_carried.push(s.key);
            }
        }
        Export {
            snapshot: ShardSnapshot { worker: self.ctx.index as u32, sessions, conns },
            sessions: keys,
            conns: conn_keys,
            not_carried,
        }
    }

    /// Takes in what a live upgrade carried from one old worker. Sessions
    /// keep their ids (backends know them by it) and count against the
    /// node's admission as they did before; streams get new generations
    /// here. A session whose id this shard already serves is refused and
    /// counted as lost (ids are unique per node, so only a corrupt snapshot
    /// does that).
    pub(crate) fn import(&mut self, snap: ShardSnapshot, now: Instant) -> Imported {
        let conn_snaps: Vec<(u32, Vec<u8>)> =
            snap.conns.iter().map(|c| (c.fd.unwrap_or(u32::MAX), c.input.clone())).collect();
        let ids = self.backends.import(&mut self.ctx, snap.conns, now);
        let mut sessions = Vec::with_capacity(snap.sessions.len());
        for mut s in snap.sessions {
            if self.sessions.by_id.contains_key(&s.id) {
                tracing::error!(
                    worker = self.ctx.index,
                    session_id = s.id,
                    "live upgrade: session id already served here: not taken"
                );
                self.ctx.stats.handoff_sessions_lost += 1;
                continue;
            }
            let bindings = s
                .bindings
                .iter()
                .filter_map(|b| {
                    let (conn, generation) = *ids.get(b.conn as usize)?;
                    Some(super::session::Binding {
                        server_type: b.server_type,
                        world: b.world,
                        conn,
                        generation,
                        notify: b.notify,
                        trace: b.trace,
                        on_loss: match b.on_loss {
                            1 => crate::routing::OnBackendLoss::Rebind,
                            2 => crate::routing::OnBackendLoss::Hold,
                            _ => crate::routing::OnBackendLoss::Close,
                        },
                        protocol: self.backends.protocol(conn)?,
                        queued: 0,
                        epoch: self.backends.epoch(conn),
                        held: b.held,
                    })
                })
                .collect();
            let (id, fd, paused) = (s.id, s.fd, s.paused);
            let input = std::mem::take(&mut s.input);
            let ip = s.ip_counted.then(|| s.peer.ip());
            self.ids.observe(id);
            self.ctx.admission.adopt(ip, now);
            let key = self.sessions.insert(|key| super::session::Session::restore(s, key, bindings, now), id);
            self.ctx.stats.handoff_sessions_in += 1;
            // Closing when it left (a kick, a timeout): the shutdown the old
            // process's driver may not have carried out yet is asked again.
            if let Some(how) = self.sessions.get(key).and_then(|s| s.close_pending()) {
                self.ctx.actions.push(super::Action::ShutdownClient(key, how));
            }
            sessions.push((key, fd, input, paused));
        }
        let conns = ids
            .iter()
            .zip(conn_snaps)
            .filter(|(&(id, _), (fd, _))| *fd != u32::MAX && self.backends.is_up(id))
            .map(|(&(id, generation), (fd, input))| (id, generation, fd, input))
            .collect();
        Imported { sessions, conns }
    }
}

impl super::Shard {
    /// The old process's worker handed its sessions over (counts only: the
    /// shard is dropped unchanged, its sockets being the new process's).
    pub(crate) fn handed_over(&mut self, handed: u64, not_carried: u64) {
        self.ctx.stats.handoff_sessions_out += handed;
        self.ctx.stats.handoff_sessions_not_carried += not_carried;
    }

    /// A carried session whose socket could not be set up here: it ends
    /// (its backends are told, reason 6) and is counted as lost.
    pub(crate) fn handoff_lost(&mut self, key: super::SessionKey, now: Instant) {
        self.ctx.stats.handoff_sessions_lost += 1;
        if let Some(s) = self.sessions.get_mut(key) {
            s.info.set_close_reason(crate::protocol::backend::DisconnectReason::Shutdown);
        }
        self.client_closed(key, now);
    }
}

impl super::Shard {
    /// A live upgrade was abandoned after `frozen_for` without any I/O:
    /// sessions' idle clocks and backend streams' keep-alive clocks move on
    /// by that much, so the pause itself times nothing out.
    pub(crate) fn thawed(&mut self, frozen_for: std::time::Duration) {
        let now = Instant::now();
        for s in self.sessions.iter_mut() {
            s.info.last_active = (s.info.last_active + frozen_for).min(now);
        }
        self.backends.shift_clocks(frozen_for, now);
    }
}
