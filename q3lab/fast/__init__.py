"""Fast layer: drivers of the runtime's one layer step with every shape fixed (CUDA graphs, offload).

`decoders` (StaticDecoder, OffloadedDecoder), `device_cache` (DeviceExpertCache on the shared residency
core). Imports `runtime` and below, never `analysis` or `viz`.
"""
