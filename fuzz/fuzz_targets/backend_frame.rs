#![no_main]
//! `cargo fuzz run backend_frame`: the body is `game_gateway::fuzzing::backend_frame` (src/fuzzing.rs),
//! which the stable corpus replay test runs too.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| game_gateway::fuzzing::backend_frame(data));
