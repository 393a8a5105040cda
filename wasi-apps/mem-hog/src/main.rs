//! `mem-hog`: a wasi:cli command that allocates `CHUNK_MIB` (default 1) MiB at
//! a time, touching every page and keeping everything, until the host traps it.

fn main() {
    let chunk_mib: usize = std::env::var("CHUNK_MIB")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    let chunk = chunk_mib << 20;
    println!("allocating");
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut total: usize = 0;
    loop {
        let mut v: Vec<u8> = Vec::with_capacity(chunk);
        // Zero-fill, then write one byte per 4 KiB page.
        v.resize(chunk, 0);
        let mut i = 0;
        while i < chunk {
            v[i] = 1;
            i += 4096;
        }
        kept.push(std::hint::black_box(v));
        total += chunk_mib;
        println!("allocated {total} MiB");
    }
}
