//! Benchmarks of EventStreamCore live in `benches/`; each compares against a
//! peer measured in the same run and prints the ratio.
