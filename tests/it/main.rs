//! Integration tests: real `wasmctl` processes, real RocksDB in temp dirs, real sockets on
//! loopback, real kubectl. One test binary so the build links once.

mod agent;
mod api;
mod cli;
mod controllers;
mod dns;
mod durability;
mod kubectl;
mod nodes;
mod proxy;
mod services;
mod shop;
mod support;
