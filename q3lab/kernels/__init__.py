"""Kernel layer: leaf arithmetic with a torch twin each, called by the layer step and the fast drivers.

`triton_decode` (attention over the cache, router top-k), `triton_moe` (one decode token's experts), `cpu`
(bf16 one-token C kernels). Imports nothing of q3lab but `q3lab.errors`.
"""
