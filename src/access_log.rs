//! The access log: exactly one JSON record per session, when it ends.
//!
//! Off the data path: a worker appends records to its own buffer and hands
//! the whole buffer to the writer thread when it passes [`FLUSH_BYTES`] or
//! once a second, with a non-blocking send on a bounded channel. When the
//! writer cannot keep up the buffer is dropped and its records counted
//! (`game_gateway_access_log_dropped_total`), so a slow disk never slows
//! the data path.
//!
//! Fields keep the original gateway's names (`timestamp`, `duration_ns`,
//! `trace_id`, `client.address`, `server.address`, `session.id`,
//! `server.type`, `world.id`, `network.io.receive`, `network.io.send`,
//! `status`, `error.message`) plus `frames.in`, `frames.out`, `close.reason`.
//!
//! With `[log] format = "otel"` a record is an `otel` log line
//! ([`crate::otel_log`]): the Go gateway's envelope (`timestamp` in epoch
//! nanoseconds, `severity_text` `INFO`, `severity_number` 9, `body`
//! `access_log`, `caller`, `service.*`), then the same fields, with the Go
//! gateway's `duration_ms` added and, as it did, zero and empty ones left out.

use crate::protocol::backend::DisconnectReason;
use crate::session::{Hex, SessionInfo};
use crossbeam_channel::{bounded, Sender, TrySendError};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

/// A worker hands its buffer over once it holds this many bytes.
pub(crate) const FLUSH_BYTES: usize = 64 * 1024;
/// Buffers in flight to the writer before records are dropped.
pub(crate) const CHANNEL_DEPTH: usize = 64;

#[derive(Serialize)]
struct Record<'a> {
    timestamp: String,
    duration_ns: u128,
    trace_id: String,
    #[serde(rename = "client.address")]
    client_address: String,
    #[serde(rename = "server.address")]
    server_address: &'a str,
    #[serde(rename = "session.id")]
    session_id: i64,
    #[serde(rename = "server.type")]
    server_type: Option<u8>,
    #[serde(rename = "world.id")]
    world_id: u16,
    #[serde(rename = "network.io.receive")]
    received: u64,
    #[serde(rename = "network.io.send")]
    sent: u64,
    #[serde(rename = "frames.in")]
    frames_in: u64,
    #[serde(rename = "frames.out")]
    frames_out: u64,
    #[serde(rename = "close.reason")]
    close_reason: &'static str,
    status: &'static str,
    #[serde(rename = "error.message")]
    error_message: &'static str,
}

/// Whether a close reason is an error, and its message.
pub(crate) fn outcome(reason: DisconnectReason) -> (&'static str, &'static str) {
    use DisconnectReason::*;
    match reason {
        ClientClosed | Kicked | Shutdown | RouteChanged | IdleTimeout => ("ok", ""),
        ProtocolError => ("error", "client protocol error"),
        RateLimited => ("error", "rate limited or not reading replies"),
        BackendLost => ("error", "backend connection lost"),
    }
}

/// Appends one record for a connection refused at accept (before it became a
/// session), with the refusal reason (`connection_rejected_total{refusal}`).
pub(crate) fn append_refused(buf: &mut Vec<u8>, client: std::net::SocketAddr, refusal: &str) {
    if let Some(r) = crate::otel_log::active() {
        let caller = crate::otel_log::caller(file!(), line!());
        let mut l = crate::otel_log::Line::envelope(r, &tracing::Level::INFO, "access_log", &caller);
        l.field("client.address", client.to_string());
        l.field("status", "refused");
        l.field("close.reason", refusal);
        l.field("error.message", format!("connection refused: {refusal}"));
        buf.extend_from_slice(l.finish().as_bytes());
        buf.push(b'\n');
        return;
    }
    let rec = serde_json::json!({
        "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        "client.address": client.to_string(),
        "status": "refused",
        "close.reason": refusal,
        "error.message": format!("connection refused: {refusal}"),
    });
    if serde_json::to_writer(&mut *buf, &rec).is_ok() {
        buf.push(b'\n');
    }
}

/// Appends one record (a JSON line) for a session that ended.
pub(crate) fn append(buf: &mut Vec<u8>, info: &SessionInfo, reason: DisconnectReason, server_address: &str) {
    if let Some(r) = crate::otel_log::active() {
        append_otel(buf, r, info, reason, server_address);
        return;
    }
    let (status, error_message) = outcome(reason);
    let rec = Record {
        timestamp: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        duration_ns: info.started.elapsed().as_nanos(),
        trace_id: Hex(&info.trace_id).to_string(),
        client_address: info.peer.to_string(),
        server_address,
        session_id: info.id,
        server_type: info.first_server_type,
        world_id: info.first_world,
        received: info.bytes_in,
        sent: info.bytes_out,
        frames_in: info.frames_in,
        frames_out: info.frames_out,
        close_reason: reason.as_str(),
        status,
        error_message,
    };
    if serde_json::to_writer(&mut *buf, &rec).is_ok() {
        buf.push(b'\n');
    }
}

/// [`append`] in the `otel` format.
fn append_otel(
    buf: &mut Vec<u8>,
    r: &crate::otel_log::Resource,
    info: &SessionInfo,
    reason: DisconnectReason,
    server_address: &str,
) {
    let (status, error_message) = outcome(reason);
    let d = info.started.elapsed();
    let caller = crate::otel_log::caller(file!(), line!());
    let mut l = crate::otel_log::Line::envelope(r, &tracing::Level::INFO, "access_log", &caller);
    l.field("client.address", info.peer.to_string());
    l.field("status", status);
    l.field("duration_ns", d.as_nanos() as u64);
    l.field("duration_ms", d.as_secs_f64() * 1e3);
    l.field("trace_id", Hex(&info.trace_id).to_string());
    l.field("session.id", info.id);
    if let Some(t) = info.first_server_type {
        l.field("server.type", t);
    }
    if info.first_world != 0 {
        l.field("world.id", info.first_world);
    }
    if !server_address.is_empty() {
        l.field("server.address", server_address);
    }
    if info.bytes_in != 0 {
        l.field("network.io.receive", info.bytes_in);
    }
    if info.bytes_out != 0 {
        l.field("network.io.send", info.bytes_out);
    }
    if !error_message.is_empty() {
        l.field("error.message", error_message);
    }
    l.field("frames.in", info.frames_in);
    l.field("frames.out", info.frames_out);
    l.field("close.reason", reason.as_str());
    buf.extend_from_slice(l.finish().as_bytes());
    buf.push(b'\n');
}

/// Hands a worker's buffer to the writer: `Ok(records)` written, or
/// `Err(records)` dropped because the writer is behind (or gone).
pub(crate) fn hand_over(tx: &Sender<Vec<u8>>, buf: Vec<u8>, records: u64) -> Result<u64, u64> {
    match tx.try_send(buf) {
        Ok(()) => Ok(records),
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(records),
    }
}

/// Starts the writer thread: appends to `path`, or stdout when `None`. It
/// ends when every worker's sender is gone.
pub(crate) fn spawn_writer(path: Option<PathBuf>) -> std::io::Result<(Sender<Vec<u8>>, std::thread::JoinHandle<()>)> {
    let mut out: Box<dyn Write + Send> = match &path {
        Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
        None => Box::new(std::io::stdout()),
    };
    let (tx, rx) = bounded::<Vec<u8>>(CHANNEL_DEPTH);
    let j = std::thread::Builder::new().name("gw-access-log".into()).spawn(move || {
        for buf in rx {
            if let Err(e) = out.write_all(&buf).and_then(|_| out.flush()) {
                tracing::error!(error = %e, "access log write failed");
            }
        }
    })?;
    Ok((tx, j))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::Transport;

    #[test]
    fn one_json_line_with_the_original_fields() {
        let mut info = SessionInfo::new(
            42,
            "10.0.0.1:5000".parse().unwrap(),
            Transport::Tcp,
            std::time::Instant::now(),
            [0xab; 16],
        );
        info.first_server_type = Some(10);
        info.first_world = 3;
        info.bytes_in = 100;
        let mut buf = Vec::new();
        append(&mut buf, &info, DisconnectReason::BackendLost, "127.0.0.1:19711");
        assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        for k in [
            "timestamp",
            "duration_ns",
            "trace_id",
            "client.address",
            "server.address",
            "session.id",
            "server.type",
            "world.id",
            "network.io.receive",
            "network.io.send",
            "status",
            "error.message",
            "frames.in",
            "frames.out",
            "close.reason",
        ] {
            assert!(v.get(k).is_some(), "missing {k}: {v}");
        }
        assert_eq!(v["trace_id"], "ab".repeat(16));
        assert_eq!(v["status"], "error");
        assert_eq!(v["close.reason"], "backend_lost");
    }

    #[test]
    fn otel_record_has_the_go_gateway_envelope_and_leaves_out_empty_fields() {
        let r = crate::otel_log::Resource {
            service_name: "game-gateway".into(),
            service_namespace: "hgame".into(),
            service_version: "0.1.0".into(),
        };
        let mut info = SessionInfo::new(
            42,
            "10.0.0.1:5000".parse().unwrap(),
            Transport::Tcp,
            std::time::Instant::now(),
            [0xab; 16],
        );
        let mut buf = Vec::new();
        append_otel(&mut buf, &r, &info, DisconnectReason::ClientClosed, "");
        info.first_server_type = Some(10);
        info.first_world = 3;
        info.bytes_in = 100;
        append_otel(&mut buf, &r, &info, DisconnectReason::BackendLost, "127.0.0.1:19711");
        let lines: Vec<serde_json::Value> =
            buf.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        for v in &lines {
            assert!(v["timestamp"].is_u64(), "{v}");
            assert_eq!((v["severity_text"].as_str(), v["severity_number"].as_u64()), (Some("INFO"), Some(9)));
            assert_eq!(v["body"], "access_log");
            assert!(v["caller"].as_str().unwrap().starts_with("src/access_log.rs:"), "{v}");
            assert_eq!(
                (v["service.name"].as_str(), v["service.namespace"].as_str()),
                (Some("game-gateway"), Some("hgame"))
            );
            assert!(v["duration_ns"].is_u64() && v["duration_ms"].is_f64() && v["session.id"].is_i64(), "{v}");
        }
        for absent in
            ["server.type", "world.id", "server.address", "network.io.receive", "network.io.send", "error.message"]
        {
            assert!(lines[0].get(absent).is_none(), "{absent} left out when empty: {}", lines[0]);
        }
        let v = &lines[1];
        assert_eq!((v["server.type"].as_u64(), v["world.id"].as_u64()), (Some(10), Some(3)));
        assert_eq!(
            (v["network.io.receive"].as_u64(), v["error.message"].as_str()),
            (Some(100), Some("backend connection lost"))
        );
        assert_eq!(v["server.address"], "127.0.0.1:19711");
    }

    #[test]
    fn full_writer_drops_and_counts() {
        let (tx, _rx) = bounded(1);
        assert_eq!(hand_over(&tx, vec![1], 3), Ok(3));
        assert_eq!(hand_over(&tx, vec![2], 5), Err(5));
    }
}
