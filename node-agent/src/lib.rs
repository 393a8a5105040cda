//! The wasmctl node agent (kubelet): registers its Node, renews its Lease, watches the pods
//! bound to it and runs them in wasmtime.
//!
//! Not implemented yet: this crate is the placeholder in the workspace layout. The runtime,
//! the agent loop and `wasmctl agent` arrive with the node-agent issue (#3).
