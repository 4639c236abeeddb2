"""Notebooks pointed at the wrong folder: the papermill run fails in the first cell after the parameters (the
one calling `q3lab.viz.notebooks.open_checked`), with the audit's message, and `q3lab notebooks` exits 2."""
from __future__ import annotations

import json

import pytest

from faultkit import cli, copy_ckpt, index, write_index
from q3lab.errors import CheckpointError
from q3lab.viz.notebooks import NOTEBOOKS_DIR, open_checked

NORM = "thinker.model.layers.1.post_attention_layernorm.weight"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.skipif(not NOTEBOOKS, reason=f"no notebooks in {NOTEBOOKS_DIR}")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_opens_its_checkpoint_checked_first(path):
    cells = code_cells(json.loads(path.read_text()))
    assert "parameters" in cells[0]["metadata"].get("tags", [])
    assert "open_checked(checkpoint)" in "".join(cells[1]["source"]), f"{path.name}: first cell does not check"


def test_open_checked_refuses_folders_that_are_not_checkpoints(tiny_ckpt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"{empty / 'config.json'}: file not found"):
        open_checked(empty)
    broken = copy_ckpt(tiny_ckpt, tmp_path / "broken")
    ix = index(broken)
    ix["weight_map"].pop(NORM)
    write_index(broken, ix)
    with pytest.raises(CheckpointError) as e:
        open_checked(broken)
    msg = str(e.value)
    assert msg.startswith(f"audit of {broken} failed:") and f"{NORM}  [not in the index]" in msg
    assert msg.rstrip().endswith("FAILED: the thinker text model is incomplete or inconsistent")


@pytest.mark.skipif(not NOTEBOOKS, reason=f"no notebooks in {NOTEBOOKS_DIR}")
@pytest.mark.parametrize("folder", ["not_a_checkpoint", "checkpoint_missing_a_norm"])
def test_papermill_run_on_a_wrong_folder_fails_in_its_first_cell(folder, tiny_ckpt, tmp_path, capsys):
    if folder == "not_a_checkpoint":
        target = tmp_path / "downloads"
        target.mkdir()
        (target / "README.md").write_text("not weights")
        says = [f"{target / 'config.json'}: file not found"]
    else:
        target = copy_ckpt(tiny_ckpt, tmp_path / "ckpt")
        ix = index(target)
        ix["weight_map"].pop(NORM)
        write_index(target, ix)
        says = [f"audit of {target} failed", NORM, "FAILED: the thinker text model is incomplete"]
    nb = NOTEBOOKS[0]
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, "notebooks", "--checkpoint", target, "--out", out, "--only", nb.name[:2])
    assert rc == 2 and stdout == ""
    error = err[err.index("q3lab notebooks: error: "):]   # papermill's progress bar comes first on stderr
    assert error.startswith(f"q3lab notebooks: error: {nb.name} failed in cell"), err
    assert "CheckpointError" in error and all(s in error for s in says), err
    executed = code_cells(json.loads((out / nb.name).read_text()))
    ran = [i for i, c in enumerate(executed) if c.get("execution_count")]
    failed = [i for i, c in enumerate(executed) if any(o.get("output_type") == "error" for o in c["outputs"])]
    assert len(failed) == 1 and "open_checked(checkpoint)" in "".join(executed[failed[0]]["source"])
    assert max(ran) == failed[0], "cells after the failing one ran"
    assert not any("figures" in p.parts for p in out.rglob("*.png")), "a figure was written"
