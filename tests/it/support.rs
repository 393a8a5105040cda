//! Test support: real `wasmctl` processes on loopback, HTTP helpers, deadlines.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_wasmctl")
}

/// The lines a child prints on its (piped) stdout, read on a thread.
pub fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Kills its child process when dropped (also when a test panics).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// Poll `f` until it returns `Some`, or panic after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A `wasmctl server` child process.
pub struct ServerProc {
    pub child: Child,
    pub data_dir: PathBuf,
    pub url: String,
    pub kubeconfig: PathBuf,
    pub token: String,
    pub http: reqwest::Client,
    extra: Vec<String>,
    listen: String,
}

impl ServerProc {
    pub async fn start(data_dir: &Path, extra: &[&str]) -> ServerProc {
        Self::start_on(data_dir, "127.0.0.1:0", extra).await
    }

    pub async fn start_on(data_dir: &Path, listen: &str, extra: &[&str]) -> ServerProc {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut child = Command::new(bin())
            .arg("server")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen)
            .args(&extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn wasmctl server");
        // Read the announced URL from stdout (the port may have been chosen by the kernel).
        let rx = stdout_lines(&mut child);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut url = None;
        while url.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(u) = line.strip_prefix("API server listening on ") {
                        url = Some(u.trim().to_string());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("wasmctl server did not announce its address within 120 s");
                }
            }
        }
        let url = url.expect("set");
        let kubeconfig = data_dir.join("kubeconfig.yaml");
        let kc = wasmctl_client::Kubeconfig::load(Some(&kubeconfig)).expect("kubeconfig written");
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(kc.ca_pem.as_ref().unwrap()).unwrap(),
            )
            .build()
            .unwrap();
        let listen_addr = url.trim_start_matches("https://").to_string();
        let s = ServerProc {
            child,
            data_dir: data_dir.to_path_buf(),
            url,
            kubeconfig,
            token: kc.token.clone().expect("token in kubeconfig"),
            http,
            extra,
            listen: listen_addr,
        };
        s.wait_ready().await;
        s
    }

    pub async fn wait_ready(&self) {
        let http = self.http.clone();
        let url = format!("{}/readyz", self.url);
        wait_for(
            Duration::from_secs(60),
            "the API server to answer /readyz",
            || {
                let http = http.clone();
                let url = url.clone();
                async move {
                    match http.get(&url).send().await {
                        Ok(r) if r.status().is_success() => Some(()),
                        _ => None,
                    }
                }
            },
        )
        .await;
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
        self.child.wait().expect("wait")
    }

    /// Start again on the same data directory and port.
    pub async fn restart(&mut self) {
        self.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let listen = self.listen.clone();
        let fresh = ServerProc::start_on(&self.data_dir.clone(), &listen, &extra).await;
        *self = fresh;
    }

    pub fn client(&self) -> wasmctl_client::Client {
        wasmctl_client::Client::from_kubeconfig(Some(&self.kubeconfig)).expect("client")
    }

    /// A raw request; returns the status code and the JSON body (Null if not JSON).
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        content_type: &str,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut rb = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb
                .header("content-type", content_type)
                .body(serde_json::to_vec(b).unwrap());
        }
        let resp = rb.send().await.expect("request sent");
        let code = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let token = self.token.clone();
        self.raw(method, path, body, "application/json", Some(&token))
            .await
    }

    /// Run the real binary as a client against this server.
    pub fn wasmctl(&self, args: &[&str]) -> std::process::Output {
        self.wasmctl_stdin(args, None)
    }

    pub fn wasmctl_stdin(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        use std::io::Write;
        let mut child = Command::new(bin())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wasmctl");
        {
            let mut sin = child.stdin.take().expect("stdin");
            if let Some(s) = stdin {
                sin.write_all(s.as_bytes()).expect("write stdin");
            }
        }
        child.wait_with_output().expect("wasmctl output")
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The built guest components (`wasi-apps/`), built once per test run with the
/// `wasm32-wasip2` target into `$WASI_APPS_TARGET` (default: `wasi-apps/target`).
pub fn wasi_app(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("wasi-apps");
        // In the clone, not the shared target dir: cargo re-links `release/NAME.wasm` only
        // when it rebuilds, so two clones sharing one target dir would see each other's builds.
        let target = std::env::var_os("WASI_APPS_TARGET")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let status = Command::new("cargo")
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--locked",
            ])
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS")
            .status()
            .expect("running cargo for wasi-apps");
        assert!(
            status.success(),
            "building wasi-apps failed (is the wasm32-wasip2 target installed?)"
        );
        target.join("wasm32-wasip2").join("release")
    });
    let p = dir.join(format!("{name}.wasm"));
    assert!(p.exists(), "{} was not built", p.display());
    p
}

/// A distinct pod CIDR (and node IP) per agent in this test process, so agents of tests
/// running in parallel never hand out the same pod IP.
pub fn next_node_octet() -> u8 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // 20..=249, skipping 127.96/16 and 127.97/16 (the default and the tests' service
    // ranges): an agent refuses a pod CIDR that overlaps them.
    const OCTETS: [u8; 228] = {
        let mut out = [0u8; 228];
        let (mut i, mut o) = (0, 20u8);
        while i < out.len() {
            if o != 96 && o != 97 {
                out[i] = o;
                i += 1;
            }
            o += 1;
        }
        out
    };
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as usize;
    OCTETS[n % OCTETS.len()]
}

/// A `wasmctl agent` child process.
pub struct AgentProc {
    pub child: Child,
    pub name: String,
    pub data_dir: PathBuf,
    pub octet: u8,
    /// Where its cluster DNS listens (UDP and TCP): an ephemeral port unless `extra` says
    /// `--dns-listen`.
    pub dns: std::net::SocketAddr,
    kubeconfig: PathBuf,
    extra: Vec<String>,
}

impl AgentProc {
    pub async fn start(
        server: &ServerProc,
        name: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> AgentProc {
        Self::start_with(
            server.kubeconfig.clone(),
            name,
            data_dir,
            next_node_octet(),
            extra.iter().map(|s| s.to_string()).collect(),
        )
        .await
    }

    async fn start_with(
        kubeconfig: PathBuf,
        name: &str,
        data_dir: &Path,
        octet: u8,
        extra: Vec<String>,
    ) -> AgentProc {
        let mut child = Command::new(bin())
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["agent", "--name", name, "--kubelet-port", "0"])
            // Agents share 127.0.0.1 unless `extra` gives one its own `--node-ip` (NodePorts
            // of two agents on one address would be the same sockets).
            .args(if extra.iter().any(|a| a.starts_with("--node-ip")) {
                &[][..]
            } else {
                &["--node-ip", "127.0.0.1"][..]
            })
            .arg("--pod-cidr")
            .arg(format!("127.{octet}.0.0/16"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(if extra.iter().any(|a| a.starts_with("--dns-listen")) {
                &[][..]
            } else {
                &["--dns-listen", "127.0.0.1:0"][..]
            })
            .args(&extra)
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn wasmctl agent");
        let rx = stdout_lines(&mut child);
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.starts_with("node agent") => {}
            other => {
                let _ = child.kill();
                panic!("wasmctl agent did not start: {other:?}");
            }
        }
        // The next line: "cluster DNS listening on IP:PORT (udp+tcp)".
        let dns = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => line
                .strip_prefix("cluster DNS listening on ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|addr| addr.parse().ok()),
            Err(_) => None,
        };
        let Some(dns) = dns else {
            let _ = child.kill();
            panic!("wasmctl agent did not announce its cluster DNS address");
        };
        AgentProc {
            child,
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            octet,
            dns,
            kubeconfig,
            extra,
        }
    }

    /// The node IP it was started with (`--node-ip` in `extra`, else 127.0.0.1).
    pub fn node_ip(&self) -> String {
        self.extra
            .iter()
            .position(|a| a == "--node-ip")
            .and_then(|i| self.extra.get(i + 1).cloned())
            .or_else(|| {
                self.extra
                    .iter()
                    .find_map(|a| a.strip_prefix("--node-ip=").map(str::to_string))
            })
            .unwrap_or_else(|| "127.0.0.1".into())
    }

    /// SIGKILL and start again with the same name, data dir and pod CIDR.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let fresh = Self::start_with(
            self.kubeconfig.clone(),
            &self.name.clone(),
            &self.data_dir.clone(),
            self.octet,
            self.extra.clone(),
        )
        .await;
        *self = fresh;
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Plain HTTP GET (pods serve HTTP on their pod IP); `None` on connection errors.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    let c = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .ok()?;
    let r = c.get(url).send().await.ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.unwrap_or_default()))
}

/// A server with a ClusterIP range of its own and agents each on a node IP of its own
/// (127.250.0.x), so that the NodePorts and ClusterIPs of tests running in parallel on this
/// host never collide.
pub async fn service_cluster(
    dir: &Path,
    agents: &[&str],
    server_extra: &[&str],
    agent_extra: &[&str],
) -> (ServerProc, Vec<AgentProc>) {
    let range = format!("127.97.{}.0/24", next_node_octet());
    let mut args = vec!["--service-cluster-ip-range", range.as_str()];
    args.extend_from_slice(server_extra);
    let server = ServerProc::start(&dir.join("server"), &args).await;
    let mut started = Vec::new();
    for name in agents {
        let ip = format!("127.250.0.{}", next_node_octet());
        let mut args = vec!["--node-ip", ip.as_str()];
        args.extend_from_slice(agent_extra);
        started.push(AgentProc::start(&server, name, &dir.join(name), &args).await);
    }
    (server, started)
}
