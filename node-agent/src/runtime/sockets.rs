//! Pod loopback: every pod gets its own "pod IP" in 127.0.0.0/8 (Linux routes all of 127/8 to
//! `lo`, no setup needed), and its components see that address as `127.0.0.1`.
//!
//! Design: wasmtime-wasi's `socket_addr_check` can only allow or deny, so [`add_to_linker`]
//! shadows the `wasi:sockets/{tcp,udp,ip-name-lookup}` host functions that `p2::add_to_linker_async`
//! registered with a newtype view (`PodSocketsView` = wasmtime-wasi's `WasiSocketsCtxView` + the
//! pod IP). Every method delegates to wasmtime-wasi's own implementation; only addresses are
//! rewritten: guest → host (`to_host`, `bind_to_host`) *before* delegating, so wasmtime-wasi's
//! validation and the embedder's `socket_addr_check` see the real (pod IP) address, and host →
//! guest (`to_guest`) on everything reported back. Sockets, streams and the resource table stay
//! wasmtime-wasi's; nothing here touches a file descriptor.
//!
//! The shadows also keep the pod's books ([`super::reach`]): every socket takes one of the
//! pod's socket budget from its creation (or its acceptance) until it is dropped (over budget: `new-socket-limit`), a listening TCP
//! socket or a bound UDP socket records its port (so connects to the pod IP reach only ports
//! the pod really serves), and name lookups follow the pod's egress (see `resolve_addresses`).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::task::{Context, Poll, Waker};

use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource};
use wasmtime_wasi::p2::bindings::sockets::network::{ErrorCode, IpSocketAddress};
use wasmtime_wasi::p2::bindings::sockets::{
    ip_name_lookup, network, tcp, tcp_create_socket, udp, udp_create_socket,
};
use wasmtime_wasi::p2::{SocketError, SocketResult};
use wasmtime_wasi::sockets::{WasiSocketsCtxView, WasiSocketsView};
use wasmtime_wasi::WasiView;

use super::reach::{may_be_service, Egress, PodNet, SocketClaim, StoreSockets, Transport};

/// Implemented by the store data of a pod's component.
pub trait PodAddr {
    /// The pod's loopback identity, in 127.0.0.0/8 (e.g. `127.1.0.7`).
    fn pod_ip(&self) -> Ipv4Addr;
    /// Resolves Service names (`web`, `web.shop`, `web.shop.svc.cluster.local`, seen from
    /// this pod's namespace) to their ClusterIP, for `ip-name-lookup`.
    fn service_lookup(&self) -> Option<ServiceLookup> {
        None
    }
    /// The pod's network policy and budgets, and this Store's claims on them.
    fn pod_net(&self) -> Option<(Arc<PodNet>, Arc<StoreSockets>)> {
        None
    }
}

/// A Service name → ClusterIP resolver (see [`PodAddr::service_lookup`]).
pub type ServiceLookup = std::sync::Arc<dyn Fn(&str) -> Option<Ipv4Addr> + Send + Sync>;

/// Re-registers the `wasi:sockets/{tcp,udp,ip-name-lookup}` interfaces with pod-loopback
/// rewriting. Call after `wasmtime_wasi::p2::add_to_linker_async(linker)`; sets
/// `linker.allow_shadowing(true)` for the duration and restores it to false.
///
/// `tcp-create-socket` and `udp-create-socket` are shadowed too (a socket takes one of the
/// pod's budget from its creation: wasmtime-wasi opens the OS socket there); `network` and
/// `instance-network` are left as wasmtime-wasi registered them.
pub fn add_to_linker<T>(linker: &mut Linker<T>) -> wasmtime::Result<()>
where
    T: WasiView + PodAddr + Send + 'static,
{
    linker.allow_shadowing(true);
    let result = add_interfaces(linker);
    linker.allow_shadowing(false);
    result
}

fn add_interfaces<T>(linker: &mut Linker<T>) -> wasmtime::Result<()>
where
    T: WasiView + PodAddr + Send + 'static,
{
    tcp_create_socket::add_to_linker::<T, PodSockets>(linker, pod_sockets::<T>)?;
    udp_create_socket::add_to_linker::<T, PodSockets>(linker, pod_sockets::<T>)?;
    tcp::add_to_linker::<T, PodSockets>(linker, pod_sockets::<T>)?;
    udp::add_to_linker::<T, PodSockets>(linker, pod_sockets::<T>)?;
    ip_name_lookup::add_to_linker::<T, PodSockets>(linker, pod_sockets::<T>)?;
    Ok(())
}

/// The guest-visible loopback address.
const GUEST_LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Which kind of socket a local (bind) address is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    Tcp,
    Udp,
}

/// Maps a guest *destination* address (connect, UDP `stream`/`send`) to the real one.
///
/// - `127.0.0.1:P` → `POD_IP:P`;
/// - `[::1]:P` → `Err(connection-refused)`: IPv6 sockets are `IPV6_V6ONLY` in wasmtime-wasi and
///   IPv4-mapped addresses are rejected, so an IPv6 socket can never reach the IPv4 pod IP; the
///   pod behaves like one where nothing listens on `::1` (clients fall back to `127.0.0.1`);
/// - everything else unchanged (`0.0.0.0`/`::` stay, so wasmtime-wasi rejects them as
///   `invalid-argument` exactly as the WASI spec says; other addresses, other pods' IPs included,
///   go to the embedder's `socket_addr_check`).
pub(crate) fn to_host(addr: SocketAddr, pod_ip: Ipv4Addr) -> Result<SocketAddr, ErrorCode> {
    match addr {
        SocketAddr::V4(v4) if *v4.ip() == GUEST_LOOPBACK => {
            Ok(SocketAddr::V4(SocketAddrV4::new(pod_ip, v4.port())))
        }
        SocketAddr::V6(v6) if v6.ip().is_loopback() => Err(ErrorCode::ConnectionRefused),
        other => Ok(other),
    }
}

/// Maps a guest *local* (bind) address to the real one.
///
/// - `127.0.0.1:P` → `POD_IP:P`;
/// - `0.0.0.0:P` → `POD_IP:P` (so two pods binding the same port never collide and nothing
///   listens outside the pod), except UDP `0.0.0.0:0`, which stays: WASI 0.2 makes UDP clients
///   bind before sending, and an ephemeral wildcard bind is how they reach the outside world
///   (a socket bound to a 127/8 address can only talk over `lo`); ephemeral ports never collide;
/// - `[::1]:P` and `[::]:P` → `Err(address-not-bindable)` (an IPv6 socket cannot be bound to the
///   IPv4 pod IP, and the real `::1`/`::` are shared by every pod), except UDP `[::]:0`, which
///   stays for the same reason as UDP `0.0.0.0:0`;
/// - everything else unchanged (left to the embedder's `socket_addr_check`).
pub(crate) fn bind_to_host(
    addr: SocketAddr,
    pod_ip: Ipv4Addr,
    proto: Proto,
) -> Result<SocketAddr, ErrorCode> {
    let ephemeral_udp_wildcard =
        proto == Proto::Udp && addr.port() == 0 && addr.ip().is_unspecified();
    match addr {
        _ if ephemeral_udp_wildcard => Ok(addr),
        SocketAddr::V4(v4) if *v4.ip() == GUEST_LOOPBACK || v4.ip().is_unspecified() => {
            Ok(SocketAddr::V4(SocketAddrV4::new(pod_ip, v4.port())))
        }
        SocketAddr::V6(v6) if v6.ip().is_loopback() || v6.ip().is_unspecified() => {
            Err(ErrorCode::AddressNotBindable)
        }
        other => Ok(other),
    }
}

/// Maps a real address reported to the guest (local/remote address, UDP datagram source) back:
/// `POD_IP:P` → `127.0.0.1:P`; everything else, `127.0.0.1` included, unchanged.
pub(crate) fn to_guest(addr: SocketAddr, pod_ip: Ipv4Addr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) if *v4.ip() == pod_ip => {
            SocketAddr::V4(SocketAddrV4::new(GUEST_LOOPBACK, v4.port()))
        }
        other => other,
    }
}

/// `localhost`, `localhost.` and `*.localhost` (RFC 6761), case-insensitively.
pub(crate) fn is_localhost(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// `HasData` marker for the linker: its data is a `PodSocketsView`.
struct PodSockets;

impl HasData for PodSockets {
    type Data<'a> = PodSocketsView<'a>;
}

/// wasmtime-wasi's sockets view plus the pod IP.
struct PodSocketsView<'a> {
    inner: WasiSocketsCtxView<'a>,
    pod_ip: Ipv4Addr,
    services: Option<ServiceLookup>,
    net: Option<(Arc<PodNet>, Arc<StoreSockets>)>,
}

fn pod_sockets<T: WasiView + PodAddr>(t: &mut T) -> PodSocketsView<'_> {
    let pod_ip = t.pod_ip();
    let services = t.service_lookup();
    let net = t.pod_net();
    PodSocketsView {
        inner: t.sockets(),
        pod_ip,
        services,
        net,
    }
}

impl PodSocketsView<'_> {
    /// One socket of the pod's budget for a socket about to be created.
    fn claim_new(&self) -> SocketResult<Option<SocketClaim>> {
        match &self.net {
            Some((net, _)) => Ok(Some(net.claim_socket().ok_or(ErrorCode::NewSocketLimit)?)),
            None => Ok(None),
        }
    }

    fn keep(&self, rep: u32, claim: Option<SocketClaim>) {
        if let (Some((_, store)), Some(c)) = (&self.net, claim) {
            store.insert(rep, c);
        }
    }

    fn release(&self, rep: u32) {
        if let Some((_, store)) = &self.net {
            store.release(rep);
        }
    }

    /// Records the port socket `rep` is bound to, when that is the pod IP.
    fn record_port(&self, rep: u32, transport: Transport, local: SocketAddr) {
        if let Some((_, store)) = &self.net {
            // A wildcard UDP bind (`0.0.0.0:0`, kept for egress) also receives at the pod IP.
            if local.ip() == IpAddr::V4(self.pod_ip) || local.ip().is_unspecified() {
                store.set_port(rep, transport, local.port());
            }
        }
    }

    fn guest(&self, addr: IpSocketAddress) -> IpSocketAddress {
        to_guest(addr.into(), self.pod_ip).into()
    }

    /// Before an unbound TCP socket connects over loopback, binds it to `POD_IP:0` so the
    /// connection's source is the pod IP rather than the kernel's default `127.0.0.1`: a server
    /// in this pod then sees `127.0.0.1` (mapped back), one in another pod sees this pod's IP,
    /// and only non-pod clients show up as `127.0.0.1`. Best effort: any failure (already bound,
    /// an IPv6 socket, a bind the `socket_addr_check` denies or does not answer at once) leaves
    /// the socket as it was and the kernel picks the source as usual.
    fn bind_loopback_source(
        &mut self,
        this: &Resource<tcp::TcpSocket>,
        network: &Resource<tcp::Network>,
    ) {
        let local = IpSocketAddress::from(SocketAddr::V4(SocketAddrV4::new(self.pod_ip, 0)));
        let bound = {
            let fut = tcp::HostTcpSocket::start_bind(
                &mut self.inner,
                Resource::new_borrow(this.rep()),
                Resource::new_borrow(network.rep()),
                local,
            );
            let mut fut = std::pin::pin!(fut);
            // `start_bind` only awaits the embedder's address check; a pending check is
            // dropped before anything was bound.
            matches!(
                fut.as_mut().poll(&mut Context::from_waker(Waker::noop())),
                Poll::Ready(Ok(()))
            )
        };
        if bound {
            let _ =
                tcp::HostTcpSocket::finish_bind(&mut self.inner, Resource::new_borrow(this.rep()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// wasi:sockets/network: not re-registered, but the tcp/udp/ip-name-lookup host traits require it
// (error-code conversion); plain delegation.

impl network::Host for PodSocketsView<'_> {
    fn convert_error_code(&mut self, error: SocketError) -> wasmtime::Result<network::ErrorCode> {
        network::Host::convert_error_code(&mut self.inner, error)
    }

    fn network_error_code(
        &mut self,
        err: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<network::ErrorCode>> {
        network::Host::network_error_code(&mut self.inner, err)
    }
}

impl network::HostNetwork for PodSocketsView<'_> {
    fn drop(&mut self, this: Resource<network::Network>) -> wasmtime::Result<()> {
        network::HostNetwork::drop(&mut self.inner, this)
    }
}

// ---------------------------------------------------------------------------------------------
// wasi:sockets/{tcp,udp}-create-socket: the socket's budget is taken before it exists.

impl tcp_create_socket::Host for PodSocketsView<'_> {
    fn create_tcp_socket(
        &mut self,
        address_family: network::IpAddressFamily,
    ) -> SocketResult<Resource<tcp::TcpSocket>> {
        let claim = self.claim_new()?;
        let sock = tcp_create_socket::Host::create_tcp_socket(&mut self.inner, address_family)?;
        self.keep(sock.rep(), claim);
        Ok(sock)
    }
}

impl udp_create_socket::Host for PodSocketsView<'_> {
    async fn create_udp_socket(
        &mut self,
        address_family: network::IpAddressFamily,
    ) -> SocketResult<Resource<udp::UdpSocket>> {
        let claim = self.claim_new()?;
        let sock =
            udp_create_socket::Host::create_udp_socket(&mut self.inner, address_family).await?;
        self.keep(sock.rep(), claim);
        Ok(sock)
    }
}

// ---------------------------------------------------------------------------------------------
// wasi:sockets/tcp

impl tcp::Host for PodSocketsView<'_> {}

impl tcp::HostTcpSocket for PodSocketsView<'_> {
    async fn start_bind(
        &mut self,
        this: Resource<tcp::TcpSocket>,
        network: Resource<tcp::Network>,
        local_address: tcp::IpSocketAddress,
    ) -> SocketResult<()> {
        let local = bind_to_host(local_address.into(), self.pod_ip, Proto::Tcp)?;
        tcp::HostTcpSocket::start_bind(&mut self.inner, this, network, local.into()).await
    }

    fn finish_bind(&mut self, this: Resource<tcp::TcpSocket>) -> SocketResult<()> {
        tcp::HostTcpSocket::finish_bind(&mut self.inner, this)
    }

    fn start_connect(
        &mut self,
        this: Resource<tcp::TcpSocket>,
        network: Resource<tcp::Network>,
        remote_address: tcp::IpSocketAddress,
    ) -> SocketResult<()> {
        let remote = to_host(remote_address.into(), self.pod_ip)?;
        if let SocketAddr::V4(v4) = remote {
            if v4.ip().is_loopback() && v4.port() != 0 {
                self.bind_loopback_source(&this, &network);
            }
        }
        tcp::HostTcpSocket::start_connect(&mut self.inner, this, network, remote.into())
    }

    fn finish_connect(
        &mut self,
        this: Resource<tcp::TcpSocket>,
    ) -> SocketResult<(Resource<tcp::InputStream>, Resource<tcp::OutputStream>)> {
        tcp::HostTcpSocket::finish_connect(&mut self.inner, this)
    }

    async fn start_listen(&mut self, this: Resource<tcp::TcpSocket>) -> SocketResult<()> {
        tcp::HostTcpSocket::start_listen(&mut self.inner, this).await
    }

    fn finish_listen(&mut self, this: Resource<tcp::TcpSocket>) -> SocketResult<()> {
        let rep = this.rep();
        tcp::HostTcpSocket::finish_listen(&mut self.inner, Resource::new_borrow(rep))?;
        if let Ok(local) = tcp::HostTcpSocket::local_address(&mut self.inner, this) {
            self.record_port(rep, Transport::Tcp, local.into());
        }
        Ok(())
    }

    fn accept(
        &mut self,
        this: Resource<tcp::TcpSocket>,
    ) -> SocketResult<(
        Resource<tcp::TcpSocket>,
        Resource<tcp::InputStream>,
        Resource<tcp::OutputStream>,
    )> {
        let (sock, rx, tx) = tcp::HostTcpSocket::accept(&mut self.inner, this)?;
        match self.claim_new() {
            Ok(claim) => {
                self.keep(sock.rep(), claim);
                Ok((sock, rx, tx))
            }
            Err(e) => {
                // Over the pod's socket budget: close the new connection at once.
                let _ = self.inner.table.delete(rx);
                let _ = self.inner.table.delete(tx);
                let _ = tcp::HostTcpSocket::drop(&mut self.inner, sock);
                Err(e)
            }
        }
    }

    fn local_address(
        &mut self,
        this: Resource<tcp::TcpSocket>,
    ) -> SocketResult<tcp::IpSocketAddress> {
        let addr = tcp::HostTcpSocket::local_address(&mut self.inner, this)?;
        Ok(self.guest(addr))
    }

    fn remote_address(
        &mut self,
        this: Resource<tcp::TcpSocket>,
    ) -> SocketResult<tcp::IpSocketAddress> {
        let addr = tcp::HostTcpSocket::remote_address(&mut self.inner, this)?;
        Ok(self.guest(addr))
    }

    fn is_listening(&mut self, this: Resource<tcp::TcpSocket>) -> wasmtime::Result<bool> {
        tcp::HostTcpSocket::is_listening(&mut self.inner, this)
    }

    fn address_family(
        &mut self,
        this: Resource<tcp::TcpSocket>,
    ) -> wasmtime::Result<tcp::IpAddressFamily> {
        tcp::HostTcpSocket::address_family(&mut self.inner, this)
    }

    fn set_listen_backlog_size(
        &mut self,
        this: Resource<tcp::TcpSocket>,
        value: u64,
    ) -> SocketResult<()> {
        tcp::HostTcpSocket::set_listen_backlog_size(&mut self.inner, this, value)
    }

    fn keep_alive_enabled(&mut self, this: Resource<tcp::TcpSocket>) -> SocketResult<bool> {
        tcp::HostTcpSocket::keep_alive_enabled(&mut self.inner, this)
    }

    fn set_keep_alive_enabled(
        &mut self,
        this: Resource<tcp::TcpSocket>,
        value: bool,
    ) -> SocketResult<()> {
        tcp::HostTcpSocket::set_keep_alive_enabled(&mut self.inner, this, value)
    }

    fn keep_alive_idle_time(
        &mut self,
        this: Resource<tcp::TcpSocket>,
    ) -> SocketResult<tcp::Duration> {
        tcp::HostTcpSocket::keep_alive_idle_time(&mut self.inner, this)
    }

    fn set_keep_alive_idle_time(
        &mut self,
        this: Resource<tcp::TcpSocket>,
        value: tcp::Duration,
    ) -> SocketResult<()> {
        tcp::HostTcpSocket::set_keep_alive_idle_time(&mut self.inner, this, value)
    }

    fn keep_alive_interval(
        &mut self,
        this: Resource<tcp::TcpSocket>,
    ) -> SocketResult<tcp::Duration> {
        tcp::HostTcpSocket::keep_alive_interval(&mut self.inner, this)
    }

    fn set_keep_alive_interval(
        &mut self,
        this: Resource<tcp::TcpSocket>,
        value: tcp::Duration,
    ) -> SocketResult<()> {
        tcp::HostTcpSocket::set_keep_alive_interval(&mut self.inner, this, value)
    }

    fn keep_alive_count(&mut self, this: Resource<tcp::TcpSocket>) -> SocketResult<u32> {
        tcp::HostTcpSocket::keep_alive_count(&mut self.inner, this)
    }

    fn set_keep_alive_count(
        &mut self,
        this: Resource<tcp::TcpSocket>,
        value: u32,
    ) -> SocketResult<()> {
        tcp::HostTcpSocket::set_keep_alive_count(&mut self.inner, this, value)
    }

    fn hop_limit(&mut self, this: Resource<tcp::TcpSocket>) -> SocketResult<u8> {
        tcp::HostTcpSocket::hop_limit(&mut self.inner, this)
    }

    fn set_hop_limit(&mut self, this: Resource<tcp::TcpSocket>, value: u8) -> SocketResult<()> {
        tcp::HostTcpSocket::set_hop_limit(&mut self.inner, this, value)
    }

    fn receive_buffer_size(&mut self, this: Resource<tcp::TcpSocket>) -> SocketResult<u64> {
        tcp::HostTcpSocket::receive_buffer_size(&mut self.inner, this)
    }

    fn set_receive_buffer_size(
        &mut self,
        this: Resource<tcp::TcpSocket>,
        value: u64,
    ) -> SocketResult<()> {
        tcp::HostTcpSocket::set_receive_buffer_size(&mut self.inner, this, value)
    }

    fn send_buffer_size(&mut self, this: Resource<tcp::TcpSocket>) -> SocketResult<u64> {
        tcp::HostTcpSocket::send_buffer_size(&mut self.inner, this)
    }

    fn set_send_buffer_size(
        &mut self,
        this: Resource<tcp::TcpSocket>,
        value: u64,
    ) -> SocketResult<()> {
        tcp::HostTcpSocket::set_send_buffer_size(&mut self.inner, this, value)
    }

    fn subscribe(
        &mut self,
        this: Resource<tcp::TcpSocket>,
    ) -> wasmtime::Result<Resource<tcp::Pollable>> {
        tcp::HostTcpSocket::subscribe(&mut self.inner, this)
    }

    fn shutdown(
        &mut self,
        this: Resource<tcp::TcpSocket>,
        shutdown_type: tcp::ShutdownType,
    ) -> SocketResult<()> {
        tcp::HostTcpSocket::shutdown(&mut self.inner, this, shutdown_type)
    }

    fn drop(&mut self, this: Resource<tcp::TcpSocket>) -> wasmtime::Result<()> {
        self.release(this.rep());
        tcp::HostTcpSocket::drop(&mut self.inner, this)
    }
}

// ---------------------------------------------------------------------------------------------
// wasi:sockets/udp

impl udp::Host for PodSocketsView<'_> {}

impl udp::HostUdpSocket for PodSocketsView<'_> {
    async fn start_bind(
        &mut self,
        this: Resource<udp::UdpSocket>,
        network: Resource<udp::Network>,
        local_address: udp::IpSocketAddress,
    ) -> SocketResult<()> {
        let local = bind_to_host(local_address.into(), self.pod_ip, Proto::Udp)?;
        udp::HostUdpSocket::start_bind(&mut self.inner, this, network, local.into()).await
    }

    fn finish_bind(&mut self, this: Resource<udp::UdpSocket>) -> SocketResult<()> {
        let rep = this.rep();
        udp::HostUdpSocket::finish_bind(&mut self.inner, Resource::new_borrow(rep))?;
        if let Ok(local) = udp::HostUdpSocket::local_address(&mut self.inner, this) {
            self.record_port(rep, Transport::Udp, local.into());
        }
        Ok(())
    }

    async fn stream(
        &mut self,
        this: Resource<udp::UdpSocket>,
        remote_address: Option<udp::IpSocketAddress>,
    ) -> SocketResult<(
        Resource<udp::IncomingDatagramStream>,
        Resource<udp::OutgoingDatagramStream>,
    )> {
        let remote = match remote_address {
            Some(addr) => Some(to_host(addr.into(), self.pod_ip)?.into()),
            None => None,
        };
        udp::HostUdpSocket::stream(&mut self.inner, this, remote).await
    }

    fn local_address(
        &mut self,
        this: Resource<udp::UdpSocket>,
    ) -> SocketResult<udp::IpSocketAddress> {
        let addr = udp::HostUdpSocket::local_address(&mut self.inner, this)?;
        Ok(self.guest(addr))
    }

    fn remote_address(
        &mut self,
        this: Resource<udp::UdpSocket>,
    ) -> SocketResult<udp::IpSocketAddress> {
        let addr = udp::HostUdpSocket::remote_address(&mut self.inner, this)?;
        Ok(self.guest(addr))
    }

    fn address_family(
        &mut self,
        this: Resource<udp::UdpSocket>,
    ) -> wasmtime::Result<udp::IpAddressFamily> {
        udp::HostUdpSocket::address_family(&mut self.inner, this)
    }

    fn unicast_hop_limit(&mut self, this: Resource<udp::UdpSocket>) -> SocketResult<u8> {
        udp::HostUdpSocket::unicast_hop_limit(&mut self.inner, this)
    }

    fn set_unicast_hop_limit(
        &mut self,
        this: Resource<udp::UdpSocket>,
        value: u8,
    ) -> SocketResult<()> {
        udp::HostUdpSocket::set_unicast_hop_limit(&mut self.inner, this, value)
    }

    fn receive_buffer_size(&mut self, this: Resource<udp::UdpSocket>) -> SocketResult<u64> {
        udp::HostUdpSocket::receive_buffer_size(&mut self.inner, this)
    }

    fn set_receive_buffer_size(
        &mut self,
        this: Resource<udp::UdpSocket>,
        value: u64,
    ) -> SocketResult<()> {
        udp::HostUdpSocket::set_receive_buffer_size(&mut self.inner, this, value)
    }

    fn send_buffer_size(&mut self, this: Resource<udp::UdpSocket>) -> SocketResult<u64> {
        udp::HostUdpSocket::send_buffer_size(&mut self.inner, this)
    }

    fn set_send_buffer_size(
        &mut self,
        this: Resource<udp::UdpSocket>,
        value: u64,
    ) -> SocketResult<()> {
        udp::HostUdpSocket::set_send_buffer_size(&mut self.inner, this, value)
    }

    fn subscribe(
        &mut self,
        this: Resource<udp::UdpSocket>,
    ) -> wasmtime::Result<Resource<udp::Pollable>> {
        udp::HostUdpSocket::subscribe(&mut self.inner, this)
    }

    fn drop(&mut self, this: Resource<udp::UdpSocket>) -> wasmtime::Result<()> {
        self.release(this.rep());
        udp::HostUdpSocket::drop(&mut self.inner, this)
    }
}

impl udp::HostIncomingDatagramStream for PodSocketsView<'_> {
    fn receive(
        &mut self,
        this: Resource<udp::IncomingDatagramStream>,
        max_results: u64,
    ) -> SocketResult<Vec<udp::IncomingDatagram>> {
        let mut datagrams =
            udp::HostIncomingDatagramStream::receive(&mut self.inner, this, max_results)?;
        for datagram in &mut datagrams {
            datagram.remote_address = self.guest(datagram.remote_address);
        }
        Ok(datagrams)
    }

    fn subscribe(
        &mut self,
        this: Resource<udp::IncomingDatagramStream>,
    ) -> wasmtime::Result<Resource<udp::Pollable>> {
        udp::HostIncomingDatagramStream::subscribe(&mut self.inner, this)
    }

    fn drop(&mut self, this: Resource<udp::IncomingDatagramStream>) -> wasmtime::Result<()> {
        udp::HostIncomingDatagramStream::drop(&mut self.inner, this)
    }
}

impl udp::HostOutgoingDatagramStream for PodSocketsView<'_> {
    fn check_send(&mut self, this: Resource<udp::OutgoingDatagramStream>) -> SocketResult<u64> {
        udp::HostOutgoingDatagramStream::check_send(&mut self.inner, this)
    }

    /// Rewrites each datagram's destination. A rejected destination (`::1`) ends the batch
    /// there: the datagrams before it are sent and counted (WIT: once one datagram was sent,
    /// `send` never returns an error); if it is the first one, its error is returned.
    fn send(
        &mut self,
        this: Resource<udp::OutgoingDatagramStream>,
        datagrams: Vec<udp::OutgoingDatagram>,
    ) -> SocketResult<u64> {
        let mut rewritten = Vec::with_capacity(datagrams.len());
        let mut rejected = None;
        for mut datagram in datagrams {
            if let Some(addr) = datagram.remote_address {
                match to_host(addr.into(), self.pod_ip) {
                    Ok(real) => datagram.remote_address = Some(real.into()),
                    Err(code) => {
                        rejected = Some(code);
                        break;
                    }
                }
            }
            rewritten.push(datagram);
        }
        if let (true, Some(code)) = (rewritten.is_empty(), rejected) {
            return Err(code.into());
        }
        udp::HostOutgoingDatagramStream::send(&mut self.inner, this, rewritten)
    }

    fn subscribe(
        &mut self,
        this: Resource<udp::OutgoingDatagramStream>,
    ) -> wasmtime::Result<Resource<udp::Pollable>> {
        udp::HostOutgoingDatagramStream::subscribe(&mut self.inner, this)
    }

    async fn drop(&mut self, this: Resource<udp::OutgoingDatagramStream>) -> wasmtime::Result<()> {
        udp::HostOutgoingDatagramStream::drop(&mut self.inner, this).await
    }
}

// ---------------------------------------------------------------------------------------------
// wasi:sockets/ip-name-lookup

impl ip_name_lookup::Host for PodSocketsView<'_> {
    /// `localhost` (and `*.localhost`) resolves to the guest-visible `127.0.0.1` only, never to
    /// the host's `::1`, and a Service name ([`may_be_service`]) to its ClusterIP; both go
    /// through wasmtime-wasi as IP literals (answered at once, no resolver). Any other name
    /// reaches the host's resolver only when the pod's egress allows that name — otherwise it
    /// is `name-unresolvable` at once, so a pod without egress cannot leak data through DNS
    /// queries (`<data>.attacker.example`) — and at most [`super::reach::MAX_LOOKUPS_PER_POD`]
    /// such lookups per pod are open at once (each holds a blocking-pool thread; the slot is
    /// freed when the stream answers, or [`super::reach::RESOLVER_MAX`] after the guest
    /// dropped it unanswered — the host thread cannot be cancelled).
    fn resolve_addresses(
        &mut self,
        network: Resource<ip_name_lookup::Network>,
        name: String,
    ) -> SocketResult<Resource<ip_name_lookup::ResolveAddressStream>> {
        let egress = self.net.as_ref().map(|(net, _)| net.egress.clone());
        let service_ip = match may_be_service(&name, egress.as_ref().unwrap_or(&Egress::None)) {
            Some(svc) => self.services.as_ref().and_then(|f| f(svc)),
            None => None,
        };
        if is_localhost(&name) {
            let literal = IpAddr::V4(GUEST_LOOPBACK).to_string();
            return ip_name_lookup::Host::resolve_addresses(&mut self.inner, network, literal);
        }
        if let Some(ip) = service_ip {
            // A Service name: its ClusterIP, where the node's proxy listens (as cluster DNS
            // would answer; the guest then connects to it like to any address).
            return ip_name_lookup::Host::resolve_addresses(
                &mut self.inner,
                network,
                ip.to_string(),
            );
        }
        if name.parse::<IpAddr>().is_ok() {
            // An IP literal is parsed, never looked up.
            return ip_name_lookup::Host::resolve_addresses(&mut self.inner, network, name);
        }
        let Some((net, store)) = self.net.clone() else {
            return ip_name_lookup::Host::resolve_addresses(&mut self.inner, network, name);
        };
        if !net.egress.allows_host(&name) {
            return Err(ErrorCode::NameUnresolvable.into());
        }
        let permit = net
            .lookup_permit()
            .ok_or(ErrorCode::TemporaryResolverFailure)?;
        let stream = ip_name_lookup::Host::resolve_addresses(&mut self.inner, network, name)?;
        store.hold_lookup(stream.rep(), permit);
        Ok(stream)
    }
}

impl ip_name_lookup::HostResolveAddressStream for PodSocketsView<'_> {
    fn resolve_next_address(
        &mut self,
        this: Resource<ip_name_lookup::ResolveAddressStream>,
    ) -> SocketResult<Option<ip_name_lookup::IpAddress>> {
        let rep = this.rep();
        let r =
            ip_name_lookup::HostResolveAddressStream::resolve_next_address(&mut self.inner, this);
        if !would_block(&r) {
            // The lookup answered: its thread is free again, and so is its slot.
            if let Some((_, store)) = &self.net {
                store.release_lookup(rep, false);
            }
        }
        r
    }

    fn subscribe(
        &mut self,
        this: Resource<ip_name_lookup::ResolveAddressStream>,
    ) -> wasmtime::Result<Resource<ip_name_lookup::Pollable>> {
        ip_name_lookup::HostResolveAddressStream::subscribe(&mut self.inner, this)
    }

    fn drop(
        &mut self,
        this: Resource<ip_name_lookup::ResolveAddressStream>,
    ) -> wasmtime::Result<()> {
        if let Some((_, store)) = self.net.clone() {
            // Still waiting for the host's resolver? Then its thread still runs.
            let probe = Resource::new_borrow(this.rep());
            let pending = would_block(
                &ip_name_lookup::HostResolveAddressStream::resolve_next_address(
                    &mut self.inner,
                    probe,
                ),
            );
            store.release_lookup(this.rep(), pending);
        }
        ip_name_lookup::HostResolveAddressStream::drop(&mut self.inner, this)
    }
}

/// `resolve-next-address` answered `would-block`: the lookup has not finished.
fn would_block<T>(r: &SocketResult<T>) -> bool {
    matches!(r, Err(e) if e.downcast_ref() == Some(&ErrorCode::WouldBlock))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv6Addr, SocketAddrV6};

    const POD: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 7);

    fn v4(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
        SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
    }

    #[test]
    fn to_host_rewrites_loopback_destinations() {
        assert_eq!(
            to_host(v4([127, 0, 0, 1], 9000), POD),
            Ok(v4([127, 1, 0, 7], 9000))
        );
        // Not the guest's loopback: another pod, another 127/8 address, the outside world.
        assert_eq!(
            to_host(v4([127, 1, 0, 8], 80), POD),
            Ok(v4([127, 1, 0, 8], 80))
        );
        assert_eq!(
            to_host(v4([127, 0, 0, 2], 80), POD),
            Ok(v4([127, 0, 0, 2], 80))
        );
        assert_eq!(
            to_host(v4([10, 0, 0, 1], 443), POD),
            Ok(v4([10, 0, 0, 1], 443))
        );
        assert_eq!(
            to_host(v4([127, 1, 0, 7], 80), POD),
            Ok(v4([127, 1, 0, 7], 80))
        );
    }

    #[test]
    fn to_host_leaves_unspecified_destinations_for_wasi_to_reject() {
        assert_eq!(to_host(v4([0, 0, 0, 0], 80), POD), Ok(v4([0, 0, 0, 0], 80)));
        assert_eq!(
            to_host(v6(Ipv6Addr::UNSPECIFIED, 80), POD),
            Ok(v6(Ipv6Addr::UNSPECIFIED, 80))
        );
    }

    #[test]
    fn to_host_refuses_ipv6_loopback() {
        assert_eq!(
            to_host(v6(Ipv6Addr::LOCALHOST, 80), POD),
            Err(ErrorCode::ConnectionRefused)
        );
        let global = "2001:db8::1".parse().unwrap();
        assert_eq!(to_host(v6(global, 80), POD), Ok(v6(global, 80)));
        // IPv4-mapped: untouched, wasmtime-wasi rejects it as invalid-argument.
        let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
        assert_eq!(to_host(v6(mapped, 80), POD), Ok(v6(mapped, 80)));
    }

    #[test]
    fn bind_rewrites_loopback_and_wildcard() {
        for proto in [Proto::Tcp, Proto::Udp] {
            assert_eq!(
                bind_to_host(v4([127, 0, 0, 1], 9000), POD, proto),
                Ok(v4([127, 1, 0, 7], 9000))
            );
            assert_eq!(
                bind_to_host(v4([0, 0, 0, 0], 9000), POD, proto),
                Ok(v4([127, 1, 0, 7], 9000))
            );
            assert_eq!(
                bind_to_host(v4([127, 0, 0, 1], 0), POD, proto),
                Ok(v4([127, 1, 0, 7], 0))
            );
            assert_eq!(
                bind_to_host(v4([10, 0, 0, 1], 80), POD, proto),
                Ok(v4([10, 0, 0, 1], 80))
            );
            assert_eq!(
                bind_to_host(v4([127, 1, 0, 7], 80), POD, proto),
                Ok(v4([127, 1, 0, 7], 80))
            );
        }
        assert_eq!(
            bind_to_host(v4([0, 0, 0, 0], 0), POD, Proto::Tcp),
            Ok(v4([127, 1, 0, 7], 0))
        );
    }

    #[test]
    fn bind_keeps_ephemeral_udp_wildcard() {
        assert_eq!(
            bind_to_host(v4([0, 0, 0, 0], 0), POD, Proto::Udp),
            Ok(v4([0, 0, 0, 0], 0))
        );
        assert_eq!(
            bind_to_host(v6(Ipv6Addr::UNSPECIFIED, 0), POD, Proto::Udp),
            Ok(v6(Ipv6Addr::UNSPECIFIED, 0))
        );
    }

    #[test]
    fn bind_rejects_ipv6_loopback_and_wildcard() {
        for proto in [Proto::Tcp, Proto::Udp] {
            assert_eq!(
                bind_to_host(v6(Ipv6Addr::LOCALHOST, 9000), POD, proto),
                Err(ErrorCode::AddressNotBindable)
            );
            assert_eq!(
                bind_to_host(v6(Ipv6Addr::UNSPECIFIED, 9000), POD, proto),
                Err(ErrorCode::AddressNotBindable)
            );
            assert_eq!(
                bind_to_host(v6(Ipv6Addr::LOCALHOST, 0), POD, proto),
                Err(ErrorCode::AddressNotBindable)
            );
        }
        assert_eq!(
            bind_to_host(v6(Ipv6Addr::UNSPECIFIED, 0), POD, Proto::Tcp),
            Err(ErrorCode::AddressNotBindable)
        );
    }

    #[test]
    fn to_guest_maps_pod_ip_back() {
        assert_eq!(
            to_guest(v4([127, 1, 0, 7], 9000), POD),
            v4([127, 0, 0, 1], 9000)
        );
        // The kernel's default loopback source, other pods and the outside world stay.
        assert_eq!(
            to_guest(v4([127, 0, 0, 1], 40000), POD),
            v4([127, 0, 0, 1], 40000)
        );
        assert_eq!(
            to_guest(v4([127, 1, 0, 8], 80), POD),
            v4([127, 1, 0, 8], 80)
        );
        assert_eq!(
            to_guest(v4([0, 0, 0, 0], 5353), POD),
            v4([0, 0, 0, 0], 5353)
        );
        assert_eq!(
            to_guest(v6(Ipv6Addr::LOCALHOST, 80), POD),
            v6(Ipv6Addr::LOCALHOST, 80)
        );
    }

    #[test]
    fn round_trip() {
        for guest in [v4([127, 0, 0, 1], 1), v4([127, 0, 0, 1], 65535)] {
            let host = to_host(guest, POD).unwrap();
            assert_eq!(to_guest(host, POD), guest);
            let bound = bind_to_host(guest, POD, Proto::Tcp).unwrap();
            assert_eq!(to_guest(bound, POD), guest);
        }
        let wildcard = bind_to_host(v4([0, 0, 0, 0], 8080), POD, Proto::Tcp).unwrap();
        assert_eq!(to_guest(wildcard, POD), v4([127, 0, 0, 1], 8080));
    }

    #[test]
    fn localhost_names() {
        for name in [
            "localhost",
            "LocalHost",
            "localhost.",
            "api.localhost",
            "x.y.LOCALHOST.",
        ] {
            assert!(is_localhost(name), "{name}");
        }
        for name in [
            "localhost.example.com",
            "notlocalhost",
            "local",
            "127.0.0.1",
            "",
        ] {
            assert!(!is_localhost(name), "{name}");
        }
    }
}
