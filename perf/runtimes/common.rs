// Shared by both forwarders (included with `include!`): arguments, pinning,
// and the constants that must be identical on both runtimes.

/// Bytes per read, per direction, per client (HAProxy's default bufsize).
pub const BUF: usize = 16 * 1024;

pub struct Args {
    pub listen: std::net::SocketAddr,
    pub backend: std::net::SocketAddr,
    pub cpu: usize,
}

/// `fwd-* --listen ADDR --backend ADDR --cpu N`
pub fn args() -> Args {
    let mut a = Args {
        listen: "127.0.0.1:28180".parse().unwrap(),
        backend: "127.0.0.1:29800".parse().unwrap(),
        cpu: 0,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for p in v.chunks(2) {
        let val = p.get(1).unwrap_or_else(|| panic!("{} needs a value", p[0]));
        match p[0].as_str() {
            "--listen" => a.listen = val.parse().expect("--listen ADDR"),
            "--backend" => a.backend = val.parse().expect("--backend ADDR"),
            "--cpu" => a.cpu = val.parse().expect("--cpu N"),
            o => panic!("unknown argument {o}; usage: --listen ADDR --backend ADDR --cpu N"),
        }
    }
    a
}
