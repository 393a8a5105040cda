//! `echo`: a long-running wasi:cli command serving a line-based TCP echo on
//! `127.0.0.1:<PORT>` (default 9000). Each line is answered with `echo: <line>\n`.
//!
//! Connections are served one at a time. A read timeout (if the runtime
//! supports socket timeouts) closes idle connections; without timeouts each
//! connection is closed after its first line, so an idle client can hold the
//! server only until it sends a line or disconnects.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(9000);
    let listener = match TcpListener::bind(("127.0.0.1", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("echo: bind 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("echo listening on {a}"),
        Err(_) => println!("echo listening on 127.0.0.1:{port}"),
    }
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = serve(stream) {
                    eprintln!("echo: connection from {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("echo: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(stream: TcpStream) -> std::io::Result<()> {
    let has_timeout = stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_ok();
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    // `&TcpStream` reads and writes; `try_clone` is not supported on wasm32-wasip2.
    let mut writer = &stream;
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(()); // idle client: drop it
            }
            Err(e) => return Err(e),
        }
        let text = line.trim_end_matches(['\r', '\n']);
        writer.write_all(format!("echo: {text}\n").as_bytes())?;
        writer.flush()?;
        if !has_timeout {
            return Ok(());
        }
    }
}
