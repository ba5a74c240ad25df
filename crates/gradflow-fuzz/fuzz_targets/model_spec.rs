//! Fuzz target `model_spec`: see `gradflow_fuzz::model_spec`. Without `--cfg fuzzing` (a plain
//! `cargo build`), replays the files named on the command line.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    gradflow_fuzz::single_threaded();
    gradflow_fuzz::model_spec(data)
});

#[cfg(not(fuzzing))]
fn main() {
    gradflow_fuzz::replay_main("model_spec");
}
