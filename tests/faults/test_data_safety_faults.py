"""Data safety: nothing the user made is overwritten or deleted (synth, extract, trace --out, audit --csv), and
no wrong number passes silently (a source changed under a read, an fp16 overflow, nan/inf weights).

Each test reproduces one row of the adversarial report on real files (synthetic checkpoints) and checks the
class at its shared mechanism: `q3lab.weights.outdir` / `q3lab.weights.store.write_atomic` for writes, the header identity of
`ShardReader` / `read_span` for reads, `q3lab.runtime.finite` for non-finite values."""
from __future__ import annotations

import errno
import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

import q3lab.weights.store as store_mod
from faultkit import INDEX, bytes_in, cli, copy_ckpt, read_shard, shard_of, snapshot, tmp_files, write_shard
from q3lab.weights.checkpoint import Checkpoint
from q3lab.errors import CheckpointError, Q3LabError
from q3lab.weights.extraction import extract, verify
from q3lab.runtime.finite import NonFiniteError, tensor_stats
from q3lab.weights.outdir import MARKER, OutputError
from q3lab.runtime.recording import load_trace, save_trace
from q3lab.weights.store import MANIFEST, PROGRESS, write_atomic
from q3lab.weights.synthetic import synth

REPO = Path(__file__).resolve().parents[2]
MINI = REPO / "data" / "mini"
P = "thinker.model."


@pytest.fixture(scope="module")
def store(tiny_ckpt, tmp_path_factory) -> Path:
    return extract(tiny_ckpt, tmp_path_factory.mktemp("safety") / "store", progress=False)


@pytest.fixture(scope="module")
def no_stubs(tmp_path_factory) -> Path:
    """The tiny checkpoint without stubs: the same tensor values at other offsets (rows 37, 38)."""
    return synth(tmp_path_factory.mktemp("nostubs") / "ckpt", "tiny", seed=0, stubs=False, progress=False)


def poison(ckpt: Path, key: str, fn) -> torch.Tensor:
    """Rewrite tensor `key`'s bytes in its shard as `fn(values)` (same dtype and shape: offsets unchanged);
    returns the new values."""
    file = ckpt / shard_of(ckpt, key)
    header, data = read_shard(file)
    a, b = header[key]["data_offsets"]
    x = torch.frombuffer(bytearray(data[a:b]), dtype=torch.bfloat16).reshape(header[key]["shape"])
    y = fn(x.clone()).to(torch.bfloat16)
    write_shard(file, header, data[:a] + y.reshape(-1).view(torch.uint8).numpy().tobytes() + data[b:])
    return y


# == 3. nothing the user made is overwritten or deleted =============================================
def test_synth_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    """Row 39: the user's config.json, tokenizer.json and notes in the folder."""
    out = tmp_path / "proj"
    out.mkdir()
    for name, text in (("config.json", '{"mine": 1}'), ("tokenizer.json", "{}"), ("notes.txt", "mine")):
        (out / name).write_text(text)
    before = snapshot(out)
    rc, _, err = cli(capsys, "synth", out, "--preset", "tiny", "--no-progress")
    assert rc == 2 and f"{out}: not empty and not made by q3lab synth (found config.json, notes.txt, " \
                       f"tokenizer.json)" in err, err
    assert snapshot(out) == before


@pytest.mark.parametrize("case", ["trained_copy_of_data_mini", "synth_folder_modified_since"])
def test_synth_never_replaces_weights_it_did_not_write(case, make_ckpt, tmp_path, capsys):
    """Row 40: `synth --shards 2` over a copy of the trained data/mini (same shard names); and a synth folder
    whose shard was rewritten afterwards (trained in place, say): both refused, nothing changed."""
    if case == "trained_copy_of_data_mini":
        out = copy_ckpt(MINI, tmp_path / "mini")
        expect = f"{out}: not empty and not made by q3lab synth"
    else:
        out = make_ckpt("tiny", shards=2)
        shard = out / "model-00001-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes())   # same bytes, new mtime: no longer the file synth wrote
        expect = "holds files q3lab synth did not write, or that changed since it wrote them " \
                 "(model-00001-of-00002.safetensors)"
    before = snapshot(out)
    rc, _, err = cli(capsys, "synth", out, "--preset", "tiny", "--shards", "2", "--seed", "9", "--no-progress")
    assert rc == 2 and expect in err, err
    assert snapshot(out) == before


def test_synth_killed_then_rerun_is_byte_identical(tmp_path, capsys):
    """kill -9 of a real `q3lab synth small` subprocess while it writes shards, then the same command: the
    same bytes as an uninterrupted run (the marker lets the rerun take the folder back, and only it)."""
    reference = synth(tmp_path / "reference", "small", seed=1, progress=False)
    total = bytes_in(reference)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "q3lab", "synth", str(out), "--preset", "small", "--seed", "1",
                             "--no-progress"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and bytes_in(out) < total // 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "synth ended before the kill"
    assert not (out / INDEX).exists() and (out / MARKER).exists()
    rc, _, err = cli(capsys, "synth", out, "--preset", "small", "--seed", "1", "--no-progress")
    assert rc == 0, err
    mine = {k: v for k, v in snapshot(out).items() if k != MARKER}
    assert mine == {k: v for k, v in snapshot(reference).items() if k != MARKER} and not tmp_files(out)


def test_extract_does_not_follow_a_symlinked_experts_folder(make_ckpt, tmp_path, capsys):
    """Row 30: storeA/experts is a link to storeB's experts/: refused, storeB untouched and still verified."""
    a, b = make_ckpt("tiny"), make_ckpt("tiny", seed=1)
    store_b = extract(b, tmp_path / "storeB", progress=False)
    store_a = extract(a, tmp_path / "storeA", progress=False)
    shutil.rmtree(store_a / "experts")
    (store_a / "experts").symlink_to(Path("..") / "storeB" / "experts")
    before = snapshot(store_b)
    rc, _, err = cli(capsys, "extract", a, store_a, "--no-progress")
    assert rc == 2 and "holds files that are not part of this store: experts" in err, err
    assert snapshot(store_b) == before and verify(store_b, progress=False).ok
    # the shared writer refuses the link too, whoever calls it
    with pytest.raises(Q3LabError, match="experts: is a symlink"):
        write_atomic(store_a / "experts" / "layer_000.safetensors", b"x", root=store_a)
    assert snapshot(store_b) == before


def test_a_planted_tmp_symlink_is_not_followed(tmp_path):
    """The temporary file is created with O_EXCL|O_NOFOLLOW: a `.tmp` planted as a link to someone else's
    file is removed, never written through."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json.tmp").symlink_to(victim)
    digest = write_atomic(out / "config.json", b'{"a": 1}', root=out)
    assert victim.read_text() == "precious" and (out / "config.json").read_bytes() == b'{"a": 1}'
    assert digest.sha256 == hashlib.sha256(b'{"a": 1}').hexdigest() and not tmp_files(out)


@pytest.mark.parametrize("when", ["first_file", "last_file", "manifest_rewrite"])
def test_interrupted_noop_rerun_keeps_the_store_published(when, tiny_ckpt, store, tmp_path, monkeypatch):
    """Row 27: Ctrl-C during a rerun into a finished store, while it re-hashes its files: the manifest stays,
    the store is byte-identical and verifies (it used to lose manifest.json)."""
    extract_mod = importlib.import_module("q3lab.weights.extraction")
    out = copy_ckpt(store, tmp_path / "store")
    before = snapshot(out)
    if when == "manifest_rewrite":   # nothing is rewritten, so the manifest is never even written again
        real = store_mod.write_atomic

        def no_manifest(path, *a, **k):
            assert Path(path).name != MANIFEST and Path(path).name != PROGRESS, f"{path} written on a no-op rerun"
            return real(path, *a, **k)
        monkeypatch.setattr(extract_mod, "write_atomic", no_manifest)
        extract(tiny_ckpt, out, progress=False)
    else:
        files = list(json.loads((out / MANIFEST).read_text())["files"])
        target = files[0] if when == "first_file" else files[-1]
        real = extract_mod.sha256_file

        def interrupt(path, *a, **k):
            if Path(path) == out / target:
                raise KeyboardInterrupt
            return real(path, *a, **k)
        monkeypatch.setattr(extract_mod, "sha256_file", interrupt)
        with pytest.raises(KeyboardInterrupt):
            extract(tiny_ckpt, out, progress=False)
    monkeypatch.undo()
    assert snapshot(out) == before and not (out / PROGRESS).exists()
    assert verify(out, progress=False).ok


def _reading_inside(pid: int, folder: Path) -> bool:
    """Has process `pid` a file of the store in `folder` open (the rerun re-hashing it; the manifest and the
    journal, read or written before that, do not count)?"""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{folder}/") and not Path(target).name.startswith((MANIFEST, PROGRESS)):
            return True
    return False


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see what the rerun has open")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl_c", "kill_9"])
def test_killed_noop_rerun_keeps_the_store_published(sig, small_store):
    """Row 27 with real signals: Ctrl-C or kill -9 of a `q3lab extract` subprocess rerun into a finished store,
    sent once it is re-hashing the store's files (one of them open, seen in /proc): the store is
    byte-identical and verifies (the old code had removed manifest.json by then)."""
    ckpt, out = small_store
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-m", "q3lab", "extract", str(ckpt), str(out), "--no-progress"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _reading_inside(proc.pid, out) and time.monotonic() < deadline:
        time.sleep(0.0005)
    alive = proc.poll() is None
    proc.send_signal(sig)
    _, err = proc.communicate()
    assert alive, f"the rerun ended before the signal: {err.decode()[-500:]}"
    assert proc.returncode in (-sig, 130), (proc.returncode, err.decode()[-500:])
    assert snapshot(out) == before and not (out / PROGRESS).exists()
    assert verify(out, progress=False).ok


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("small_store")
    ckpt = synth(root / "ckpt", "small", seed=3, progress=False)
    return ckpt, extract(ckpt, root / "store", progress=False)


class DiskFull:
    """`open` inside q3lab.weights.store, where files opened for writing take `budget` bytes in all, then ENOSPC."""

    def __init__(self, budget: int):
        self.left, self._open = budget, open

    def __call__(self, path, mode="r", *args, **kwargs):
        f = self._open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        disk = self

        class Limited:
            def write(self, data):
                n = len(memoryview(data).cast("B"))
                if n > disk.left:
                    disk.left = 0
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.left -= n
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)
        return Limited()


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_trace_overwrite_on_a_full_disk_keeps_the_old_trace(suffix, tmp_path, monkeypatch):
    """Row 35: a trace written over an old one fails for lack of space: the old trace is intact (it used to
    be left as an unreadable 8 KiB file), no `.tmp`, and the error names the file."""
    frame = pd.DataFrame({"prompt": np.repeat(np.arange(50, dtype=np.int32), 40), "token_index": 0, "layer": 0,
                          "rank": 0, "expert": np.arange(2000, dtype=np.int16) % 8, "weight": 0.5})
    path = save_trace(frame, tmp_path / f"keep{suffix}")
    before = path.read_bytes()
    monkeypatch.setattr(store_mod, "open", DiskFull(4096), raising=False)
    with pytest.raises(OutputError, match=f"{path}: cannot write: No space left on device"):
        save_trace(frame.assign(expert=frame["expert"] + 1), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and not tmp_files(tmp_path)
    pd.testing.assert_frame_equal(load_trace(path), load_trace(path))
    assert load_trace(path)["expert"].tolist() == frame["expert"].tolist()


@pytest.mark.parametrize("target", ["user_csv", "user_parquet", "symlink", "folder"])
def test_trace_never_replaces_a_file_that_is_not_a_trace(target, tiny_ckpt, tmp_path, capsys):
    """`trace --out` onto the user's CSV, a parquet file that is not a trace, a symlink, or a folder: exit 2
    before any tracing, nothing touched. Overwriting an earlier trace works."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n")
    victim = tmp_path / "victim.csv"
    victim.write_text("a,b\n1,2\n")
    out = {"user_csv": tmp_path / "mine.csv", "user_parquet": tmp_path / "mine.parquet",
           "symlink": tmp_path / "link.csv", "folder": tmp_path / "dir.parquet"}[target]
    if target == "user_csv":
        out.write_text("a,b\n1,2\n")
    elif target == "user_parquet":
        pd.DataFrame({"a": [1, 2]}).to_parquet(out)
    elif target == "symlink":
        out.symlink_to(victim)
    else:
        out.mkdir()
    before = snapshot(tmp_path)
    rc, _, err = cli(capsys, "trace", tiny_ckpt, "--prompts", prompts, "--out", out, "--no-progress")
    assert rc == 2 and str(out) in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before and victim.read_text() == "a,b\n1,2\n"
    good = tmp_path / "t.parquet"
    assert cli(capsys, "trace", tiny_ckpt, "--prompts", prompts, "--out", good, "--no-progress")[0] == 0
    first = load_trace(good)
    assert cli(capsys, "trace", tiny_ckpt, "--prompts", prompts, "--out", good, "--no-progress")[0] == 0
    pd.testing.assert_frame_equal(load_trace(good), first)


def test_audit_csv_destinations(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Row 36: `audit --csv` into a missing folder (created), onto a folder or the user's file (exit 2,
    untouched), on a full disk (exit 2, the earlier table intact), and over its own earlier table."""
    table = tmp_path / "new" / "sub" / "audit.csv"
    rc, _, err = cli(capsys, "audit", tiny_ckpt, "--csv", table)
    assert rc == 0, err
    frame = pd.read_csv(table)
    assert len(frame) == 135 and (frame["status"] == "ok").all()
    (tmp_path / "dir.csv").mkdir()
    mine = tmp_path / "mine.csv"
    mine.write_text("x,y\n1,2\n")
    for target in (tmp_path / "dir.csv", mine):
        rc, _, err = cli(capsys, "audit", tiny_ckpt, "--csv", target)
        assert rc == 2 and str(target) in err and len(err.strip().splitlines()) == 1, err
    assert mine.read_text() == "x,y\n1,2\n"
    before = table.read_bytes()
    monkeypatch.setattr(store_mod, "open", DiskFull(1000), raising=False)
    rc, _, err = cli(capsys, "audit", tiny_ckpt, "--csv", table)
    monkeypatch.undo()
    assert rc == 2 and f"{table}: cannot write: No space left on device" in err, err
    assert table.read_bytes() == before and not tmp_files(tmp_path)
    assert cli(capsys, "audit", tiny_ckpt, "--csv", table, "--deep", "--no-progress")[0] == 0   # its own table
    assert "nan" in pd.read_csv(table).columns


def test_unreadable_source_file_is_blamed_on_the_source(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """Row 32: the source tokenizer.json cannot be read: the error names it and "cannot read", not the
    destination (`copy_file_atomic` used to report "OUT/tokenizer.json: cannot write"). As root, where mode
    000 does not stop a read, the read is made to fail inside q3lab.weights.store instead."""
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    src = ckpt / "tokenizer.json"
    src.chmod(0)
    try:
        open(src, "rb").close()
        real = open

        def denied(path, mode="r", *a, **k):
            if Path(path) == src:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path, mode, *a, **k)
        monkeypatch.setattr(store_mod, "open", denied, raising=False)
    except PermissionError:
        pass
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "extract", ckpt, out, "--no-progress")
    src.chmod(0o644)
    assert rc == 2 and f"{src}: cannot read: Permission denied" in err and "cannot write" not in err, err
    assert not tmp_files(out) and not (out / MANIFEST).exists()


# == 4. no silent wrong numbers ====================================================================
def test_shard_replaced_during_extract_stops_it_naming_the_shard(tiny_ckpt, no_stubs, tmp_path, monkeypatch,
                                                                 capsys):
    """Row 37: the last shard is atomically replaced mid-extraction by a file holding the same values at other
    offsets: the extraction stops naming it (it used to read the new file at the old offsets and verify OK)."""
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    shard = "model-00003-of-00003.safetensors"
    real, calls = store_mod.SafetensorsWriter.append, [0]

    def swap(self, name, chunk):
        calls[0] += 1
        if calls[0] == 3:
            shutil.copy(no_stubs / shard, ckpt / "x")
            os.replace(ckpt / "x", ckpt / shard)
        return real(self, name, chunk)
    monkeypatch.setattr(store_mod.SafetensorsWriter, "append", swap)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "extract", ckpt, out, "--no-progress")
    assert rc == 2 and f"{ckpt / shard}: changed since its header was read" in err, err
    assert not (out / MANIFEST).exists() and not tmp_files(out)


def test_shard_replaced_under_an_open_checkpoint(tiny_ckpt, no_stubs, tmp_path):
    """Row 38: the same swap under an open Checkpoint (what an expert cache reads from): expert and dense reads
    raise naming the shard; after close() the new file's header is read and the values are right again."""
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    ck = Checkpoint(ckpt)
    want = ck.expert(3, 7)[0].clone()
    shard = ck.shard_of("model.layers.3.mlp.experts.7.gate_proj.weight")
    dense = next(n for n in ck.names() if ck.shard_of(n) == shard and ".experts." not in n)
    want_dense = ck.get(dense)
    shutil.copy(no_stubs / shard, ckpt / "x")
    os.replace(ckpt / "x", ckpt / shard)
    for read in (lambda: ck.expert(3, 7), lambda: ck.get(dense)):
        with pytest.raises(CheckpointError, match=f"{shard}: changed since its header was read"):
            read()
    ck.close()
    assert torch.equal(ck.expert(3, 7)[0], want) and torch.equal(ck.get(dense), want_dense)
    os.utime(ckpt / shard, ns=(1, 1))   # a touched file (same bytes) is refused too: mtime is part of the identity
    with pytest.raises(CheckpointError, match=r"modified \(mtime\)"):
        ck.expert(3, 7)


def test_store_file_replaced_under_an_open_store(store, tmp_path):
    """The same identity check for a `Store` (one mechanism, `ShardFiles.reader` / `read_span`): a layer file
    rewritten under an open store (same bytes, new inode and mtime) is refused naming it; after close() the
    reads equal the values read before."""
    from q3lab.errors import StoreError
    from q3lab.weights.store import Store
    out = copy_ckpt(store, tmp_path / "store")
    st = Store.open(out)
    want, want_dense = st.expert(2, 5), st.get("model.norm.weight")
    for rel in ("experts/layer_002.safetensors", "dense.safetensors"):
        data = (out / rel).read_bytes()
        (out / rel).unlink()
        (out / rel).write_bytes(data)
    for read in (lambda: st.expert(2, 5), lambda: st.get("model.norm.weight")):
        with pytest.raises(StoreError, match="changed since its header was read"):
            read()
    st.close()
    assert all(torch.equal(a, b) for a, b in zip(st.expert(2, 5), want))
    assert torch.equal(st.get("model.norm.weight"), want_dense)


def test_manifest_records_the_source_and_verify_checks_it(tiny_ckpt, store, no_stubs, tmp_path, capsys):
    """The manifest records every shard's size, mtime_ns and header sha256 (as parsed), config and index
    sha256; `extract --verify OUT --source CKPT` exits 0 on the source and 1 naming each file that differs."""
    m = json.loads((store / MANIFEST).read_text())
    for shard in ("model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        raw = (tiny_ckpt / shard).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert m["sources"][shard] == {"bytes": len(raw), "mtime_ns": (tiny_ckpt / shard).stat().st_mtime_ns,
                                       "header_sha256": hashlib.sha256(raw[:8 + n]).hexdigest()}
    assert m["sources"]["config.json"]["sha256"] == hashlib.sha256((tiny_ckpt / "config.json").read_bytes()).hexdigest()
    rc, text, _ = cli(capsys, "extract", "--verify", store, "--source", tiny_ckpt, "--no-progress")
    assert rc == 0 and "OK: every checksum matches, and the source is the one extracted from" in text, text
    other = copy_ckpt(tiny_ckpt, tmp_path / "other")   # copytree keeps mtimes
    shutil.copy(no_stubs / "model-00003-of-00003.safetensors", other)
    rc, text, _ = cli(capsys, "extract", "--verify", store, "--source", other, "--no-progress")
    assert rc == 1 and "BAD source model-00003-of-00003.safetensors:" in text and "header differs" in text, text
    assert "BAD source model-00001" not in text and "1 source file(s) differ" in text
    rc, _, err = cli(capsys, "extract", "--verify", store, "--source", tmp_path / "nope", "--no-progress")
    assert rc == 2 and "nope: not a folder" in err
    old = copy_ckpt(store, tmp_path / "old_store")   # a manifest written before sources were recorded
    m = json.loads((old / MANIFEST).read_text())
    del m["sources"]
    (old / MANIFEST).write_text(json.dumps(m))
    rc, _, err = cli(capsys, "extract", "--verify", old, "--source", tiny_ckpt, "--no-progress")
    assert rc == 2 and "records no source identity" in err, err
    assert cli(capsys, "extract", "--verify", old, "--no-progress")[0] == 0


@pytest.mark.parametrize("key", [P + "layers.0.self_attn.q_proj.weight", P + "layers.1.mlp.experts.3.up_proj.weight"],
                         ids=["dense", "expert"])
def test_fp16_overflow_is_refused_naming_tensor_and_count(key, tiny_ckpt, tmp_path, capsys):
    """Row 42: 1e6 (beyond fp16's 65504) in 1% of a bf16 tensor: `extract --dtype fp16` exits 2 naming the
    tensor and exactly how many values would become inf (it used to store 40 infs and verify OK)."""
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    chosen = []

    def spike(x):
        flat = x.reshape(-1)
        idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:flat.numel() // 100]
        flat[idx] = torch.where(torch.arange(len(idx)) % 2 == 0, 1e6, -3e5).to(flat.dtype)
        chosen.append(len(idx))
        return x
    poison(ckpt, key, spike)
    out = tmp_path / "s16"
    rc, _, err = cli(capsys, "extract", ckpt, out, "--dtype", "fp16", "--no-progress")
    numel = math.prod(json.loads(json.dumps(read_shard(ckpt / shard_of(ckpt, key))[0][key]["shape"])))
    assert rc == 2 and f"tensor {key} in {shard_of(ckpt, key)}: {chosen[0]} of {numel} values are outside the " \
                       f"fp16 range" in err, err
    assert not (out / MANIFEST).exists() and not tmp_files(out)
    assert cli(capsys, "extract", ckpt, tmp_path / "s32", "--dtype", "fp32", "--no-progress")[0] == 0   # fits


@pytest.fixture(scope="module")
def poisoned(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny checkpoint with nan or inf in one tensor each, and where the model meets it first."""
    root = tmp_path_factory.mktemp("poisoned")
    cases = {"final_norm": (P + "norm.weight", float("nan"), "the final norm"),
             "layer2_moe": (P + "layers.2.post_attention_layernorm.weight", float("nan"), "layer 2's MoE output"),
             "embedding": (P + "embed_tokens.weight", float("inf"), "the embedding")}
    out = {}
    for name, (key, value, where) in cases.items():
        path = copy_ckpt(tiny_ckpt, root / name)
        poison(path, key, lambda x, v=value: x.fill_(v))
        out[name] = (path, key, where)
    return out


@pytest.mark.parametrize("case", ["final_norm", "layer2_moe", "embedding"])
@pytest.mark.parametrize("mode", ["greedy", "sampling", "trace"])
def test_nonfinite_weights_stop_generate_and_trace_naming_the_layer(case, mode, poisoned, tmp_path, capsys):
    """Row 54: nan in the final norm or in layer 2's post-attention norm, inf in the embedding: greedy
    generation (which printed "!!!!!!" and exited 0), sampling (a torch RuntimeError) and trace all exit 2
    naming the first place the values turn non-finite, and print no token."""
    path, _, where = poisoned[case]
    if mode == "trace":
        prompts = tmp_path / "p.txt"
        prompts.write_text("hello world\n")
        rc, out, err = cli(capsys, "trace", path, "--prompts", prompts, "--out", tmp_path / "t.parquet",
                           "--no-progress")
        assert not (tmp_path / "t.parquet").exists()
    else:
        rc, out, err = cli(capsys, "generate", path, "--prompt", "hello world", "--max-new-tokens", "4",
                           *(["--greedy"] if mode == "greedy" else []))
    assert rc == 2 and f"nan/inf values first appear in {where} at token 0 of " in err, err
    assert out.strip() == ""


def test_nonfinite_logits_mid_generation_are_caught_at_the_end(tiny_ckpt):
    """nan appearing only in a later decode step (a weight of layer 1 turned to nan after the third step, as a
    faulty expert provider or an in-place edit would): `generate` raises NonFiniteError after the loop, from
    the per-step flag (no sync per step), naming layer 1; sampling, where multinomial would raise, too."""
    import q3lab
    model = q3lab.load(tiny_ckpt)
    ids = torch.tensor([[5, 6, 7]])
    norm = model.model.layers[1].post_attention_layernorm.weight
    good = norm.detach().clone()
    calls = [0]

    def hook(module, args, out):
        calls[0] += 1
        if calls[0] == 3:
            norm.data.fill_(float("nan"))
        return out
    h = model.lm_head.register_forward_hook(hook)
    try:
        for sample in (False, True):
            calls[0] = 0
            norm.data.copy_(good)
            with pytest.raises(NonFiniteError, match="first appear in layer 1's MoE output at token 0 of 7"):
                model.generate(ids, 5, do_sample=sample, seed=0)
    finally:
        h.remove()
        norm.data.copy_(good)
    assert model.generate(ids, 5).shape == (1, 8)   # the same model without the fault runs


def test_audit_deep_reports_stats_and_nonfinite_tensors(tiny_ckpt, poisoned, tmp_path, monkeypatch, capsys):
    """`q3lab audit --deep`: per-tensor min/max/mean/std/nan/inf equal to a numpy computation on the
    safetensors library's read, also when streamed in chunks far smaller than a tensor; a poisoned tensor makes
    it exit 1 naming it, with the exact count, in the table and in --csv (plain audit: exit 0)."""
    finite_mod = importlib.import_module("q3lab.runtime.finite")
    monkeypatch.setattr(finite_mod, "_CHUNK_BYTES", 4096)   # the embedding (64 KiB) takes 16 chunks
    ck = Checkpoint(tiny_ckpt)
    keys = [("thinker." + n, ck.shard_of(n)) for n in ("model.embed_tokens.weight", "model.norm.weight",
                                                      "model.layers.1.mlp.experts.3.down_proj.weight")]
    stats = tensor_stats(ck, keys=keys, progress=False).set_index("key")
    for key, shard in keys:
        with safe_open(str(tiny_ckpt / shard), "pt") as f:
            x = f.get_tensor(key).double().numpy().reshape(-1)
        row = stats.loc[key]
        assert (row["numel"], row["nan"], row["inf"]) == (x.size, 0, 0)
        assert row["min"] == x.min() and row["max"] == x.max()
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-9, abs=1e-12)
        assert row["std"] == pytest.approx(x.std(), rel=1e-9)
    path, key, _ = poisoned["final_norm"]
    assert cli(capsys, "audit", path)[0] == 0   # the structural audit cannot see values
    table = tmp_path / "deep.csv"
    rc, out, _ = cli(capsys, "audit", path, "--deep", "--no-progress", "--csv", table)
    assert rc == 1 and f"{key} in {shard_of(path, key)}: 64 nan, 0 inf of 64" in out, out
    assert "non-finite: 1 tensor(s) hold nan or inf" in out
    frame = pd.read_csv(table).set_index("key")
    assert frame.loc[key, "nan"] == 64 and frame["nan"].drop(key).eq(0).all() and len(frame) == 135
