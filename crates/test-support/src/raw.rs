//! A backend that misbehaves at the byte level (what an HTTP framework will
//! not do): answers that never come, stall half way, never end, are malformed,
//! are reset, redirect, or come after a 1xx. And a raw client that sends
//! exact bytes and reads whatever comes back.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the raw backend answers every request.
#[derive(Debug, Clone)]
pub enum Misbehaviour {
    /// Reads the request, then sends nothing, ever.
    NoHeaders,
    /// A 200 with `Content-Length: 100` and half of it, then nothing.
    StallMidBody,
    /// A 200 whose body is `bytes` long (streamed zeros).
    Huge { bytes: u64 },
    /// A 200 with a chunked body that never ends.
    EndlessChunks,
    /// These bytes as the whole answer, e.g. a malformed status line.
    Raw(&'static [u8]),
    /// A 200 with `Content-Length: 100`, 10 bytes of it, then a reset.
    ResetMidBody,
    /// A 302 to somewhere else.
    Redirect,
    /// `103 Early Hints`, then a 200 JSON answer.
    InformationalFirst,
    /// A 200 with `Content-Encoding: gzip` and these bytes as the body.
    Gzip(&'static [u8]),
}

/// The JSON answer the well-behaved parts send.
pub const OK_BODY: &str = r#"{"ok":true,"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;

/// A raw backend on a free port.
pub struct RawBackend {
    pub id: String,
    pub port: u16,
}

impl RawBackend {
    pub async fn start(id: &str, how: Misbehaviour) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let how = Arc::new(how);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let how = how.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, &how).await;
                });
            }
        });
        RawBackend { id: id.to_string(), port }
    }

    /// `id=http://127.0.0.1:port`, for `BACKEND_ENDPOINTS`.
    pub fn endpoint(&self) -> String {
        format!("{}=http://127.0.0.1:{}", self.id, self.port)
    }
}

/// Reads one request's head and body (by `Content-Length`); its method, or
/// `None` when the connection closed first.
async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(head.split(' ').next().map(str::to_uppercase))
}

async fn serve(mut stream: TcpStream, how: &Misbehaviour) -> std::io::Result<()> {
    // Health probes (GET) pass; requests (POST) get the misbehaviour.
    while let Some(method) = read_request(&mut stream).await? {
        let ok = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{OK_BODY}",
            OK_BODY.len()
        );
        if method == "GET" {
            stream.write_all(ok.as_bytes()).await?;
            continue;
        }
        match how {
            Misbehaviour::NoHeaders => std::future::pending::<()>().await,
            Misbehaviour::StallMidBody => {
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n")
                    .await?;
                stream.write_all(&[b' '; 50]).await?;
                std::future::pending::<()>().await;
            }
            Misbehaviour::Huge { bytes } => {
                let head =
                    format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {bytes}\r\n\r\n");
                stream.write_all(head.as_bytes()).await?;
                let zeros = vec![b' '; 64 * 1024];
                let mut left = *bytes;
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    stream.write_all(&zeros[..n]).await?;
                    left -= n as u64;
                }
            }
            Misbehaviour::EndlessChunks => {
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
                    )
                    .await?;
                let chunk = format!("{:x}\r\n{}\r\n", 4096, " ".repeat(4096));
                loop {
                    stream.write_all(chunk.as_bytes()).await?;
                }
            }
            Misbehaviour::Raw(bytes) => {
                stream.write_all(bytes).await?;
                return Ok(());
            }
            Misbehaviour::ResetMidBody => {
                stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"partial\":").await?;
                stream.set_zero_linger()?;
                return Ok(());
            }
            Misbehaviour::Redirect => {
                stream
                    .write_all(
                        b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/elsewhere\r\ncontent-length: 0\r\n\r\n",
                    )
                    .await?;
            }
            Misbehaviour::InformationalFirst => {
                stream.write_all(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n").await?;
                stream.write_all(ok.as_bytes()).await?;
            }
            Misbehaviour::Gzip(body) => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(body).await?;
            }
        }
    }
    Ok(())
}

/// What a raw exchange got back.
#[derive(Debug)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    /// The router closed the connection (EOF or reset) within the wait.
    pub closed: bool,
}

impl RawReply {
    /// The status of the first answer, if one came.
    pub fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// Sends `request` as it is on a new connection to `addr`, then reads until
/// the router closes the connection or `wait` passes.
pub async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8], wait: Duration) -> RawReply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_until_closed(&mut stream, wait).await
}

/// Reads until EOF, a reset, or `wait`.
pub async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> RawReply {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return RawReply { bytes, closed: true },
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => return RawReply { bytes, closed: false },
        }
    }
}
