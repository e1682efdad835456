//! HTTP/1.1 request framing, checked before hyper sees it.
//!
//! hyper follows RFC 9112 when a request carries both `Content-Length` and
//! `Transfer-Encoding`: it drops the length and reads the body as chunked.
//! A proxy in front that reads the length instead sees a different request
//! boundary, and the bytes after it are "smuggled" as a request of their own.
//! The only safe answer is to refuse such a request and close the connection.
//!
//! [`Framing`] follows the byte stream of one connection: it holds each
//! request's header block until it is complete, checks it, then releases it,
//! and follows the body (by length, or chunk by chunk) to find where the next
//! request starts. A header block with both framing headers, or with more than
//! one `Transfer-Encoding`, is released with its first byte replaced by one
//! that no method may contain: hyper's parser then refuses it, answers 400
//! and closes the connection. Anything this module cannot follow (HTTP/2, an
//! upgrade, a header block hyper will refuse anyway) is passed on unchecked
//! from then on; hyper refuses the malformed cases itself.

/// What an HTTP/2 client sends first.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface's request line (a method no HTTP/1 request has).
const H2_PREFACE_START: &[u8] = H2_PREFACE.split_at(14).0;

/// The byte that replaces a refused request's first byte: not a token
/// character, so no method can contain it.
const POISON: u8 = 0x01;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Gathering a request's header block.
    Head,
    /// A body of known length: bytes left.
    Body(u64),
    /// A chunked body.
    Chunked(Chunk),
    /// No more checking on this connection.
    Passthrough,
}

impl State {
    /// After a checked header block whose body is `length` bytes long.
    fn after_head(length: u64) -> State {
        if length > 0 { State::Body(length) } else { State::Head }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line (in `line`).
    Size,
    /// Chunk data: bytes left.
    Data(u64),
    /// The CRLF after a chunk's data: bytes of it seen.
    DataEnd,
    /// Trailer lines after the last chunk, until an empty line (in `line`).
    Trailers,
}

/// What a header block turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Checked; its body is followed.
    Checked,
    /// Both `Content-Length` and `Transfer-Encoding`, or several
    /// `Transfer-Encoding`s: refused.
    Refused,
}

/// The framing of one connection's requests.
#[derive(Debug)]
pub struct Framing {
    state: State,
    /// The header block being gathered, or a chunk-size or trailer line.
    held: Vec<u8>,
    /// Past this many bytes of header block, stop holding: hyper answers 431.
    max_head: usize,
    /// Header blocks refused so far.
    pub refused: u64,
}

impl Framing {
    pub fn new(max_head: usize) -> Self {
        Self { state: State::Head, held: Vec::new(), max_head, refused: 0 }
    }

    /// Whether a header block is partly received (for the header timeout).
    pub fn reading_head(&self) -> bool {
        self.state == State::Head && !self.held.is_empty()
    }

    /// Whether the connection is past checking (HTTP/2, an upgrade).
    pub fn passthrough(&self) -> bool {
        self.state == State::Passthrough
    }

    /// Takes the bytes read from the client; appends to `out` what may be
    /// given to hyper now (a header block is held until it is complete).
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let mut input = std::borrow::Cow::Borrowed(data);
        let mut pos = 0;
        while pos < input.len() {
            let data = &input[pos..];
            match self.state {
                State::Passthrough => {
                    out.extend_from_slice(data);
                    return;
                }
                State::Body(left) => {
                    let n = (left as usize).min(data.len());
                    out.extend_from_slice(&data[..n]);
                    pos += n;
                    self.state = if left == n as u64 { State::Head } else { State::Body(left - n as u64) };
                }
                State::Chunked(chunk) => {
                    let n = self.chunked(chunk, data);
                    out.extend_from_slice(&data[..n]);
                    pos += n;
                }
                // Most often a whole header block comes in one read: it is
                // checked where it is, not gathered first.
                State::Head if self.held.is_empty() => {
                    let Some((len, verdict)) = self.check_head(data) else {
                        // Wait for the rest of the header block.
                        self.held.extend_from_slice(data);
                        return;
                    };
                    if verdict == Verdict::Refused {
                        self.refused += 1;
                        out.push(POISON);
                        out.extend_from_slice(&data[1..len]);
                    } else {
                        out.extend_from_slice(&data[..len]);
                    }
                    pos += len;
                }
                State::Head => {
                    self.held.extend_from_slice(data);
                    let mut held = std::mem::take(&mut self.held);
                    let Some((len, verdict)) = self.check_head(&held) else {
                        self.held = held;
                        return;
                    };
                    if verdict == Verdict::Refused {
                        self.refused += 1;
                        held[0] = POISON;
                    }
                    // Release the block; what followed it goes on in the new state.
                    let rest = held.split_off(len);
                    out.extend_from_slice(&held);
                    input = std::borrow::Cow::Owned(rest);
                    pos = 0;
                }
            }
        }
    }

    /// Releases a header block still held (the client closed: hyper
    /// decides). A chunk-size or trailer line being gathered is a copy of
    /// bytes already released, and is dropped.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        if self.state == State::Head {
            out.append(&mut self.held);
        } else {
            self.held.clear();
        }
    }

    /// Looks at a header block received so far (`held`): `None` while
    /// incomplete; else its length and verdict, with the state set for
    /// what follows it.
    fn check_head(&mut self, held: &[u8]) -> Option<(usize, Verdict)> {
        if held.len() >= 3 && H2_PREFACE_START.starts_with(&held[..held.len().min(H2_PREFACE_START.len())]) {
            if held.len() >= H2_PREFACE_START.len() {
                self.state = State::Passthrough;
                return Some((held.len(), Verdict::Checked));
            }
            return None;
        }
        if let Some((len, length)) = quick_head(held) {
            self.state = State::after_head(length);
            return Some((len, Verdict::Checked));
        }
        self.parse_head(held)
    }

    /// [`Self::check_head`] by a full parse (httparse), for any header block.
    fn parse_head(&mut self, held: &[u8]) -> Option<(usize, Verdict)> {
        // Not zeroed first (4 KiB per header block): httparse writes what it finds.
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; 128];
        let mut request = httparse::Request::new(&mut []);
        let len = match request.parse_with_uninit_headers(held, &mut headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if held.len() <= self.max_head => return None,
            // Too long, too many headers, or malformed: hyper refuses it
            // (431 or 400) and closes the connection.
            Ok(httparse::Status::Partial) | Err(_) => {
                self.state = State::Passthrough;
                return Some((held.len(), Verdict::Checked));
            }
        };
        let (mut lengths, mut encodings, mut chunked, mut length) = (0, 0, false, None);
        let mut upgrade = request.method == Some("CONNECT");
        for h in request.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths += 1;
                length = content_length(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                encodings += 1;
                chunked = h.value.rsplit(|b| *b == b',').next().is_some_and(|last| {
                    std::str::from_utf8(last).is_ok_and(|s| s.trim().eq_ignore_ascii_case("chunked"))
                });
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if encodings > 1 || (encodings == 1 && lengths > 0) {
            // hyper closes the connection after its 400.
            self.state = State::Passthrough;
            return Some((len, Verdict::Refused));
        }
        self.state = if upgrade {
            State::Passthrough
        } else if encodings == 1 && chunked {
            State::Chunked(Chunk::Size)
        } else if encodings == 1 || (lengths > 0 && length.is_none()) {
            // Not chunked last, or a bad length: hyper answers 400.
            State::Passthrough
        } else {
            State::after_head(length.unwrap_or(0))
        };
        Some((len, Verdict::Checked))
    }

    /// Whether [`quick_head`] and the full parse agree on a header block:
    /// the same length and the same state after it, unless httparse finds
    /// the block malformed (hyper then refuses it and closes the
    /// connection). For the fuzz target and the tests.
    #[doc(hidden)]
    pub fn quick_agrees(held: &[u8]) -> bool {
        let Some((len, length)) = quick_head(held) else { return true };
        let mut headers = [httparse::EMPTY_HEADER; 128];
        if httparse::Request::new(&mut headers).parse(held).is_err() {
            return true;
        }
        let mut full = Framing::new(usize::MAX);
        let verdict = full.parse_head(held);
        verdict == Some((len, Verdict::Checked)) && full.state == State::after_head(length)
    }

    /// Follows a chunked body through `data`; returns how many bytes of it
    /// belong to the body (all of them unless the body ended inside).
    fn chunked(&mut self, chunk: Chunk, data: &[u8]) -> usize {
        match chunk {
            Chunk::Data(left) => {
                let n = (left as usize).min(data.len());
                self.state =
                    State::Chunked(if left == n as u64 { Chunk::DataEnd } else { Chunk::Data(left - n as u64) });
                n
            }
            Chunk::DataEnd => {
                // "\r\n" (hyper refuses anything else).
                let mut n = 0;
                while n < data.len() && self.held.len() < 2 {
                    self.held.push(data[n]);
                    n += 1;
                    if data[n - 1] == b'\n' {
                        break;
                    }
                }
                if self.held.last() == Some(&b'\n') {
                    self.held.clear();
                    self.state = State::Chunked(Chunk::Size);
                } else if self.held.len() >= 2 {
                    self.held.clear();
                    self.state = State::Passthrough;
                }
                n
            }
            Chunk::Size | Chunk::Trailers => {
                let Some(end) = data.iter().position(|b| *b == b'\n') else {
                    self.held.extend_from_slice(data);
                    if self.held.len() > self.max_head {
                        self.held.clear();
                        self.state = State::Passthrough;
                    }
                    return data.len();
                };
                self.held.extend_from_slice(&data[..=end]);
                let line = std::mem::take(&mut self.held);
                self.state = match chunk {
                    Chunk::Size => match httparse::parse_chunk_size(&line) {
                        Ok(httparse::Status::Complete((_, 0))) => State::Chunked(Chunk::Trailers),
                        Ok(httparse::Status::Complete((_, size))) => State::Chunked(Chunk::Data(size)),
                        // A bad size: hyper refuses the body.
                        _ => State::Passthrough,
                    },
                    // An empty line ends the trailers, and the request.
                    _ if line == b"\r\n" || line == b"\n" => State::Head,
                    _ => State::Chunked(Chunk::Trailers),
                };
                end + 1
            }
        }
    }
}

/// The common header block, read line by line without a full parse (a
/// full one cost ~2,400 instructions a request): complete, not `CONNECT`,
/// no header named `Transfer-Encoding` or `Upgrade`, and at most one
/// `Content-Length`, a number. Its length and the body's; `None` for
/// anything else, which the full parse decides. A block the full parse
/// finds malformed hyper refuses too, closing the connection, so what this
/// says of it changes nothing ([`Framing::quick_agrees`], fuzzed).
fn quick_head(held: &[u8]) -> Option<(usize, u64)> {
    // httparse skips empty lines before the request line; this does not.
    if held.first().is_none_or(|b| matches!(b, b'\r' | b'\n')) || held.starts_with(b"CONNECT") {
        return None;
    }
    let mut lines = memchr::memchr_iter(b'\n', held);
    // Past the request line.
    let mut start = lines.next()? + 1;
    let mut length = None;
    for end in lines {
        let line = &held[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        start = end + 1;
        if line.is_empty() {
            return Some((start, length.unwrap_or(0)));
        }
        // A name is what comes before the first colon, with no space.
        let named = |name: &[u8]| line.get(name.len()) == Some(&b':') && line[..name.len()].eq_ignore_ascii_case(name);
        const CONTENT_LENGTH: &[u8] = b"content-length";
        if named(CONTENT_LENGTH) {
            if length.is_some() {
                return None;
            }
            length = Some(content_length(&line[CONTENT_LENGTH.len() + 1..])?);
        } else if named(b"transfer-encoding") || named(b"upgrade") {
            return None;
        }
    }
    None
}

/// A `Content-Length` value (what follows the colon), as both checks read it.
fn content_length(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse::<u64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns what hyper would get.
    fn run(input: &[u8], step: usize) -> (Vec<u8>, Framing) {
        let mut f = Framing::new(16 * 1024);
        let mut out = Vec::new();
        for piece in input.chunks(step.max(1)) {
            f.push(piece, &mut out);
        }
        f.flush(&mut out);
        (out, f)
    }

    #[test]
    fn well_framed_requests_pass_unchanged_whatever_the_read_sizes() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok";
        for step in [1, 2, 3, 7, 64, 4096] {
            let (out, f) = run(stream, step);
            assert_eq!(out, stream, "step {step}");
            assert_eq!(f.refused, 0);
            assert_eq!(f.state, State::Head, "every request followed to its end (step {step})");
        }
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused_even_after_a_good_request() {
        let good: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
        let bad: &[u8] =
            b"POST /v1/inference HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for step in [1, 5, 4096] {
            let (out, f) = run(&[good, bad].concat(), step);
            assert_eq!(&out[..good.len()], good);
            assert_eq!(out[good.len()], POISON, "the smuggling request's method is spoiled (step {step})");
            assert_eq!(f.refused, 1);
        }
    }

    #[test]
    fn two_transfer_encodings_are_refused() {
        let bad = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n";
        let (out, f) = run(bad, 4096);
        assert_eq!((out[0], f.refused), (POISON, 1));
    }

    #[test]
    fn http2_and_malformed_heads_pass_through_for_hyper_to_judge() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04";
        let (out, f) = run(h2, 3);
        assert_eq!((&out[..], f.passthrough()), (&h2[..], true));
        let junk = b"\x16\x03\x01 not http at all\r\n\r\n";
        let (out, f) = run(junk, 4096);
        assert_eq!((&out[..], f.refused), (&junk[..], 0));
        // A header block past the limit is released, for hyper's 431.
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 20_000));
        let (out, f) = run(&big, 1000);
        assert_eq!((out.len(), f.passthrough()), (big.len(), true));
    }

    #[test]
    fn the_common_head_is_read_without_a_full_parse_and_the_rest_by_one() {
        let post = b"POST /v1/inference HTTP/1.1\r\nhost: x\r\nCONTENT-LENGTH:  12 \r\nx-api-key: k\r\n\r\n{}";
        assert_eq!(quick_head(post), Some((post.len() - 2, 12)));
        assert_eq!(quick_head(b"GET / HTTP/1.1\nHost: x\n\n"), Some((24, 0)), "bare LF line ends, as httparse");
        for other in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 1\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(quick_head(other), None, "{}", String::from_utf8_lossy(other));
        }
        // Where it answers, the full parse answers the same, or refuses the block.
        for head in [
            &post[..],
            b"GET / HTTP/1.1\nHost: x\n\n",
            b"GET / HTTP/1.1\r\nX: a\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length : 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\n Content-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length-X: 5\r\nno colon here\r\n\r\n",
        ] {
            assert!(Framing::quick_agrees(head), "{}", String::from_utf8_lossy(head));
        }
    }

    /// Found by the `framing` fuzz target: a client that closed in the middle
    /// of a chunk-size line had that line's bytes given to hyper twice.
    #[test]
    fn a_connection_closed_inside_a_chunk_size_line_releases_each_byte_once() {
        let stream: &[u8] =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nabcd\r\n0\r\nM\n\xe0\xff\xff\xff";
        for step in [1, 2, 5, 4096] {
            let (out, f) = run(stream, step);
            assert_eq!(out, stream, "step {step}");
            assert_eq!(f.refused, 0);
        }
        let (out, _) = run(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", 3);
        assert!(out.ends_with(b"\r\n5\r\nab"), "a partial chunk is released once");
    }

    #[test]
    fn a_partial_head_is_held_and_reported() {
        let mut f = Framing::new(1024);
        let mut out = Vec::new();
        f.push(b"GET / HTTP/1.1\r\nHo", &mut out);
        assert!(out.is_empty() && f.reading_head());
        f.push(b"st: x\r\n\r\n", &mut out);
        assert!(!f.reading_head() && out.ends_with(b"\r\n\r\n"));
    }
}
