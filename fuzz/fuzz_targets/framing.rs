//! A client's byte stream, read in pieces of any size, through the request
//! framing check: every byte reaches hyper, in order (a refused request's
//! first byte spoiled), whatever the pieces; and the quick check of a
//! header block agrees with the full parse wherever it answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use router_http::server::framing::Framing;

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else { return };
    assert!(Framing::quick_agrees(stream), "the quick header check and the full parse disagree");
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
