#!/usr/bin/env bash
# Installs what building rim needs beyond a Rust toolchain: libclang and clang's
# builtin headers (RocksDB's bindgen), a C++ compiler and make; and python3 for
# one test (the example webhook receiver). protoc is
# vendored (protoc-bin-vendored). Idempotent and quick when everything is present.
#
# The libclang check looks for exactly the files bindgen's loader (clang-sys,
# runtime linking) accepts: libclang.so, libclang-N.so, libclang.so.N and
# libclang-N.so.N. Debian's libclang-cpp14 (libclang-cpp.so.14, the C++ API) is
# often installed alone and is NOT a libclang: an earlier version of this script
# took it for one and installed nothing, so a fresh machine failed 6 minutes into
# its first build.
#
#   scripts/prereqs.sh                  check, install what is missing (as root or
#                                       with passwordless sudo), else print the
#                                       apt-get line and exit 1
#   scripts/prereqs.sh --check-libclang only the libclang verdict: prints
#                                       "libclang: found PATH" (exit 0) or
#                                       "libclang: missing" (exit 1)
#
# RIM_LIBCLANG_DIRS (colon-separated) replaces the directories searched and
# skips ldconfig's cache: tests/prereqs.rs uses it on fake library trees.
set -euo pipefail

# The first library bindgen would load, or nothing.
find_libclang() {
  local dirs=() d f name
  if [ -n "${RIM_LIBCLANG_DIRS:-}" ]; then
    IFS=: read -r -a dirs <<<"$RIM_LIBCLANG_DIRS"
  else
    [ -n "${LIBCLANG_PATH:-}" ] && dirs+=("$LIBCLANG_PATH")
    # ldconfig's cache lists what the dynamic loader finds by name.
    while read -r name _ _ f; do
      if [[ $name =~ ^libclang(-[0-9.]+)?\.so(\.[0-9.]+)?$ ]]; then echo "$f"; return 0; fi
    done < <(ldconfig -p 2>/dev/null | tail -n +2 | sed 's/^[[:space:]]*//')
    dirs+=(/usr/lib/llvm-*/lib /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/lib)
  fi
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    for f in "$d"/libclang*.so*; do
      [ -e "$f" ] || continue
      name=${f##*/}
      if [[ $name =~ ^libclang(-[0-9.]+)?\.so(\.[0-9.]+)?$ ]]; then echo "$f"; return 0; fi
    done
  done
  return 1
}

# clang's own stddef.h/stdarg.h, which bindgen needs to parse rocksdb's c.h.
have_clang_headers() {
  compgen -G '/usr/lib/llvm-*/lib/clang/*/include/stddef.h' >/dev/null && return 0
  compgen -G '/usr/lib/clang/*/include/stddef.h' >/dev/null && return 0
  compgen -G '/usr/local/lib/clang/*/include/stddef.h' >/dev/null && return 0
  return 1
}

if [ "${1:-}" = "--check-libclang" ]; then
  if lib=$(find_libclang); then
    echo "libclang: found $lib"
    exit 0
  fi
  echo "libclang: missing"
  exit 1
fi

need=()
find_libclang >/dev/null || need+=(libclang-dev)
have_clang_headers || need+=(clang)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
# The tests run the example webhook receiver (docs/examples, standard library only).
command -v python3 >/dev/null 2>&1 || need+=(python3)
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

# What was just installed must now be found, or the build would fail later.
if ! find_libclang >/dev/null; then
  echo "rim: libclang still not found after installing ${need[*]}; set LIBCLANG_PATH" >&2
  exit 1
fi
