"""What a person sees in JupyterLab: the notebooks open, run to the end without an error, show their figures,
and the ipywidgets explorer redraws its figure when its layer control moves. Run with `make e2e`."""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

from labdriver import (REPO, check_not_blank, notebook_parameters, open_notebook, run_all, set_parameters,
                       wait_figures_changed)

# Q3LAB_E2E_NOTEBOOKS: run against another set of notebooks (e.g. freshly built ones) than notebooks/.
NOTEBOOKS = Path(os.environ.get("Q3LAB_E2E_NOTEBOOKS", REPO / "notebooks"))
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
# Inline figures outside any widget (the explorer's own figure is checked separately).
STATIC_IMAGES = ".jp-OutputArea-output img:not(.jupyter-widgets img)"


def _run_clean(page, lab, name: str, out: Path):
    """Open notebook `name`, Run All, and assert that every code cell ran and none shows an error."""
    panel = open_notebook(page, lab, f"notebooks/{name}")
    result = run_all(page, panel, name)
    shot = out / f"{Path(name).stem}_page.png"
    page.screenshot(path=str(shot))
    assert not result.errors, f"{name}: cells show errors:\n" + "\n---\n".join(result.errors)
    unrun = [i for i, p in enumerate(result.prompts) if not re.match(r"^\[\d+\]:$", p.strip())]
    assert not unrun, f"{name}: code cells {unrun} did not run (prompts {result.prompts})"
    nb = nbformat.read(lab.root / "notebooks" / name, as_version=4)
    assert len(result.prompts) == sum(c.cell_type == "code" for c in nb.cells)
    check_not_blank(shot.read_bytes(), f"{name} page")
    print(f"{name}: Run All took {result.seconds:.1f} s; stderr without a traceback: {len(result.warnings)}")
    return panel


def _check_figures(panel, name: str, out: Path, expected: int | None = None) -> int:
    """Every inline figure outside widgets decoded by the browser and not blank; `expected` of them if given."""
    # A Figure displayed without an active inline backend shows only its repr, no image.
    as_text = [t for t in panel.locator('.jp-OutputArea-output[data-mime-type="text/plain"]').all_text_contents()
               if t.startswith("<Figure size")]
    assert not as_text, (f"{name}: {len(as_text)} figures shown as text, not images (no image/png output: "
                         f"is matplotlib's inline backend active in the kernel?): {as_text[:3]}")
    images = panel.locator(STATIC_IMAGES)
    n = images.count()
    if expected is not None:
        assert n == expected, f"{name}: {n} inline figures, expected {expected}"
    assert n > 0, f"{name}: no inline figure rendered"
    for i in range(n):
        img = images.nth(i)
        img.scroll_into_view_if_needed()
        assert img.evaluate("e => e.complete && e.naturalWidth > 0"), f"{name}: figure {i} did not decode"
        shot = out / f"{Path(name).stem}_figure_{i}.png"
        img.screenshot(path=str(shot))
        check_not_blank(shot.read_bytes(), f"{name} figure {i}")
    return n


def _check_explorer(page, panel, name: str, out: Path) -> tuple[bytes, bytes]:
    """The explorer's layer slider is visible with a figure; ArrowRight on its handle moves the readout by one
    and redraws the figure, without an error. Returns the explorer's screenshots before and after."""
    slider = panel.locator(".widget-slider", has=page.locator(".widget-label", has_text=re.compile(r"^layer$")))
    slider.wait_for(state="visible")
    assert slider.count() == 1, f"{name}: {slider.count()} sliders labelled 'layer', expected one"
    # The explorer: the outermost widget around the slider (controls and figure together).
    explorer = slider.locator("xpath=ancestor::*[contains(@class,'jupyter-widgets')][last()]")
    readout = slider.locator(".widget-readout")
    before_value = readout.text_content().strip()
    before_src = wait_figures_changed(page, explorer, "", f"{name}: explorer figure drawn")
    stem = Path(name).stem
    shot_before = explorer.screenshot(path=str(out / f"{stem}_explorer_before.png"))
    stats_before = check_not_blank(shot_before, f"{name} explorer before")

    # A person's keyboard: focus the slider's handle and step it once to the right.
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    after_src = wait_figures_changed(page, explorer, before_src, f"{name}: explorer figure after ArrowRight")
    after_value = readout.text_content().strip()
    assert int(after_value) == int(before_value) + 1, f"layer readout {before_value!r} -> {after_value!r}"
    assert after_src != before_src
    shot_after = explorer.screenshot(path=str(out / f"{stem}_explorer_after.png"))
    stats_after = check_not_blank(shot_after, f"{name} explorer after")
    assert stats_after["sha256"] != stats_before["sha256"], f"{name}: the explorer looks the same after the move"

    # The redraw runs in the kernel: it must not have written an error into the explorer's output.
    errors = panel.locator(STDERR)
    assert errors.count() == 0, f"{name}: stderr after the slider moved: {errors.all_text_contents()}"
    return shot_before, shot_after


def test_mrope_notebook_runs_and_shows_its_figures(page, lab, lab_root, e2e_out):
    name = "03_mrope_validation.ipynb"
    src = NOTEBOOKS / name
    set_parameters(src, lab_root / "notebooks" / name, notebook_parameters(lab_root))
    panel = _run_clean(page, lab, name, e2e_out)
    # 03 has no widgets: every figure it saves is also shown inline.
    nb = nbformat.read(src, as_version=4)
    _check_figures(panel, name, e2e_out, sum(c.source.count("save_figure(") for c in nb.cells))


def test_expert_diversity_explorer_follows_its_layer_slider(page, lab, lab_root, e2e_out):
    name = "05_expert_diversity.ipynb"
    if not (NOTEBOOKS / name).exists():
        pytest.fail(f"{NOTEBOOKS / name} is missing (scripts/build_notebooks.py writes it)")
    set_parameters(NOTEBOOKS / name, lab_root / "notebooks" / name,
                   notebook_parameters(lab_root, interactive=True, max_new_tokens=2))
    panel = _run_clean(page, lab, name, e2e_out)
    _check_explorer(page, panel, name, e2e_out)
    _check_figures(panel, name, e2e_out)
