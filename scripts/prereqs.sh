#!/usr/bin/env bash
# Installs what building rim needs beyond a Rust toolchain: libclang (RocksDB's
# bindgen) and a C++ compiler. protoc is vendored (protoc-bin-vendored).
# Idempotent and quick when everything is present.
set -euo pipefail

need=()
have_libclang() {
  ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' && return 0
  compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null && return 0
  compgen -G '/usr/lib/x86_64-linux-gnu/libclang*.so*' >/dev/null && return 0
  return 1
}
have_libclang || need+=(libclang-dev clang)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
# Optional: libfaketime for the jepsen harness's clock nemesis (skipped
# with a printed reason without it). Installed only where we may.
optional=()
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || optional+=(faketime)
if [ ${#optional[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    need+=("${optional[@]}")
  else
    echo "rim: optional: sudo apt-get install -y ${optional[*]} (jepsen clock faults)" >&2
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "rim needs a Rust toolchain: https://rustup.rs (then re-run)" >&2
  exit 1
fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

cmd="apt-get update && apt-get install -y ${need[*]}"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "rim: installing build prerequisites: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  echo "rim: installing build prerequisites with sudo: ${need[*]}" >&2
  sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "rim: missing build prerequisites: ${need[*]}" >&2
  echo "install them with:  sudo sh -c '$cmd'" >&2
  exit 1
fi
