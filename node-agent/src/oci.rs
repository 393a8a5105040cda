//! Pulling and pushing Wasm components as OCI artifacts.
//!
//! Pods may name their module by registry reference (`127.0.0.1:5000/apps/hello:v1`,
//! `ghcr.io/org/app@sha256:…`) instead of an inline or locally stored module. This module speaks
//! the OCI Distribution API through [`oci_client`] and uses the CNCF TAG Runtime
//! "Wasm OCI Artifact" layout, the one `wkg`, `oci-wasm`, Spin and wasmCloud produce:
//!
//! * an ordinary OCI image manifest (`application/vnd.oci.image.manifest.v1+json`);
//! * a config blob of media type [`WASM_CONFIG_MEDIA_TYPE`] (`application/vnd.wasm.config.v0+json`)
//!   holding `{"created", "architecture": "wasm", "os": "wasip1"|"wasip2", "layerDigests"}`;
//! * exactly one layer of media type [`WASM_LAYER_MEDIA_TYPE`] (`application/wasm`), the raw
//!   `.wasm` bytes.
//!
//! On pull the older `wasm-to-oci` layer type ([`LEGACY_WASM_LAYER_MEDIA_TYPE`],
//! `application/vnd.wasm.content.layer.v1+wasm`) is accepted too; the config blob is not read at
//! all, so its media type does not matter.
//!
//! Access is anonymous. Registries listed as insecure are reached over plain HTTP (loopback
//! registries in tests); everything else over HTTPS with the webpki roots.
//!
//! Note: `oci_client::manifest::{WASM_LAYER_MEDIA_TYPE, WASM_CONFIG_MEDIA_TYPE}` are *not* the
//! CNCF types: they are the legacy `wasm-to-oci` ones (`…content.layer.v1+wasm`,
//! `…config.v1+json`). That is why this module defines its own constants.

use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{
    ImageIndexEntry, OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

/// Media type of the single layer holding the `.wasm` bytes (CNCF Wasm OCI artifact).
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Media type of the config blob of a CNCF Wasm OCI artifact.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Layer media type of the older `wasm-to-oci` format; accepted on pull, never produced.
pub const LEGACY_WASM_LAYER_MEDIA_TYPE: &str = oci_client::manifest::WASM_LAYER_MEDIA_TYPE;

/// `created` timestamp written into pushed configs. Fixed (the Unix epoch, as reproducible
/// builds do with `SOURCE_DATE_EPOCH=0`) so that pushing the same bytes twice yields the same
/// config and therefore the same manifest digest.
const CONFIG_CREATED: &str = "1970-01-01T00:00:00Z";

/// Bound on establishing a TCP/TLS connection to a registry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on each individual read from a registry (not on the whole transfer).
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors from resolving, pulling or pushing a Wasm OCI artifact. Every variant carries the image
/// reference as the user wrote it, then a human-readable reason.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The image string is not a valid OCI reference (or is unusable for the operation).
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    /// The registry refused or failed a pull (manifest or blob).
    #[error("pull {0}: {1}")]
    Pull(String, String),
    /// The registry refused or failed a push.
    #[error("push {0}: {1}")]
    Push(String, String),
    /// The artifact was fetched but is not an acceptable Wasm artifact (no wasm layer, too big,
    /// digest mismatch, …).
    #[error("{0}: {1}")]
    Invalid(String, String),
}

/// Whether `image` names a registry explicitly, i.e. whether its first `/`-separated component
/// is a registry host rather than a repository path component.
///
/// This is docker's rule (`splitDockerDomain` in `distribution/reference`): the first component
/// is a host when it contains a `.` or a `:`, is exactly `localhost`, or contains an upper-case
/// letter (repository path components must be lower case, so only a host can). A name without any
/// `/` is never a registry reference.
///
/// ```text
/// 127.0.0.1:5000/apps/hello:v1   -> true
/// ghcr.io/x/y@sha256:…           -> true
/// localhost/hello:v1             -> true
/// hello:v1, hello@sha256:…       -> false
/// library/hello:v1               -> false   (docker would expand this to docker.io)
/// ```
pub fn is_registry_reference(image: &str) -> bool {
    let Some((first, rest)) = image.split_once('/') else {
        return false;
    };
    if first.is_empty() || rest.is_empty() {
        return false;
    }
    first.contains('.')
        || first.contains(':')
        || first == "localhost"
        || first.chars().any(|c| c.is_ascii_uppercase())
}

/// Client for pulling (and, for tests and tooling, pushing) Wasm OCI artifacts.
///
/// Cheap to clone: the underlying [`oci_client::Client`] shares its connection pool and token
/// cache between clones.
#[derive(Clone)]
pub struct OciPuller {
    client: Client,
}

impl std::fmt::Debug for OciPuller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OciPuller").finish_non_exhaustive()
    }
}

impl OciPuller {
    /// Creates a client.
    ///
    /// `insecure_hosts`: registries reached over plain HTTP (loopback registries in tests);
    /// everything else is HTTPS. Entries are compared verbatim against the reference's registry
    /// component, *including the port*: `127.0.0.1:5000`, not `127.0.0.1`.
    pub fn new(insecure_hosts: Vec<String>) -> Self {
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure_hosts),
            // A multi-platform index of Wasm artifacts is keyed by `wasm`/`wasip*`, never by the
            // host's os/arch, so the default host-platform resolver would never match.
            platform_resolver: Some(Box::new(wasm_platform_resolver)),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..ClientConfig::default()
        };
        OciPuller {
            client: Client::new(config),
        }
    }

    /// Pulls the single `application/wasm` layer of the artifact, anonymously. Returns
    /// `(bytes, layer digest "sha256:<hex>")`.
    ///
    /// The manifest must list exactly one Wasm layer (other layers are ignored); its declared
    /// size must not exceed `max_bytes`, and the download is cut off as soon as it exceeds the
    /// declared size, so a lying registry cannot make this buffer more than `max_bytes`. The
    /// downloaded bytes' sha256 must equal the manifest's layer digest (only `sha256` layer
    /// digests are accepted).
    pub async fn pull_wasm(
        &self,
        image: &str,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, String), OciError> {
        let reference = parse_reference(image)?;
        let pull_err = |e: oci_client::errors::OciDistributionError| {
            OciError::Pull(image.to_string(), e.to_string())
        };
        let invalid = |msg: String| OciError::Invalid(image.to_string(), msg);

        let (manifest, _manifest_digest) = self
            .client
            .pull_image_manifest(&reference, &RegistryAuth::Anonymous)
            .await
            .map_err(pull_err)?;

        let layer = select_wasm_layer(&manifest).map_err(invalid)?;
        let expected_hex = layer
            .digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_ascii_lowercase)
            .ok_or_else(|| {
                invalid(format!(
                    "wasm layer digest {:?} is not a sha256 digest",
                    layer.digest
                ))
            })?;
        let declared = u64::try_from(layer.size)
            .map_err(|_| invalid(format!("wasm layer has negative size {}", layer.size)))?;
        if declared > max_bytes {
            return Err(invalid(format!(
                "wasm layer is {declared} bytes, more than the {max_bytes}-byte limit"
            )));
        }
        // `declared <= max_bytes`; the capacity is only a hint, so cap it against absurd limits.
        let capacity = usize::try_from(declared.min(64 << 20)).unwrap_or(0);

        let mut stream = self
            .client
            .pull_blob_stream(&reference, layer)
            .await
            .map_err(pull_err)?;
        let mut data: Vec<u8> = Vec::with_capacity(capacity);
        let mut hasher = Sha256::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                OciError::Pull(image.to_string(), format!("reading wasm layer: {e}"))
            })?;
            let total = data.len() as u64 + chunk.len() as u64;
            if total > declared {
                return Err(invalid(format!(
                    "wasm layer body exceeds its declared size of {declared} bytes"
                )));
            }
            hasher.update(&chunk);
            data.extend_from_slice(&chunk);
        }
        if data.len() as u64 != declared {
            return Err(invalid(format!(
                "wasm layer body is {} bytes, manifest declares {declared}",
                data.len()
            )));
        }
        let actual_hex = hex::encode(hasher.finalize());
        if actual_hex != expected_hex {
            return Err(invalid(format!(
                "wasm layer digest mismatch: manifest says sha256:{expected_hex}, content is sha256:{actual_hex}"
            )));
        }
        Ok((data, format!("sha256:{actual_hex}")))
    }

    /// Pushes `wasm` as a Wasm artifact to `image` (anonymous auth). Returns the manifest URL
    /// oci-client reports (the registry's `Location` header, e.g.
    /// `http://127.0.0.1:5000/v2/apps/hello/manifests/sha256:…`).
    ///
    /// The config's `os` is `wasip2` when `wasm` carries the component-model binary header and
    /// `wasip1` otherwise. `image` must carry a tag (or none, meaning `latest`): a digest-only
    /// reference is rejected because the manifest's digest is not known in advance.
    pub async fn push_wasm(&self, image: &str, wasm: Vec<u8>) -> Result<String, OciError> {
        let reference = parse_reference(image)?;
        if reference.digest().is_some() {
            return Err(OciError::Reference(
                image.to_string(),
                "pushing needs a tag, not a digest".to_string(),
            ));
        }

        let layer_digest = format!("sha256:{}", hex::encode(Sha256::digest(&wasm)));
        let config_json = serde_json::json!({
            "created": CONFIG_CREATED,
            "architecture": "wasm",
            "os": if is_component(&wasm) { "wasip2" } else { "wasip1" },
            "layerDigests": [layer_digest],
        });
        let config_bytes = serde_json::to_vec(&config_json)
            .map_err(|e| OciError::Push(image.to_string(), format!("encoding config: {e}")))?;
        let config = Config::new(config_bytes, WASM_CONFIG_MEDIA_TYPE.to_string(), None);
        let layers = [ImageLayer::new(
            wasm,
            WASM_LAYER_MEDIA_TYPE.to_string(),
            None,
        )];

        let mut manifest = OciImageManifest::build(&layers, &config, None);
        manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.to_string());

        let response = self
            .client
            .push(
                &reference,
                &layers,
                config,
                &RegistryAuth::Anonymous,
                Some(manifest),
            )
            .await
            .map_err(|e| OciError::Push(image.to_string(), e.to_string()))?;
        Ok(response.manifest_url)
    }
}

/// Parses `image` as an OCI reference (`hello:v1` normalises to `docker.io/library/hello:v1`).
fn parse_reference(image: &str) -> Result<Reference, OciError> {
    image
        .parse::<Reference>()
        .map_err(|e| OciError::Reference(image.to_string(), e.to_string()))
}

/// Whether a layer media type carries raw Wasm bytes.
fn is_wasm_layer_type(media_type: &str) -> bool {
    media_type == WASM_LAYER_MEDIA_TYPE || media_type == LEGACY_WASM_LAYER_MEDIA_TYPE
}

/// The manifest's one Wasm layer; an error message when there is none or more than one.
fn select_wasm_layer(manifest: &OciImageManifest) -> Result<&OciDescriptor, String> {
    let mut wasm_layers = manifest
        .layers
        .iter()
        .filter(|l| is_wasm_layer_type(&l.media_type));
    let Some(layer) = wasm_layers.next() else {
        let found: Vec<&str> = manifest
            .layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect();
        return Err(format!(
            "not a Wasm artifact: no layer of media type {WASM_LAYER_MEDIA_TYPE} (layers: {found:?})"
        ));
    };
    if wasm_layers.next().is_some() {
        return Err("ambiguous Wasm artifact: more than one wasm layer".to_string());
    }
    Ok(layer)
}

/// Picks the first entry of an image index whose platform architecture is `wasm`.
fn wasm_platform_resolver(manifests: &[ImageIndexEntry]) -> Option<String> {
    manifests
        .iter()
        .find(|entry| {
            entry
                .platform
                .as_ref()
                .is_some_and(|p| p.architecture == "wasm")
        })
        .map(|entry| entry.digest.clone())
}

/// Whether `wasm` starts with the component-model binary header (`\0asm`, a version, then layer
/// `1`) rather than a core module's (`\0asm` `01 00 00 00`).
fn is_component(wasm: &[u8]) -> bool {
    wasm.len() >= 8 && wasm[0..4] == *b"\0asm" && wasm[6..8] == [0x01, 0x00]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_references() {
        assert!(is_registry_reference("127.0.0.1:5000/apps/hello:v1"));
        assert!(is_registry_reference("127.0.0.1:5000/hello"));
        assert!(is_registry_reference("ghcr.io/x/y@sha256:0123456789abcdef"));
        assert!(is_registry_reference("ghcr.io/x/y:v1"));
        assert!(is_registry_reference("localhost/hello:v1"));
        assert!(is_registry_reference("localhost:5000/hello"));
        assert!(is_registry_reference("[::1]:5000/hello"));
        assert!(is_registry_reference("MyRegistry/hello"));
    }

    #[test]
    fn not_registry_references() {
        assert!(!is_registry_reference("hello"));
        assert!(!is_registry_reference("hello:v1"));
        assert!(!is_registry_reference("hello@sha256:0123456789abcdef"));
        assert!(!is_registry_reference("library/hello:v1"));
        assert!(!is_registry_reference("apps/hello"));
        assert!(!is_registry_reference("localhostx/hello"));
        assert!(!is_registry_reference(""));
        assert!(!is_registry_reference("/hello"));
        assert!(!is_registry_reference("ghcr.io/"));
    }

    #[test]
    fn component_header_detection() {
        assert!(is_component(b"\0asm\x0d\x00\x01\x00"));
        assert!(!is_component(b"\0asm\x01\x00\x00\x00"));
        assert!(!is_component(b"\0asm"));
        assert!(!is_component(b"not wasm"));
    }

    fn descriptor(media_type: &str) -> OciDescriptor {
        OciDescriptor {
            media_type: media_type.to_string(),
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 8,
            ..Default::default()
        }
    }

    #[test]
    fn wasm_layer_selection() {
        let mut manifest = OciImageManifest::default();
        assert!(select_wasm_layer(&manifest).is_err());
        manifest
            .layers
            .push(descriptor("application/vnd.oci.image.layer.v1.tar"));
        assert!(select_wasm_layer(&manifest).is_err());
        manifest.layers.push(descriptor(WASM_LAYER_MEDIA_TYPE));
        assert_eq!(
            select_wasm_layer(&manifest).map(|l| l.media_type.as_str()),
            Ok(WASM_LAYER_MEDIA_TYPE)
        );
        manifest
            .layers
            .push(descriptor(LEGACY_WASM_LAYER_MEDIA_TYPE));
        assert!(select_wasm_layer(&manifest).is_err());
    }

    #[test]
    fn legacy_layer_type_accepted() {
        let mut manifest = OciImageManifest::default();
        manifest
            .layers
            .push(descriptor(LEGACY_WASM_LAYER_MEDIA_TYPE));
        assert!(select_wasm_layer(&manifest).is_ok());
    }

    #[test]
    fn bad_reference_is_reference_error() {
        let err = parse_reference("UPPER/Case:v1").err();
        assert!(matches!(err, Some(OciError::Reference(..))), "{err:?}");
    }
}
