//! `crasher`: a wasi:cli command that fails on purpose (restart-policy tests).
//! Sleeps `DELAY_MS` (default 0) then exits with `EXIT_CODE` (default 1).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn main() {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    println!("crasher starting (attempt at {now_ms})");
    eprintln!("crasher: about to fail");
    let delay: u64 = env_num("DELAY_MS", 0);
    let code: i32 = env_num("EXIT_CODE", 1);
    if delay > 0 {
        std::thread::sleep(Duration::from_millis(delay));
    }
    std::process::exit(code);
}
