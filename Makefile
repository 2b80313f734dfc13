# rim: the two commands of the README, and the gates CI runs.
#
# CARGO_TARGET_DIR lives outside the clone so every checkout on this machine
# (and CI's fresh clone) reuses one build: RocksDB takes ~10 minutes to
# compile on 2 cores, once.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/rim-target
CARGO ?= cargo

.PHONY: dev test jepsen-smoke jepsen-long jepsen-5 lint fmt prereqs bench bench-store bench-send-inproc bench-send bench-connections bench-fanout bench-failover bench-sync

## Start a local cluster (3 logic nodes and a gateway) with data in ./rim-data.
dev: prereqs
	$(CARGO) run --bin rim -- dev

## Run every test of the workspace, then a 60 s consistency run of the real
## cluster under partitions, crashes and pauses (must be valid).
test: prereqs
	$(CARGO) test --workspace --all-targets
	$(MAKE) --no-print-directory jepsen-smoke

JEPSEN_STORE ?= $(CARGO_TARGET_DIR)/jepsen-store

## The CI consistency run: 3 nodes, 60 s, partition/kill/pause and the
## app's webhook receiver killed, paused or cut off; exit 0 = valid.
jepsen-smoke: prereqs
	$(CARGO) build -q -p rim -p rim-jepsen
	$(CARGO) run -q -p rim-jepsen -- test --nodes 3 --time-limit 60 \
		--nemesis partition,kill,pause,webhook --min-acked 300 --store $(JEPSEN_STORE)

## The long run of docs/jepsen.md: 10 minutes, every nemesis.
jepsen-long: prereqs
	$(CARGO) build -q -p rim -p rim-jepsen
	$(CARGO) run -q -p rim-jepsen -- test --nodes 3 --time-limit 600 \
		--nemesis all --min-acked 1000 --store $(JEPSEN_STORE)

## jepsen-smoke on 5 nodes (replication 3: each shard on 3 of them, kills
## and pauses of a shard's voter majority); not part of `make test`.
jepsen-5: prereqs
	$(CARGO) build -q -p rim -p rim-jepsen
	$(CARGO) run -q -p rim-jepsen -- test --nodes 5 --time-limit 60 \
		--nemesis partition,kill,pause --min-acked 200 --store $(JEPSEN_STORE)

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
bench-send-inproc: prereqs
	$(CARGO) run -p rim-node --example send_bench -- 64 10 64

## The `rim bench` scenarios of docs/benchmarks.md. Release build (the first
## one compiles RocksDB again at -O3, ~10-15 min); each spawns 3 nodes and a
## gateway on loopback and writes bench-*.json here. `make bench` runs them all.
RIM_BENCH = $(CARGO) run -q --release --bin rim -- bench

bench: bench-send bench-connections bench-fanout bench-failover bench-sync

## 1:1 sends: closed-loop maximum, fixed rates, and the highest rate whose ack p99 stays under 50 ms.
bench-send: prereqs
	$(RIM_BENCH) send --spawn --pairs 256 --rate max --max-inflight 16 --duration 30s --out bench-send-max.json
	$(RIM_BENCH) send --spawn --pairs 256 --rate 5000 --duration 30s --out bench-send-5000.json
	$(RIM_BENCH) send --spawn --pairs 256 --rate 1000 --slo 50ms --step-duration 10s --search-steps 4 --out bench-send-slo.json

## Idle TCP connections: gateway RSS per connection (19,000: the open-file limit here is 20,000).
bench-connections: prereqs
	$(RIM_BENCH) connections --spawn --connections 19000 --local-ips 16

## Group fan-out: small groups of 100/500 members, a super group of 10,000 all online.
bench-fanout: prereqs
	$(RIM_BENCH) fanout --spawn --kind small --members 100 --messages 2000 --rate 400 --out bench-fanout-small-100.json
	$(RIM_BENCH) fanout --spawn --kind small --members 500 --messages 1000 --rate 100 --out bench-fanout-small-500.json
	$(RIM_BENCH) fanout --spawn --kind super --members 10000 --online 10000 --messages 100 --rate 10 --out bench-fanout-super-10000.json

## SIGKILL of a shard leader under steady load: write pause, nothing acked lost.
bench-failover: prereqs
	$(RIM_BENCH) failover --spawn --pairs 64 --rate 1000 --kill-after 5s --after 10s --out bench-failover.json

## Devices offline for 10,000 messages each reconnect and catch up.
bench-sync: prereqs
	$(RIM_BENCH) sync --spawn --devices 4 --messages 10000 --out bench-sync.json
