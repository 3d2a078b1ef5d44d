"""Small real models and data shipped with the package, for the demo, tests and benchmarks (no downloads)."""
