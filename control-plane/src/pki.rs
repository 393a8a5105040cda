//! First-start credentials: a cluster CA, the API server's certificate, the admin bearer
//! token, and the kubeconfig that `wasmctl` and `kubectl` read.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct Credentials {
    pub ca_pem: String,
    pub tls: Arc<rustls::ServerConfig>,
    pub token: String,
    pub kubeconfig_path: PathBuf,
}

/// Writes `contents` to `path` atomically (temp file, fsync, rename), readable by the owner only.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "wasmctl-ca");
    dn.push(DnType::OrganizationName, "wasmctl");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2025, 1, 1);
    p.not_after = rcgen::date_time_ymd(2035, 1, 1);
    Ok(p)
}

/// The names the server certificate must cover for `listen`.
fn sans_for(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let ip = listen.ip();
    if !ip.is_unspecified() {
        sans.push(ip.to_string());
    }
    if let Ok(h) = fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            sans.push(h.to_string());
        }
    }
    sans.extend(extra.iter().cloned());
    sans.sort();
    sans.dedup();
    sans
}

/// Load or create everything under `data_dir/pki`, (re)issue the server certificate when its
/// names no longer cover `listen`, and write `data_dir/kubeconfig.yaml`.
pub fn ensure(data_dir: &Path, listen: SocketAddr, extra_sans: &[String]) -> Result<Credentials> {
    let pki = data_dir.join("pki");
    fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    let ca_key_path = pki.join("ca.key");
    let ca_crt_path = pki.join("ca.crt");
    let srv_key_path = pki.join("server.key");
    let srv_crt_path = pki.join("server.crt");
    let sans_path = pki.join("server.sans");
    let token_path = pki.join("admin.token");

    let ca_key = if ca_key_path.exists() {
        KeyPair::from_pem(&fs::read_to_string(&ca_key_path)?).context("reading the CA key")?
    } else {
        let k = KeyPair::generate()?;
        write_private(&ca_key_path, &k.serialize_pem())?;
        k
    };
    // The CA certificate is re-derived from fixed parameters and the persistent key; the
    // PEM on disk is the one clients trust.
    let ca_cert = ca_params()?.self_signed(&ca_key)?;
    if !ca_crt_path.exists() {
        write_private(&ca_crt_path, &ca_cert.pem())?;
    }
    let ca_pem = fs::read_to_string(&ca_crt_path)?;

    let sans = sans_for(listen, extra_sans);
    let wanted = sans.join("\n");
    let current = fs::read_to_string(&sans_path).unwrap_or_default();
    if current != wanted || !srv_crt_path.exists() || !srv_key_path.exists() {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = sans
            .iter()
            .map(|s| match s.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(s.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "wasmctl-apiserver");
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.not_before = rcgen::date_time_ymd(2025, 1, 1);
        p.not_after = rcgen::date_time_ymd(2034, 1, 1);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
        write_private(&srv_key_path, &key.serialize_pem())?;
        write_private(&srv_crt_path, &cert.pem())?;
        write_private(&sans_path, &wanted)?;
    }

    let token = if token_path.exists() {
        fs::read_to_string(&token_path)?.trim().to_string()
    } else {
        let bytes: [u8; 32] = rand::random();
        let t: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&token_path, &t)?;
        t
    };

    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut fs::read_to_string(&srv_crt_path)?.as_bytes())
            .collect::<Result<_, _>>()
            .context("reading the server certificate")?;
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut fs::read_to_string(&srv_key_path)?.as_bytes())
            .context("reading the server key")?
            .context("no private key in server.key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let kubeconfig_path = data_dir.join("kubeconfig.yaml");
    write_private(&kubeconfig_path, &kubeconfig(listen, &ca_pem, &token))?;

    Ok(Credentials {
        ca_pem,
        tls: Arc::new(tls),
        token,
        kubeconfig_path,
    })
}

/// The URL clients use for a listen address (`0.0.0.0` is reached via loopback).
pub fn server_url(listen: SocketAddr) -> String {
    let ip = if listen.ip().is_unspecified() {
        "127.0.0.1".parse().expect("valid ip")
    } else {
        listen.ip()
    };
    SocketAddr::new(ip, listen.port()).to_string()
}

fn kubeconfig(listen: SocketAddr, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: wasmctl
  cluster:
    server: https://{}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: wasmctl
  context:
    cluster: wasmctl
    user: admin
    namespace: default
current-context: wasmctl
preferences: {{}}
",
        server_url(listen)
    )
}

/// An HTTPS client that trusts only the cluster CA in `ca_pem` (for server-to-server calls).
pub fn client_with_ca(ca_pem: &[u8]) -> Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(ca_pem).context("reading the cluster CA")?;
    reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
        .context("building the cluster HTTPS client")
}

/// Installs the cluster CA (certificate verbatim, so its hash stays the token's) and the
/// admin token a joining server received; [`ensure`] then issues this server's own
/// certificate from it. Refuses a data dir that already has another CA.
pub fn install_joined(
    data_dir: &Path,
    ca_crt: &str,
    ca_key: &str,
    admin_token: &str,
) -> Result<()> {
    let pki = data_dir.join("pki");
    fs::create_dir_all(&pki).with_context(|| format!("creating {}", pki.display()))?;
    let ca_crt_path = pki.join("ca.crt");
    if let Ok(existing) = fs::read_to_string(&ca_crt_path) {
        if existing != ca_crt {
            anyhow::bail!(
                "{} holds another cluster's CA; refusing to overwrite it (use an empty data dir \
                 to join)",
                ca_crt_path.display()
            );
        }
    }
    KeyPair::from_pem(ca_key).context("the CA key received when joining")?;
    write_private(&pki.join("ca.key"), ca_key)?;
    write_private(&ca_crt_path, ca_crt)?;
    write_private(&pki.join("admin.token"), admin_token)?;
    // The serving certificate must be re-issued by this CA.
    for stale in ["server.crt", "server.key", "server.sans"] {
        let _ = fs::remove_file(pki.join(stale));
    }
    Ok(())
}
