//! A worker's side of a live upgrade (see `crate::upgrade` for the whole
//! sequence and docs/OPERATIONS.md for operators).
//!
//! Old process, per worker: [`Worker::freeze`] stops accepting (cancelling
//! the accepts in flight; one the kernel completed becomes a session),
//! stops every session's reads and writes (client sockets are in readiness
//! mode, so no operation is in flight on them), stops each backend stream's
//! read in flight keeping what it read, lets its write in flight finish,
//! defers every socket action and control command, then exports the shard
//! with the bytes the tasks hold and the descriptor of every socket. Then
//! either [`Worker::thaw`] (the new process failed: everything goes on where
//! it stopped) or [`Worker::retire`] (the new process has it all: the tasks
//! end without touching a socket and the worker exits).
//!
//! New process, per worker: [`Worker::adopt`] imports the shard snapshots of
//! the old workers mapped to it and starts the sockets' tasks.

use super::{backend, client, Worker};
use crate::notify::Notify;
use crate::shard::handoff::{ConnStateSnap, ShardSnapshot};
use std::cell::Cell;
use std::os::fd::{OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Waits while `frozen` (woken by `thaw`); false once `retired`: the task
/// must then end without touching its socket. Each task waits on its own
/// `thaw` (a `Notify` keeps one waiter, and a monoio task whose last waker
/// is dropped is dropped with it).
pub(super) async fn wait_thaw(frozen: &Cell<bool>, retired: &Cell<bool>, thaw: &Notify) -> bool {
    while frozen.get() && !retired.get() {
        thaw.notified().await;
    }
    !retired.get()
}

/// Longest a worker waits for its accept loops to end and its backend
/// streams to stop (a cancelled read, a write in flight finishing).
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// One worker's state and sockets, on their way to the new process.
pub struct WorkerExport {
    pub snapshot: ShardSnapshot,
    /// The descriptors the snapshot's `fd` fields index: this worker's own,
    /// not duplicates (a process near its open-file limit could not double
    /// them). They stay open while the worker is frozen: a frozen worker
    /// closes no socket (its socket actions wait for the thaw, and its tasks
    /// hold their sockets) until it is thawed or retired, which the control
    /// side does only after sending them.
    pub fds: Vec<RawFd>,
    /// Sessions left behind (TLS), closed if the upgrade completes.
    pub not_carried: usize,
}

/// What an adoption took.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdoptReport {
    pub sessions: usize,
    pub conns: usize,
    /// Sessions whose socket could not be set up here (closed, counted lost).
    pub lost: usize,
}

impl Worker {
    /// Old process: stop and export (see the module docs).
    pub(super) async fn freeze(self: Rc<Self>) -> Result<WorkerExport, String> {
        let started = Instant::now();
        if !self.live_upgrade {
            return Err(format!("worker {}: started without [server] upgrade_socket", self.index));
        }
        self.frozen.set(true);
        self.frozen_at.set(Some(started));
        self.stop_accepting();
        let clients: Vec<Rc<client::ClientIo>> = self.clients.borrow().iter().flatten().cloned().collect();
        for io in &clients {
            io.frozen.set(true);
        }
        let conns: Vec<Rc<backend::ConnIo>> = self.backends.borrow().iter().flatten().cloned().collect();
        for io in &conns {
            io.freeze();
        }
        let deadline = started + FREEZE_TIMEOUT;
        // Every accept loop has ended (an accept the kernel completed is a
        // session by then, frozen below) and every backend stream stopped.
        while self.accept_loops.get() > 0 || !conns.iter().all(|c| c.at_rest()) {
            if Instant::now() >= deadline {
                return Err(format!(
                    "worker {}: accept loops or backend streams did not stop within {FREEZE_TIMEOUT:?}",
                    self.index
                ));
            }
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        // A connection accepted while the accept loops were stopping is a
        // session too: frozen with the rest before anything is read.
        for io in self.clients.borrow().iter().flatten() {
            io.frozen.set(true);
        }
        let export = self.shard.borrow().export(Instant::now());
        let mut snapshot = export.snapshot;
        let mut fds = Vec::with_capacity(snapshot.sessions.len() + snapshot.conns.len());
        for (snap, key) in snapshot.sessions.iter_mut().zip(&export.sessions) {
            let io =
                self.client(*key).ok_or_else(|| format!("worker {}: session {} has no socket", self.index, key.id))?;
            fds.push(io.raw_fd());
            snap.fd = fds.len() as u32 - 1;
            snap.input = io.partial.borrow().to_vec();
            let pending = io.pending.borrow();
            if !pending.is_empty() {
                let mut out = pending.to_vec();
                out.extend_from_slice(&snap.out);
                snap.out = out;
            }
        }
        let backends = self.backends.borrow();
        for (snap, (conn, generation)) in snapshot.conns.iter_mut().zip(&export.conns) {
            let io = backends.get(conn.0 as usize).and_then(Option::as_ref).filter(|io| io.generation == *generation);
            let fd = io.and_then(|io| io.fd.get()).filter(|_| io.is_some_and(|io| !io.reader_done.get()));
            match (snap.state, io, fd) {
                (ConnStateSnap::Up, Some(io), Some(fd)) => {
                    fds.push(fd);
                    snap.fd = Some(fds.len() as u32 - 1);
                    snap.input = io.reader_left.borrow().as_deref().unwrap_or_default().to_vec();
                    if let Some(left) = io.writer_left.borrow().as_ref().filter(|l| !l.is_empty()) {
                        let mut out = left.to_vec();
                        out.extend_from_slice(&snap.out);
                        snap.out = out;
                    }
                }
                // Up in the shard but its socket is gone (its loss is on its
                // way): the new process dials again.
                (ConnStateSnap::Up, _, _) => snap.state = ConnStateSnap::Idle,
                _ => {}
            }
        }
        tracing::info!(
            worker = self.index,
            sessions = snapshot.sessions.len(),
            conns = snapshot.conns.len(),
            not_carried = export.not_carried.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "live upgrade: worker frozen and exported"
        );
        Ok(WorkerExport { snapshot, fds, not_carried: export.not_carried.len() })
    }

    /// Old process: the upgrade failed; go on, accepting on `listeners`
    /// (this worker's). Nothing to do for a worker that was not frozen.
    pub(super) fn thaw(self: &Rc<Self>, epoch: u64, listeners: Vec<std::net::TcpListener>) {
        self.thawed_epoch.set(self.thawed_epoch.get().max(epoch));
        if !self.frozen.get() {
            // The freeze has not begun or not finished: it thaws with these.
            *self.stashed_thaw.borrow_mut() = Some(listeners);
            return;
        }
        self.frozen.set(false);
        let frozen_for = self.frozen_at.get().map_or(Duration::ZERO, |t| t.elapsed());
        // Timeouts and keep-alives do not count the time nothing could move.
        self.shard.borrow_mut().thawed(frozen_for);
        for io in self.clients.borrow().iter().flatten() {
            io.frozen.set(false);
            io.thaw_rd.notify();
            io.thaw_wr.notify();
            io.resume.notify();
        }
        for io in self.backends.borrow().iter().flatten() {
            io.unfreeze();
        }
        // A drain that began while frozen keeps the listeners closed.
        let listeners = if self.stopping.get() { Vec::new() } else { listeners };
        for listener in listeners {
            match monoio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    monoio::spawn(client::accept_loop(self.clone(), l));
                }
                Err(e) => {
                    tracing::error!(worker = self.index, error = %e, "live upgrade abandoned: cannot accept again")
                }
            }
        }
        // What the shard asked for meanwhile, in order, then the commands.
        let deferred = std::mem::take(&mut *self.deferred.borrow_mut());
        for a in deferred {
            self.run_action(a);
        }
        let cmds = std::mem::take(&mut *self.deferred_cmds.borrow_mut());
        for c in cmds {
            self.handle_command(c);
        }
        // Replies queued while frozen go out now.
        let clients: Vec<Rc<client::ClientIo>> = self.clients.borrow().iter().flatten().cloned().collect();
        for io in &clients {
            self.flush_client(io);
        }
        tracing::info!(worker = self.index, "live upgrade abandoned: worker resumed");
    }

    /// Old process: the new one has everything; end without touching a
    /// socket (dropping a descriptor closes only this process's copy).
    pub(super) fn retire(self: &Rc<Self>, handed: u64, not_carried: u64) {
        // Sessions closed before the freeze whose last bytes were still
        // being written are this process's alone (closed sessions are not
        // exported): their tail goes out now, as far as the socket takes it,
        // then the FIN.
        let closing: Vec<Rc<client::ClientIo>> =
            self.clients.borrow().iter().flatten().filter(|io| io.closing()).cloned().collect();
        for io in closing {
            io.finish_now();
        }
        for io in self.clients.borrow().iter().flatten() {
            io.retired.set(true);
            io.thaw_rd.notify();
            io.thaw_wr.notify();
        }
        for io in self.backends.borrow().iter().flatten() {
            io.retire();
        }
        {
            let mut sh = self.shard.borrow_mut();
            sh.handed_over(handed, not_carried);
        }
        tracing::info!(worker = self.index, sessions = handed, "live upgrade complete: worker retired");
        // The access-log writer ends with its last sender.
        self.shard.borrow_mut().flush_access_log();
        self.access_tx.borrow_mut().take();
        // Nothing more to ask of this worker: requests (stats for a scrape)
        // fail at once instead of waiting for an answer that never comes.
        self.commands.borrow_mut().take();
        self.stop_done.notify();
    }

    /// New process: take in `snap` (one old worker's) and start its sockets.
    pub(super) fn adopt(self: &Rc<Self>, snap: ShardSnapshot, fds: Vec<OwnedFd>) -> AdoptReport {
        let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
        // Imported first, its actions (dials, shutdowns of sessions that were
        // closing) carried out once the sockets are set up below.
        let imported = self.shard.borrow_mut().import(snap, Instant::now());
        let mut report = AdoptReport::default();
        for (conn, generation, fd, input) in imported.conns {
            let Some(fd) = fds.get_mut(fd as usize).and_then(Option::take) else { continue };
            match backend::adopt(self, conn, generation, fd, input) {
                Ok(io) => {
                    let mut backends = self.backends.borrow_mut();
                    let slot = conn.0 as usize;
                    if backends.len() <= slot {
                        backends.resize(slot + 1, None);
                    }
                    backends[slot] = Some(io);
                    report.conns += 1;
                }
                Err(e) => {
                    tracing::error!(worker = self.index, error = %e, "live upgrade: backend stream not adopted");
                    // Lost, as any stream: its sessions are closed or
                    // rebound by their rule.
                    let now = Instant::now();
                    self.with_shard(|sh| {
                        sh.backend_lost(conn, generation, crate::shard::LossKind::ReadFailed, &e, now)
                    });
                }
            }
        }
        let mut adopted_ios = Vec::with_capacity(imported.sessions.len());
        for (key, fd, input, _paused) in imported.sessions {
            let adopted = fds
                .get_mut(fd as usize)
                .and_then(Option::take)
                .ok_or_else(|| std::io::Error::other("no descriptor"))
                .and_then(|fd| client::adopt(self, key, fd, input));
            match adopted {
                Ok(io) => {
                    report.sessions += 1;
                    adopted_ios.push(io);
                }
                Err(e) => {
                    tracing::error!(worker = self.index, session_id = key.id, error = %e, "live upgrade: session not adopted");
                    report.lost += 1;
                    self.shard.borrow_mut().handoff_lost(key, Instant::now());
                }
            }
        }
        // Every socket is set up: the import's actions run now, then the
        // replies that were queued go out.
        self.with_shard(|_| ());
        for io in &adopted_ios {
            self.flush_client(io);
        }
        report
    }
}
