"""Analysis layer: tidy frames from models and routing traces.

`metrics`, `cachesim` (the residency core replayed on traces), `lens`, `interventions` (intervene, capture),
`causal`, `saturation`, `ranking`, `ablations`, `rope_check`, `study` (what notebooks 01-04 compute). Imports
`oracle`, `fast`, `runtime` and below; never `viz`.
"""
