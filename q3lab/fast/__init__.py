"""Fast layer: drivers of the same layer step with fixed shapes (CUDA graphs, offload), the GPU cache."""
