//! A client's byte stream, read in pieces of any size, through the request
//! framing check: every byte reaches hyper, in order (a refused request's
//! first byte spoiled), whatever the pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use router_http::server::framing::Framing;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else { return };
    let mut framing = Framing::new(1024);
    let mut out = Vec::new();
    for piece in stream.chunks(usize::from(step).max(1)) {
        framing.push(piece, &mut out);
    }
    framing.flush(&mut out);
    assert_eq!(out.len(), stream.len());
    if framing.refused == 0 {
        assert_eq!(out, stream);
    }
});
