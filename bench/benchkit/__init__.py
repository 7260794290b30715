"""Helpers of the benchmark scripts in ``bench/`` (not part of the installed library).

``machine``: CPU/GPU description, instruction-set flags and measured GEMM rates; ``shapes``: the
benchmarked parameter sets; ``optimizers``: this library's optimizers and the optional peers
(HeavyBall, pytorch-optimizer) on the same weights; ``flops``: the msign FLOP model; ``measure``:
interleaved timing, transient memory and the profiler summary; ``report``: markdown tables.
"""
