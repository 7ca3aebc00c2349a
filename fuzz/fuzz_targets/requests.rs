//! Every RPC's request decoding and validation, and token verification.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../crates/strife/tests/fuzz_bodies/mod.rs"]
mod bodies;

fuzz_target!(|data: &[u8]| {
    let _ = bodies::requests(data);
});
