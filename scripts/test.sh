#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, openraft's storage suite, and the
# integration tests (real server processes, RocksDB, sockets, the CLI, kubectl).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-deps.sh
. scripts/env.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
# The guests' host-testable logic (wasi-apps is its own workspace).
(cd wasi-apps && CARGO_TARGET_DIR=target cargo test --locked -p shop-core)
