//! `worker`: a long-running wasi:cli command printing `tick <n>` every
//! `INTERVAL_MS` (default 1000) ms, and `worker stderr <n>` on stderr every 10th tick.

use std::time::Duration;

fn main() {
    let interval: u64 = std::env::var("INTERVAL_MS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1000);
    let mut n: u64 = 0;
    loop {
        n += 1;
        println!("tick {n}");
        if n % 10 == 0 {
            eprintln!("worker stderr {n}");
        }
        std::thread::sleep(Duration::from_millis(interval));
    }
}
