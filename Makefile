# The front door: build, run, test, bench, lint.
.PHONY: run test lint fmt bench bench-http bench-quick build clean stack stack-down

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

bench:
	bash scripts/bench.sh

# Router vs direct vs nginx under oha, pinned with taskset (docs/benchmarks-http.md).
bench-http:
	bash scripts/bench-http.sh

# The same, 2 s per point: about a minute.
bench-quick:
	bash scripts/bench-http.sh 2

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
