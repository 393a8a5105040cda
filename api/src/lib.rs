//! Kubernetes-shaped API types for wasmctl, shared by the API server, the node agent and the
//! CLI: the wire types of every kind, quantities, selectors, defaulting and validation, the
//! resource table, and server-side table printing.
//!
//! This crate is pure: no I/O, no async, no HTTP. Everything here is unit-tested in place.

pub mod apps;
pub mod coordination;
pub mod core;
pub mod meta;
pub mod quantity;
pub mod registry;
pub mod selector;
pub mod table;
pub mod validation;

pub use meta::{ObjectMeta, Status, Time};
pub use quantity::Quantity;
pub use registry::{ResourceInfo, RESOURCES};
pub use selector::{FieldSelector, Selector};
pub use validation::{normalize, FieldError, Invalid};

/// Well-known annotation and label keys.
pub mod keys {
    pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
    pub const REVISION: &str = "deployment.kubernetes.io/revision";
    pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
    pub const HOSTNAME: &str = "kubernetes.io/hostname";
    pub const ARCH: &str = "kubernetes.io/arch";
    pub const OS: &str = "kubernetes.io/os";
}
