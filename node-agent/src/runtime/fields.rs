//! Host memory a guest drives through wasi:http header maps (`fields`), charged to the pod's
//! memory budget ([`super::limits::HostMemory`]).
//!
//! A `fields` resource is a header map in the agent's heap, not in the guest's linear memory:
//! without a charge, one Store could hold `MAX_HANDLES_PER_STORE` ([`super::pod`]) maps of
//! wasmtime's default 128 KiB each (512 MiB), and every live Store of every pod as much. ResourceTable has no
//! hook on push, so the charge is taken where the maps are born: [`add_to_linker`] shadows the
//! three `wasi:http/types` functions that create a guest-writable map (`[constructor]fields`,
//! `[static]fields.from-list`, `[method]fields.clone`), delegating to wasmtime-wasi-http.
//!
//! **The arithmetic.** Let `F` = [`FIELD_SIZE_LIMIT`] (16 KiB, lowered from 128 KiB: Node.js's
//! total header limit, twice nginx's per-line buffer; it is wasmtime's accounting of a map:
//! each name and value's bytes plus the size of `HeaderName`/`HeaderValue`), and `H` =
//! `MAX_HANDLES_PER_STORE` (4096). A writable map can never hold more than `F` accounted bytes
//! (wasmtime refuses growth past it), except a clone of a larger host-built map, which holds
//! at most that map's size. So:
//! - each new writable map is charged `F` before it exists (a clone `max(F, source)`), so a map
//!   can grow to its limit without any further look;
//! - from time to time ([`HeaderCharge::reserve`]: when as many maps were created since the
//!   last measurement as the Store had handles then, at least 64, and whenever the budget
//!   would refuse) the Store's table is *measured* and the charge set to the result: every
//!   distinct header map reachable from a handle (`fields`, outgoing requests and responses,
//!   incoming responses; shared maps counted once) at `max(F, its size)`, `F` for each
//!   request in flight (`future-incoming-response`: its headers left the table), and
//!   [`HANDLE_COST`] per handle (the table entry and the boxed host object). Maps the guest
//!   dropped or sent stop costing at the next measurement; between two, the charge only
//!   over-counts (what was freed is still charged);
//! - when the pod's budget cannot hold the charge, the call traps with
//!   [`MemoryLimitExceeded`] and the container is `OOMKilled`, as for linear memory.
//!
//! **The bound.** Header maps a pod's guests built, plus the handles measured, never exceed
//! the pod's memory limit in wasmtime's accounting, together with its linear memories; the
//! allocator's real footprint of a map is within about 2× its accounting (`HeaderMap`'s
//! vectors grow by doubling; measured by `tests/it/sandbox_memory.rs` on the agent's RSS).
//! Not charged: handles created since the last measurement other than maps (at most
//! `H × HANDLE_COST` ≈ 1 MiB per Store), host-built maps that arrived since (an incoming
//! response: bounded by the HTTP client's header limits), and the request and response heads
//! that hyper parses for the node (bounded by the servers' own limits). Live Stores per pod are
//! capped (`--max-instances-per-pod`), so that residue is bounded per pod too.

use std::any::Any;
use std::collections::HashSet;
use std::sync::Arc;

use http::HeaderMap;
use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::StoreContextMut;
use wasmtime_wasi_http::p2::bindings::http::types::{self, HostFields};
use wasmtime_wasi_http::p2::types::{
    HostFutureIncomingResponse, HostIncomingResponse, HostOutgoingRequest, HostOutgoingResponse,
};
use wasmtime_wasi_http::{FieldMap, WasiHttpView};

use super::limits::{HostMemory, MemoryLimitExceeded, PodBudget};
use super::state::GuestState;

/// Largest header map a guest may build, in wasmtime's accounting (`WasiHttpCtx`'s field
/// size limit).
pub const FIELD_SIZE_LIMIT: usize = 16 * 1024;

/// What one resource handle costs the host besides the header map it may hold: its table
/// entry and boxed host object (a few hundred bytes for the largest wasi types).
pub const HANDLE_COST: usize = 256;

/// Maps created between two measurements at least (the measurement walks the table).
const MIN_UNMEASURED: usize = 64;

/// The `wasi:http/types` instance wasmtime-wasi-http 48 registers (guests importing an
/// older 0.2.x are linked to it).
const TYPES: &str = "wasi:http/types@0.2.12";

/// One Store's charge for the header maps and handles its guest holds.
#[derive(Debug)]
pub struct HeaderCharge {
    memory: HostMemory,
    /// Maps created (and charged ahead) since the last measurement.
    unmeasured: usize,
    /// Handles the last measurement found.
    measured_handles: usize,
}

impl HeaderCharge {
    pub fn new(budget: Arc<PodBudget>) -> Self {
        HeaderCharge {
            memory: HostMemory::new(budget),
            unmeasured: 0,
            measured_handles: 0,
        }
    }

    /// Bytes charged to the pod now.
    pub fn charged(&self) -> usize {
        self.memory.charged()
    }

    /// Charges `bytes` for a map about to be created, measuring `table` first when due or
    /// when the budget would refuse.
    pub fn reserve(
        &mut self,
        table: &mut ResourceTable,
        bytes: usize,
    ) -> Result<(), MemoryLimitExceeded> {
        self.unmeasured += 1;
        if self.unmeasured > self.measured_handles.max(MIN_UNMEASURED) {
            self.measure(table)?;
        }
        if self.memory.grow(bytes).is_ok() {
            return Ok(());
        }
        self.measure(table)?;
        self.memory.grow(bytes)
    }

    /// Sets the charge to what `table` holds now.
    pub fn measure(&mut self, table: &mut ResourceTable) -> Result<(), MemoryLimitExceeded> {
        let (bytes, handles) = measure(table);
        self.unmeasured = 0;
        self.measured_handles = handles;
        self.memory.set(bytes)
    }
}

/// wasmtime's accounting of a header map (as `FieldMap` counts it against its limit).
pub fn map_size(map: &HeaderMap) -> usize {
    let names: usize = map
        .keys()
        .map(|k| k.as_str().len() + size_of::<http::HeaderName>())
        .sum();
    let values: usize = map
        .values()
        .map(|v| v.len() + size_of::<http::HeaderValue>())
        .sum();
    names + values
}

/// The host memory `table`'s handles hold (see the module doc) and how many handles it has.
fn measure(table: &mut ResourceTable) -> (usize, usize) {
    let mut seen: HashSet<*const HeaderMap> = HashSet::new();
    let (mut bytes, mut handles) = (0usize, 0usize);
    for entry in table.iter_mut() {
        let entry: &dyn Any = entry;
        handles += 1;
        bytes += HANDLE_COST;
        let map: Option<&HeaderMap> = if let Some(f) = entry.downcast_ref::<FieldMap>() {
            Some(f)
        } else if let Some(r) = entry.downcast_ref::<HostOutgoingRequest>() {
            Some(&r.headers)
        } else if let Some(r) = entry.downcast_ref::<HostOutgoingResponse>() {
            Some(&r.headers)
        } else if let Some(r) = entry.downcast_ref::<HostIncomingResponse>() {
            Some(&r.headers)
        } else {
            if entry.is::<HostFutureIncomingResponse>() {
                bytes += FIELD_SIZE_LIMIT;
            }
            None
        };
        if let Some(map) = map {
            if seen.insert(map as *const HeaderMap) {
                bytes += map_size(map).max(FIELD_SIZE_LIMIT);
            }
        }
    }
    (bytes, handles)
}

/// Shadows the `wasi:http/types` functions that create a guest-writable header map with ones
/// that charge it first. Call after `wasmtime_wasi_http::p2::add_only_http_to_linker_async`.
pub fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let result = shadow(linker);
    linker.allow_shadowing(false);
    result
}

fn shadow(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    let mut inst = linker.instance(TYPES)?;
    inst.func_wrap(
        "[constructor]fields",
        |mut store: StoreContextMut<'_, GuestState>, (): ()| {
            let s = store.data_mut();
            s.headers.reserve(&mut s.table, FIELD_SIZE_LIMIT)?;
            Ok((HostFields::new(&mut s.http())?,))
        },
    )?;
    inst.func_wrap(
        "[static]fields.from-list",
        |mut store: StoreContextMut<'_, GuestState>, (entries,): (Vec<(String, Vec<u8>)>,)| {
            let s = store.data_mut();
            s.headers.reserve(&mut s.table, FIELD_SIZE_LIMIT)?;
            let mut view = s.http();
            let result = match HostFields::from_list(&mut view, entries) {
                Ok(fields) => Ok(fields),
                Err(e) => Err(types::Host::convert_header_error(&mut view, e)?),
            };
            Ok((result,))
        },
    )?;
    inst.func_wrap(
        "[method]fields.clone",
        |mut store: StoreContextMut<'_, GuestState>, (fields,): (Resource<FieldMap>,)| {
            let s = store.data_mut();
            let size = map_size(s.table.get(&fields)?).max(FIELD_SIZE_LIMIT);
            s.headers.reserve(&mut s.table, size)?;
            Ok((HostFields::clone(&mut s.http(), fields)?,))
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measured_maps_are_counted_once_and_released() {
        let budget = PodBudget::new(Some(10 * (FIELD_SIZE_LIMIT + HANDLE_COST)), None);
        let mut table = ResourceTable::new();
        let mut charge = HeaderCharge::new(budget.clone());
        let mut held = Vec::new();
        // Ten maps fit (each charged F ahead); the eleventh does not, even measured.
        for _ in 0..10 {
            charge.reserve(&mut table, FIELD_SIZE_LIMIT).unwrap();
            held.push(table.push(FieldMap::new_mutable(FIELD_SIZE_LIMIT)).unwrap());
        }
        assert!(charge.reserve(&mut table, FIELD_SIZE_LIMIT).is_err());
        // Measured: ten maps at F plus their handles.
        assert_eq!(charge.charged(), 10 * (FIELD_SIZE_LIMIT + HANDLE_COST));
        assert_eq!(budget.memory_used(), charge.charged());
        // Dropped maps stop costing at the next measurement.
        for h in held.drain(..) {
            table.delete(h).unwrap();
        }
        charge.reserve(&mut table, FIELD_SIZE_LIMIT).unwrap();
        let mut big = HeaderMap::new();
        big.insert("x-big", "v".repeat(3 * FIELD_SIZE_LIMIT).parse().unwrap());
        let size = map_size(&big);
        assert!(size > 3 * FIELD_SIZE_LIMIT);
        let f = table
            .push(FieldMap::new_immutable(
                wasmtime_wasi_http::default_hooks(),
                big,
            ))
            .unwrap();
        charge.measure(&mut table).unwrap();
        assert_eq!(charge.charged(), size + HANDLE_COST);
        table.delete(f).unwrap();
        drop(charge);
        assert_eq!(budget.memory_used(), 0);
    }
}
