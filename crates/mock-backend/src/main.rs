//! The mock game backend as a program, for the demo and the load harness.
//!
//! Echoes `TRANS`, prints `CONNECT`/`DISCONNECT`, and takes commands on stdin:
//! `kick SESSION [TEXT]`, `multicast SESSION,SESSION,... TEXT`,
//! `broadcast TEXT`, `push SESSION TEXT`, `sessions`.

use clap::Parser;
use mock_backend::{Event, MockBackend, Options};
use std::io::BufRead;

#[derive(Parser)]
#[command(about = "Mock game backend: echoes TRANS, records CONNECT/DISCONNECT")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:19711")]
    listen: String,
    /// Do not print events (load runs).
    #[arg(long)]
    quiet: bool,
    /// Expect the extended (trace) gate header on TRANS.
    #[arg(long)]
    trace: bool,
    /// Append TEXT to every echoed TRANS payload (says which backend answered).
    #[arg(long, value_name = "TEXT")]
    tag: Option<String>,
}

fn main() {
    let a = Args::parse();
    let tag: Option<&'static [u8]> = a.tag.map(|t| &*Box::leak(t.into_bytes().into_boxed_slice()));
    let mb = match MockBackend::start(&a.listen, Options { trace: a.trace, tag, ..Default::default() }) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mock-backend: cannot listen on {}: {e}", a.listen);
            std::process::exit(1);
        }
    };
    println!("mock-backend listening on {}", mb.addr());
    let events = mb.events.clone();
    let quiet = a.quiet;
    std::thread::spawn(move || {
        for e in events {
            if quiet {
                continue;
            }
            match e {
                Event::Connect { session, transport, addr, .. } => {
                    println!("CONNECT session={session} transport={transport} client={addr}")
                }
                Event::Disconnect { session, reason, .. } => println!("DISCONNECT session={session} reason={reason}"),
                Event::Accepted { conn } => println!("gateway connection {conn} open"),
                Event::Closed { conn } => println!("gateway connection {conn} closed"),
                Event::Trans { .. } => {}
            }
        }
    });
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let mut parts = line.splitn(3, ' ');
        let cmd = parts.next().unwrap_or("");
        let r = match cmd {
            "kick" => {
                let sid = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                mb.kick(sid, 9, parts.next().unwrap_or("").as_bytes())
            }
            "push" => {
                let sid = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                mb.push(sid, 8, 0, parts.next().unwrap_or("").as_bytes())
            }
            "multicast" => {
                let ids: Vec<i64> = parts.next().unwrap_or("").split(',').filter_map(|s| s.parse().ok()).collect();
                mb.multicast(&ids, 7, parts.next().unwrap_or("").as_bytes())
            }
            "broadcast" => {
                let rest: Vec<&str> = parts.collect();
                mb.broadcast(6, rest.join(" ").as_bytes())
            }
            "sessions" => {
                println!("sessions: {:?}", mb.sessions());
                Ok(())
            }
            "" => Ok(()),
            other => {
                println!("unknown command {other:?}: kick|push|multicast|broadcast|sessions");
                Ok(())
            }
        };
        if let Err(e) = r {
            println!("error: {e}");
        }
    }
    // stdin closed (e.g. run in the background): keep serving.
    loop {
        std::thread::park();
    }
}
