#!/usr/bin/env bash
# Install what building and testing wasmctl needs on a fresh Debian machine. Idempotent.
set -euo pipefail

need_apt=()
# RocksDB's bindgen needs libclang; its C++ build needs a compiler.
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
# Tests drive the stock kubectl, and `dig` against the agents' cluster DNS.
command -v kubectl >/dev/null 2>&1 || need_apt+=(kubectl)
command -v dig >/dev/null 2>&1 || need_apt+=(bind9-dnsutils)
# The OCI pull test runs Debian's distribution registry on loopback.
command -v docker-registry >/dev/null 2>&1 || need_apt+=(docker-registry)

if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

# Guest components (wasi-apps/, built by `up` and by the tests) target wasm32-wasip2.
if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 \
    || timeout 300 rustup target add wasm32-wasip2 \
    || echo "warning: could not add the wasm32-wasip2 target (wasi-apps/ and the agent tests need it)" >&2
fi
