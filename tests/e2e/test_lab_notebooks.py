"""What a person sees in JupyterLab: the notebooks open, run to the end without an error, show their figures,
and the ipywidgets explorer redraws its figure when its layer control moves. Run with `make e2e`."""
from __future__ import annotations

import re
from pathlib import Path

import nbformat

from labdriver import (REPO, check_not_blank, notebook_parameters, open_notebook, run_all, set_parameters,
                       wait_figures_changed)

NOTEBOOKS = REPO / "notebooks"


def _run_clean(page, lab, name: str, out: Path):
    """Open notebook `name`, Run All, and assert that every code cell ran and none shows an error."""
    panel = open_notebook(page, lab, f"notebooks/{name}")
    result = run_all(page, panel, name)
    page.screenshot(path=str(out / f"{Path(name).stem}_page.png"))
    assert not result.errors, f"{name}: cells show errors:\n" + "\n---\n".join(result.errors)
    unrun = [i for i, p in enumerate(result.prompts) if not re.match(r"^\[\d+\]:$", p.strip())]
    assert not unrun, f"{name}: code cells {unrun} did not run (prompts {result.prompts})"
    nb = nbformat.read(lab.root / "notebooks" / name, as_version=4)
    assert len(result.prompts) == sum(c.cell_type == "code" for c in nb.cells)
    check_not_blank((out / f"{Path(name).stem}_page.png").read_bytes(), f"{name} page")
    return panel, result


def test_mrope_notebook_runs_and_shows_its_figures(page, lab, lab_root, e2e_out):
    name = "03_mrope_validation.ipynb"
    src = NOTEBOOKS / name
    set_parameters(src, lab_root / "notebooks" / name, notebook_parameters(lab_root))
    panel, result = _run_clean(page, lab, name, e2e_out)

    # Every figure the notebook saves is also shown inline, decoded by the browser, and not blank.
    expected = nbformat.read(src, as_version=4)
    n_figures = sum(c.source.count("save_figure(") for c in expected.cells if c.cell_type == "code")
    images = panel.locator(".jp-OutputArea-output img")
    assert images.count() == n_figures, f"{name}: {images.count()} inline images, expected {n_figures}"
    for i in range(n_figures):
        img = images.nth(i)
        img.scroll_into_view_if_needed()
        assert img.evaluate("e => e.complete && e.naturalWidth > 0"), f"{name}: image {i} did not decode"
        shot = e2e_out / f"03_figure_{i}.png"
        img.screenshot(path=str(shot))
        check_not_blank(shot.read_bytes(), f"{name} figure {i}")
    print(f"{name}: Run All took {result.seconds:.1f} s; stderr (not errors): {len(result.warnings)}")


# A stand-in for 05's explorer until 05 exists: a layer slider driving a matplotlib figure through
# `interactive_output`, the pattern 05 uses, on the router weights of the synthetic checkpoint.
_WIDGET_CELLS = [
    ("markdown", "# Widget harness check"),
    ("parameters", 'checkpoint = "../data/mini"\ninteractive = False'),
    ("code", "import matplotlib.pyplot as plt\nimport ipywidgets as widgets\nfrom IPython.display import display\n"
             "import q3lab\nsrc = q3lab.open_weights(checkpoint)"),
    ("code", "def show(layer):\n"
             "    w = src.get(f'model.layers.{layer}.mlp.gate.weight').float()\n"
             "    fig, ax = plt.subplots(figsize=(6, 2.5))\n"
             "    ax.imshow(w, aspect='auto', cmap='viridis')\n"
             "    ax.set_title(f'router weights, layer {layer}')\n"
             "    plt.show()\n"
             "if interactive:\n"
             "    layer = widgets.IntSlider(0, 0, src.config.num_hidden_layers - 1, description='layer')\n"
             "    display(widgets.VBox([layer, widgets.interactive_output(show, {'layer': layer})]))\n"
             "else:\n"
             "    show(0)"),
]


def _widget_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, source in _WIDGET_CELLS:
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        else:
            cell = nbformat.v4.new_code_cell(source)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def test_explorer_widget_renders_and_follows_its_layer_slider(page, lab, lab_root, e2e_out, tmp_path):
    name = "widget_explorer.ipynb"
    set_parameters(_widget_notebook(tmp_path / name), lab_root / "notebooks" / name,
                   dict(checkpoint=str(lab_root / "ckpt"), interactive=True))
    panel, _ = _run_clean(page, lab, name, e2e_out)

    slider = panel.locator(".widget-slider", has=page.locator(".widget-label", has_text="layer")).first
    slider.wait_for(state="visible")
    # The explorer: the outermost widget around the slider (controls and figure together).
    explorer = slider.locator("xpath=ancestor::*[contains(@class,'jupyter-widgets')][last()]")
    readout = slider.locator(".widget-readout")
    before_value = readout.text_content().strip()
    before_src = wait_figures_changed(page, explorer, "", "explorer figure drawn")
    shot_before = explorer.screenshot(path=str(e2e_out / "explorer_before.png"))
    stats_before = check_not_blank(shot_before, "explorer before")

    # A person's keyboard: focus the slider's handle and step it once to the right.
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("ArrowRight")
    after_src = wait_figures_changed(page, explorer, before_src, "explorer figure after ArrowRight")
    after_value = readout.text_content().strip()
    assert int(after_value) == int(before_value) + 1, f"readout {before_value!r} -> {after_value!r}"
    shot_after = explorer.screenshot(path=str(e2e_out / "explorer_after.png"))
    stats_after = check_not_blank(shot_after, "explorer after")
    assert stats_after["sha256"] != stats_before["sha256"], "the explorer looks the same after moving the slider"
    assert after_src != before_src

    # The redraw itself must not have raised inside the widget's output.
    errors = panel.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    assert errors.count() == 0, f"{name}: stderr after the slider moved: {errors.all_text_contents()}"
