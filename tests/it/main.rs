//! Integration tests: real `wasmctl` processes, real RocksDB in temp dirs, real sockets on
//! loopback, real kubectl. One test binary so the build links once.

mod agent;
mod api;
mod architecture;
mod cli;
mod consistent_list;
mod controllers;
mod cpu;
mod dns;
mod durability;
mod emptydir;
mod ha;
mod ha_client;
mod hardening_api;
mod hardening_endpoints;
mod hardening_watch;
mod jepsen;
mod kubectl;
mod lincheck;
mod namespaces_terminating;
mod nodes;
mod podgc;
mod proxy;
mod sandbox;
mod sandbox_memory;
mod services;
mod shop;
mod support;
