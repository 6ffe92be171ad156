//! gw-echo: a raw byte echo server (one monoio thread), the backend for
//! proxies that pass bytes through (HAProxy, nginx) and for the direct
//! baseline: every byte read is written back on the same connection.

use clap::Parser;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

#[derive(Parser)]
#[command(about = "Raw TCP echo server")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:19800")]
    listen: std::net::SocketAddr,
}

/// Read size per connection.
const CHUNK: usize = 16 * 1024;

fn main() {
    let a = Args::parse();
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().expect("runtime");
    rt.block_on(async move {
        let l = monoio::net::TcpListener::bind(a.listen).unwrap_or_else(|e| panic!("listen {}: {e}", a.listen));
        println!("gw-echo listening on {}", a.listen);
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            let _ = s.set_nodelay(true);
            monoio::spawn(async move {
                let mut buf = bytes::BytesMut::with_capacity(CHUNK);
                loop {
                    let cap = buf.capacity();
                    let (r, b) = s.read(buf.slice_mut(0..cap)).await;
                    buf = b.into_inner();
                    match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let (r, b) = s.write_all(buf).await;
                    buf = b;
                    buf.clear();
                    if r.is_err() {
                        return;
                    }
                }
            });
        }
    });
}
