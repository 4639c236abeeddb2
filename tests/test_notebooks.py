"""The notebook runner: jupytext sources paired with their executed notebooks, where figures and outputs go, and
the folders it refuses to write into."""
from __future__ import annotations

import json

import matplotlib
import pytest

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

import q3lab.viz.notebooks as nbk  # noqa: E402
from q3lab.cli import main  # noqa: E402
from q3lab.errors import InputError  # noqa: E402
from q3lab.viz.plots import save_figure  # noqa: E402

SOURCES = sorted(nbk.NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))


def _cells(nb) -> list[tuple]:
    return [(c["cell_type"], c["source"], "parameters" in c.get("metadata", {}).get("tags", [])) for c in nb["cells"]]


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_every_source_is_paired_with_its_executed_notebook(source):
    """The .ipynb holds exactly the .py's cells (so the two cannot drift), and every code cell of it was executed
    (nbval checks only executed cells)."""
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.is_file(), f"{source.name} has no paired {ipynb.name}: run `make notebooks`"
    committed = json.loads(ipynb.read_text())
    committed["cells"] = [{**c, "source": "".join(c["source"])} for c in committed["cells"]]
    assert _cells(committed) == _cells(nbk.read_source(source)), \
        f"{ipynb.name} differs from {source.name}: run `make notebooks`"
    code = [c for c in committed["cells"] if c["cell_type"] == "code"]
    assert code[0]["metadata"]["tags"] == ["parameters"]
    unexecuted = [i for i, c in enumerate(code) if c["execution_count"] is None]
    assert not unexecuted, f"{ipynb.name}: code cells {unexecuted} carry no outputs for nbval to check"
    assert committed["metadata"]["kernelspec"]["name"] == "python3"


def test_the_runner_finds_every_numbered_source(tmp_path):
    """A new NN_*.py is picked up (its .ipynb, if any, is not run twice); an .ipynb without a .py still runs."""
    for name in ("01_a.py", "01_a.ipynb", "02_b.ipynb", "07_c.py", "notes.py", "1_x.py"):
        (tmp_path / name).write_text("")
    assert [p.name for p in nbk.notebook_paths(tmp_path)] == ["01_a.py", "02_b.ipynb", "07_c.py"]
    assert [p.name for p in nbk.notebook_paths(tmp_path, ["07"])] == ["07_c.py"]
    with pytest.raises(InputError, match="matching \\['99'\\]"):
        nbk.notebook_paths(tmp_path, ["99"])


PROBE = '''# %% [markdown]
# # 01 Probe

# %% tags=["parameters"]
checkpoint = "none"
figures_dir = "committed_figures"
out_dir = "default_out"

# %%
from pathlib import Path
Path(figures_dir).mkdir(parents=True, exist_ok=True)
Path(figures_dir, "01_probe.txt").write_text(checkpoint)
print("checkpoint", checkpoint)
'''


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A notebooks folder with one tiny notebook that writes its checkpoint parameter into figures_dir; the
    runner's default output folder moved into tmp_path."""
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    (nbdir / "01_probe.py").write_text(PROBE)
    monkeypatch.setattr(nbk, "DEFAULT_OUT", tmp_path / "out" / "notebooks")
    return nbdir


def test_only_a_default_run_writes_the_committed_figures(probe, tmp_path):
    """Row 63 of the adversarial report: `-p checkpoint X` (any parameter) sends figures to OUT/figures."""
    committed = probe / "committed_figures"
    committed.mkdir()
    (committed / "01_probe.txt").write_text("committed")
    nbk.run_notebooks(notebooks_dir=probe, parameters={"checkpoint": "other"}, progress=False)
    assert (committed / "01_probe.txt").read_text() == "committed"
    assert (nbk.DEFAULT_OUT / "figures" / "01_probe.txt").read_text() == "other"
    out = tmp_path / "mine"
    nbk.run_notebooks(notebooks_dir=probe, out=out, progress=False)          # --out alone: not default either
    assert (committed / "01_probe.txt").read_text() == "committed"
    assert (out / "figures" / "01_probe.txt").read_text() == "none"
    executed = json.loads((out / "01_probe.ipynb").read_text())
    assert executed["cells"][-1]["outputs"][0]["text"] == ["checkpoint none\n"]
    table = nbk.run_notebooks(notebooks_dir=probe, progress=False)            # the default run
    assert (committed / "01_probe.txt").read_text() == "none"
    assert table["notebook"].tolist() == ["01_probe"]


def test_in_place_writes_the_paired_notebook_and_refuses_parameters(probe):
    nbk.run_notebooks(notebooks_dir=probe, in_place=True, progress=False)
    paired = json.loads((probe / "01_probe.ipynb").read_text())
    assert [c["id"] for c in paired["cells"]] == ["01-00", "01-01", "01-02"]
    assert paired["cells"][2]["outputs"][0]["text"] == ["checkpoint none\n"]
    assert "papermill" not in paired["metadata"] and "execution" not in paired["cells"][2]["metadata"]
    with pytest.raises(InputError, match="default parameters only"):
        nbk.run_notebooks(notebooks_dir=probe, in_place=True, parameters={"checkpoint": "x"}, progress=False)


def test_out_is_written_only_when_empty_new_or_made_by_the_runner(tmp_path, capsys):
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    with pytest.raises(InputError, match="not empty and was not made by q3lab notebooks"):
        nbk.claim_folder(user)
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        nbk.claim_folder(afile)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert nbk.claim_folder(empty) == empty and (empty / nbk.MARKER).is_file()
    (empty / "01_x.ipynb").write_text("{}")
    nbk.claim_folder(empty)                                    # made by the runner: reusable
    new = nbk.claim_folder(tmp_path / "a" / "b")
    assert (new / nbk.MARKER).is_file()
    # the CLI refuses before running anything, exit 2 with one line naming the folder
    for target in (user, afile, afile / "sub"):
        capsys.readouterr()
        rc = main(["notebooks", "--checkpoint", str(tmp_path), "--out", str(target), "--only", "03"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"q3lab notebooks: error: notebooks --out {target}:"), err
        assert len(err.strip().splitlines()) == 1, err
    assert (user / "thesis.tex").read_text() == "mine" and afile.read_text() == "x"


def test_figure_saver_is_save_figure_unless_a_model_is_named(tmp_path):
    def fig():
        f = Figure(figsize=(2, 1))
        f.add_subplot().set_title("reuse")
        return f
    save_figure(fig(), tmp_path / "ref.png")
    nbk.FigureSaver(tmp_path)(fig(), "plain.png")
    assert (tmp_path / "plain.png").read_bytes() == (tmp_path / "ref.png").read_bytes()
    named = nbk.FigureSaver(tmp_path, "mini128")(fig(), "05_reuse.png")
    assert (tmp_path / "05_reuse_mini128.png").is_file() and not (tmp_path / "05_reuse.png").exists()
    assert named.axes[0].get_title() == "reuse (model: mini128)"


def test_routing_notebooks_run_again_on_a_second_model_or_say_why_not(tmp_path, tiny_ckpt, monkeypatch):
    sources = [tmp_path / n for n in ("01_a.py", "05_b.py", "06_c.py")]
    for path in sources:
        path.write_text('# %% tags=["parameters"]\ncheckpoint = "x"\nmodel_name = ""\n')
    monkeypatch.setattr(nbk, "SECOND_MODELS", {"mini128": (tmp_path / "absent", ("05", "06"), {})})
    [(nb, name, why)] = nbk._second_model_runs(sources, tmp_path / "out", {})
    assert nb is None and name == "05+06 on mini128" and why == f"{tmp_path / 'absent'} is absent"
    monkeypatch.setattr(nbk, "SECOND_MODELS", {"mini128": (tiny_ckpt, ("05", "06"), {})})
    runs = nbk._second_model_runs(sources, tmp_path / "out", {"figures_dir": "F"})
    assert [(nb.name, name) for nb, name, _ in runs] == [("05_b.py", "05_b_mini128"), ("06_c.py", "06_c_mini128")]
    assert runs[0][2] == {"figures_dir": "F", "checkpoint": str(tiny_ckpt), "model_name": "mini128",
                          "out_dir": str(tmp_path / "out" / "mini128")}
    (tmp_path / "06_c.py").write_text('# %% tags=["parameters"]\ncheckpoint = "x"\n')
    runs = nbk._second_model_runs(sources, tmp_path / "out", {})
    assert runs[1] == (None, "06_c on mini128", "06_c.py has no `model_name` parameter (it names the figures "
                       "of a second model: see q3lab.viz.notebooks.FigureSaver)")
    assert nbk._declares(nbk.NOTEBOOKS_DIR / "05_expert_diversity.py", "model_name")
