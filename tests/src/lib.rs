//! Shared helpers of the integration tests: the test vectors copied from
//! PROTOCOL.md's generator, and hex decoding.

use std::path::PathBuf;

pub mod decode;

/// Path of a vector file under `tests/vectors/`.
pub fn vector_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("vectors")
        .join(name)
}

/// The lines of a `.jsonl` vector file.
pub fn vector_lines(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(vector_path(name))
        .unwrap_or_else(|e| panic!("reading vector file {name}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Decodes lower- or upper-case hex.
pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// Encodes bytes as lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
