# rim: the two commands of the README, and the gates CI runs.
#
# CARGO_TARGET_DIR lives outside the clone so every checkout on this machine
# (and CI's fresh clone) reuses one build: RocksDB takes ~10 minutes to
# compile on 2 cores, once.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/rim-target
CARGO ?= cargo

.PHONY: dev test jepsen-smoke jepsen-long lint fmt prereqs bench-store bench-send bench-connections bench-latency bench-fanout

## Start a local cluster (3 logic nodes and a gateway) with data in ./rim-data.
dev: prereqs
	$(CARGO) run --bin rim -- dev

## Run every test of the workspace, then a 60 s consistency run of the real
## cluster under partitions, crashes and pauses (must be valid).
test: prereqs
	$(CARGO) test --workspace --all-targets
	$(MAKE) --no-print-directory jepsen-smoke

JEPSEN_STORE ?= $(CARGO_TARGET_DIR)/jepsen-store

## The CI consistency run: 3 nodes, 60 s, partition/kill/pause; exit 0 = valid.
jepsen-smoke: prereqs
	$(CARGO) build -q -p rim -p rim-jepsen
	$(CARGO) run -q -p rim-jepsen -- test --nodes 3 --time-limit 60 \
		--nemesis partition,kill,pause --min-acked 300 --store $(JEPSEN_STORE)

## The long run of docs/jepsen.md: 10 minutes, every nemesis.
jepsen-long: prereqs
	$(CARGO) build -q -p rim -p rim-jepsen
	$(CARGO) run -q -p rim-jepsen -- test --nodes 3 --time-limit 600 \
		--nemesis all --min-acked 1000 --store $(JEPSEN_STORE)

## Formatting and lints, as CI checks them.
lint: prereqs
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

prereqs:
	@scripts/prereqs.sh

## Storage micro-benchmarks (docs/benchmarks.md). The dev profile builds
## dependencies (RocksDB) at -O2 and shares the test build.
bench-store: prereqs
	$(CARGO) bench -p rim-raft-store --bench store --profile dev

## 1:1 sends through client gRPC on an in-process 3-node cluster, fsync on.
bench-send: prereqs
	$(CARGO) run -p rim-node --example send_bench -- 64 10 64

## Idle TCP connections on a spawned cluster + gateway: gateway RSS per connection.
bench-connections: prereqs
	$(CARGO) run -q --bin rim -- bench connections --spawn --connections 10000

## Send -> ack and send -> delivered latency through a spawned gateway.
bench-latency: prereqs
	$(CARGO) run -q --bin rim -- bench latency --spawn --rate 1000

## Group fan-out: small groups of 100 and 500 members, a super group of 10,000 (1,000 online).
bench-fanout: prereqs
	$(CARGO) run -q --bin rim -- bench fanout --spawn --kind small --members 100 --messages 2000 --rate 400 --out bench-fanout-small-100.json
	$(CARGO) run -q --bin rim -- bench fanout --spawn --kind small --members 500 --messages 1000 --rate 100 --out bench-fanout-small-500.json
	$(CARGO) run -q --bin rim -- bench fanout --spawn --kind super --members 10000 --online 1000 --messages 100 --rate 5 --out bench-fanout-super-10000.json
