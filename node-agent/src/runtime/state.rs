//! The data of one Store: WASI and wasi:http contexts, the resource table, the Store's share of
//! the pod budget, and the pod it belongs to (for `localhost` routing and the pod IP).

use std::net::Ipv4Addr;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::fields::HeaderCharge;
use super::http::PodHttpHooks;
use super::limits::StoreLimiter;
use super::reach::{PodNet, StoreSockets};
use super::sockets::{PodAddr, ServiceLookup};

pub struct GuestState {
    pub wasi: WasiCtx,
    pub http: WasiHttpCtx,
    pub table: ResourceTable,
    pub limiter: StoreLimiter,
    pub hooks: PodHttpHooks,
    pub pod_ip: Ipv4Addr,
    /// Service names → ClusterIP for `ip-name-lookup` (absent until the agent's service
    /// router is installed).
    pub services: Option<ServiceLookup>,
    /// The pod's network policy and budgets.
    pub net: Arc<PodNet>,
    /// This Store's sockets (released when the Store is dropped).
    pub sockets: Arc<StoreSockets>,
    /// The header maps and handles its guest holds, charged to the pod ([`super::fields`]).
    pub headers: HeaderCharge,
    /// Its slot of the pod's live Stores (`--max-instances-per-pod`), held while it lives.
    pub instance: tokio::sync::OwnedSemaphorePermit,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl PodAddr for GuestState {
    fn pod_ip(&self) -> Ipv4Addr {
        self.pod_ip
    }
    fn service_lookup(&self) -> Option<ServiceLookup> {
        self.services.clone()
    }
    fn pod_net(&self) -> Option<(Arc<PodNet>, Arc<StoreSockets>)> {
        Some((self.net.clone(), self.sockets.clone()))
    }
}
