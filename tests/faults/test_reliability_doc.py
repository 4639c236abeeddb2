"""docs/RELIABILITY.md: every test its table names exists, and every fault test is named there."""
from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
DOC = TESTS.parent / "docs" / "RELIABILITY.md"
REF = re.compile(r"`((?:faults/)?test_\w+\.py)::(\w+)(?:\[(\w+)\])?`")
CKPT = re.compile(r"`CKPT\[(\w+)\]`")


def _defined(file: Path) -> set[str]:
    return set(re.findall(r"^def (test_\w+)", file.read_text(), re.M))


def test_every_named_test_exists():
    text = DOC.read_text()
    refs = REF.findall(text)
    assert len(refs) > 30
    for file, name, _ in refs:
        assert name in _defined(TESTS / file), f"RELIABILITY.md names {file}::{name}, which does not exist"
    breakers = set(re.findall(r"^def (\w+)\(p\)", (TESTS / "faults/test_checkpoint_faults.py").read_text(), re.M))
    named = set(CKPT.findall(text))
    assert named <= breakers, f"RELIABILITY.md names unknown checkpoint cases {named - breakers}"
    assert breakers <= named, f"checkpoint cases missing from RELIABILITY.md: {breakers - named}"


def test_every_fault_test_is_in_the_table():
    named = {name for _, name, _ in REF.findall(DOC.read_text())}
    named.add("test_broken_checkpoint_is_named_and_refused_everywhere")  # the CKPT[...] rows
    for file in [*sorted((TESTS / "faults").glob("test_*.py")), TESTS / "test_fuzz.py"]:
        if file.name == Path(__file__).name:
            continue
        missing = _defined(file) - named
        assert not missing, f"{file.name}: {sorted(missing)} not in RELIABILITY.md"
