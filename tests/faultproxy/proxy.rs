//! A TCP fault proxy for the path gateway -> backend (this kernel has no
//! `tc netem`): adds delay, stalls, or cuts connections (at once, or with a
//! probability per forwarded chunk). Plain threads; loopback only; every
//! loop bounded by a stop flag and a lifetime.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest a proxy lives (a test that forgets it cannot leave it running).
const LIFETIME: Duration = Duration::from_secs(120);

#[derive(Default)]
pub struct Ctl {
    stop: AtomicBool,
    delay_ms: AtomicU64,
    stalled: AtomicBool,
    /// Probability (per million) that a forwarded chunk cuts its connection.
    cut_ppm: AtomicU64,
    rng: AtomicU64,
    pub accepted: AtomicU64,
    pub cuts: AtomicU64,
    pub bytes: AtomicU64,
    links: Mutex<Vec<Arc<Link>>>,
}

struct Link {
    down: TcpStream,
    up: TcpStream,
    cut: AtomicBool,
}

impl Link {
    fn cut(&self, ctl: &Ctl) {
        if !self.cut.swap(true, Ordering::SeqCst) {
            ctl.cuts.fetch_add(1, Ordering::Relaxed);
            let _ = self.down.shutdown(Shutdown::Both);
            let _ = self.up.shutdown(Shutdown::Both);
        }
    }
}

impl Ctl {
    fn chance(&self) -> bool {
        let ppm = self.cut_ppm.load(Ordering::Relaxed);
        if ppm == 0 {
            return false;
        }
        // xorshift over an atomic: good enough for a test's coin.
        let mut x = self.rng.load(Ordering::Relaxed) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x % 1_000_000 < ppm
    }

    fn live(&self, t0: Instant) -> bool {
        !self.stop.load(Ordering::Relaxed) && t0.elapsed() < LIFETIME
    }
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    pub ctl: Arc<Ctl>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let ctl = Arc::new(Ctl { rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15), ..Default::default() });
        let c2 = ctl.clone();
        let thread = Some(std::thread::spawn(move || accept_loop(listener, upstream, c2)));
        FaultProxy { addr, ctl, thread }
    }

    /// One-way delay added to every chunk, in both directions.
    pub fn set_delay(&self, d: Duration) {
        self.ctl.delay_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Stops moving bytes either way (reading stops too, so TCP backpressure
    /// builds as on a black-holed path), until un-stalled.
    pub fn stall(&self, on: bool) {
        self.ctl.stalled.store(on, Ordering::SeqCst);
    }

    /// Each forwarded chunk cuts its connection with probability `p`.
    pub fn set_cut_probability(&self, p: f64) {
        self.ctl.cut_ppm.store((p * 1e6) as u64, Ordering::SeqCst);
    }

    /// Cuts every open connection now (mid-stream); returns how many.
    pub fn cut_all(&self) -> usize {
        let links: Vec<Arc<Link>> = self.ctl.links.lock().unwrap().drain(..).collect();
        for l in &links {
            l.cut(&self.ctl);
        }
        links.len()
    }

    pub fn cuts(&self) -> u64 {
        self.ctl.cuts.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        self.cut_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, ctl: Arc<Ctl>) {
    let t0 = Instant::now();
    let mut threads = Vec::new();
    while ctl.live(t0) {
        let (down, _) = match listener.accept() {
            Ok(x) => x,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
        };
        let _ = down.set_nonblocking(false);
        let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(1)) else {
            // Nothing behind: the gateway sees its connection closed.
            continue;
        };
        ctl.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = down.set_nodelay(true);
        let _ = up.set_nodelay(true);
        let link = Arc::new(Link {
            down: down.try_clone().unwrap(),
            up: up.try_clone().unwrap(),
            cut: AtomicBool::new(false),
        });
        ctl.links.lock().unwrap().push(link.clone());
        for (from, to) in [(down.try_clone().unwrap(), up.try_clone().unwrap()), (up, down)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let (c1, l1) = (ctl.clone(), link.clone());
            threads.push(std::thread::spawn(move || pump_in(from, tx, &c1, &l1, t0)));
            let (c2, l2) = (ctl.clone(), link.clone());
            threads.push(std::thread::spawn(move || pump_out(to, rx, &c2, &l2, t0)));
        }
        threads.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
    }
    for t in threads {
        let _ = t.join();
    }
}

/// Reads chunks and timestamps them.
fn pump_in(mut from: TcpStream, tx: mpsc::Sender<(Instant, Vec<u8>)>, ctl: &Ctl, link: &Link, t0: Instant) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 * 1024];
    while ctl.live(t0) && !link.cut.load(Ordering::SeqCst) {
        if ctl.stalled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if ctl.chance() {
                    link.cut(ctl);
                    break;
                }
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    // End of stream one way: pass the FIN on once the queue is written
    // (dropping `tx` ends `pump_out` after its last chunk).
}

/// Writes chunks once their delay has passed (and while not stalled).
fn pump_out(mut to: TcpStream, rx: mpsc::Receiver<(Instant, Vec<u8>)>, ctl: &Ctl, link: &Link, t0: Instant) {
    loop {
        let (at, data) = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(x) => x,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !ctl.live(t0) || link.cut.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        loop {
            if !ctl.live(t0) || link.cut.load(Ordering::SeqCst) {
                return;
            }
            let due = at + Duration::from_millis(ctl.delay_ms.load(Ordering::Relaxed));
            let now = Instant::now();
            if ctl.stalled.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            } else if now < due {
                std::thread::sleep((due - now).min(Duration::from_millis(20)));
            } else {
                break;
            }
        }
        if to.write_all(&data).is_err() {
            // This direction is over; the other one still delivers what it
            // has (as a path would: a reset on one side does not recall
            // bytes already travelling to the other).
            return;
        }
        ctl.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    if !link.cut.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
    }
}
