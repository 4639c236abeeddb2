"""Exit statuses and bounded reading: what the environment can do to a file, hostile JSON, config type confusion,
hostile manifests, journals, tokenizer configs, prompt files and traces, and bad CLI options.

Every case runs the CLI in-process (`faultkit.cli`) and checks the status (0 success, 1 ran and found problems,
2 refused input, 3 internal error) and the one line naming the file, field or option; a few run a real
`python -m q3lab` subprocess. Permissions are simulated with a patched `os.open` (these tests run as root), and
checked for real through `setpriv` where it works.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import q3lab
from faultkit import INDEX, cli, copy_ckpt, index, read_shard, snapshot, write_index, write_shard
from q3lab.base import jsonio
from q3lab.weights.checkpoint import Checkpoint, audit_checkpoint
from q3lab.base.config import ThinkerConfig
from q3lab.errors import CheckpointError, InputError, StoreError
from q3lab.weights.extraction import extract
from q3lab.runtime.recording import load_trace, read_prompts
from q3lab.weights.store import MANIFEST, PROGRESS
from q3lab.base.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def ck(tiny_ckpt, tmp_path) -> Path:
    return copy_ckpt(tiny_ckpt, tmp_path / "ck")


@pytest.fixture(scope="module")
def store(tiny_ckpt, tmp_path_factory) -> Path:
    return extract(tiny_ckpt, tmp_path_factory.mktemp("exit_faults") / "store", progress=False)


@pytest.fixture
def no_hang():
    """Fail instead of hanging (a FIFO read blocks forever): SIGALRM after 20 s."""
    def alarm(signum, frame):
        raise TimeoutError("hang: the read did not return within 20 s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err[:600]}"
    assert "Traceback" not in err
    return lines[0]


def text_config(ck: Path) -> tuple[dict, dict]:
    cfg = json.loads((ck / "config.json").read_text())
    return cfg, cfg["thinker_config"]["text_config"]


# -- 1. exit statuses --------------------------------------------------------------------------------------
def test_exit_statuses_mean_one_thing_each(ck, capsys, monkeypatch):
    assert cli(capsys, "audit", ck)[0] == 0
    idx = index(ck)
    del idx["weight_map"]["thinker.model.norm.weight"]
    write_index(ck, idx)
    rc, out, _ = cli(capsys, "audit", ck)
    assert rc == 1 and "FAILED" in out and "model.norm.weight" in out        # ran and found problems
    good = (ck / "config.json").read_bytes()
    (ck / "config.json").write_text("{")
    rc, _, err = cli(capsys, "audit", ck)
    assert rc == 2 and one_line(err).startswith(f"q3lab audit: error: {ck / 'config.json'}: invalid JSON")
    (ck / "config.json").write_bytes(good)

    def boom(*a, **k):
        raise RuntimeError("an injected bug\nsecond line")
    monkeypatch.setattr("q3lab.weights.checkpoint.audit_checkpoint", boom)
    monkeypatch.delenv("Q3LAB_DEBUG", raising=False)
    rc, _, err = cli(capsys, "audit", ck)
    line = one_line(err)
    assert rc == 3 and "internal error: RuntimeError: an injected bug (this is a bug in q3lab" in line
    assert "rerun with --debug or Q3LAB_DEBUG=1" in line
    for argv in (["--debug", "audit", ck], ["audit", ck, "--debug"]):
        rc, _, err = cli(capsys, *argv)
        assert rc == 3 and "Traceback (most recent call last)" in err and "RuntimeError: an injected bug" in err
    monkeypatch.setenv("Q3LAB_DEBUG", "1")
    rc, _, err = cli(capsys, "audit", ck)
    assert rc == 3 and "Traceback" in err

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("q3lab.weights.checkpoint.audit_checkpoint", interrupt)
    rc, _, err = cli(capsys, "audit", ck)
    assert rc == 130 and one_line(err) == "q3lab audit: interrupted"


def test_os_errors_outside_q3lab_readers_exit_2_naming_the_file(ck, capsys, monkeypatch, tmp_path):
    """The net under the readers: an OSError from anywhere (here pandas writing --csv into a folder) is the
    environment, exit 2 with the file name, never a traceback or exit 3."""
    (tmp_path / "adir").mkdir()
    rc, _, err = cli(capsys, "audit", ck, "--csv", tmp_path / "adir")
    assert rc == 2 and str(tmp_path / "adir") in one_line(err)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.csv"))
    monkeypatch.setattr(pd.DataFrame, "to_csv", denied)
    rc, _, err = cli(capsys, "audit", ck, "--csv", tmp_path / "x.csv")
    assert rc == 2 and one_line(err) == f"q3lab audit: error: {tmp_path / 'x.csv'}: cannot write: Permission denied"


# -- 2. what the environment can do to a file ------------------------------------------------------------
def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


def _fifo(p: Path) -> None:
    p.unlink()
    os.mkfifo(p)


def _dev_zero(p: Path) -> None:
    p.unlink()
    p.symlink_to("/dev/zero")


def _loop(p: Path) -> None:
    p.unlink()
    p.symlink_to(p.name)


def _latin1(p: Path) -> None:
    p.write_bytes(p.read_bytes().replace(b'"silu"', b'"sil\xe9"').replace(b'"weight_map"', b'"weight_m\xe4p"'))


def _deep(p: Path) -> None:
    p.write_text(DEEP)


SPECIAL = {"directory": (_directory, "a directory, expected a regular"),
           "fifo": (_fifo, "a FIFO (named pipe), expected a regular"),
           "dev_zero": (_dev_zero, "a character device, expected a regular"),
           "symlink_loop": (_loop, "cannot read: Too many levels of symbolic links"),
           "latin1": (_latin1, "not UTF-8 text: byte b'\\x"),
           "deep": (_deep, "nested 100000 levels deep, more than the 100 q3lab accepts")}


@pytest.mark.parametrize("file", ["config.json", INDEX])
@pytest.mark.parametrize("case", sorted(SPECIAL))
def test_special_files_and_bad_json_exit_2_naming_the_file(ck, capsys, no_hang, file, case):
    make, message = SPECIAL[case]
    make(ck / file)
    for argv in (["audit", ck], ["extract", ck, ck.parent / "out"], ["generate", ck, "--prompt", "hi"]):
        rc, _, err = cli(capsys, *argv)
        line = one_line(err)
        assert rc == 2 and f"{ck / file}: " in line and message in line, (argv, line)
    assert not (ck.parent / "out").exists()
    with pytest.raises(CheckpointError, match="expected a regular|cannot read|not UTF-8|nested"):
        q3lab.load(ck)


def test_deep_nesting_in_a_shard_header_metadata_is_a_corrupt_header(ck, capsys):
    shard = ck / index(ck)["weight_map"]["thinker.model.norm.weight"]
    header, data = read_shard(shard)
    header["__metadata__"] = {"x": "PLACEHOLDER"}
    write_shard(shard, json.dumps(header).replace('"PLACEHOLDER"', "[" * 50_000 + "]" * 50_000), data)
    rc, out, _ = cli(capsys, "audit", ck)
    assert rc == 1 and f"{shard.name}: corrupt header: invalid JSON (nested 50002 levels deep" in out


def test_unreadable_inputs_exit_2_naming_the_file(ck, capsys, monkeypatch):
    """Permission denied on each input (simulated: root ignores modes; the real check is the setpriv test)."""
    shard = index(ck)["weight_map"]["thinker.model.norm.weight"]
    real_open = os.open
    denied: set[str] = set()

    def fake_open(path, flags, *a, **k):
        if Path(path).name in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr("q3lab.base.safetensors_io._open_header", fake_open)   # shard headers' own descriptor
    for name, argv, status in [("config.json", ["audit", ck], 2), (INDEX, ["audit", ck], 2),
                               (shard, ["audit", ck], 1),
                               ("tokenizer_config.json", ["generate", ck, "--prompt", "hi", "--max-new-tokens", "1"], 2),
                               ("tokenizer.json", ["generate", ck, "--prompt", "hi", "--max-new-tokens", "1"], 2)]:
        denied.clear()
        denied.add(name)
        rc, out, err = cli(capsys, *argv)
        text = out if status == 1 else one_line(err)
        assert rc == status and f"{ck / name}: cannot " in text and "Permission denied" in text, (name, out, err)


def test_unreadable_inputs_with_real_permissions(ck, tmp_path):
    """The same with real modes: root without CAP_DAC_OVERRIDE (setpriv), as the adversarial run did."""
    ro = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
          "-dac_override,-dac_read_search"]
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    if shutil.which("setpriv") is None or subprocess.run([*ro, "cat", str(probe)], capture_output=True).returncode == 0:
        pytest.skip("cannot drop CAP_DAC_OVERRIDE here")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shard = ck / index(ck)["weight_map"]["thinker.model.norm.weight"]
    # one process (torch takes seconds to import) runs the audit with each file unreadable in turn; the owner
    # may chmod without CAP_DAC_OVERRIDE
    script = ("import os, sys\nfrom q3lab.cli import main\n"
              "for target in sys.argv[2:]:\n"
              "    os.chmod(target, 0)\n"
              "    print('STATUS', main(['audit', sys.argv[1]]), file=sys.stderr, flush=True)\n"
              "    os.chmod(target, 0o644)\n")
    r = subprocess.run([*ro, sys.executable, "-c", script, str(ck), str(ck / "config.json"), str(shard)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert [x for x in r.stderr.splitlines() if x.startswith("STATUS")] == ["STATUS 2", "STATUS 1"], r.stderr
    assert f"q3lab audit: error: {ck / 'config.json'}: cannot read: Permission denied" in r.stderr
    assert f"{shard}: cannot open shard: Permission denied" in r.stdout and "Traceback" not in r.stderr


def test_size_caps_refuse_large_files(ck, capsys, monkeypatch):
    monkeypatch.setitem(jsonio.CAPS, "config", 1000)   # the real cap is 16 MiB: far above any real config
    rc, _, err = cli(capsys, "audit", ck)
    size = (ck / "config.json").stat().st_size
    assert rc == 2 and one_line(err) == (f"q3lab audit: error: {ck / 'config.json'}: {size:,} bytes, more than "
                                         f"the 1,000 q3lab reads from a config file")


def test_long_shard_name_is_an_audit_error_naming_it(ck, capsys):
    idx = index(ck)
    idx["weight_map"]["thinker.model.norm.weight"] = "a" * 300
    write_index(ck, idx)
    rc, out, _ = cli(capsys, "audit", ck)
    assert rc == 1 and f"shard {'a' * 80!r} of {ck} cannot be opened: File name too long" in out


# -- 3. config type confusion ----------------------------------------------------------------------------
def _set(key, value):
    def edit(text):
        text[key] = value
    return edit


def _section(value):
    def edit(text):
        text["rope_scaling"]["mrope_section"] = value
    return edit


CONFIG_CASES = {
    "eps_true": (_set("rms_norm_eps", True), "rms_norm_eps True (expected a number)"),
    "theta_true": (_set("rope_theta", True), "rope_theta True (expected a number)"),
    "theta_string": (_set("rope_theta", "1e6"), "rope_theta '1e6' (expected a number)"),
    "eps_huge_int": (_set("rms_norm_eps", 10**400), "rms_norm_eps 1000"),
    "hidden_float": (_set("hidden_size", 64.9), "hidden_size 64.9 (expected an integer)"),
    "layers_float": (_set("num_hidden_layers", 4.5), "num_hidden_layers 4.5 (expected an integer)"),
    "layers_integral_float": (_set("num_hidden_layers", 4.0), "num_hidden_layers 4.0 (expected an integer)"),
    "heads_string": (_set("num_attention_heads", "4"), "num_attention_heads '4' (expected an integer)"),
    "experts_bool": (_set("num_experts", True), "num_experts True (expected an integer)"),
    "vocab_4000_digits": (_set("vocab_size", 10**3999), "vocab_size 1000"),
    "flag_string": (_set("norm_topk_prob", "false"), "norm_topk_prob 'false' (expected true or false)"),
    "section_strings": (_section(["4", 2, 2]), "mrope_section ['4', 2, 2] (expected a list of 3 integers)"),
    "section_bools": (_section([True, 2, 5]), "mrope_section [True, 2, 5] (expected a list of 3 integers)"),
    "odd_head_dim": (lambda t: (t.update(head_dim=15), t["rope_scaling"].update(mrope_section=[4, 2, 1])),
                     "head_dim 15 is odd; rotary embeddings need an even head_dim"),
    "rope_scaling_list": (_set("rope_scaling", [1]), "malformed rope_scaling in the thinker text config"),
    "act_list": (_set("hidden_act", ["silu"]), "hidden_act ['silu'] (expected a string)"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_values_are_type_checked_field_by_field(ck, capsys, case):
    edit, message = CONFIG_CASES[case]
    cfg, text = text_config(ck)
    edit(text)
    (ck / "config.json").write_text(json.dumps(cfg))
    rc, _, err = cli(capsys, "audit", ck)
    line = one_line(err)
    assert rc == 2 and line.startswith(f"q3lab audit: error: {ck / 'config.json'}: ") and message in line, line


def test_config_types_are_checked_when_built_in_python_too():
    good = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, mrope_section=[4, 2, 2])
    assert ThinkerConfig(**good).rms_norm_eps == 1e-6
    for bad in ({"rms_norm_eps": True}, {"hidden_size": 64.0}, {"head_dim": 15, "mrope_section": [4, 2, 1]},
                {"mrope_section": (4, 2, 2)}, {"tie_word_embeddings": 0}):
        with pytest.raises(CheckpointError, match="invalid thinker text config"):
            ThinkerConfig(**{**good, **bad})
    assert type(ThinkerConfig(**{**good, "rope_theta": 10000}).rope_theta) is float   # an integer theta is fine


# -- 4. a linear audit -----------------------------------------------------------------------------------
def test_audit_of_an_index_with_20k_missing_shards_reports_each_once(ck, capsys):
    idx = index(ck)
    n = 20_000
    for i in range(n):
        idx["weight_map"][f"talker.junk.{i}"] = f"missing-{i}.safetensors"
    write_index(ck, idx)
    t0 = time.perf_counter()
    report = audit_checkpoint(Checkpoint(ck))
    seconds = time.perf_counter() - t0
    assert len(report.errors) == n
    assert report.errors[0] == f"shard missing-0.safetensors is missing from {ck}; the index lists 1 tensors in " \
                               f"it, e.g. talker.junk.0"
    summary = report.summary()
    assert summary.count("\nerror: ") == 50 and f"... and {n - 50} more errors ({n} in all)" in summary
    rc, out, _ = cli(capsys, "audit", ck)
    assert rc == 1 and len(out.splitlines()) < 200
    print(f"\naudit of {n} missing shards: {seconds:.2f} s")   # measured once for the report (no timed assert)


# -- 5. tokenizer files ----------------------------------------------------------------------------------
def _tok_cfg(edit):
    def apply(ck: Path) -> None:
        p = ck / "tokenizer_config.json"
        c = json.loads(p.read_text())
        edit(c)
        p.write_text(json.dumps(c))
    return apply


TOKENIZER_CASES = {
    "config_nested": (lambda ck: (ck / "tokenizer_config.json").write_text(DEEP),
                      "tokenizer_config.json: invalid JSON: nested 100000 levels deep"),
    "decoder_key_abc": (_tok_cfg(lambda c: c["added_tokens_decoder"].__setitem__("abc", {"content": "<|endoftext|>"})),
                        "added_tokens_decoder key 'abc' is not a token id"),
    "eos_list": (_tok_cfg(lambda c: c.__setitem__("eos_token", ["<|im_end|>"])),
                 "eos_token is ['<|im_end|>'], expected a string"),
    "decoder_list": (_tok_cfg(lambda c: c.__setitem__("added_tokens_decoder", [1])),
                     "added_tokens_decoder is list, expected an object"),
    "decoder_flag_string": (_tok_cfg(lambda c: next(iter(c["added_tokens_decoder"].values())).__setitem__("special", "no")),
                            "special must be true or false"),
    "tokenizer_fifo": (lambda ck: _fifo(ck / "tokenizer.json"), "tokenizer.json: a FIFO (named pipe)"),
    "tokenizer_dev_zero": (lambda ck: _dev_zero(ck / "tokenizer.json"), "tokenizer.json: a character device"),
    "tokenizer_nested": (lambda ck: (ck / "tokenizer.json").write_text(DEEP), "nested 100000 levels deep"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_hostile_tokenizer_files_exit_2(ck, capsys, no_hang, case):
    make, message = TOKENIZER_CASES[case]
    make(ck)
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(ck)
    rc, _, err = cli(capsys, "generate", ck, "--prompt", "hi", "--max-new-tokens", "1")
    assert rc == 2 and message in one_line(err)


def test_vocab_and_merges_are_read_through_the_bounded_reader(ck, no_hang):
    from tokenizers import Tokenizer as HF
    hf = HF.from_file(str(ck / "tokenizer.json"))
    model = json.loads(hf.to_str())["model"]
    (ck / "tokenizer.json").unlink()
    (ck / "vocab.json").write_text(json.dumps(model["vocab"]))
    (ck / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) if isinstance(m, list) else m
                                                               for m in model["merges"]) + "\n")
    tok = load_tokenizer(ck)
    assert tok.encode("hello world") == hf.encode("hello world", add_special_tokens=False).ids
    _fifo(ck / "merges.txt")
    with pytest.raises(CheckpointError, match="merges.txt: a FIFO"):
        load_tokenizer(ck)


# -- 6. hostile manifest and journal ---------------------------------------------------------------------
def _manifest_tensor(key, value):
    def edit(m):
        m["tensors"][0][key] = value
    return edit


MANIFEST_CASES = {
    "name_list": (_manifest_tensor("name", ["x"]), "malformed tensor entry"),
    "shape_int": (_manifest_tensor("shape", 5), "malformed tensor entry"),
    "shape_bool": (_manifest_tensor("shape", [True, 64]), "malformed tensor entry"),
    "dtype_list": (_manifest_tensor("dtype", ["bf16"]), "malformed tensor entry"),
    "file_int": (_manifest_tensor("file", 3), "malformed tensor entry"),
    "bytes_float": (lambda m: next(iter(m["files"].values())).__setitem__("bytes", 1.5), "malformed entry for file"),
    "fingerprint_list": (lambda m: m.__setitem__("fingerprint", ["x"]), "'fingerprint' is ['x'], expected a string"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES) + ["nested"])
def test_hostile_manifest_is_a_store_error(store, tmp_path, tiny_ckpt, capsys, case):
    s = Path(shutil.copytree(store, tmp_path / "s"))
    if case == "nested":
        (s / MANIFEST).write_text('{"format": "q3lab-store", "x": ' + DEEP + "}")
        message = "nested 100001 levels deep"
    else:
        edit, message = MANIFEST_CASES[case]
        m = json.loads((s / MANIFEST).read_text())
        edit(m)
        (s / MANIFEST).write_text(json.dumps(m))
    before = snapshot(s)
    for argv in (["extract", "--verify", s, "--no-progress"], ["extract", tiny_ckpt, s, "--no-progress"],
                 ["generate", s, "--prompt", "hi", "--max-new-tokens", "1"]):
        rc, _, err = cli(capsys, *argv)
        line = one_line(err)
        assert rc == 2 and f"{s / MANIFEST}: " in line and message in line, (argv, line)
    with pytest.raises(StoreError):
        q3lab.load(s)
    assert snapshot(s) == before


JOURNAL_CASES = {
    "file_entry_int": lambda j: j["files"].__setitem__("config.json", 5),
    "tensors_list": lambda j: j["files"].__setitem__("config.json", {"sha256": "0" * 64, "bytes": 1, "tensors": []}),
    "bytes_string": lambda j: j["files"].__setitem__("config.json", {"sha256": "0" * 64, "bytes": "1"}),
    "path_outside": lambda j: j["files"].__setitem__("../x", {"sha256": "0" * 64, "bytes": 1}),
}


@pytest.mark.parametrize("case", sorted(JOURNAL_CASES) + ["nested", "fifo"])
def test_hostile_journal_is_a_store_error(store, tmp_path, tiny_ckpt, capsys, no_hang, case):
    s = Path(shutil.copytree(store, tmp_path / "s"))
    m = json.loads((s / MANIFEST).read_text())
    (s / MANIFEST).unlink()
    journal = {"format": "q3lab-store-progress", "version": 1, "source": m["source"], "source_id": m["source_id"],
               "fingerprint": m["fingerprint"], "dtype": m["dtype"], "files": {}}
    if case == "nested":
        (s / PROGRESS).write_text(DEEP)
    elif case == "fifo":
        os.mkfifo(s / PROGRESS)
    else:
        JOURNAL_CASES[case](journal)
        (s / PROGRESS).write_text(json.dumps(journal))
    rc, _, err = cli(capsys, "extract", tiny_ckpt, s, "--no-progress")
    line = one_line(err)
    assert rc == 2 and f"{s / PROGRESS}: " in line and "remove the folder to start over" in line, line


# -- 7. generate and trace options -----------------------------------------------------------------------
GENERATE_CASES = {
    "prompt_not_utf8": (["--prompt", "caf\udce9 \udcff"], "--prompt is not UTF-8 text: byte 0xe9 at character 3"),
    "temperature_nan": (["--temperature", "nan"], "--temperature must be a number >= 1e-30 (or use --greedy), got nan"),
    "temperature_tiny": (["--temperature", "1e-300"], "--temperature must be a number >= 1e-30"),
    "top_p_tiny": (["--top-p", "1e-300"], "--top-p must be a number in [1e-30, 1], got 1e-300"),
    "top_p_nan": (["--top-p", "nan"], "--top-p must be a number in [1e-30, 1], got nan"),
    "cache_superscript": (["--expert-cache", "²"], "cannot read '²' as a size in bytes"),
    "device_banana": (["--device", "banana"], "--device 'banana' is not a torch device"),
    "device_meta": (["--device", "meta"], "--device 'meta' holds shapes but no data"),
    "device_cuda": (["--device", "cuda"], "--device 'cuda': no cuda device is available"),
    "device_cuda_99": (["--device", "cuda:99"], "--device 'cuda:99'"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_bad_options_exit_2_with_one_line(store, capsys, case):
    extra, message = GENERATE_CASES[case]
    argv = ["generate", store, "--max-new-tokens", "2", *extra]
    if "--prompt" not in extra:
        argv += ["--prompt", "hi"]
    rc, out, err = cli(capsys, *argv)
    assert rc == 2 and message in one_line(err), err
    assert out == ""


def test_tiny_but_valid_sampling_parameters_run(store, capsys):
    rc, out, err = cli(capsys, "generate", store, "--prompt", "hi", "--max-new-tokens", "3", "--temperature", "1e-20",
                       "--top-p", "1e-20")
    greedy = cli(capsys, "generate", store, "--prompt", "hi", "--max-new-tokens", "3", "--greedy")
    assert rc == 0 and greedy[0] == 0 and out == greedy[1]   # as cold as that, sampling is the argmax


def _prompts(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


TRACE_CASES = {
    "prompts_latin1": ("p.txt", b"caf\xe9\n", "p.txt: not UTF-8 text: byte b'\\xe9' at offset 3"),
    "id_object": ("p.jsonl", b'{"prompt": "hi", "id": {"a": 1}}\n', "p.jsonl:1: 'id' must be an integer or a string"),
    "id_float": ("p.jsonl", b'{"prompt": "hi", "id": 1.5}\n', "p.jsonl:1: 'id' must be an integer or a string"),
    "domain_list": ("p.jsonl", b'{"prompt": "hi", "domain": ["a"]}\n', "p.jsonl:1: 'domain' must be a string"),
    "line_nested": ("p.jsonl", DEEP.encode() + b"\n", "p.jsonl:1: invalid JSON line: nested 100000 levels deep"),
    "ids_1_and_string_1": ("p.jsonl", b'{"prompt": "hi", "id": 1}\n{"prompt": "yo", "id": "1"}\n',
                           "p.jsonl:2: prompt id '1' repeats the id 1 of line 1 (a trace stores mixed ids as text)"),
    "ids_repeated": ("p.jsonl", b'{"prompt": "hi", "id": 1}\n{"prompt": "yo", "id": 1}\n',
                     "p.jsonl:2: prompt id 1 repeats the id 1 of line 1"),
    "prompt_surrogate": ("p.jsonl", b'{"prompt": "caf\\udce9"}\n', "text is not valid Unicode: lone surrogate U+DCE9"),
}


@pytest.mark.parametrize("case", sorted(TRACE_CASES))
def test_trace_bad_prompt_files_exit_2_with_one_line(store, tmp_path, capsys, case):
    name, data, message = TRACE_CASES[case]
    out = tmp_path / "t.parquet"
    rc, _, err = cli(capsys, "trace", store, "--prompts", _prompts(tmp_path, name, data), "--out", out,
                     "--no-progress")
    assert rc == 2 and message in one_line(err), err
    assert not out.exists()


def test_trace_bad_destinations_are_refused_before_tracing(store, tmp_path, capsys, monkeypatch):
    prompts = _prompts(tmp_path, "p.txt", b"hello\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir.parquet").mkdir()
    calls = []
    monkeypatch.setattr(sys.modules["q3lab.runtime.recording"], "trace_prompts", lambda *a, **k: calls.append(1))
    for out, message in [(tmp_path / "afile" / "x.parquet", f"cannot write the trace: {tmp_path / 'afile'} is not a folder"),
                         (tmp_path / "adir.parquet", "is a folder; give a trace file name"),
                         (tmp_path / "x.txt", "unknown trace format '.txt'")]:
        rc, _, err = cli(capsys, "trace", store, "--prompts", prompts, "--out", out, "--no-progress")
        assert rc == 2 and message in one_line(err), err
    rc, _, err = cli(capsys, "trace", store, "--prompts", prompts, "--device", "banana", "--no-progress")
    assert rc == 2 and "--device 'banana' is not a torch device" in one_line(err)
    assert calls == []   # refused before any prompt was traced


def test_prompt_ids_keep_their_type(tmp_path):
    items = read_prompts(_prompts(tmp_path, "p.jsonl", b'{"prompt": "a", "id": 7}\n{"prompt": "b", "id": "x"}\n'
                                                       b'{"prompt": "c"}\n'))
    assert [i["id"] for i in items] == [7, "x", 2] and [i["line"] for i in items] == [1, 2, 3]


# -- 8. corrupt traces -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_traces(store, tmp_path_factory):
    from q3lab.runtime.recording import save_trace, trace_prompts
    model = q3lab.load(store)
    tok = load_tokenizer(store)
    frame = trace_prompts(model, tok, [{"id": "a", "prompt": "hello world", "line": 1}], progress=False).to_frame()
    d = tmp_path_factory.mktemp("traces")
    return save_trace(frame, d / "good.parquet"), save_trace(frame, d / "good.csv"), frame


def _flip(raw: bytes, n: int = 200) -> bytes:
    import random
    b = bytearray(raw)
    rng = random.Random(0)
    for _ in range(n):
        b[rng.randrange(len(b))] ^= 0xFF
    return bytes(b)


def _csv_edit(fn):
    def edit(raw: bytes) -> bytes:
        first, rest = raw.split(b"\n", 1)
        return fn(first, rest)
    return edit


CORRUPT_TRACES = {
    "parquet_truncated": ("parquet", lambda r: r[:len(r) // 2]),
    "parquet_random": ("parquet", lambda r: os.urandom(4000)),
    "parquet_empty": ("parquet", lambda r: b""),
    "parquet_flipped": ("parquet", _flip),
    "csv_magic_broken": ("csv", _csv_edit(lambda f, r: b"# q3lab-trace {not json\n" + r)),
    "csv_magic_nested": ("csv", _csv_edit(lambda f, r: b"# q3lab-trace " + DEEP.encode() + b"\n" + r)),
    "csv_truncated": ("csv", lambda r: r[:len(r) // 3]),
    "csv_latin1": ("csv", lambda r: r.replace(b"hello", b"h\xe9llo", 1) + b"a,\xe9\n"),
    "csv_kinds_list": ("csv", _csv_edit(lambda f, r: b'# q3lab-trace {"attrs": {}, "kinds": ["x"]}\n' + r)),
    "csv_expert_not_numeric": ("csv", lambda r: r + b"a,0,0,0,0,banana,0.5\n"),
    "csv_empty": ("csv", lambda r: b""),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_TRACES))
def test_load_trace_of_a_corrupt_trace_raises_input_error(good_traces, tmp_path, case):
    fmt, corrupt = CORRUPT_TRACES[case]
    src = good_traces[0] if fmt == "parquet" else good_traces[1]
    bad = tmp_path / f"bad.{fmt}"
    bad.write_bytes(corrupt(src.read_bytes()))
    try:
        frame = load_trace(bad)
    except InputError as e:
        assert str(bad) in str(e)
    else:   # a corruption that leaves a readable trace must still give a well-typed frame
        assert case == "csv_truncated" and len(frame) < len(good_traces[2]) and frame["expert"].dtype == "int16"


def test_load_trace_of_special_files(tmp_path, no_hang):
    os.mkfifo(tmp_path / "f.parquet")
    (tmp_path / "d.csv").mkdir()
    for p, message in [(tmp_path / "f.parquet", "not a regular file"), (tmp_path / "d.csv", "not a regular file"),
                       (tmp_path / "none.csv", "no such trace file"), (tmp_path / "x.txt", "unknown trace format")]:
        with pytest.raises(InputError, match=message):
            load_trace(p)


# -- 9. real processes -----------------------------------------------------------------------------------
def test_real_process_on_a_fifo_config_exits_2_without_hanging(ck, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("Q3LAB_DEBUG", None)
    os.unlink(ck / "config.json")
    os.mkfifo(ck / "config.json")
    r = subprocess.run([sys.executable, "-m", "q3lab", "audit", str(ck)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and "a FIFO (named pipe)" in one_line(r.stderr)
