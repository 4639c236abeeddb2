"""Run the numbered notebooks headless with papermill, on any checkpoint."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from .errors import InputError, Q3LabError
from .record import read_prompts  # noqa: F401  (notebooks read prompt files through here)


class NotebookError(Q3LabError):
    """A notebook raised while papermill ran it; names the notebook, the cell and the error."""

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO / "notebooks"
DEFAULT_CHECKPOINT = REPO / "data" / "mini"


def notebook_paths(notebooks_dir: Path = NOTEBOOKS_DIR, names: list[str] | None = None) -> list[Path]:
    """The numbered notebooks NN_*.ipynb in order (optionally only those whose name starts with one of names)."""
    paths = sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))
    if names:
        paths = [p for p in paths if any(p.stem.startswith(n) or p.name == n for n in names)]
    if not paths:
        raise InputError(f"no notebooks NN_*.ipynb found in {notebooks_dir}" + (f" matching {names}" if names else ""))
    return paths


def run_notebooks(checkpoint: str | Path | None = None, out: str | Path | None = None, *,
                  figures_dir: str | Path | None = None, names: list[str] | None = None,
                  notebooks_dir: str | Path = NOTEBOOKS_DIR, parameters: dict | None = None,
                  kernel: str = "python3", progress: bool = True, in_place: bool = False) -> pd.DataFrame:
    """Execute every numbered notebook with papermill; returns one row per notebook with its time.

    Only what is given overrides a notebook's own defaults (the embedded data/mini, figures/ and
    out/notebooks, relative to notebooks/): checkpoint -> `checkpoint`, figures_dir -> `figures_dir`,
    out -> `out_dir` (also where the executed notebooks go; default out/notebooks). in_place: copy each
    executed notebook over its source, without papermill's timing metadata (refreshes the committed
    outputs; only with default parameters, so no machine-specific paths get committed).
    """
    import papermill as pm

    params = dict(parameters or {})
    if checkpoint is not None:
        params["checkpoint"] = str(Path(checkpoint).resolve())
    if figures_dir is not None:
        params["figures_dir"] = str(Path(figures_dir).resolve())
    if out is not None:
        params["out_dir"] = str(Path(out).resolve())
    if in_place and params:
        raise InputError(f"in-place refreshes the committed notebooks with their default parameters only; "
                         f"got {sorted(params)}")
    dest_dir = Path(out).resolve() if out is not None else REPO / "out" / "notebooks"
    dest_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for nb in notebook_paths(Path(notebooks_dir), names):
        t0 = time.perf_counter()
        dest = dest_dir / nb.name
        try:
            pm.execute_notebook(str(nb), str(dest), parameters=params, kernel_name=kernel,
                                cwd=str(nb.parent), progress_bar=progress)
        except pm.PapermillExecutionError as e:
            raise NotebookError(f"{nb.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} "
                                f"(executed notebook: {dest})") from None
        rows.append(dict(notebook=nb.name, seconds=round(time.perf_counter() - t0, 1), output=str(dest)))
        if in_place:
            write_clean(dest, nb)
    return pd.DataFrame(rows)


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
    """Open a checkpoint or store for a notebook's first cell (`q3lab.weights.open_source`, audit included).

    Raises `CheckpointError` carrying the audit's findings, so a papermill run pointed at the wrong folder
    fails in its first cell with the audit's message.
    """
    from .weights import open_source
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
