//! A TCP fault proxy between the router and a dependency (Redis, the broker,
//! etcd, a backend): latency, a stall, a black hole, a slow trickle, a reset
//! of every connection, refusing new ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// What the proxy does to the bytes it carries, both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward as they come.
    None,
    /// Each piece of data waits this long before it is forwarded.
    Latency(Duration),
    /// Nothing is forwarded until the fault changes; then everything held is.
    Stall,
    /// Everything is read and thrown away; connections stay open.
    BlackHole,
    /// At most this many bytes a second, each way.
    Trickle(u64),
}

/// A TCP proxy on a free port to `127.0.0.1:target`.
pub struct Proxy {
    pub port: u16,
    open: Arc<AtomicBool>,
    fault: watch::Sender<Fault>,
    /// Bumped to reset every open connection.
    generation: watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let (fault, _) = watch::channel(Fault::None);
        let (generation, _) = watch::channel(0u64);
        let (o, f, g) = (open.clone(), fault.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    let _ = inbound.set_zero_linger();
                    continue; // reset: refused
                }
                let (fault, mut generation) = (f.subscribe(), g.subscribe());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                    // Every close is a reset, as a dead peer's would be.
                    let _ = inbound.set_zero_linger();
                    let _ = outbound.set_zero_linger();
                    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    generation.borrow_and_update();
                    tokio::select! {
                        _ = pump(ri, wo, fault.clone()) => {}
                        _ = pump(ro, wi, fault) => {}
                        _ = generation.changed() => {}
                    }
                });
            }
        });
        Proxy { port, open, fault, generation }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Applies `fault` to open connections and new ones.
    pub fn set_fault(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// Resets every open connection (new ones are accepted).
    pub fn reset_all(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// `false`: every open connection reset, new ones refused; `true`: open.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if !open {
            self.reset_all();
        }
    }
}

/// Copies one direction under the current fault until either side closes.
/// Reading and writing are separate tasks, so latency delays each piece of
/// data without slowing the ones behind it (a pipelined client keeps its
/// throughput, as over a long link).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((tokio::time::Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((arrived, data)) = rx.recv().await {
            loop {
                let current = *fault.borrow_and_update();
                let sent = match current {
                    Fault::None => to.write_all(&data).await,
                    Fault::Latency(d) => {
                        tokio::time::sleep_until(arrived + d).await;
                        to.write_all(&data).await
                    }
                    Fault::Stall => {
                        if fault.changed().await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Fault::BlackHole => Ok(()),
                    Fault::Trickle(per_second) => {
                        let piece = (per_second / 10).max(1) as usize;
                        let mut result = Ok(());
                        for part in data.chunks(piece) {
                            result = to.write_all(part).await;
                            if result.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        result
                    }
                };
                if sent.is_err() {
                    return;
                }
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    // The writer finishes what the reader queued before the shutdown.
    let (_, _) = tokio::join!(reader, writer);
}
