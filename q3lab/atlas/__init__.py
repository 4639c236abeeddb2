"""The routing atlas: corpus-scale routing traces as a Parquet dataset, and out-of-core DuckDB analyses.

    q3lab trace CKPT --corpus PATH --out DATASET        # tracing.py: windows, batches, resume, shards
    ds = q3lab.atlas.open_dataset(DATASET)              # dataset.py: schema, parts, manifest
    q3lab.atlas.layer_summary(ds)                       # queries.py: tidy frames, never the whole trace

Modules: `dataset` (schema, writer, manifest, resume), `corpus` (readers), `tracing` (the trace loop),
`queries` (DuckDB analyses), `predict` (expert predictors that need the model), `export` (vLLM layout).
"""
from __future__ import annotations

from q3lab._lazy import lazy_exports

_EXPORTS = {
    "COLUMNS": "dataset", "Dataset": "dataset", "open_dataset": "dataset", "schema": "dataset",
    "Document": "corpus", "read_corpus": "corpus", "corpus_sha256": "corpus",
    "trace": "tracing", "trace_corpus": "tracing", "windows": "tracing",
    "export_routed_experts": "export",
    "expert_prediction": "predict", "synthetic_dataset": "synthetic",
    **{name: "queries" for name in (
        "atlas", "sql", "stream", "layer_load", "layer_summary", "coactivation", "domain_specialisation",
        "vocab_specialisation", "token_specialisation", "consecutive_overlap", "overlap_summary",
        "reuse_distance", "hit_rate_curves", "adaptive_capacities", "uniform_overlap",
        "modality_load", "modality_summary", "modality_hit_rate")},
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
