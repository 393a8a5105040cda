//! The wasmctl control plane: the generic object registry on top of the Raft-replicated
//! store, and the Kubernetes-shaped HTTPS API server in front of it.

pub mod allocator;
pub mod apiserver;
pub mod cluster;
pub mod controllers;
pub mod error;
pub mod modules;
pub mod objects;
pub mod patch;
pub mod pki;
pub mod scheduler;
pub mod scheduling;
pub mod server;

pub use allocator::{Ipv4Cidr, PortRange, ServiceRanges};
pub use error::ApiError;
pub use objects::Objects;
pub use server::{ClusterMode, Server, ServerConfig};
