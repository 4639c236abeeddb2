"""The harness itself: parameter injection and the blank-screenshot check by hand, and (in the browser) that a
cell raising under Run All is reported as an error rather than waited on or missed."""
from __future__ import annotations

import io

import nbformat
import pytest
from PIL import Image

from labdriver import LabError, check_not_blank, image_stats, open_notebook, run_all, set_parameters


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _notebook(path, *sources: str, params: str = 'checkpoint = "../data/mini"  # a folder\nmax_prompts = 24'):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="old\n")]
    cell.execution_count = 7
    nb.cells = [cell] + [nbformat.v4.new_code_cell(s) for s in sources]
    nbformat.write(nb, path)
    return path


def test_set_parameters_replaces_values_and_clears_outputs(tmp_path):
    src = _notebook(tmp_path / "a.ipynb", "print(checkpoint)")
    dest = set_parameters(src, tmp_path / "out" / "a.ipynb", {"checkpoint": "/x/ckpt", "max_prompts": 3})
    nb = nbformat.read(dest, as_version=4)
    assert nb.cells[0].source.splitlines() == ["checkpoint = '/x/ckpt'  # set by tests/e2e",
                                               "max_prompts = 3  # set by tests/e2e"]
    assert nb.cells[0].metadata["tags"] == ["parameters"]
    assert nb.cells[0].outputs == [] and nb.cells[0].execution_count is None
    assert nb.cells[1].source == "print(checkpoint)"


def test_set_parameters_refuses_a_name_the_cell_does_not_assign(tmp_path):
    src = _notebook(tmp_path / "a.ipynb")
    with pytest.raises(LabError, match="'interactive' 0 times"):
        set_parameters(src, tmp_path / "b.ipynb", {"interactive": True})


def test_blank_check_by_hand():
    img = Image.new("RGB", (10, 10), "white")
    for i in range(30):
        img.putpixel((i % 10, i // 10), (255, 0, 0))
    stats = image_stats(_png(img))
    assert (stats["colours"], stats["top_share"]) == (2, 0.7)
    with pytest.raises(LabError, match="2 colours"):
        check_not_blank(_png(img), "two colours")
    with pytest.raises(LabError, match="covers 100.0%"):
        check_not_blank(_png(Image.new("RGB", (50, 50), "white")), "white", min_colours=1)
    # A gradient: 64 distinct colours, none more common than 1/64 of the pixels.
    grad = Image.new("RGB", (64, 4))
    for x in range(64):
        for y in range(4):
            grad.putpixel((x, y), (4 * x, 0, 0))
    assert check_not_blank(_png(grad), "gradient")["colours"] == 64


def test_a_raising_cell_is_reported_and_stops_run_all(page, lab, lab_root):
    name = "raises.ipynb"
    _notebook(lab_root / "notebooks" / name, "x = 1", "1 / 0", "y = 2")
    panel = open_notebook(page, lab, f"notebooks/{name}")
    result = run_all(page, panel, name, timeout=60)
    assert len(result.errors) == 1 and "ZeroDivisionError" in result.errors[0]
    # Run All stops at the error: the cell after it is never run.
    assert [p.strip() for p in result.prompts] == ["[1]:", "[2]:", "[3]:", "[ ]:"]
