//! gw-contended: what one cache line written by several cores costs on this
//! machine: the constant behind docs/SCALING.md's arithmetic for the
//! gateway's few shared counters (the node's connection count, the
//! reference counts of the shared route table, config and endpoint names).
//!
//! One thread per CPU given (pinned), each doing `--iters` operations on
//!   - `private`: its own counter (a cache line of its own): the baseline;
//!   - `shared`: one `AtomicU64` every thread increments (`fetch_add`);
//!   - `arc`: one `Arc` every thread clones and drops (two atomic read-modify-
//!     writes on its count, what `ctx.cfg.clone()` does),
//!
//! and prints CPU ns per operation per thread (thread CPU time, so a thread
//! time-sliced away by other processes is not charged) and what that makes
//! per second over all threads. Meaningful on otherwise idle CPUs: threads
//! that do not run at the same time do not contend.

use clap::Parser;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

#[derive(Parser, Debug)]
#[command(about = "Cost of one cache line modified by several cores")]
struct Args {
    /// CPUs to run on, one thread each (e.g. 0,1 or 0-7).
    #[arg(long, default_value = "0,1")]
    cpus: String,
    /// Operations per thread.
    #[arg(long, default_value_t = 5_000_000)]
    iters: u64,
}

#[repr(align(128))]
struct Padded(AtomicU64);

fn cpus(s: &str) -> Vec<usize> {
    let mut v = Vec::new();
    for p in s.split(',').filter(|p| !p.is_empty()) {
        match p.split_once('-') {
            Some((a, b)) => v.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => v.push(p.parse().unwrap()),
        }
    }
    v
}

/// CPU time of the calling thread (so time sliced away by other processes
/// is not counted as the operation's).
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs `f(thread index)` on every CPU at once; CPU seconds each thread took.
fn run(cpus: &[usize], f: impl Fn(usize) + Sync) -> Vec<f64> {
    let barrier = Barrier::new(cpus.len());
    std::thread::scope(|s| {
        let hs: Vec<_> = cpus
            .iter()
            .enumerate()
            .map(|(i, &cpu)| {
                let (barrier, f) = (&barrier, &f);
                s.spawn(move || {
                    core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                    barrier.wait();
                    let t = thread_cpu();
                    f(i);
                    thread_cpu() - t
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn main() {
    let a = Args::parse();
    let cpus = cpus(&a.cpus);
    let n = a.iters;
    let private: Vec<Padded> = cpus.iter().map(|_| Padded(AtomicU64::new(0))).collect();
    let shared = Padded(AtomicU64::new(0));
    let arc = Arc::new(0u64);
    let report = |name: &str, ops_per_iter: u64, t: Vec<f64>| {
        let worst = t.iter().cloned().fold(0.0, f64::max);
        let total = (n * ops_per_iter * cpus.len() as u64) as f64 / worst;
        println!(
            "{name:>8}: {} threads, {:.1} CPU ns per atomic operation per thread, {:.1} M operations/s over all threads",
            cpus.len(),
            worst * 1e9 / (n * ops_per_iter) as f64,
            total / 1e6
        );
    };
    report(
        "private",
        1,
        run(&cpus, |i| {
            for _ in 0..n {
                private[i].0.fetch_add(1, Ordering::AcqRel);
            }
        }),
    );
    report(
        "shared",
        1,
        run(&cpus, |_| {
            for _ in 0..n {
                shared.0.fetch_add(1, Ordering::AcqRel);
            }
        }),
    );
    report(
        "arc",
        2,
        run(&cpus, |_| {
            for _ in 0..n {
                std::hint::black_box(arc.clone());
            }
        }),
    );
}
