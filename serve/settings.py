"""Process-level settings of the Serve ingress, fixed when Ray starts."""

# The fast ingress: throughput-optimised Serve with the HAProxy proxy. Measured here on 2 cores:
# a no-op app went from ~400 req/s (defaults) to ~6,000 req/s, and a batched LSTM app that
# collapsed at 400 clients with the defaults served them with p99 < 1 s. These must be in the
# environment of the process that starts Ray (serve run, ray start), not in a runtime_env.
FAST_INGRESS_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}
