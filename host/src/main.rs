//! `eventstream`: the EventStreamCore command-line program.

fn main() {
    println!("eventstream {}", env!("CARGO_PKG_VERSION"));
}
