# The front door: build, run, test, bench, lint.
.PHONY: run test lint fmt fuzz mutants build-pgo bench bench-http bench-quick bench-soak bench-keys bench-audit reliability build clean stack stack-down

# Build and start the router on embedded defaults with two mock backends.
run:
	bash scripts/run-dev.sh

# Install and start what the tests need, then run the whole suite.
test:
	bash scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt --all

# Every benchmark, about 10 minutes: writes docs/benchmarks.md and the plot.
bench:
	bash scripts/bench.sh

# A profile-guided release build, trained on the harness's load (about 20
# minutes): target/pgo/<host triple>/release. BENCH_BIN=<that dir> make
# bench-http measures it.
build-pgo:
	bash scripts/build-pgo.sh

# Only the HTTP harness: router (minimal, all features) vs direct vs nginx under oha.
bench-http:
	bash scripts/bench-http.sh 8

# The HTTP harness at 2 s per point, 2,000 rps, max and one connection only, no callgrind: about 2 minutes; prints only.
bench-quick:
	bash scripts/bench-http.sh 2 --quick

# 10 minutes at 1,000 requests/s with all features: p99 and RSS per minute.
bench-soak:
	bash scripts/bench-soak.sh 10 1000

# The audit store on PostgreSQL (release, a private server): the rate a
# backlog of 20,000 journaled records drains at, and how long a record takes
# to be visible on another replica while the first serves load.
bench-audit:
	cargo nextest run --release -p api-router --test audit_postgres --run-ignored only --no-capture measure_audit

# How long a key revoked on one replica takes to be refused by another
# (two release routers on one etcd, 100 keys): p50, p99, max.
bench-keys:
	scripts/deps.sh protoc:protobuf-compiler etcd:etcd-server etcdctl:etcd-client
	cargo nextest run --release -p api-router --test keys --run-ignored only --no-capture revocation_reaches

# Every fuzz target for 5 minutes (make test runs 5 s each). FUZZ_MERGE=1
# adds what was found to the committed corpora.
fuzz:
	bash scripts/fuzz.sh 300

# Mutation testing of the money- and record-keeping mechanisms (long: each
# mutant is a build and a test run); writes the tables of docs/testing.md.
# MUTANTS_SET=core|limits|records|audit-log|usage|providers runs one set (default: all);
# MUTANTS_ITERATE=1 tests again only what the set's last run did not catch.
mutants:
	bash scripts/mutants.sh

# Every failure scenario, longer, in a release build: writes docs/reliability.md
# (about 12 minutes; the short versions run in make test).
reliability:
	bash scripts/reliability.sh

# The full local stack: Redis, etcd, Kafka (tansu), Prometheus, router, mocks.
stack:
	bash scripts/stack.sh

stack-down:
	bash scripts/stack-down.sh

build:
	cargo build --bins

clean:
	cargo clean
	rm -rf .dev data
