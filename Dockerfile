# Multi-stage build of api-router. Not built in CI (no Docker engine there);
# the Helm chart's image values refer to it.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin api-router --bin mock-backend

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin api-router \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=build /src/target/release/api-router /usr/local/bin/api-router
COPY --from=build /src/target/release/mock-backend /usr/local/bin/mock-backend
USER 10001:10001
ENV HTTP_ADDR=0.0.0.0:8080 DATA_DIR=/data LOG_FORMAT=json
EXPOSE 8080
VOLUME ["/data"]
ENTRYPOINT ["/usr/local/bin/api-router"]
