//! A backend's answer body (whole, or streamed in pieces) through every
//! kind's usage reading and every translation: never a panic; and the quick
//! reading of `usage` never disagrees with serde's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use router_providers::translate::Translation;
use router_providers::{KINDS, Kind, Operation, Usage};

fuzz_target!(|data: &[u8]| {
    assert!(Usage::quick_agrees(data), "the quick usage reading and serde disagree");
    let Some((&step, body)) = data.split_first() else { return };
    for kind in KINDS.iter().filter_map(|p| Kind::by_name(p.name())) {
        for op in Operation::ALL {
            let _ = kind.provider().usage(op, body);
            if let Some(Some(t)) = Translation::between(op, kind) {
                let _ = t.answer(body, "m");
                let _ = t.error(u16::from(step) + 400, body);
                let mut stream = t.stream("m", step % 2 == 0);
                for piece in body.chunks(usize::from(step).max(1)) {
                    let _ = stream.push(piece);
                }
                let _ = stream.finish();
            }
        }
    }
});
