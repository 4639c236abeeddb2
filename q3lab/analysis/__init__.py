"""Analysis layer: tidy frames from models and traces (metrics, cache simulation, causal studies)."""
