//! A TCP proxy that can cut every connection and refuse new ones.

use std::sync::Arc;
use std::time::Duration;

/// A TCP proxy on a free port that can cut every connection and refuse new
/// ones (`set_open(false)`), to break a client's watch without touching etcd.
pub struct Proxy {
    pub port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (o, g) = (open.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let (o, g) = (o.clone(), g.clone());
                let born = g.load(std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else { return };
                    let cut = async {
                        while o.load(std::sync::atomic::Ordering::SeqCst)
                            && g.load(std::sync::atomic::Ordering::SeqCst) == born
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut => {}
                    }
                });
            }
        });
        Proxy { port, open, generation }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_open(&self, open: bool) {
        if !open {
            self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.open.store(open, std::sync::atomic::Ordering::SeqCst);
    }
}
