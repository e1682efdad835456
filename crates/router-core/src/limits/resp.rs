//! The limits' own connection to one Redis (`REDIS_URL`): RESP2 over TCP or
//! a Unix socket, multiplexed (every caller's command goes down one
//! connection, answers come back in order), and nothing else.
//!
//! Why not redis-rs here: an admission is one `EVALSHA` of 27 arguments and
//! an answer of three integers, and redis-rs's general encoder and
//! combinator parser cost about 14,000 instructions a request for it (by
//! callgrind: `write_command` 4,800, `decode_stream` 4,400, the rest its
//! queue). Here a command is written straight into one buffer and an answer
//! parsed by hand. redis-rs still parses the URL (so `REDIS_URL` means what
//! it meant) and still serves Redis Cluster.
//!
//! The connection is lazy: a driver task connects (bounded by the connect
//! timeout), authenticates and selects the database, then serves the queue.
//! When the connection fails (refused, reset, closed, an answer that is not
//! RESP), every command waiting on it fails and the connection is closed for
//! good ([`Connection::is_closed`]): the owner makes a new one. A silent
//! connection (a black hole) is not noticed here; callers bound their waits,
//! and the owner's pinger replaces it.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Nesting deeper than this in an answer is refused (the router's commands
/// answer one level deep at most); it bounds the parser's recursion.
const MAX_DEPTH: usize = 8;

/// The longest string or array an answer may announce (Redis's own limit
/// for a string is 512 MB; the router reads integers and short strings).
const MAX_LEN: i64 = 16 * 1024 * 1024;

/// The longest line (a status, an error, a number) waited for: a line that
/// does not end by then is not RESP, and is not buffered on and on.
const MAX_LINE: usize = 64 * 1024;

/// One argument of a command.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Str(&'a str),
    Int(i64),
}

impl Arg<'_> {
    /// An unsigned number (intervals, TTLs: far below `i64::MAX`; larger
    /// ones are capped there).
    pub fn uint(n: u64) -> Self {
        Arg::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}

/// Why a command got no answer, or an error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespError {
    /// Redis answered with an error (`-ERR ...`, `-NOSCRIPT ...`).
    Server(String),
    /// The connection could not be made or broke; the command may or may
    /// not have run.
    Io(String),
    /// Redis answered something that is not RESP2; the connection is closed.
    Protocol(String),
    /// The connection is closed; a new one is needed.
    Closed,
}

impl RespError {
    /// Redis does not have the script (restarted, flushed).
    pub fn is_no_script(&self) -> bool {
        matches!(self, RespError::Server(m) if m.starts_with("NOSCRIPT"))
    }
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::Server(m) => write!(f, "{m}"),
            RespError::Io(m) => write!(f, "connection: {m}"),
            RespError::Protocol(m) => write!(f, "protocol: {m}"),
            RespError::Closed => f.write_str("connection closed"),
        }
    }
}

impl std::error::Error for RespError {}

type Answer = Result<Value, RespError>;

struct Request {
    bytes: Vec<u8>,
    answer: oneshot::Sender<Answer>,
}

/// A handle on one multiplexed connection: cheap to clone.
#[derive(Clone)]
pub struct Connection {
    queue: mpsc::UnboundedSender<Request>,
}

impl Connection {
    /// A connection to `info` that connects on first use (its driver task
    /// starts now, on the current runtime).
    pub fn lazy(info: &ConnectionInfo, connect_timeout: Duration) -> Result<Self, String> {
        let addr = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Addr::Tcp(host.clone(), *port),
            ConnectionAddr::Unix(path) => Addr::Unix(path.clone()),
            _ => return Err("only redis:// and unix:// URLs are supported".into()),
        };
        let settings = info.redis_settings();
        let mut hello = Vec::new();
        let mut answers = 0;
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => encode(&[Arg::Str("AUTH"), Arg::Str(user), Arg::Str(password)], &mut hello),
                None => encode(&[Arg::Str("AUTH"), Arg::Str(password)], &mut hello),
            }
            answers += 1;
        }
        if settings.db() != 0 {
            encode(&[Arg::Str("SELECT"), Arg::Int(settings.db())], &mut hello);
            answers += 1;
        }
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(drive(addr, Hello { bytes: hello, answers }, connect_timeout, rx));
        Ok(Self { queue })
    }

    /// The connection failed or its driver ended: it will answer nothing more.
    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }

    /// Sends one command and waits for its answer. Dropping the future
    /// abandons the answer, not the connection.
    pub async fn call(&self, args: &[Arg<'_>]) -> Answer {
        let mut bytes = Vec::with_capacity(encoded_len(args));
        encode(args, &mut bytes);
        let (answer, rx) = oneshot::channel();
        self.queue.send(Request { bytes, answer }).map_err(|_| RespError::Closed)?;
        rx.await.unwrap_or(Err(RespError::Closed))
    }
}

enum Addr {
    Tcp(String, u16),
    Unix(std::path::PathBuf),
}

/// What is sent first on a new connection (`AUTH`, `SELECT`), and how many
/// answers it has.
struct Hello {
    bytes: Vec<u8>,
    answers: usize,
}

/// Connects, then serves the queue until the connection fails or every
/// handle is gone; whatever is still waiting then fails.
async fn drive(addr: Addr, hello: Hello, connect_timeout: Duration, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut waiting = VecDeque::new();
    let error = match tokio::time::timeout(connect_timeout, connect(&addr)).await {
        Err(_) => RespError::Io(format!("no connection within {connect_timeout:?}")),
        Ok(Err(e)) => RespError::Io(e.to_string()),
        Ok(Ok(Stream::Tcp(s))) => serve(s, hello, connect_timeout, &mut rx, &mut waiting).await,
        Ok(Ok(Stream::Unix(s))) => serve(s, hello, connect_timeout, &mut rx, &mut waiting).await,
    };
    rx.close();
    while let Ok(request) = rx.try_recv() {
        waiting.push_back(request.answer);
    }
    for answer in waiting {
        let _ = answer.send(Err(error.clone()));
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn connect(addr: &Addr) -> std::io::Result<Stream> {
    Ok(match addr {
        Addr::Tcp(host, port) => {
            let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            s.set_nodelay(true)?;
            Stream::Tcp(s)
        }
        Addr::Unix(path) => Stream::Unix(tokio::net::UnixStream::connect(path).await?),
    })
}

/// Serves one open connection; returns why it ended. The hello's answers
/// are waited for as long as the connection was (a Redis that accepts and
/// then says nothing does not hold the connection's queue).
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    hello: Hello,
    hello_timeout: Duration,
    rx: &mut mpsc::UnboundedReceiver<Request>,
    waiting: &mut VecDeque<oneshot::Sender<Answer>>,
) -> RespError {
    let mut read = Vec::with_capacity(512);
    if hello.answers > 0 {
        let greet = async {
            stream.write_all(&hello.bytes).await.map_err(|e| RespError::Io(e.to_string()))?;
            for _ in 0..hello.answers {
                // AUTH or SELECT refused: no command would work.
                next_answer(&mut stream, &mut read).await??;
            }
            Ok(())
        };
        match tokio::time::timeout(hello_timeout, greet).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return e,
            Err(_) => return RespError::Io(format!("no answer to AUTH or SELECT within {hello_timeout:?}")),
        }
    }
    let mut write = Vec::with_capacity(512);
    loop {
        tokio::select! {
            biased;
            n = stream.read_buf(&mut read) => {
                match n {
                    Ok(0) => return RespError::Io("closed by Redis".into()),
                    Err(e) => return RespError::Io(e.to_string()),
                    Ok(_) => {}
                }
                let mut at = 0;
                while let Some((answer, used)) = match parse(&read[at..]) {
                    Ok(parsed) => parsed,
                    Err(e) => return e,
                } {
                    at += used;
                    let Some(waiter) = waiting.pop_front() else {
                        return RespError::Protocol("an answer to no command".into());
                    };
                    // The caller may have stopped waiting (its bound passed).
                    let _ = waiter.send(answer);
                }
                read.drain(..at);
            }
            request = rx.recv() => {
                let Some(first) = request else { return RespError::Closed };
                // Everything queued now goes out in one write.
                write.extend_from_slice(&first.bytes);
                waiting.push_back(first.answer);
                while let Ok(more) = rx.try_recv() {
                    write.extend_from_slice(&more.bytes);
                    waiting.push_back(more.answer);
                }
                if let Err(e) = stream.write_all(&write).await {
                    return RespError::Io(e.to_string());
                }
                write.clear();
            }
        }
    }
}

/// Reads until one whole answer is in `read`, and takes it out.
async fn next_answer<S: AsyncRead + Unpin>(stream: &mut S, read: &mut Vec<u8>) -> Result<Answer, RespError> {
    loop {
        if let Some((answer, used)) = parse(read)? {
            read.drain(..used);
            return Ok(answer);
        }
        match stream.read_buf(read).await {
            Ok(0) => return Err(RespError::Io("closed by Redis".into())),
            Err(e) => return Err(RespError::Io(e.to_string())),
            Ok(_) => {}
        }
    }
}

/// Enough bytes for `args` encoded (an estimate from above).
pub fn encoded_len(args: &[Arg<'_>]) -> usize {
    // `$<len>\r\n<value>\r\n`, with room for the length's digits.
    16 + args
        .iter()
        .map(|a| {
            8 + match a {
                Arg::Str(s) => s.len(),
                Arg::Int(_) => 20,
            }
        })
        .sum::<usize>()
}

/// `args` as one RESP2 command (an array of bulk strings), appended to `out`.
pub fn encode(args: &[Arg<'_>], out: &mut Vec<u8>) {
    let mut digits = itoa::Buffer::new();
    out.push(b'*');
    out.extend_from_slice(digits.format(args.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut number = itoa::Buffer::new();
    for arg in args {
        let bytes = match arg {
            Arg::Str(s) => s.as_bytes(),
            Arg::Int(n) => number.format(*n).as_bytes(),
        };
        // Almost every length has one or two digits: pushed as bytes, they
        // spare a call to memcpy each (by callgrind, ~700 instructions an
        // admission).
        match bytes.len() {
            n @ 0..10 => out.extend_from_slice(&[b'$', b'0' + n as u8, b'\r', b'\n']),
            n @ 10..100 => out.extend_from_slice(&[b'$', b'0' + (n / 10) as u8, b'0' + (n % 10) as u8, b'\r', b'\n']),
            n => {
                out.push(b'$');
                out.extend_from_slice(digits.format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(bytes);
        out.extend_from_slice(b"\r\n");
    }
}

/// One whole answer at the start of `buf` and the bytes it takes, or `None`
/// if it has not all arrived. An error answer is `Err(Server)` in the first
/// place (one nested in an array makes the whole answer that error).
pub fn parse(buf: &[u8]) -> Result<Option<(Answer, usize)>, RespError> {
    let mut at = 0;
    Ok(value(buf, &mut at, 0)?.map(|answer| (answer, at)))
}

fn value(buf: &[u8], at: &mut usize, depth: usize) -> Result<Option<Answer>, RespError> {
    let Some(&kind) = buf.get(*at) else { return Ok(None) };
    let Some(line) = line(buf, *at + 1) else {
        if buf.len() - *at > MAX_LINE {
            return Err(RespError::Protocol("a line that does not end".into()));
        }
        return Ok(None);
    };
    let text = &buf[*at + 1..line];
    *at = line + 2;
    Ok(Some(match kind {
        b'+' => Ok(match text {
            b"OK" => Value::Okay,
            _ => Value::SimpleString(utf8(text)?),
        }),
        b'-' => Err(RespError::Server(utf8(text)?)),
        b':' => Ok(Value::Int(int(text)?)),
        b'$' => match length(text)? {
            None => Ok(Value::Nil),
            Some(len) => {
                let end = *at + len;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(RespError::Protocol("a string without its CRLF".into()));
                }
                let bytes = buf[*at..end].to_vec();
                *at = end + 2;
                Ok(Value::BulkString(bytes))
            }
        },
        b'*' => match length(text)? {
            None => Ok(Value::Nil),
            Some(len) => {
                if depth >= MAX_DEPTH {
                    return Err(RespError::Protocol("an answer nested too deep".into()));
                }
                // Each element takes at least 3 bytes: do not trust the
                // announced length for the allocation.
                let mut items = Vec::with_capacity(len.min((buf.len() - *at) / 3));
                let mut error = None;
                for _ in 0..len {
                    match value(buf, at, depth + 1)? {
                        None => return Ok(None),
                        Some(Ok(v)) => items.push(v),
                        Some(Err(e)) => error = error.or(Some(e)),
                    }
                }
                match error {
                    Some(e) => Err(e),
                    None => Ok(Value::Array(items)),
                }
            }
        },
        other => return Err(RespError::Protocol(format!("unknown answer type {:?}", other as char))),
    }))
}

/// Where the CRLF that ends the line starting at `from` is.
fn line(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    memchr::memmem::find(rest, b"\r\n").map(|p| from + p)
}

fn utf8(text: &[u8]) -> Result<String, RespError> {
    String::from_utf8(text.to_vec()).map_err(|_| RespError::Protocol("a status line that is not UTF-8".into()))
}

fn int(text: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| RespError::Protocol("an integer that is not one".into()))
}

/// A string's or array's length: `None` for -1 (nil).
fn length(text: &[u8]) -> Result<Option<usize>, RespError> {
    match int(text)? {
        -1 => Ok(None),
        n @ 0..=MAX_LEN => Ok(Some(n as usize)),
        n => Err(RespError::Protocol(format!("a length out of range: {n}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(bytes: &[u8]) -> (Answer, usize) {
        parse(bytes).unwrap().unwrap()
    }

    #[test]
    fn a_command_is_an_array_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&[Arg::Str("EVALSHA"), Arg::Str("ab"), Arg::Int(0), Arg::Int(-42), Arg::Int(i64::MIN)], &mut out);
        assert_eq!(out, b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n$3\r\n-42\r\n$20\r\n-9223372036854775808\r\n");
        assert!(encoded_len(&[Arg::Int(i64::MIN), Arg::Str("ab")]) >= out.len() - 30);
        let long = "k".repeat(123);
        let mut out = Vec::new();
        encode(&[Arg::Str(&long), Arg::Str("")], &mut out);
        assert_eq!(out, format!("*2\r\n$123\r\n{long}\r\n$0\r\n\r\n").into_bytes());
    }

    #[test]
    fn every_kind_of_answer_parses() {
        assert_eq!(parsed(b"+OK\r\n"), (Ok(Value::Okay), 5));
        assert_eq!(parsed(b"+PONG\r\n").0, Ok(Value::SimpleString("PONG".into())));
        assert_eq!(parsed(b":-12\r\n").0, Ok(Value::Int(-12)));
        assert_eq!(parsed(b"$3\r\nabc\r\n"), (Ok(Value::BulkString(b"abc".to_vec())), 9));
        assert_eq!(parsed(b"$-1\r\n").0, Ok(Value::Nil));
        assert_eq!(parsed(b"*-1\r\n").0, Ok(Value::Nil));
        assert_eq!(
            parsed(b"*3\r\n:0\r\n$-1\r\n$2\r\n12\r\n:9").0,
            Ok(Value::Array(vec![Value::Int(0), Value::Nil, Value::BulkString(b"12".to_vec())]))
        );
    }

    #[test]
    fn an_error_answer_is_the_servers_error() {
        let (answer, used) = parsed(b"-NOSCRIPT No matching script\r\n+OK\r\n");
        assert_eq!(used, 30);
        assert!(answer.unwrap_err().is_no_script());
        assert_eq!(parsed(b"*2\r\n:1\r\n-ERR x\r\n").0, Err(RespError::Server("ERR x".into())));
    }

    #[test]
    fn a_partial_answer_waits_for_the_rest() {
        let whole = b"*2\r\n$5\r\nhello\r\n:7\r\n";
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(parsed(whole).1, whole.len());
    }

    #[test]
    fn what_is_not_resp_is_refused() {
        for bad in [
            &b"?x\r\n"[..],
            b":12a\r\n",
            b"$99999999999\r\n",
            b"$-2\r\n",
            b"$2\r\nabcd\r\n",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
            &[b'+'; MAX_LINE + 2][..],
        ] {
            assert!(matches!(parse(bad), Err(RespError::Protocol(_))), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_huge_announced_array_does_not_allocate_its_length() {
        // Parses as incomplete without reserving 16M entries.
        assert_eq!(parse(b"*16777216\r\n:1\r\n"), Ok(None));
    }
}
