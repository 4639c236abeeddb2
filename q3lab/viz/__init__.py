"""Viz layer: figures (frame -> Figure), the routing explorer, the notebook runner and its helpers."""
