# rim: the two commands of the README, and the gates CI runs.
#
# CARGO_TARGET_DIR lives outside the clone so every checkout on this machine
# (and CI's fresh clone) reuses one build: RocksDB takes ~10 minutes to
# compile on 2 cores, once.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/rim-target
CARGO ?= cargo

.PHONY: dev test lint fmt prereqs bench-store

## Start a local cluster (3 logic nodes + a gateway) with data in ./rim-data.
dev: prereqs
	$(CARGO) run --bin rim -- dev

## Run every test of the workspace.
test: prereqs
	$(CARGO) test --workspace --all-targets

## Formatting and lints, as CI checks them.
lint: prereqs
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

prereqs:
	@scripts/prereqs.sh

## Storage micro-benchmarks (docs/benchmarks.md).
bench-store: prereqs
	$(CARGO) bench -p rim-raft-store --bench store
