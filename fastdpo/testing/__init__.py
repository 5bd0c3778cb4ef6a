"""Tiny, locally built tokenizers and models for tests, the demo and CPU benchmarks (no downloads)."""
