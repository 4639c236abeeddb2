"""Viz layer: what a person looks at. Figures are frame -> matplotlib Figure, without pyplot.

`plots` (routing), `plots_model` (checkpoints, correctness, ablations), `plots_causal`, `interactive` (the
routing explorer, ipywidgets with a static fallback), `notebooks` (the papermill runner and the helpers of
the notebooks' first cells). The top of the package below the CLI.
"""
