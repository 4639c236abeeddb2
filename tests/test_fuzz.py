"""Fuzz the checkpoint reader: seeded random mutations of a tiny checkpoint's shards, index and config.

Every case must end in one of:
  error         a `Q3LabError` (opening, auditing or reading), and `q3lab audit` exits 2 or 1;
  rejected      the audit reports a problem (`q3lab audit` exits 1);
  identical     the audit passes and every thinker tensor reads back byte-equal to the original;
  undetectable  the audit passes and only the tensors whose data bytes were overwritten in place differ.
The last class is honest, not a pass by convenience: safetensors has no checksums, so a flipped byte inside
tensor data cannot be seen in the checkpoint (the extracted store's sha256 catches it later, see
tests/faults/test_extract_faults.py). Anything else (another exception, a hang, a wrong read the mutation
does not explain) fails the test with the seed and the mutation.

Q3LAB_FUZZ_SEED and Q3LAB_FUZZ_CASES change the seed and the number of cases (default 0 and 400).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import signal
import struct
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from q3lab.weights.checkpoint import Checkpoint, audit_checkpoint
from q3lab.cli import main
from q3lab.errors import Q3LabError

SEED = int(os.environ.get("Q3LAB_FUZZ_SEED", "0"))
CASES = int(os.environ.get("Q3LAB_FUZZ_CASES", "400"))
CASE_TIMEOUT_S = 5.0   # one case reads a 0.4 MB checkpoint in ~10 ms: 5 s means it hangs
DEADLINE_S = 50.0      # the whole loop; cases are seeded by index, so a cut run is still reproducible
INDEX = "model.safetensors.index.json"


class CaseTimeout(BaseException):
    """Raised by SIGALRM inside a case; a BaseException so that no `except Exception` in q3lab eats it."""


@dataclass
class Mutation:
    file: str
    kind: str
    detail: str
    in_place: list[int] | None = None  # file offsets overwritten without moving anything else


# -- the mutators ------------------------------------------------------------------------------------
INTERESTING = b'\x00\xff"{}[],: 0123456789-.eE\\nt'
JSON_VALUES = [0, -1, 1, 2, 7, 10**12, 2**63, -(2**70), 1.5, 1e308, math.inf, -math.inf, math.nan, True, False, None,
               "", "BF16", "F16", "F32", "I8", "U8", "BOOL", "X", [], [1], [1, 2, 3], ["a"], {}, {"a": 1}]


def _header_split(data: bytes) -> tuple[int, dict, bytes] | None:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _pack(header, rest: bytes) -> bytes:
    raw = json.dumps(header).encode()  # json.dumps writes inf/nan as Infinity/NaN: also worth feeding
    return struct.pack("<Q", len(raw)) + raw + rest


def byte_mutation(rng: random.Random, file: str, data: bytes, header_end: int) -> tuple[bytes, Mutation]:
    b = bytearray(data)
    kind = rng.choice(["flip", "set", "truncate", "insert", "delete", "splice"])
    # half of the positions fall in the header (or the JSON file), where structure lives
    pos = lambda: rng.randrange(header_end) if rng.random() < 0.5 else rng.randrange(len(b))  # noqa: E731
    if kind == "flip":
        where = sorted({pos() for _ in range(rng.randint(1, 4))})
        for p in where:
            b[p] ^= rng.randint(1, 255)
        return bytes(b), Mutation(file, kind, f"xor at {where}", in_place=where)
    if kind == "set":
        p, v = pos(), rng.choice(INTERESTING)
        b[p] = v
        return bytes(b), Mutation(file, kind, f"byte {p} = {bytes([v])!r}", in_place=[p])
    if kind == "truncate":
        n = rng.randrange(len(b))
        return bytes(b[:n]), Mutation(file, kind, f"to {n} bytes")
    if kind == "insert":
        p, k = pos(), rng.randint(1, 16)
        junk = bytes(rng.choice([rng.randrange(256), rng.choice(INTERESTING)]) for _ in range(k))
        return bytes(b[:p] + junk + b[p:]), Mutation(file, kind, f"{junk!r} at {p}")
    if kind == "delete":
        p, k = pos(), rng.randint(1, 16)
        return bytes(b[:p] + b[p + k:]), Mutation(file, kind, f"{k} bytes at {p}")
    a, k = rng.randrange(len(b)), rng.randint(1, 64)
    p = pos()
    return bytes(b[:p] + b[a:a + k] + b[p:]), Mutation(file, "splice", f"copy [{a}, {a + k}) to {p}")


def header_length_mutation(rng: random.Random, file: str, data: bytes) -> tuple[bytes, Mutation]:
    (n,) = struct.unpack("<Q", data[:8])
    new = rng.choice([n + rng.choice([-16, -8, -3, -1, 1, 2, 8, 64]), 0, 1, len(data) - 8, len(data),
                      rng.randrange(2**64), 2**63, 2**64 - 1])
    new = max(0, min(new, 2**64 - 1))
    return struct.pack("<Q", new) + data[8:], Mutation(file, "header_length", f"{n} -> {new}")


def _mutate_entry(rng: random.Random, entry) -> str:
    """Change one field of a safetensors header entry; returns what was done."""
    if not isinstance(entry, dict):
        return "entry not a dict"
    field = rng.choice(["dtype", "shape", "data_offsets", "extra", "drop"])
    if field == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "BOOL", "bf16", "X", 5, None,
                                     ["BF16"], {"a": 1}])
        return f"dtype = {entry['dtype']!r}"
    if field == "shape":
        shape = list(entry.get("shape", []))
        how = rng.choice(["swap", "drop", "add1", "value", "type"])
        if how == "swap":
            shape = shape[::-1]
        elif how == "drop" and shape:
            shape.pop(rng.randrange(len(shape)))
        elif how == "add1":
            shape.insert(rng.randrange(len(shape) + 1), 1)
        elif how == "value" and shape:
            shape[rng.randrange(len(shape))] = rng.choice(JSON_VALUES)
        else:
            shape = rng.choice(JSON_VALUES)
        entry["shape"] = shape
        return f"shape = {shape!r}"
    if field == "data_offsets":
        off = list(entry.get("data_offsets", [0, 0]))
        how = rng.choice(["shift", "end", "swap", "value", "type", "len"])
        if how == "shift" and len(off) == 2:
            d = rng.choice([-64, -2, -1, 1, 2, 64, 10**9])
            off = [off[0] + d, off[1] + d]
        elif how == "end" and len(off) == 2:
            off[1] += rng.choice([-2, -1, 1, 2])
        elif how == "swap":
            off = off[::-1]
        elif how == "value" and off:
            off[rng.randrange(len(off))] = rng.choice(JSON_VALUES)
        elif how == "len":
            off = off + [0]
        else:
            off = rng.choice(JSON_VALUES)
        entry["data_offsets"] = off
        return f"data_offsets = {off!r}"
    if field == "extra":
        entry[rng.choice(["x", "dtype2", "__metadata__"])] = rng.choice(JSON_VALUES)
        return "extra field"
    entry.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
    return "field dropped"


def header_json_mutation(rng: random.Random, file: str, data: bytes) -> tuple[bytes, Mutation]:
    n, header, rest = _header_split(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    how = rng.choice(["entry", "entry", "entry", "rename", "drop", "copy", "metadata", "not_object", "nested"])
    if how == "entry":
        detail = f"{name}: {_mutate_entry(rng, header[name])}"
    elif how == "rename":
        new = rng.choice([name + "x", name.replace("thinker.", "", 1), name.replace("layers.1", "layers.0"),
                          name.replace("weight", "bias")])
        header[new] = header.pop(name)
        detail = f"rename {name} -> {new}"
    elif how == "drop":
        header.pop(name)
        detail = f"drop {name}"
    elif how == "copy":  # a second name over the same bytes: overlapping tensors
        other = rng.choice(names)
        header[name] = dict(header[other])
        detail = f"{name} takes {other}'s entry"
    elif how == "metadata":
        header["__metadata__"] = rng.choice(JSON_VALUES)
        detail = f"__metadata__ = {header['__metadata__']!r}"
    elif how == "not_object":
        header = rng.choice([[], [header], None, 5, "x"])
        detail = f"header = {type(header).__name__}"
    else:
        header = {name: {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2], "deep": [[[[[[]]]]]] * 3}}
        detail = "deep nesting"
    return _pack(header, rest), Mutation(file, "header_json", detail)


def index_json_mutation(rng: random.Random, data: bytes, shards: list[str]) -> tuple[bytes, Mutation]:
    index = json.loads(data)
    wm = index["weight_map"]
    key = rng.choice(sorted(wm))
    how = rng.choice(["shard", "rename", "drop", "add", "value", "weight_map", "duplicate"])
    if how == "shard":
        wm[key] = rng.choice([s for s in shards if s != wm[key]] + ["model-00009-of-00003.safetensors",
                                                                    "../" + wm[key], ".hidden", ""])
        detail = f"{key} -> {wm[key]}"
    elif how == "rename":
        new = rng.choice([key + "x", key.replace("thinker.", "", 1), key.replace("layers.1", "layers.0")])
        wm[new] = wm.pop(key)
        detail = f"rename {key} -> {new}"
    elif how == "drop":
        wm.pop(key)
        detail = f"drop {key}"
    elif how == "add":
        wm[key.replace("experts.", "experts.9", 1) if "experts." in key else key + ".extra"] = wm[key]
        detail = f"extra key next to {key}"
    elif how == "value":
        wm[key] = rng.choice(JSON_VALUES)
        detail = f"{key} -> {wm[key]!r}"
    elif how == "weight_map":
        index["weight_map"] = rng.choice([[], None, "x", 5, {}])
        detail = f"weight_map = {index['weight_map']!r}"
    else:  # the same key twice in the JSON text: a lenient parser keeps the last one silently
        text = json.dumps(index)
        entry = f'"{key}": "{wm[key]}"'
        other = rng.choice(shards)
        return text.replace(entry, f'{entry}, "{key}": "{other}"', 1).encode(), \
            Mutation(INDEX, "index_json", f"duplicate key {key} -> {other}")
    return json.dumps(index).encode(), Mutation(INDEX, "index_json", detail)


TEXT_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "rms_norm_eps",
               "rope_theta", "max_position_embeddings", "rope_scaling", "norm_topk_prob", "torch_dtype",
               "tie_word_embeddings", "hidden_act", "mlp_only_layers", "decoder_sparse_step"]


def config_json_mutation(rng: random.Random, data: bytes) -> tuple[bytes, Mutation]:
    cfg = json.loads(data)
    text = cfg["thinker_config"]["text_config"]
    field = rng.choice(TEXT_FIELDS)
    how = rng.choice(["value", "value", "drop", "section", "parent"])
    if how == "value":
        old = text.get(field)
        text[field] = rng.choice(JSON_VALUES + ([old + 1, old - 1, 2 * old] if type(old) is int else []))
        detail = f"{field}: {old!r} -> {text[field]!r}"
    elif how == "drop":
        text.pop(field, None)
        detail = f"drop {field}"
    elif how == "section":
        sec = text["rope_scaling"]["mrope_section"]
        sec[rng.randrange(len(sec))] = rng.choice(JSON_VALUES)
        detail = f"mrope_section = {sec!r}"
    else:
        cfg["thinker_config"] = rng.choice([None, [], {"text_config": rng.choice(JSON_VALUES)}])
        detail = f"thinker_config = {cfg['thinker_config']!r}"
    return json.dumps(cfg).encode(), Mutation("config.json", "config_json", detail)


DEPTHS = [50, 99, 100, 101, 500, 5_000, 100_000]   # around the reader's MAX_DEPTH (100) and far beyond it


def _deep(depth: int, rng: random.Random) -> str:
    open_, close = rng.choice([("[", "]"), ('{"a":', "}")])
    return open_ * depth + "1" + close * depth


def nest_mutation(rng: random.Random, file: str, data: bytes) -> tuple[bytes, Mutation]:
    """Deep nesting where a JSON value may stand: an extra config or index key, a header's __metadata__ or one of
    its entries' fields, or the whole file."""
    depth = rng.choice(DEPTHS)
    deep = _deep(depth, rng)
    if file.endswith(".safetensors"):
        n, header, rest = _header_split(data)
        where = rng.choice(["__metadata__", "entry"])
        if where == "__metadata__":
            header["__metadata__"] = {"x": "DEEP"}
        else:
            header[rng.choice([k for k in header if k != "__metadata__"])]["x"] = "DEEP"
        raw = json.dumps(header).replace('"DEEP"', deep).encode()
        return struct.pack("<Q", len(raw)) + raw + rest, Mutation(file, "nest", f"{where} nested {depth} deep")
    obj = json.loads(data)
    if rng.random() < 0.2:
        return deep.encode(), Mutation(file, "nest", f"the whole file nested {depth} deep")
    target = obj["thinker_config"]["text_config"] if file == "config.json" and rng.random() < 0.5 else obj
    target[rng.choice(["x", "rope_scaling" if file == "config.json" else "metadata"])] = "DEEP"
    return json.dumps(obj).replace('"DEEP"', deep).encode(), Mutation(file, "nest", f"a value nested {depth} deep")


def type_mutation(rng: random.Random, data: bytes) -> tuple[bytes, Mutation]:
    """Same value, other JSON type: 64 -> 64.0, 64.9, "64", true; 1e-6 -> true, "1e-06"; [6, 5, 5] -> ["6", 5, 5]."""
    cfg = json.loads(data)
    text = cfg["thinker_config"]["text_config"]
    field = rng.choice([k for k in TEXT_FIELDS if k in text and k != "rope_scaling"] + ["mrope_section"])
    if field == "mrope_section":
        sec = text["rope_scaling"]["mrope_section"]
        i = rng.randrange(len(sec))
        sec[i] = rng.choice([str(sec[i]), float(sec[i]), sec[i] + 0.5, bool(sec[i])])
        return json.dumps(cfg).encode(), Mutation("config.json", "type", f"mrope_section = {sec!r}")
    old = text[field]
    if type(old) is bool:
        new = rng.choice([int(old), str(old).lower(), [old]])
    elif type(old) is int:
        new = rng.choice([float(old), old + 0.9, str(old), old == 1 or bool(old), [old]])
    elif type(old) is float:
        new = rng.choice([True, False, str(old), [old], int(old) if old >= 1 else 0])
    else:
        new = rng.choice([[old], {"x": old}, 1, True])
    text[field] = new
    return json.dumps(cfg).encode(), Mutation("config.json", "type", f"{field}: {old!r} -> {new!r}")


SPECIALS = ["fifo", "dev_zero", "directory", "symlink_loop", "dangling_symlink", "symlink_to_other"]


def make_special(path: Path, kind: str, other: Path) -> None:
    """Replace `path` by a special file (its bytes are restored by `restore`)."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink_loop":
        path.symlink_to(path.name)
    elif kind == "dangling_symlink":
        path.symlink_to("nowhere-" + path.name)
    else:
        path.symlink_to(other.name)


def restore(path: Path, data: bytes) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.is_symlink() or path.exists() and not path.is_file():
        path.unlink()
    path.write_bytes(data)


def make_case(rng: random.Random, files: dict[str, bytes], shards: list[str]) -> tuple[str, bytes | str, Mutation]:
    """(file, new bytes or the name of a special file to put there, mutation)."""
    target = rng.choices(["shard", "index", "config", "nest", "type", "special"], weights=[6, 2, 2, 1, 1, 1])[0]
    if target == "nest":
        file = rng.choice([*shards, INDEX, "config.json"])
        new, m = nest_mutation(rng, file, files[file])
        return file, new, m
    if target == "type":
        new, m = type_mutation(rng, files["config.json"])
        return "config.json", new, m
    if target == "special":
        file, kind = rng.choice([*shards, INDEX, "config.json"]), rng.choice(SPECIALS)
        return file, kind, Mutation(file, "special", kind)
    if target == "shard":
        file = rng.choice(shards)
        data = files[file]
        (n,) = struct.unpack("<Q", data[:8])
        kind = rng.choices(["bytes", "header_length", "header_json"], weights=[5, 1, 4])[0]
        if kind == "bytes":
            new, m = byte_mutation(rng, file, data, 8 + n)
        elif kind == "header_length":
            new, m = header_length_mutation(rng, file, data)
        else:
            new, m = header_json_mutation(rng, file, data)
        return file, new, m
    if target == "index":
        if rng.random() < 0.5:
            new, m = byte_mutation(rng, INDEX, files[INDEX], len(files[INDEX]))
        else:
            new, m = index_json_mutation(rng, files[INDEX], shards)
        return INDEX, new, m
    if rng.random() < 0.5:
        new, m = byte_mutation(rng, "config.json", files["config.json"], len(files["config.json"]))
    else:
        new, m = config_json_mutation(rng, files["config.json"])
    return "config.json", new, m


# -- running one case ---------------------------------------------------------------------------------
def data_tensors(data: bytes, offsets: list[int]) -> set[str]:
    """Tensors (by source key) of the ORIGINAL shard whose data bytes cover any of `offsets`."""
    n, header, _ = _header_split(data)
    hit = set()
    for key, e in header.items():
        if key == "__metadata__":
            continue
        b0, b1 = (8 + n + o for o in e["data_offsets"])
        if any(b0 <= o < b1 for o in offsets):
            hit.add(key)
    return hit


def classify(folder: Path, original: dict[str, torch.Tensor], files: dict[str, bytes], m: Mutation) -> str:
    """Open, audit and read the mutated checkpoint; the outcome class, or AssertionError for a silent wrong read."""
    try:
        ckpt = Checkpoint(folder)
        report = audit_checkpoint(ckpt)
    except Q3LabError:
        return "error"
    reads, read_errors = {}, 0
    for name in ckpt.names():
        try:
            reads[name] = ckpt.get(name)
        except Q3LabError:
            read_errors += 1
    if not report.ok:
        return "rejected"
    if read_errors:
        return "read_error"  # the audit passed, yet a read raised: clear, but the audit missed it
    prefix = ckpt.prefix
    differ = {prefix + n for n, t in reads.items()
              if t.dtype != original[n].dtype or t.shape != original[n].shape
              or not torch.equal(t.view(torch.uint8), original[n].view(torch.uint8))}
    if not differ:
        return "identical"
    explained = m.in_place is not None and m.file in files and m.file.endswith(".safetensors") \
        and differ <= data_tensors(files[m.file], m.in_place)
    assert explained, f"silent wrong read: the audit passed but {sorted(differ)[:5]} differ after {m}"
    return "undetectable"


def _alarm(signum, frame):
    raise CaseTimeout()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from q3lab.weights.synthetic import synth
    path = synth(tmp_path_factory.mktemp("fuzz") / "ckpt", "tiny", seed=5, layers=2, progress=False)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    files = {name: (path / name).read_bytes() for name in [*shards, INDEX, "config.json"]}
    original = {}
    for s in shards:  # the reference values come from the safetensors library, not from the reader under test
        for key, t in load_file(str(path / s)).items():
            if key.startswith("thinker.model.") or key.startswith("thinker.lm_head."):
                original[key[len("thinker."):]] = t.clone()  # load_file maps the file: copy before mutating it
    return path, shards, files, original


def test_pristine_checkpoint_is_a_verified_success(pristine):
    path, shards, files, original = pristine
    assert classify(path, original, files, Mutation("none", "none", "")) == "identical"
    assert len(original) == len(Checkpoint(path).names())


def test_random_mutations_end_in_q3lab_errors_or_verified_reads(pristine, capsys):
    path, shards, files, original = pristine
    old = signal.signal(signal.SIGALRM, _alarm)
    outcomes: Counter = Counter()
    by_kind: defaultdict[str, Counter] = defaultdict(Counter)
    t0 = time.monotonic()
    ran = 0
    try:
        for case in range(CASES):
            if time.monotonic() - t0 > DEADLINE_S:
                break
            rng = random.Random(f"{SEED}:{case}")
            file, data, m = make_case(rng, files, shards)
            if isinstance(data, str):
                make_special(path / file, data, path / rng.choice([f for f in files if f != file]))
            else:
                (path / file).write_bytes(data)
            where = f"case {case} (Q3LAB_FUZZ_SEED={SEED}): {m}"
            try:
                signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
                outcome = classify(path, original, files, m)
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    rc = main(["audit", str(path)])  # the CLI: a status, never a traceback
                signal.setitimer(signal.ITIMER_REAL, 0)
            except CaseTimeout:
                pytest.fail(f"hang (> {CASE_TIMEOUT_S} s): {where}")
            except AssertionError as e:
                pytest.fail(f"{e} ({where})")
            except Exception as e:  # noqa: BLE001 - exactly what this test exists to catch
                pytest.fail(f"{type(e).__name__}: {e} escaped instead of a Q3LabError: {where}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                restore(path / file, files[file])
            want_rc = {"error": {2}, "rejected": {1}, "read_error": {0}, "identical": {0}, "undetectable": {0}}[outcome]
            assert rc in want_rc, f"q3lab audit exited {rc} for outcome {outcome}: {where}"
            outcomes[("shards" if m.file.startswith("model-0") else m.file, m.kind, outcome)] += 1
            by_kind[m.kind][outcome] += 1
            ran += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    per_target: dict[str, Counter] = {}
    for (target, _, outcome), n in outcomes.items():
        per_target.setdefault(target, Counter())[outcome] += n
    with capsys.disabled():
        print(f"\nfuzz: {ran} cases in {time.monotonic() - t0:.1f} s (seed {SEED}); outcomes per mutated file:")
        for target, c in sorted(per_target.items()):
            print(f"  {target:<29}" + "  ".join(f"{k} {v}" for k, v in sorted(c.items())))
        for kind in ("nest", "type", "special"):
            print(f"  {kind + ' mutations':<29}" + "  ".join(f"{k} {v}" for k, v in sorted(by_kind[kind].items())))
    assert ran >= min(CASES, 200), f"only {ran} cases ran before the {DEADLINE_S} s deadline"
    by_outcome = Counter()
    for (_, _, outcome), n in outcomes.items():
        by_outcome[outcome] += n
    # the mix proves the fuzzer reaches every branch: errors, audit rejections, clean and undetectable reads
    assert by_outcome["error"] > 0 and by_outcome["rejected"] > 0
    assert by_outcome["identical"] > 0 and by_outcome["undetectable"] > 0
    kinds = {kind for (_, kind, _) in outcomes}
    assert {"nest", "type", "special"} <= kinds


# -- the property: no CLI command ends in a traceback --------------------------------------------------------
# A corpus of a checkpoint, its store, an interrupted store (journal), prompt files and traces; hypothesis picks
# a file, a mutation (random bytes, a JSON value replaced by any other, deep nesting, a special file) and a
# command. Whatever the input, the command exits 0, 1 or 2, with its own message; never 3 or a traceback.
# Examples are derandomized (the same on every machine) and bounded by Q3LAB_PROPERTY_EXAMPLES (default 150).
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY_EXAMPLES = int(os.environ.get("Q3LAB_PROPERTY_EXAMPLES", "150"))
NASTY = ["", "1", "\udce9", "x" * 300, "../x", "model.norm.weight", "BF16", "NaN"]
JSON_ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6) | st.sampled_from(NASTY),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


class ExampleTimeout(BaseException):
    """A hang inside one example (SIGALRM)."""


def _timeout(signum, frame):
    raise ExampleTimeout()


def _json_slots(obj, limit: int = 5000) -> list[tuple[object, object]]:
    """(container, key) of every value in a parsed JSON document (iterative: no recursion), at most `limit`."""
    slots, stack = [], [obj]
    while stack and len(slots) < limit:
        cur = stack.pop()
        items = cur.items() if isinstance(cur, dict) else enumerate(cur) if isinstance(cur, list) else []
        for k, v in items:
            slots.append((cur, k))
            stack.append(v)
    return slots


def _mutate_json(data: bytes, rng: random.Random, value) -> tuple[bytes, str]:
    obj = json.loads(data)
    slots = _json_slots(obj)
    if not slots:
        return json.dumps(value).encode(), "whole document replaced"
    cont, key = rng.choice(slots)
    cont[key] = value
    return json.dumps(obj).encode(), f"[{key!r}] = {value!r:.60}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import shutil

    import q3lab
    from q3lab.weights.extraction import extract
    from q3lab.runtime.recording import save_trace, trace_prompts
    from q3lab.weights.synthetic import synth
    from q3lab.base.tokenizer import load_tokenizer
    root = tmp_path_factory.mktemp("property")
    ck = synth(root / "ck", "tiny", seed=5, layers=2, progress=False)
    store = extract(ck, root / "store", progress=False)
    frame = trace_prompts(q3lab.load(store), load_tokenizer(store), [{"id": "a", "prompt": "hi there", "line": 1}],
                          progress=False).to_frame()
    traces = {"t.parquet": save_trace(frame, root / "t.parquet"), "t.csv": save_trace(frame, root / "t.csv")}
    prompts = {"p.jsonl": root / "p.jsonl", "p.txt": root / "p.txt"}
    prompts["p.jsonl"].write_text('{"prompt": "hello", "id": 1, "domain": "d"}\n{"prompt": "yo", "id": "b"}\n')
    prompts["p.txt"].write_text("hello\nworld\n")
    journal = root / "journal-template"
    shutil.copytree(store, journal)
    m = json.loads((journal / "manifest.json").read_text())
    (journal / "manifest.json").unlink()
    files = {rel: {"sha256": d["sha256"], "bytes": d["bytes"], "tensors": {}} for rel, d in m["files"].items()}
    (journal / ".progress.json").write_text(json.dumps(
        {"format": "q3lab-store-progress", "version": 1, "source": m["source"], "source_id": m["source_id"],
         "fingerprint": m["fingerprint"], "dtype": m["dtype"], "files": files}))
    return dict(root=root, ck=ck, store=store, journal=journal, traces=traces, prompts=prompts)


TARGETS = [("ck", "config.json"), ("ck", INDEX), ("ck", "model-00001-of-00003.safetensors"),
           ("ck", "model-00003-of-00003.safetensors"), ("ck", "tokenizer.json"), ("ck", "tokenizer_config.json"),
           ("store", "manifest.json"), ("store", "config.json"), ("store", "dense.safetensors"),
           ("store", "experts/layer_001.safetensors"), ("store", "tokenizer_config.json"),
           ("journal", ".progress.json"), ("prompts", "p.jsonl"), ("prompts", "p.txt"),
           ("traces", "t.parquet"), ("traces", "t.csv")]


def _commands(kind: str, c: dict, target: Path, out: Path) -> list[list]:
    prompt = ["--prompt", "hi", "--max-new-tokens", "1", "--greedy"]
    if kind == "ck":
        return [["audit", c["ck"]], ["extract", c["ck"], out, "--no-progress"], ["generate", c["ck"], *prompt]]
    if kind == "store":
        return [["extract", "--verify", c["store"], "--no-progress"], ["generate", c["store"], *prompt],
                ["trace", c["store"], "--prompts", c["prompts"]["p.txt"], "--out", out / "t.parquet", "--no-progress"]]
    if kind == "journal":
        return [["extract", c["ck"], target.parent, "--no-progress"], ["generate", target.parent, *prompt]]
    if kind == "prompts":
        return [["trace", c["store"], "--prompts", target, "--out", out / "t.csv", "--no-progress"]]
    return []


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(target=st.sampled_from(TARGETS), how=st.sampled_from(["bytes", "json", "nest", "special", "lines"]),
       seed=st.integers(0, 2**32), value=JSON_ANY, which=st.integers(0, 2),
       lines=st.lists(st.one_of(JSON_ANY, st.fixed_dictionaries({"prompt": st.text(max_size=8)},
                                                                  optional={"id": JSON_ANY, "domain": JSON_ANY})),
                      min_size=1, max_size=4),
       raw=st.binary(max_size=40))
def test_no_cli_command_ends_in_a_traceback_on_mutated_inputs(corpus, tmp_path_factory, target, how, seed, value,
                                                                which, lines, raw):
    import shutil

    from q3lab.errors import InputError
    from q3lab.runtime.recording import load_trace
    kind, rel = target
    work = tmp_path_factory.mktemp("example")
    if kind == "journal":
        folder = Path(shutil.copytree(corpus["journal"], work / "journal"))
        path = folder / rel
    elif kind in ("prompts", "traces"):
        path = Path(shutil.copy(corpus[kind][rel], work / rel))
    else:
        path = corpus[kind] / rel
    original = path.read_bytes()
    rng = random.Random(seed)
    is_json = rel.endswith((".json", ".jsonl")) and how != "bytes"
    if how == "special":
        make_special(path, rng.choice(SPECIALS), path.parent / "config.json")
        detail = "special file"
    else:
        if how == "lines" and kind == "prompts":
            data = b"\n".join(json.dumps(x).encode() for x in lines) + b"\n" + raw
        elif how == "nest" and (is_json or rel.endswith(".safetensors")) and not rel.endswith(".jsonl"):
            data = nest_mutation(rng, rel, original)[0] if rel != "tokenizer.json" and rel != "tokenizer_config.json" \
                else _deep(rng.choice(DEPTHS), rng).encode()
        elif is_json and rel.endswith(".json"):
            data = _mutate_json(original, rng, value)[0]
        else:
            data = byte_mutation(rng, rel, original, min(len(original), 400))[0]
        path.write_bytes(data)
        detail = f"{how}: {data[:80]!r}"
    where = f"{kind}/{rel} {detail}"
    old = signal.signal(signal.SIGALRM, _timeout)
    try:
        signal.alarm(30)
        if kind == "traces":
            try:
                frame = load_trace(path)
                assert {"prompt", "token_index", "layer", "expert"} <= set(frame.columns)
                event("traces: loaded")
            except InputError:
                event("traces: InputError")
        else:
            commands = _commands(kind, corpus, path, work / "out")
            argv = [str(a) for a in commands[which % len(commands)]]
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = main(argv)
            text = err.getvalue()
            assert rc in (0, 1, 2) and "Traceback" not in text and "internal error" not in text, \
                f"q3lab {' '.join(argv)} exited {rc} after {where}:\n{text[-2000:]}"
            event(f"{kind}: q3lab {argv[0]}{' --verify' if '--verify' in argv else ''} exit {rc}")
            if rc == 2:
                assert f"q3lab {argv[0]}: error: " in text, f"exit 2 without its error line after {where}: {text!r}"
    except ExampleTimeout:
        pytest.fail(f"hang (> 30 s) after {where}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        restore(path, original)
        shutil.rmtree(work, ignore_errors=True)
