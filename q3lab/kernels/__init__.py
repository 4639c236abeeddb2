"""Kernel layer: leaf arithmetic (Triton, C) with torch twins, called by the layer step."""
