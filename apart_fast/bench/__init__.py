"""Benchmarks users run: kernel throughput and training cost."""
