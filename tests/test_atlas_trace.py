"""q3lab.atlas tracing: windows, equality with q3lab.record, corpus readers, resume after kill -9, sharding."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import q3lab
from q3lab.atlas import open_dataset, read_corpus, windows
from q3lab.atlas.tracing import trace_corpus
from q3lab.cli import main
from q3lab.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "data" / "mini"


@pytest.fixture(scope="module")
def mini():
    model = q3lab.load(MINI)
    return model, q3lab.load_tokenizer(MINI)


def _corpus(path: Path, texts: list[str], domains: list[str] | None = None) -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            row = {"id": f"d{i}", "text": t}
            if domains:
                row["domain"] = domains[i]
            f.write(json.dumps(row) + "\n")
    return path


def _table(path: Path) -> pa.Table:
    ds = open_dataset(path, require_complete=True)
    return pa.concat_tables([pq.read_table(p) for p in ds.parts])


def _record_one(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    with q3lab.record(model) as rec:
        with torch.inference_mode():
            model(torch.tensor([ids]))
    f = rec.to_frame()
    L, A = model.config.num_hidden_layers, model.config.num_experts_per_tok
    return f["expert"].to_numpy().reshape(-1, L * A), f["weight"].to_numpy().reshape(-1, L * A)


def test_windows_by_hand():
    assert windows(5, 8, 4) == [(0, 5, 0)]
    assert windows(8, 8, 4) == [(0, 8, 0)]
    # 20 tokens, window 8, stride 4: keep 0-8, then 8-12 (context from 4), 12-16, 16-20
    assert windows(20, 8, 4) == [(0, 8, 0), (4, 12, 8), (8, 16, 12), (12, 20, 16)]
    assert windows(10, 8, 4) == [(0, 8, 0), (2, 10, 8)]        # the last window ends at the document's end
    assert windows(10, 4, 4) == [(0, 4, 0), (4, 8, 4), (6, 10, 8)]
    with pytest.raises(InputError, match="stride"):
        windows(10, 4, 5)


@pytest.mark.parametrize("batch", [1, 4])
def test_short_documents_equal_record_of_one_forward(mini, tmp_path, batch):
    """Documents shorter than the window: with batch size 1, every token's experts and weights are bit-equal to
    what q3lab.record gives around one forward of that document alone. Batched 4 at a time with right padding,
    the experts are still equal here, but float32 matmuls over other rows round differently (~2e-7), which
    can move a weight by one float16 step (and could flip an exact near-tie)."""
    model, tok = mini
    texts = ["The capital of France is Paris.", "12 + 30 = 42\n7 * 8 = 56", "def f(x):\n    return x + 1\n",
             "Permission is hereby granted, free of charge, to any person", "Japan is a country in Asia.",
             "9 - 4 = 5"]
    corpus = _corpus(tmp_path / "c.jsonl", texts, ["facts", "math", "code", "license", "facts", "math"])
    trace_corpus(model, tok, corpus, tmp_path / "ds", batch_size=batch, window=64, progress=False)
    t = _table(tmp_path / "ds")
    assert t.schema == q3lab.atlas.schema(48, 4)
    L, A = 48, 4
    ex = t.column("experts").combine_chunks().flatten().to_numpy().reshape(-1, L * A)
    wt = t.column("weights").combine_chunks().flatten().to_numpy().reshape(-1, L * A)
    doc = np.array(t.column("doc_id").to_pylist())
    n0 = len(tok.encode(texts[0]))
    assert t.column("domain").to_pylist()[:n0 + 1] == ["facts"] * n0 + ["math"]
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        rows = doc == f"d{i}"
        assert rows.sum() == len(ids)
        assert t.column("token").to_numpy()[rows].tolist() == ids
        assert t.column("token_index").to_numpy()[rows].tolist() == list(range(len(ids)))
        e_ref, w_ref = _record_one(model, ids)
        np.testing.assert_array_equal(ex[rows], e_ref)
        if batch == 1:
            np.testing.assert_array_equal(wt[rows], w_ref.astype(np.float16))
        else:
            ulp = np.spacing(w_ref.astype(np.float16))
            assert (np.abs(wt[rows].astype(np.float32) - w_ref.astype(np.float16)) <= ulp).all()


def test_long_document_windows_keep_tokens_with_context(mini, tmp_path):
    """A 100-token document in windows of 32, stride 16: tokens 0-31 from the first window, then each later
    window's last 16 tokens, each equal to record around one forward of that window's tokens."""
    model, tok = mini
    text = " ".join(f"{a} + {a + 1} = {2 * a + 1}" for a in range(40))
    ids = tok.encode(text)[:100]
    assert len(ids) == 100
    corpus = tmp_path / "long.txt"
    corpus.write_text(text)
    trace_corpus(model, tok, corpus, tmp_path / "ds", batch_size=3, window=32, stride=16, max_tokens=100,
                 progress=False)
    t = _table(tmp_path / "ds")
    assert t.column("token_index").to_pylist() == list(range(100))
    ex = t.column("experts").combine_chunks().flatten().to_numpy().reshape(100, -1)
    for s, e, k in windows(100, 32, 16):
        e_ref, _ = _record_one(model, ids[s:e])
        np.testing.assert_array_equal(ex[k:e], e_ref[k - s:])
    # and the kept tokens past the first window differ from full-context routing somewhere (what windows cost)
    e_full, _ = _record_one(model, ids)
    assert (ex[32:] != e_full[32:]).any()
    np.testing.assert_array_equal(ex[:32], e_full[:32])


def test_corpus_readers(tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "b.txt").write_text("second")
    (tmp_path / "f" / "a.txt").write_text("first")
    _corpus(tmp_path / "f" / "c.jsonl", ["x", "y"], ["d1", "d2"])
    pq.write_table(pa.table({"text": ["p", "q"], "domain": ["k", None]}), tmp_path / "f" / "d.parquet")
    docs = list(read_corpus(tmp_path / "f"))
    assert [(d.doc_id, d.text, d.domain) for d in docs] == [
        ("a.txt", "first", None), ("b.txt", "second", None), ("d0", "x", "d1"), ("d1", "y", "d2"),
        ("d.parquet:0", "p", "k"), ("d.parquet:1", "q", None)]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "no text"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: expected an object with a string 'text'"):
        list(read_corpus(tmp_path / "bad.jsonl"))
    pq.write_table(pa.table({"body": ["p"]}), tmp_path / "nt.parquet")
    with pytest.raises(InputError, match="needs a 'text' column"):
        list(read_corpus(tmp_path / "nt.parquet"))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _many_docs(path: Path, n: int = 24) -> Path:
    texts = [" ".join(f"{(i * 7 + j) % 50} + {j} = {(i * 7 + j) % 50 + j}" for j in range(6 + i % 5))
             for i in range(n)]
    return _corpus(path, texts, ["math" if i % 2 else "facts" for i in range(n)])


def _cli_args(ckpt: Path, corpus: Path, out: Path) -> list[str]:
    return ["trace", str(ckpt), "--corpus", str(corpus), "--out", str(out), "--window", "32", "--batch-size", "2",
            "--part-tokens", "40", "--no-progress"]


def test_resume_after_kill_9_equals_uninterrupted_run(tiny_ckpt, tmp_path):
    corpus = _many_docs(tmp_path / "c.jsonl", 40)
    ref = tmp_path / "ref"
    assert main(_cli_args(tiny_ckpt, corpus, ref)) == 0
    planned = len(json.loads((ref / "manifest.json").read_text())["parts"])
    assert planned >= 10
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "q3lab", *_cli_args(tiny_ckpt, corpus, out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("*.done"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.done")))
    assert 2 <= done < planned, f"kill -9 came too late to test a resume ({done} of {planned} parts)"
    # a partly written part left behind by a crash is never taken as complete
    victim = sorted(out.glob("part-*.parquet"))[-1]
    torn = out / json.loads((ref / "manifest.json").read_text())["parts"][-1]["name"]
    torn.write_bytes(victim.read_bytes()[:100])
    ds = open_dataset(out)
    assert not ds.complete and torn not in ds.parts
    with pytest.raises(InputError, match="planned parts are not complete"):
        open_dataset(out, require_complete=True)
    assert main(_cli_args(tiny_ckpt, corpus, out)) == 0
    assert _table(out).equals(_table(ref))
    # a marker whose part was replaced is caught by its checksum
    first = sorted(out.glob("part-*.parquet"))[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))
    assert first not in open_dataset(out).parts
    assert main(_cli_args(tiny_ckpt, corpus, out)) == 0
    assert _table(out).equals(_table(ref))
    # resuming with other options is refused, naming them
    assert main(_cli_args(tiny_ckpt, corpus, out)[:-1] + ["--window", "16", "--no-progress"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharding_gloo_two_ranks_and_shard_flag_equal_single_process(tiny_ckpt, tmp_path):
    corpus = _many_docs(tmp_path / "c.jsonl", 16)
    ref = tmp_path / "ref"
    assert main(_cli_args(tiny_ckpt, corpus, ref)) == 0
    out = tmp_path / "gloo"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "q3lab", *_cli_args(tiny_ckpt, corpus, out)],
                              env={**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
                                   "WORLD_SIZE": "2", "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank 0/2" in outs[0][0] and "dataset complete" in outs[0][0]
    assert "rank 1/2" in outs[1][0]
    assert _table(out).equals(_table(ref))
    out2 = tmp_path / "shard"
    for i in (1, 0):
        assert main(_cli_args(tiny_ckpt, corpus, out2) + ["--shard", f"{i}/2"]) == 0
    assert _table(out2).equals(_table(ref))


def test_logits_parts(mini, tmp_path):
    model, tok = mini
    corpus = _corpus(tmp_path / "c.jsonl", ["The capital of France is Paris.", "3 + 4 = 7"])
    trace_corpus(model, tok, corpus, tmp_path / "ds", batch_size=2, window=64, logits=True, progress=False)
    ds = open_dataset(tmp_path / "ds")
    lg = pq.read_table(ds.logits_parts[0])
    assert lg.column("doc_id").to_pylist() == pq.read_table(ds.parts[0]).column("doc_id").to_pylist()
    ids = tok.encode("The capital of France is Paris.")
    with q3lab.record(model, probs=True) as rec:
        with torch.inference_mode():
            model(torch.tensor([ids]))
    p = np.stack([rec.router_probs(layer)[1] for layer in range(48)], axis=1)       # [T, L, E]
    got = lg.column("logits").combine_chunks().flatten().to_numpy().reshape(-1, 48, 32)[:len(ids)]
    np.testing.assert_allclose(np.exp(got.astype(np.float32)), p, rtol=2e-3, atol=1e-6)
