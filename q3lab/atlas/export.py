"""Export a dataset's routing in vLLM's `--enable-return-routed-experts` layout: [tokens, layers, top_k] int16."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from q3lab.atlas.dataset import Dataset, open_dataset
from q3lab.atlas.queries import stream


def export_routed_experts(dataset: Dataset | str | Path, out: str | Path, *, batch_rows: int = 65536) -> Path:
    """Write `out` (.npy, int16 [tokens, layers, top_k], rows in dataset order) and `out`.index.parquet
    (doc_id, token_index per row), streaming: memory holds one batch. Returns the .npy path."""
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = ds.num_tokens
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=np.int16, shape=(n, ds.num_layers, ds.top_k))
    writer = pq.ParquetWriter(out.with_suffix(".index.parquet"),
                              pa.schema([("doc_id", pa.string()), ("token_index", pa.int32())]))
    row = 0
    try:
        for b in stream(ds, ("doc_id", "token_index", "experts"), batch_rows=batch_rows):
            k = len(b["experts"])
            arr[row:row + k] = b["experts"]
            writer.write_table(pa.table({"doc_id": pa.array(list(b["doc_id"]), pa.string()),
                                         "token_index": pa.array(b["token_index"].astype(np.int32))}))
            row += k
    finally:
        writer.close()
    arr.flush()
    del arr
    return out
