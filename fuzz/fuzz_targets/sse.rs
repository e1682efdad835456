//! A backend's event stream, in pieces of any size, through the event parser
//! and every kind's usage scanner: never a panic, and the same events
//! whatever the pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use router_providers::sse::{EventParser, Scanner};
use router_providers::{KINDS, Kind, Operation};

fn events(stream: &[u8], step: usize) -> Vec<(Option<String>, Vec<u8>)> {
    let mut parser = EventParser::default();
    let mut out = Vec::new();
    let mut on = |event: Option<&str>, data: &[u8]| out.push((event.map(str::to_string), data.to_vec()));
    for piece in stream.chunks(step.max(1)) {
        parser.feed(piece, &mut on);
    }
    parser.finish(&mut on);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else { return };
    assert_eq!(events(stream, usize::from(step)), events(stream, stream.len()));
    for kind in KINDS.iter().filter_map(|p| Kind::by_name(p.name())) {
        for op in Operation::ALL {
            let mut scanner = Scanner::new(kind, op);
            for piece in stream.chunks(usize::from(step).max(1)) {
                scanner.feed(piece);
            }
            scanner.finish();
        }
    }
});
