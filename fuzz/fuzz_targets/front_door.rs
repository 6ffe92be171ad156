#![no_main]
//! `cargo fuzz run front_door`: the body is `game_gateway::fuzzing::front_door` (src/fuzzing.rs),
//! which the stable corpus replay test runs too.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| game_gateway::fuzzing::front_door(data));
