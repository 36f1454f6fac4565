"""Benchmarks: AR and each depth interleaved in one process, with the cost model."""
