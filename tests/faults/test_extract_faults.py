"""Extraction under faults: killed at random points, a full disk, a read-only folder, a damaged store, a folder
holding another model's store. Each ends in a clear error (or a completed rerun), never a partial or damaged
store."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import q3lab.weights.store as store_mod
from faultkit import bytes_in, cli, copy_ckpt, inodes, snapshot, tmp_files
from q3lab.errors import StoreError
from q3lab.weights.extraction import extract, verify
from q3lab.weights.store import MANIFEST, PROGRESS, Store
from q3lab.weights.source import open_weights

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """A 29 MB checkpoint (synth small, 8 layers: 13 store files) and its store extracted without faults."""
    from q3lab.weights.synthetic import synth
    root = tmp_path_factory.mktemp("small")
    ckpt = synth(root / "ckpt", "small", seed=3, progress=False)
    return ckpt, extract(ckpt, root / "reference", progress=False)


@pytest.fixture(scope="module")
def tiny_store(tiny_ckpt, tmp_path_factory) -> Path:
    return extract(tiny_ckpt, tmp_path_factory.mktemp("tiny") / "reference", progress=False)


def assert_complete(out: Path, reference: Path) -> None:
    """`out` is a finished store, byte-identical to an uninterrupted extraction, with no leftovers."""
    assert not tmp_files(out) and not (out / PROGRESS).exists()
    assert verify(out, progress=False).ok
    assert snapshot(out) == snapshot(reference)


def journal(out: Path) -> dict:
    return json.loads((out / PROGRESS).read_text())["files"]


# -- killed -----------------------------------------------------------------------------------------
def test_kill_9_at_random_points_then_rerun_completes(small, tmp_path, capsys):
    ckpt, reference = small
    total = bytes_in(reference)
    out = tmp_path / "out"
    rng = random.Random(2026)
    # one seeded point in each quarter of the bytes, so that every run gets further than the one before
    targets = [int(total * rng.uniform(lo, lo + 0.2)) for lo in (0.02, 0.27, 0.52, 0.75)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    partial_seen = []
    for target in targets:
        proc = subprocess.Popen([sys.executable, "-m", "q3lab", "extract", str(ckpt), str(out), "--no-progress"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while proc.poll() is None and bytes_in(out) < target and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode == -signal.SIGKILL, \
            f"the extraction ended (status {proc.returncode}) before the kill at {target} bytes: {err.decode()}"
        done = sorted(journal(out)) if (out / PROGRESS).exists() else []
        partial_seen.append((bytes_in(out), len(done), tmp_files(out)))
        # a killed extraction is never taken for a store, and what it journaled is intact
        if not (out / MANIFEST).exists():
            with pytest.raises(StoreError, match="incomplete extraction"):
                open_weights(out)
        if (out / PROGRESS).exists():
            for rel, d in journal(out).items():
                assert store_mod.sha256_file(out / rel) == d["sha256"], f"{rel} damaged by the kill"
    assert any(tmps for _, _, tmps in partial_seen), f"no kill landed inside a file write: {partial_seen}"
    assert len({n for _, n, _ in partial_seen}) > 1, f"every kill landed at the same point: {partial_seen}"
    rc, _, err = cli(capsys, "extract", ckpt, out, "--no-progress")
    assert rc == 0, err
    assert_complete(out, reference)


def test_injected_crash_in_every_file_then_rerun_completes(tiny_ckpt, tiny_store, tmp_path, monkeypatch):
    """An exception (not a kill) in the middle of each tensor file in turn: the failing file is not left
    partial, the files before it stay journaled, and the next run carries on from there."""
    files = list(json.loads((tiny_store / MANIFEST).read_text())["files"])
    tensor_files = [rel for rel in files if rel.endswith(".safetensors")]
    out = tmp_path / "out"
    real = store_mod.SafetensorsWriter.append
    for target in tensor_files:
        appends = [0]

        def crashing(self, name, chunk, target=target, appends=appends):
            if self.path == out / target:
                appends[0] += 1
                if appends[0] == 5:
                    raise RuntimeError(f"injected crash in {target}")
            return real(self, name, chunk)
        monkeypatch.setattr(store_mod.SafetensorsWriter, "append", crashing)
        with pytest.raises(RuntimeError, match="injected crash"):
            extract(tiny_ckpt, out, progress=False)
        monkeypatch.setattr(store_mod.SafetensorsWriter, "append", real)
        assert not tmp_files(out) and not (out / MANIFEST).exists() and not (out / target).exists()
        assert sorted(journal(out)) == sorted(files[:files.index(target)])
    extract(tiny_ckpt, out, progress=False)
    assert_complete(out, tiny_store)


# -- disk full --------------------------------------------------------------------------------------
class DiskFull:
    """A stand-in for `open` inside q3lab.weights.store: files opened for writing take `budget` bytes in all, then
    raise ENOSPC, like a disk filling up (the bytes before the limit are written, as a real disk would)."""

    def __init__(self, budget: int):
        self.left, self.failed_on = budget, None
        self._open = open

    def __call__(self, path, mode="r", *args, **kwargs):
        f = self._open(path, mode, *args, **kwargs)
        return _Limited(f, self, Path(path)) if "w" in mode else f


class _Limited:
    def __init__(self, f, disk: DiskFull, path: Path):
        self._f, self._disk, self._path = f, disk, path

    def write(self, data):
        mv = memoryview(data).cast("B")
        if len(mv) > self._disk.left:
            self._f.write(mv[:self._disk.left])
            self._disk.left = 0
            self._disk.failed_on = self._path
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.left -= len(mv)
        return self._f.write(mv)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


@pytest.mark.parametrize("seed", range(5))
def test_disk_full_names_the_file_leaves_no_partial_file_and_rerun_completes(seed, tiny_ckpt, tiny_store, tmp_path,
                                                                           monkeypatch, capsys):
    total = bytes_in(tiny_store)
    budget = [300, *(random.Random(seed).randrange(1000, total) for _ in range(4))][seed]
    out = tmp_path / "out"
    disk = DiskFull(budget)
    monkeypatch.setattr(store_mod, "open", disk, raising=False)
    rc, _, err = cli(capsys, "extract", tiny_ckpt, out, "--no-progress")
    monkeypatch.undo()
    assert rc == 2 and disk.failed_on is not None
    final = disk.failed_on.with_name(disk.failed_on.name.removesuffix(".tmp"))
    assert err.startswith(f"q3lab extract: error: {final}: cannot write: No space left on device; free space and "
                          f"rerun: finished files are kept"), err
    assert not tmp_files(out), "a partial file was left behind"
    assert not (out / MANIFEST).exists()
    kept = {}
    if (out / PROGRESS).exists():
        for rel, d in journal(out).items():  # everything journaled before the disk filled is intact
            assert store_mod.sha256_file(out / rel) == d["sha256"]
            kept[rel] = inodes(out)[rel]
    rc, _, err = cli(capsys, "extract", tiny_ckpt, out, "--no-progress")  # space freed
    assert rc == 0, err
    assert_complete(out, tiny_store)
    now = inodes(out)
    assert all(now[rel] == v for rel, v in kept.items()), "a finished file was written again"


def test_disk_full_on_a_real_small_filesystem(tiny_ckpt, tiny_store, tmp_path, capsys):
    """The same on a real 256 KiB tmpfs (needs mount privileges; skipped without them)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs privileges): the write-wrapper test covers disk full")
    try:
        out = mnt / "store"
        rc, _, err = cli(capsys, "extract", tiny_ckpt, out, "--no-progress")
        assert rc == 2 and "No space left on device" in err and str(out) in err, err
        assert not tmp_files(out) and not (out / MANIFEST).exists()
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        rc, _, err = cli(capsys, "extract", tiny_ckpt, out, "--no-progress")
        assert rc == 0, err
        assert_complete(out, tiny_store)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- read-only output folder -------------------------------------------------------------------------
def _make_read_only(folder: Path, monkeypatch) -> str:
    """chmod 0o555; where that does not stop us (root), refuse every file creation inside `folder` instead."""
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except PermissionError:
        return "chmod"
    probe.unlink()
    real_open, real_mkdir = open, Path.mkdir

    def denied(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def ro_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and Path(path).resolve().is_relative_to(folder.resolve()):
            raise denied(path)
        return real_open(path, mode, *args, **kwargs)

    def ro_mkdir(self, *args, **kwargs):
        if self.resolve().is_relative_to(folder.resolve()) and not self.exists():
            raise denied(self)
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(store_mod, "open", ro_open, raising=False)
    monkeypatch.setattr(Path, "mkdir", ro_mkdir)
    return "simulated"


def test_read_only_empty_folder_is_a_clear_error(tiny_ckpt, tiny_store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _make_read_only(out, monkeypatch)
    rc, _, err = cli(capsys, "extract", tiny_ckpt, out, "--no-progress")
    assert rc == 2 and err.startswith(f"q3lab extract: error: {out / PROGRESS}: cannot write: Permission denied"), err
    monkeypatch.undo()
    out.chmod(0o755)
    assert sorted(out.iterdir()) == []
    assert cli(capsys, "extract", tiny_ckpt, out, "--no-progress")[0] == 0
    assert_complete(out, tiny_store)


def test_read_only_parent_folder_is_a_clear_error(tiny_ckpt, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "parent"
    parent.mkdir()
    _make_read_only(parent, monkeypatch)
    rc, _, err = cli(capsys, "extract", tiny_ckpt, parent / "store", "--no-progress")
    assert rc == 2 and "Permission denied" in err and str(parent / "store") in err, err
    monkeypatch.undo()
    parent.chmod(0o755)
    assert not (parent / "store").exists()


def test_rerun_into_a_read_only_finished_store_leaves_it_intact(tiny_ckpt, tiny_store, tmp_path, monkeypatch,
                                                               capsys):
    out = copy_ckpt(tiny_store, tmp_path / "out")
    before = snapshot(out)
    (out / "experts").chmod(0o555)
    _make_read_only(out, monkeypatch)
    rc, _, err = cli(capsys, "extract", tiny_ckpt, out, "--no-progress")
    # every file checks out, so nothing needs writing: the store stays published and the rerun succeeds
    assert rc == 0, err
    monkeypatch.undo()
    out.chmod(0o755)
    (out / "experts").chmod(0o755)
    assert snapshot(out) == before  # the manifest was not removed: still a complete store
    assert verify(out, progress=False).ok


# -- a damaged store --------------------------------------------------------------------------------
def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_data_byte_in_store_is_caught_by_verify(tiny_ckpt, tiny_store, tmp_path, capsys):
    out = copy_ckpt(tiny_store, tmp_path / "out")
    victim, offset, nbytes = Store.open(out).expert_location(2, 5)   # gate, up, down: equal thirds
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    _flip(victim, offset + nbytes // 3 + 7)
    rc, out_text, _ = cli(capsys, "extract", "--verify", out, "--no-progress")
    assert rc == 1
    assert f"BAD experts/layer_002.safetensors: sha256 differs from the manifest" in out_text
    assert f"BAD tensor {name} in experts/layer_002.safetensors: sha256 differs" in out_text
    assert out_text.count("BAD tensor") == 1 and "FAILED: 1 bad file(s), 1 bad tensor(s)" in out_text
    with pytest.raises(StoreError, match=name.replace(".", r"\.")):
        verify(out, progress=False)
    # a rerun of the extraction repairs exactly that file
    with pytest.warns(UserWarning, match="layer_002.safetensors: missing or changed"):
        assert cli(capsys, "extract", tiny_ckpt, out, "--no-progress")[0] == 0
    assert_complete(out, tiny_store)


def test_flipped_header_byte_in_store_is_caught_by_verify_and_open(tiny_store, tmp_path, capsys):
    out = copy_ckpt(tiny_store, tmp_path / "out")
    _flip(out / "dense.safetensors", 20)   # inside the JSON header
    rc, text, _ = cli(capsys, "extract", "--verify", out, "--no-progress")
    assert rc == 1 and "BAD dense.safetensors" in text
    with pytest.raises(StoreError, match="dense.safetensors"):
        Store.open(out)


def test_flipped_byte_in_checkpoint_data_is_invisible_to_the_audit(tiny_ckpt, tmp_path, capsys):
    """Honest limit: safetensors has no checksums, so the checkpoint reader cannot see a flipped data byte;
    the store's sha256, taken at extraction, catches any later change."""
    from faultkit import read_shard, shard_of
    from q3lab.weights.checkpoint import Checkpoint
    path = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
    key = "thinker.model.layers.0.mlp.experts.1.gate_proj.weight"
    shard = shard_of(path, key)
    header, data = read_shard(path / shard)
    before = Checkpoint(path).get(key[len("thinker."):])
    _flip(path / shard, (path / shard).stat().st_size - len(data) + header[key]["data_offsets"][0] + 1)
    assert cli(capsys, "audit", path)[0] == 0
    after = Checkpoint(path).get(key[len("thinker."):])
    assert (before.reshape(-1).view(torch.uint8) != after.reshape(-1).view(torch.uint8)).sum() == 1


# -- another model's store --------------------------------------------------------------------------
@pytest.mark.parametrize("other, why", [
    (dict(layers=2), "holds a store of a different model"),
    (dict(seed=1), "differs from it"),
    (None, "holds a bf16 store, you asked for fp32"),
], ids=["other_architecture", "same_architecture_other_weights", "other_dtype"])
def test_extraction_into_another_models_store_is_refused(other, why, tiny_ckpt, tiny_store, make_ckpt, tmp_path,
                                                        capsys):
    out = copy_ckpt(tiny_store, tmp_path / "out")
    before = snapshot(out)
    if other is None:
        rc, _, err = cli(capsys, "extract", tiny_ckpt, out, "--dtype", "fp32", "--no-progress")
    else:
        rc, _, err = cli(capsys, "extract", make_ckpt("tiny", **other), out, "--no-progress")
    assert rc == 2 and why in err and str(out / MANIFEST) in err, err
    assert snapshot(out) == before


def test_extraction_into_a_foreign_folder_is_refused(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, "extract", tiny_ckpt, out, "--no-progress")
    assert rc == 2 and "not empty and not a q3lab store (found notes.txt)" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
