"""Kernel sets the layer step runs, each with a torch twin of the same arithmetic; part of the runtime's layer.

`triton_decode` (attention over the cache, router top-k), `triton_moe` (one decode token's experts), `cpu`
(bf16 one-token C kernels). The step chooses among them, and their torch twins may reuse the step's math, so
kernels and runtime import each other (tests/test_layout.py puts them in one layer).
"""
