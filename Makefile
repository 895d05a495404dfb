# blx: the two commands of the README, and a few helpers.
#   make run    set up, build, and run a local 3-agent cluster
#   make test   set up, build, and run the whole test suite

# Reuse a target directory outside the clone when one exists; otherwise build in ./target.
CARGO_TARGET_DIR ?= $(if $(wildcard $(HOME)/.cache/blx-target),$(HOME)/.cache/blx-target,$(CURDIR)/target)
export CARGO_TARGET_DIR
BLX_BIN := $(CARGO_TARGET_DIR)/debug/blx
export BLX_BIN

.PHONY: run test bench build fuzz

# Both build the whole workspace with every target, so cargo resolves features once and
# RocksDB's C++ (the longest part of a cold build) is compiled once for run and test alike.
BUILD := cargo build --workspace --all-targets

run:
	scripts/setup.sh run
	$(BUILD)
	scripts/local-cluster.sh $(BLX_BIN)

test:
	scripts/setup.sh test
	$(BUILD)
	scripts/run-tests.sh

bench:
	scripts/setup.sh bench
	cargo build --release -p blx -p blx-simulation
	# The OTLP receiver for the export on/off rows; a debug build, as `make test` makes it.
	cargo build -p blx-tests --bin otlp-sink
	scripts/bench-membership.sh $(CARGO_TARGET_DIR)/release/blx 10 3
	scripts/bench-membership.sh $(CARGO_TARGET_DIR)/release/blx 30 2
	scripts/bench-scale.sh $(CARGO_TARGET_DIR)/release/blx "10 30" 20
	scripts/bench-raft.sh $(CARGO_TARGET_DIR)/release/blx 10 $(CARGO_TARGET_DIR)/debug/otlp-sink
	cargo bench -p blx-scheduler --bench placement
	scripts/bench-vm-boot.sh $(CARGO_TARGET_DIR)/release/blx
	scripts/bench-failover.sh $(CARGO_TARGET_DIR)/release/blx
	scripts/bench-simulation.sh $(CARGO_TARGET_DIR)/release/blx-simulation

fuzz:
	scripts/fuzz.sh
