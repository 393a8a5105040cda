# shellcheck shell=bash
# Sourced by the scripts: one cargo target directory outside the clone, reused across clones
# and CI runs on the same machine (a cold build of RocksDB + wasmtime is ~20 min on 2 cores).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/wasmctl-target}"
mkdir -p "$CARGO_TARGET_DIR"
export WASMCTL_BIN="$CARGO_TARGET_DIR/debug/wasmctl"
