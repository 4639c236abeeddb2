"""Runtime layer: the model as a specification and where its experts live.

`step` (the decoder layer written once, kernel sets), `thinker` (Thinker: modules with HF names and hook
points, KVCache, generate, load), `experts` (ResidentExperts, ExpertCache), `residency` (the one residency
core and eviction policies), `finite` (nan/inf diagnosis), `recording` (q3lab.record's recorder, which the
fast drivers feed too). Imports `base`, `weights`, `kernels`.
"""
