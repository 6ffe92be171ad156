#![no_main]
//! `cargo fuzz run route_json`: the body is `game_gateway::fuzzing::route_json` (src/fuzzing.rs),
//! which the stable corpus replay test runs too.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| game_gateway::fuzzing::route_json(data));
