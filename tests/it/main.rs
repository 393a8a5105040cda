//! Integration tests: real `wasmctl` processes, real RocksDB in temp dirs, real sockets on
//! loopback, real kubectl. One test binary so the build links once.

mod agent;
mod api;
mod architecture;
mod cli;
mod consistent_list;
mod controllers;
mod dns;
mod durability;
mod hardening_api;
mod hardening_endpoints;
mod kubectl;
mod nodes;
mod podgc;
mod proxy;
mod sandbox;
mod services;
mod shop;
mod support;
