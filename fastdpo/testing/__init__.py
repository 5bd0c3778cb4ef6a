"""Tiny tokenizers and models built locally for tests, the demo and CPU benchmarks."""
