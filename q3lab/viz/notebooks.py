"""Run the numbered notebooks headless with papermill, on any checkpoint."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from q3lab.errors import InputError, Q3LabError
from q3lab.runtime.recording import read_prompts  # noqa: F401  (notebooks read prompt files through here)


class NotebookError(Q3LabError):
    """A notebook raised while papermill ran it; names the notebook, the cell and the error."""

REPO = Path(__file__).resolve().parents[2]  # q3lab/viz/notebooks.py -> the repository
NOTEBOOKS_DIR = REPO / "notebooks"
DEFAULT_CHECKPOINT = REPO / "data" / "mini"
DEFAULT_OUT = REPO / "out" / "notebooks"
FIGURES_DIR = REPO / "figures"
# A folder `q3lab notebooks --out` made holds this file; the runner writes only into such a folder or an empty one.
MARKER = ".q3lab-notebooks"
# Second embedded models the routing notebooks run on too (default runs only): name -> (folder, notebooks).
# model name -> (folder, notebooks rerun on it, parameters overridden where a notebook declares them: the
# 128-expert model is ~3x slower per token, so 06 traces fewer tokens on it to keep `make demo` in budget)
SECOND_MODELS = {"mini128": (REPO / "data" / "mini128", ("05", "06"),
                             {"max_tokens": 20000, "predict_tokens": 3000})}
# Notebooks that need the audio and vision towers (q3lab.omni). With no checkpoint given they build the tiny
# random full model themselves; given a checkpoint without tower tensors (data/mini, a text-only store) they are
# skipped with a row saying why, instead of failing in their first cell.
TOWER_NOTEBOOKS = ("08",)


def notebook_paths(notebooks_dir: Path = NOTEBOOKS_DIR, names: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order: each NN_*.py (the jupytext source), or NN_*.ipynb where no .py pairs it.

    names: keep only those whose file name starts with one of them (e.g. "05") or equals one.
    """
    notebooks_dir = Path(notebooks_dir)
    paths = {p.stem: p for p in notebooks_dir.glob("[0-9][0-9]_*.ipynb")}
    paths.update({p.stem: p for p in notebooks_dir.glob("[0-9][0-9]_*.py")})
    paths = [paths[k] for k in sorted(paths)]
    if names:
        paths = [p for p in paths if any(p.stem.startswith(n) or p.name == n or p.stem == Path(n).stem
                                         for n in names)]
    if not paths:
        raise InputError(f"no notebooks NN_*.py or NN_*.ipynb found in {notebooks_dir}"
                         + (f" matching {names}" if names else ""))
    return paths


def read_source(path: str | Path):
    """The notebook of a jupytext percent-format .py (or an .ipynb as it is), without outputs.

    Cell ids are the notebook's number and the cell's index ("04-07"), so that a rebuilt .ipynb differs from the
    committed one only where a cell did, and kernelspec is `python3` (what nbval and papermill run).
    """
    import jupytext
    import nbformat
    path = Path(path)
    if path.suffix == ".ipynb":
        return nbformat.read(str(path), as_version=4)
    nb = jupytext.read(str(path), fmt="py:percent")
    nb.nbformat, nb.nbformat_minor = 4, max(int(nb.get("nbformat_minor", 5)), 5)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    nb.metadata.get("jupytext", {}).pop("text_representation", None)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{path.stem[:2]}-{i:02d}"
        if cell.cell_type == "code":
            cell.setdefault("outputs", [])
            cell.setdefault("execution_count", None)
    return nb


def claim_folder(folder: str | Path, what: str = "--out") -> Path:
    """Make `folder` the runner's own: create it (with the marker), or accept it when it is empty or marked.

    Refuses a path that is a file, a folder holding anything the runner did not make, or one it cannot write,
    so that a run never writes over a user's files.
    """
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise InputError(f"notebooks {what} {folder}: exists and is not a folder")
        if folder.is_dir() and not (folder / MARKER).is_file() and any(folder.iterdir()):
            raise InputError(f"notebooks {what} {folder}: the folder is not empty and was not made by "
                             f"q3lab notebooks (no {MARKER} in it); give an empty or new folder")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARKER).write_text("made by q3lab notebooks; it writes only into folders holding this file\n")
    except OSError as e:
        raise InputError(f"notebooks {what} {folder}: cannot write there ({e.strerror or e})") from None
    return folder


def _usable(folder: Path) -> str | None:
    """None when `folder` holds a checkpoint or store that opens and passes the audit, else why not."""
    if not folder.is_dir():
        return f"{folder} is absent"
    try:
        open_checked(folder)
    except Q3LabError as e:
        return f"{folder} does not pass the audit ({str(e).splitlines()[0]})"
    return None


def run_notebooks(checkpoint: str | Path | None = None, out: str | Path | None = None, *,
                  figures_dir: str | Path | None = None, names: list[str] | None = None,
                  notebooks_dir: str | Path = NOTEBOOKS_DIR, parameters: dict | None = None,
                  kernel: str = "python3", progress: bool = True, in_place: bool = False,
                  second_models: bool | None = None) -> pd.DataFrame:
    """Execute every numbered notebook with papermill; returns one row per run with its time.

    Each NN_*.py (jupytext percent format, the source) is converted and executed; an NN_*.ipynb without a .py
    runs as it is. Only what is given overrides a notebook's own defaults (the embedded data/mini, figures/ and
    out/notebooks, relative to notebooks/): checkpoint -> `checkpoint`, out -> `out_dir` (also where the
    executed notebooks go), figures_dir -> `figures_dir`, parameters -> the named ones.

    The committed figures/ is written only by a default run (no checkpoint, out or parameters): any other run
    sends figures to OUT/figures (OUT defaults to out/notebooks) unless figures_dir says otherwise. OUT (and an
    explicit figures_dir) must be new, empty, or made by an earlier run (see `claim_folder`).

    in_place: write each executed notebook over notebooks/NN_*.ipynb, without papermill's timing metadata
    (refreshes the committed outputs; default parameters only, so no machine-specific paths get committed).
    second_models: also run the routing notebooks (05, 06) on each model of SECOND_MODELS (data/mini128),
    figures suffixed with its name; default: on a default run only. A model that is absent or fails its audit
    is skipped with a row saying why.
    """
    import papermill as pm
    from nbclient.exceptions import DeadKernelError

    params = dict(parameters or {})
    if checkpoint is not None:
        params["checkpoint"] = str(Path(checkpoint).resolve())
    if out is not None:
        params["out_dir"] = str(Path(out).resolve())
    default_run = not params
    if in_place and (params or figures_dir is not None):
        raise InputError(f"in-place refreshes the committed notebooks with their default parameters only; "
                         f"got {sorted(params) + (['figures_dir'] if figures_dir is not None else [])}")
    dest_dir = claim_folder(Path(out).resolve() if out is not None else DEFAULT_OUT)
    if figures_dir is None and not default_run:
        figures_dir = dest_dir / "figures"
    if figures_dir is not None:
        params["figures_dir"] = str(claim_folder(Path(figures_dir).resolve(), "--figures").resolve())
    sources = notebook_paths(Path(notebooks_dir), names)
    runs = [_tower_run(nb, params) for nb in sources]
    if second_models if second_models is not None else default_run:
        runs += _second_model_runs(sources, dest_dir, params)
    rows = []
    for nb, name, run_params in runs:
        if nb is None:
            rows.append(dict(notebook=name, seconds=0.0, output=f"skipped: {run_params}"))
            print(f"{name}: skipped: {run_params}")
            continue
        t0 = time.perf_counter()
        dest = dest_dir / f"{name}.ipynb"
        try:
            pm.execute_notebook(read_source(nb), str(dest), parameters=run_params, kernel_name=kernel,
                                cwd=str(nb.parent), progress_bar=progress)
        except pm.PapermillExecutionError as e:
            raise NotebookError(f"{dest.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} "
                                f"(source: {nb}; executed notebook: {dest})") from None
        except DeadKernelError as e:
            raise NotebookError(f"{dest.name}: the kernel died while running it ({e}); "
                                f"source: {nb}; executed notebook so far: {dest}") from None
        rows.append(dict(notebook=name, seconds=round(time.perf_counter() - t0, 1), output=str(dest)))
        if in_place and name == nb.stem:
            write_clean(dest, nb.with_suffix(".ipynb"))
    return pd.DataFrame(rows)


def has_towers(folder: str | Path) -> bool:
    """Whether a checkpoint folder or store holds audio/vision tower tensors (`thinker.audio_tower.*`,
    `thinker.visual.*`, or canonical `audio_tower.*` / `visual.*`), read from its index, manifest or single
    safetensors header only (no tensor is read)."""
    from q3lab.base import jsonio
    folder = Path(folder)
    prefixes = ("audio_tower.", "visual.", "thinker.audio_tower.", "thinker.visual.")
    if (folder / "manifest.json").is_file():
        names = [t.get("name", "") for t in jsonio.read_json(folder / "manifest.json", InputError,
                                                              kind="manifest").get("tensors", [])
                 if isinstance(t, dict)]
    elif (folder / "model.safetensors.index.json").is_file():
        names = list(jsonio.read_json(folder / "model.safetensors.index.json", InputError).get("weight_map", {}))
    elif (folder / "model.safetensors").is_file():
        from q3lab.base.safetensors_io import SafetensorsFile
        names = list(SafetensorsFile(folder / "model.safetensors").tensors)
    else:
        return False
    return any(str(n).startswith(prefixes) for n in names)


def _tower_run(nb: Path, params: dict) -> tuple:
    """(nb, name, params) to run, or (None, name, why) for a tower notebook given a checkpoint without towers."""
    ckpt = params.get("checkpoint")
    if nb.stem[:2] in TOWER_NOTEBOOKS and ckpt and not has_towers(ckpt):
        return (None, nb.stem, f"{ckpt} has no audio/vision tower tensors; {nb.stem} needs a Qwen3-Omni checkpoint "
                               f"with towers (or none: it then builds the tiny random full model)")
    return (nb, nb.stem, params)


def _second_model_runs(sources: list[Path], dest_dir: Path, params: dict) -> list[tuple]:
    """(notebook, run name, parameters) for the routing notebooks on each second model; (None, name, why) when
    the model is absent or fails its audit."""
    runs = []
    for model_name, (folder, prefixes, overrides) in SECOND_MODELS.items():
        chosen = [nb for nb in sources if nb.stem[:2] in prefixes]
        if not chosen:
            continue
        why = _usable(folder)
        if why is not None:
            runs.append((None, f"{'+'.join(nb.stem[:2] for nb in chosen)} on {model_name}", why))
            continue
        for nb in chosen:
            if not _declares(nb, "model_name"):   # it would save this model's figures over the default ones
                runs.append((None, f"{nb.stem} on {model_name}", f"{nb.name} has no `model_name` parameter "
                             f"(it names the figures of a second model: see q3lab.viz.notebooks.FigureSaver)"))
                continue
            extra = {k: v for k, v in overrides.items() if _declares(nb, k)}
            runs.append((nb, f"{nb.stem}_{model_name}",
                         {**params, **extra, "checkpoint": str(folder), "model_name": model_name,
                          "out_dir": str(dest_dir / model_name)}))
    return runs


def _declares(source: Path, name: str) -> bool:
    """Whether the cell tagged `parameters` of a notebook source assigns `name`."""
    import re
    for cell in read_source(source).cells:
        if "parameters" in cell.metadata.get("tags", []):
            return re.search(rf"^{re.escape(name)}\s*=", cell.source, re.M) is not None
    return False


def write_clean(executed: Path, target: Path) -> None:
    """Copy an executed notebook without papermill's per-run metadata (times, durations, paths)."""
    import nbformat
    nb = nbformat.read(str(executed), as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, str(target))


def open_checked(checkpoint: str | Path):
    """Open a checkpoint or store for a notebook's first cell (`q3lab.weights.source.open_source`, audit included).

    Raises `CheckpointError` carrying the audit's findings, so a papermill run pointed at the wrong folder
    fails in its first cell with the audit's message.
    """
    from q3lab.weights.source import open_source
    return open_source(checkpoint)


def balanced(items: list[dict], n: int, key: str = "domain") -> list[dict]:
    """Up to n items taking turns across the values of `key` (file order within each), so that a prefix of a
    prompt file sorted by domain still covers every domain."""
    groups: dict = {}
    for item in items:
        groups.setdefault(item.get(key), []).append(item)
    out: list[dict] = []
    queues = [list(g) for g in groups.values()]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


# The notebooks' shared first cells, as functions (the notebooks stay a few lines each).
# Printed numbers: pandas shows 3 decimals. Float32 results vary with the thread count in their last bits
# (MKL's sgemm blocks by thread count: on data/mini logits move by up to 2e-5, probabilities and KLs by up to
# 6e-7 between 1 and 2 threads), so a 4th decimal can flip from one machine to the next and fail nbval. At 3
# decimals data/mini's printed probabilities sit at least 7.5e-6 (14x that noise) and its KLs 1.6e-5 from a
# rounding boundary; at 4 some sat 1.8e-6 from one.
DISPLAY_DECIMALS = 3


def setup(src, figures_dir: str | Path, out_dir: str | Path, *, seed: int = 0) -> tuple[Path, Path]:
    """After `open_checked`: seed torch, set pandas' display precision, make the figures and output folders,
    and print one line naming the source and its size. Returns (figures, out) as Paths."""
    import torch
    torch.manual_seed(seed)
    pd.set_option("display.precision", DISPLAY_DECIMALS)
    figures, out = Path(figures_dir), Path(out_dir)
    figures.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg = src.config
    print(type(src).__name__, src.path, "|", cfg.num_hidden_layers, "layers,", cfg.num_experts, "experts, top",
          cfg.num_experts_per_tok)
    return figures, out


def load_model(src, prompts: str | Path, max_prompts: int, *, dtype: str = "float32", expert_cache: int = 0,
               balance: str | None = None):
    """The model (all experts resident, or an `ExpertCache` of `expert_cache` experts), its tokenizer and the
    first `max_prompts` prompts of a JSONL file (taking turns across the values of `balance` when given).
    Returns (model, tokenizer, items) and prints the prompt count with an example."""
    import torch

    from q3lab import ExpertCache, load, load_tokenizer
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise InputError(f"notebook parameter dtype: {dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
    model = load(src, dtype=getattr(torch, dtype), experts=ExpertCache(expert_cache) if expert_cache else None)
    tok = load_tokenizer(src.path)
    items = read_prompts(prompts)
    items = balanced(items, max_prompts, balance) if balance else items[:max_prompts]
    if not items:
        raise InputError(f"notebook parameter prompts: {prompts} holds no prompts")
    print(len(items), "prompts; e.g.", repr(items[0]["prompt"]))
    return model, tok, items


class FigureSaver:
    """Saves a notebook's figures into one folder with `q3lab.viz.plots.save_figure`.

    With a model name (a second model's run), file names get `_NAME` before the suffix and the title says
    which model the figure shows; without one, files and figures are exactly what `save_figure` writes.
    """

    def __init__(self, folder: str | Path, model_name: str = ""):
        self.folder, self.model_name = Path(folder), model_name

    def __call__(self, fig, name: str):
        """Save `fig` as folder/name (suffixed for a named model) and return it, for display."""
        from q3lab.viz.plots import save_figure
        path = self.folder / name
        if self.model_name:
            path = path.with_name(f"{path.stem}_{self.model_name}{path.suffix}")
            label = f"model: {self.model_name}"
            if fig._suptitle is not None and fig._suptitle.get_text():
                fig.suptitle(f"{fig._suptitle.get_text()} ({label})")
            elif fig.axes and fig.axes[0].get_title():
                fig.axes[0].set_title(f"{fig.axes[0].get_title()} ({label})")
            else:
                fig.suptitle(label)
        save_figure(fig, path)
        return fig
