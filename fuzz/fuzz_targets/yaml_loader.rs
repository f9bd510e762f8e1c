//! Any bytes as a config file: the loader must return diagnostics, never panic or hang.
#![no_main]

use legate::config::{load_and_compile, MemTree, Options};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tree = MemTree::new().with("fuzz.yaml", data.to_vec());
    let _ = load_and_compile(&tree, &Options::default());
});
