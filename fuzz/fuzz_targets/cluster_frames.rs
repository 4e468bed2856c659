//! The embedded cluster's decoders on bytes a peer controls: frames after
//! the handshake, handshake frames, and sealed frames. Never panics; what
//! decodes encodes back to the same message; only sealed frames open.
//!
//! Input: one byte choosing the decoder, then the payload.

#![no_main]

use highlander::backend::cluster::fuzz;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    match pick % 3 {
        0 => fuzz::msg(payload),
        1 => fuzz::handshake(payload),
        _ => fuzz::open(payload),
    }
});
