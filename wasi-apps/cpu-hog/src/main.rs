//! `cpu-hog`: a wasi:cli command that busy-loops forever (CPU-limit tests).

use std::io::Write as _;

fn main() {
    println!("spinning");
    let _ = std::io::stdout().flush();
    let mut counter: u64 = 0;
    loop {
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}
