"""Move the flat q3lab/*.py modules into their layer's subpackage and rewrite every import: re-runnable.

    cd ANY_CHECKOUT_OF_Q3LAB && python /path/to/this/scripts/relayout.py [--dry-run]
    cd LAID_OUT_CHECKOUT && python scripts/relayout.py --merge BRANCH   # merge a branch still flat (below)

The one mapping table is `MOVED` in q3lab/_compat.py next to this script (read with `ast`, so the target
tree need not have it). On the target tree (the git checkout holding the current directory, or --root):

1. converts relative imports in q3lab/**/*.py to absolute ones (resolved from where the file is now);
2. rewrites old module paths to the new ones in every tracked or untracked (not ignored) .py, .ipynb,
   .md, .toml, .cfg and Makefile under q3lab/, tests/, bench/ (not bench/logs/), scripts/, notebooks/,
   docs/, and README.md, Makefile, pyproject.toml: `from q3lab.x import`, `import q3lab.x`,
   `from q3lab import x` (split by new package, the local name kept), dotted `q3lab.x.name` in strings
   (monkeypatch targets, docs), paths `q3lab/x.py`, backticked bare file names in Markdown, and
   q3lab/__init__.py's `_EXPORTS` values.
   Notebooks: only the code and markdown cells of the .ipynb change, never the outputs. A file holding the
   line `relayout: skip` is left alone;
3. `git mv`s (plain rename when untracked) every mapped file still at its old path, and writes each missing
   subpackage `__init__.py` (copied from this script's tree when it has one, so a merge sees the same
   file), and copies q3lab/_compat.py and q3lab/_lazy.py when the target lacks them;
4. prints every change. A second run changes nothing. Commit the result yourself (`git add -A`).

--merge BRANCH merges a branch written against the flat layout into the laid-out checkout: it relayouts the
merge base and the branch in temporary worktrees and merges file by file against the relayouted base, so the
import lines that both sides rewrote the same way do not conflict; only real edits meet.
"""
# relayout: skip (this file holds the old names on purpose)
from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # the tree this script comes from (holds the table)
SKIP_MARK = "relayout: skip"
DIRS = ("q3lab", "tests", "bench", "scripts", "notebooks", "docs")
TOP_FILES = ("README.md", "Makefile", "pyproject.toml", "setup.cfg")
SUFFIXES = (".py", ".ipynb", ".md", ".toml", ".cfg")
EXCLUDED = ("bench/logs/",)  # records of past runs: they name the files as they were then
PACKAGE_DOCS = {  # only used where neither tree has the subpackage's __init__.py yet
    "base": "Ground layer: bytes to validated values (safetensors headers, bounded JSON, the config, the tokenizer).",
    "weights": "Weights layer: checkpoint folders and stores behind one interface, and every file q3lab writes.",
    "kernels": "Kernel layer: leaf arithmetic (Triton, C) with torch twins, called by the layer step.",
    "runtime": "Runtime layer: the model as a specification over one layer step, experts, residency, recording.",
    "fast": "Fast layer: drivers of the same layer step with fixed shapes (CUDA graphs, offload), the GPU cache.",
    "analysis": "Analysis layer: tidy frames from models and traces (metrics, cache simulation, causal studies).",
    "viz": "Viz layer: figures (frame -> Figure), the routing explorer, the notebook runner and its helpers.",
}


def load_table(tree: Path) -> dict[str, str]:
    """MOVED from tree/q3lab/_compat.py, without importing it."""
    src = tree / "q3lab" / "_compat.py"
    for node in ast.parse(src.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MOVED" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit(f"{src}: no MOVED table")


def mod_path(dotted: str) -> str:
    """'q3lab.runtime.thinker' -> 'q3lab/runtime/thinker.py'."""
    return dotted.replace(".", "/") + ".py"


class Rewriter:
    """The text rules, built from the table."""

    def __init__(self, moved: dict[str, str]):
        self.moved = moved
        self.old = {k.split(".", 1)[1]: v for k, v in moved.items()}  # 'model' -> 'q3lab.runtime.thinker'
        shadowed = {"record", "extract", "synth"}  # also public functions: `q3lab.record(model)` stays
        # An old module replaced by a package of its name (q3lab.weights): `q3lab.weights.<child>` is new.
        children = {}
        for name in self.old:
            kids = {v.split(".")[2] for v in moved.values() if v.startswith(f"q3lab.{name}.")}
            if kids:
                children[name] = kids
        names = sorted(self.old, key=len, reverse=True)
        plain = [n for n in names if n not in shadowed]
        self.dotted = re.compile(r"(?<![\w.])q3lab\.(%s)(?![\w])" % "|".join(map(re.escape, plain)))
        self.dotted_shadow = re.compile(
            r"(?<![\w.])q3lab\.(%s)(?=\.[A-Za-z_])" % "|".join(map(re.escape, sorted(shadowed))))
        self.import_shadow = re.compile(
            r"^([ \t]*(?:from|import)[ \t]+)q3lab\.(%s)\b" % "|".join(map(re.escape, sorted(shadowed))), re.M)
        # A quoted exact name (`import_module("q3lab.extract")`, `sys.modules["q3lab.record"]`) is the module.
        self.quoted_shadow = re.compile(r"""(["'])q3lab\.(%s)\1""" % "|".join(map(re.escape, sorted(shadowed))))
        self.children = children
        # Markdown names a module by its bare file name in backticks; atlas' own file names are left alone.
        atlas = {"corpus", "dataset", "export", "plots", "predict", "queries", "synthetic", "tracing"}
        self.bare = re.compile(r"`(%s)\.py`" % "|".join(map(re.escape, [n for n in names if n not in atlas])))
        self.path = re.compile(r"(?<![\w.])q3lab/(%s)\.py\b" % "|".join(map(re.escape, names)))
        self.from_pkg = re.compile(r"^([ \t]*)from q3lab import (?!\()([^#\n]+?)([ \t]*(?:#[^\n]*)?)$", re.M)
        self.shadowed = shadowed

    def _dotted(self, m: re.Match) -> str:
        name = m.group(1)
        rest = m.string[m.end():]
        kids = self.children.get(name)
        if kids and re.match(r"\.(%s)\b" % "|".join(kids), rest):
            return m.group(0)  # already a new path below the package that replaced the module
        imported = re.match(r"[ \t]+import[ \t]+\(?([\w \t,]+)", rest) if kids else None
        if imported and {i.split()[0] for i in imported.group(1).split(",") if i.strip()} <= kids:
            return m.group(0)  # `from q3lab.weights import store`: submodules of the new package
        return self.moved[f"q3lab.{name}"]

    def _from_pkg(self, m: re.Match) -> str:
        indent, names, comment = m.group(1), m.group(2), m.group(3)
        items = [s.strip() for s in names.strip().rstrip(",").split(",")]
        keep, groups = [], {}
        for item in items:
            parts = item.split()
            name = parts[0]
            local = parts[2] if len(parts) == 3 and parts[1] == "as" else name
            new = self.old.get(name) if name not in self.shadowed else None
            if new is None:
                keep.append(item)
                continue
            pkg, leaf = new.rsplit(".", 1)
            groups.setdefault(pkg, []).append(leaf if leaf == local else f"{leaf} as {local}")
        if not groups:
            return m.group(0)
        lines = [f"from q3lab import {', '.join(keep)}"] if keep else []
        lines += [f"from {pkg} import {', '.join(v)}" for pkg, v in groups.items()]
        lines[-1] += comment
        return "\n".join(indent + line for line in lines)

    def text(self, s: str) -> str:
        s = self.from_pkg.sub(self._from_pkg, s)
        s = self.import_shadow.sub(lambda m: m.group(1) + self.moved[f"q3lab.{m.group(2)}"], s)
        s = self.quoted_shadow.sub(lambda m: m.group(1) + self.moved[f"q3lab.{m.group(2)}"] + m.group(1), s)
        s = self.dotted_shadow.sub(lambda m: self.moved[f"q3lab.{m.group(1)}"], s)
        s = self.dotted.sub(self._dotted, s)
        s = self.path.sub(lambda m: mod_path(self.moved[f"q3lab.{m.group(1)}"]), s)
        return s

    def markdown(self, s: str) -> str:
        """`model.py` -> `q3lab/runtime/thinker.py` (backticked bare file names, in .md files only)."""
        return self.bare.sub(lambda m: f"`{mod_path(self.moved['q3lab.' + m.group(1)])}`", s)

    def exports(self, s: str) -> str:
        """q3lab/__init__.py: `"Thinker": "model"` -> `"Thinker": "runtime.thinker"` (package-relative)."""
        def sub(m: re.Match) -> str:
            new = self.old.get(m.group(2))
            return m.group(0) if new is None else f'{m.group(1)}"{new.split(".", 1)[1]}"'
        return re.sub(r'(:\s*)"([a-z_]+)"', sub, s)


RELATIVE = re.compile(r"^([ \t]*from[ \t]+)(\.+)([\w.]*)([ \t]+import\b)", re.M)


def absolute_imports(s: str, package: str) -> str:
    """`from .x import y` in package `package` -> `from package.x import y`."""
    def sub(m: re.Match) -> str:
        parts = package.split(".")
        up = len(m.group(2)) - 1
        if up >= len(parts):
            return m.group(0)
        base = ".".join(parts[:len(parts) - up] + ([m.group(3)] if m.group(3) else []))
        return f"{m.group(1)}{base}{m.group(4)}"
    return RELATIVE.sub(sub, s)


def package_of(rel: str) -> str:
    """'q3lab/atlas/tracing.py' -> 'q3lab.atlas'."""
    return ".".join(Path(rel).parent.parts)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


def candidates(root: Path) -> list[str]:
    files = git(root, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    out = []
    for f in files:
        if not f or not (root / f).is_file() or f.startswith(EXCLUDED):
            continue
        top = f.split("/", 1)[0]
        if f in TOP_FILES or (top in DIRS and (f.endswith(SUFFIXES) or Path(f).name == "Makefile")):
            out.append(f)
    return sorted(set(out))


def rewrite_notebook(s: str, fn) -> str:
    nb = json.loads(s)
    if json.dumps(nb, indent=1, ensure_ascii=False) + "\n" != s:
        raise ValueError("not in nbformat's layout (indent 1); refusing to rewrite it")
    for cell in nb.get("cells", []):
        if cell.get("cell_type") not in ("code", "markdown"):
            continue
        src = cell["source"]
        joined = "".join(src) if isinstance(src, list) else src
        new = fn(joined)
        if new != joined:
            cell["source"] = new.splitlines(keepends=True) if isinstance(src, list) else new
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def relayout(root: Path, dry: bool = False, quiet: bool = False) -> tuple[int, int, int]:
    """Apply the table to the checkout at root; (files rewritten, files moved, files created)."""
    moved = load_table(HERE)
    rw = Rewriter(moved)
    changed = moves = created = 0

    def say(*a) -> None:
        if not quiet:
            print(*a)

    # 1-2: rewrite text where the files are now (relative imports resolve from there).
    for rel in candidates(root):
        path = root / rel
        try:
            s = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            say(f"skip (not UTF-8): {rel}")
            continue
        if SKIP_MARK in s:
            continue

        def fn(text: str, rel=rel) -> str:
            if rel.endswith(".py") and rel.startswith("q3lab/"):
                text = absolute_imports(text, package_of(rel))
            text = rw.text(text)
            if rel.endswith(".md"):
                text = rw.markdown(text)
            if rel == "q3lab/__init__.py":
                text = rw.exports(text)
            return text

        try:
            new = rewrite_notebook(s, fn) if rel.endswith(".ipynb") else fn(s)
        except ValueError as e:
            say(f"skip ({e}): {rel}")
            continue
        if new != s:
            n = sum(a != b for a, b in zip(s.splitlines(), new.splitlines())) + abs(
                len(s.splitlines()) - len(new.splitlines()))
            say(f"rewrote {rel} ({n} lines)")
            changed += 1
            if not dry:
                path.write_text(new, encoding="utf-8")

    # 3: move the files, then make sure every new package has its __init__.py.
    tracked = set(git(root, "ls-files", "-z", "q3lab").split("\0"))
    for old, new in moved.items():
        src, dst = root / mod_path(old), root / mod_path(new)
        if not src.exists():
            continue
        if dst.exists():
            print(f"CONFLICT: both {mod_path(old)} and {mod_path(new)} exist; merge them by hand")
            continue
        say(f"move {mod_path(old)} -> {mod_path(new)}")
        moves += 1
        if dry:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if mod_path(old) in tracked:
            git(root, "mv", mod_path(old), mod_path(new))
        else:
            src.rename(dst)
    packages = sorted({v.rsplit(".", 1)[0] for v in moved.values()} - {"q3lab"})
    extra = [f"{p.replace('.', '/')}/__init__.py" for p in packages] + ["q3lab/_compat.py", "q3lab/_lazy.py"]
    for rel in extra:
        dst = root / rel
        if dst.exists():
            continue
        if rel.endswith("__init__.py") and not dst.parent.exists():
            continue  # no module of this package exists on this tree
        template = HERE / rel
        if not rel.endswith("__init__.py") and not template.exists():
            continue  # this script's tree has no such file yet
        say(f"create {rel}" + (" (copied from " + str(HERE) + ")" if template.exists() else ""))
        created += 1
        if dry:
            continue
        if template.exists() and template.resolve() != dst.resolve():
            shutil.copyfile(template, dst)
        elif rel.endswith("__init__.py"):
            dst.write_text(f'"""{PACKAGE_DOCS[dst.parent.name]}"""\n')
    return changed, moves, created


def files_of(tree: Path) -> dict[str, bytes]:
    """Every tracked or untracked (not ignored) file of a checkout, with its bytes."""
    names = git(tree, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    return {n: (tree / n).read_bytes() for n in names if n and (tree / n).is_file()}


def merge(root: Path, branch: str) -> int:
    """Merge `branch` (still in the flat layout) into the laid-out HEAD of root without spurious conflicts.

    A plain merge sees every rewritten import line changed on both sides. Instead: relayout the merge base and
    the branch in temporary worktrees, and merge file by file with the relayouted base as the base (`git
    merge-file`), so only real edits meet. The merge is left uncommitted (MERGE_HEAD set), as `git merge
    --no-commit` would; conflicts carry the usual markers.
    """
    if git(root, "status", "--porcelain").strip():
        raise SystemExit(f"{root}: commit or stash your changes first")
    base = git(root, "merge-base", "HEAD", branch).strip()
    tmp = Path(tempfile.mkdtemp(prefix="relayout-merge-"))
    trees = {}
    try:
        for name, rev in (("base", base), ("theirs", branch)):
            wt = tmp / name
            git(root, "worktree", "add", "--detach", str(wt), rev)
            relayout(wt, quiet=True)
            trees[name] = files_of(wt)
    finally:
        for name in ("base", "theirs"):
            if (tmp / name).exists():
                git(root, "worktree", "remove", "--force", str(tmp / name))
    b, t = trees["base"], trees["theirs"]
    o = files_of(root)
    git(root, "merge", "--no-ff", "--no-commit", "-s", "ours", branch)  # records MERGE_HEAD, keeps our tree
    taken = merged = 0
    conflicts = []
    for rel in sorted(set(b) | set(o) | set(t)):
        bo, oo, to = b.get(rel), o.get(rel), t.get(rel)
        if to == bo or to == oo:
            continue  # the branch did not touch it, or made the same change
        path = root / rel
        if oo == bo:  # only the branch changed it
            taken += 1
            if to is None:
                git(root, "rm", "-q", "--", rel)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(to)
            continue
        if None in (bo, oo, to) or b"\0" in bo + oo + to:
            conflicts.append(f"{rel} (changed on both sides, deleted or binary: ours kept)")
            continue
        with tempfile.TemporaryDirectory() as d:
            files = [Path(d, n) for n in ("ours", "base", "theirs")]
            for f, data in zip(files, (oo, bo, to)):
                f.write_bytes(data)
            r = subprocess.run(["git", "merge-file", "-L", "HEAD", "-L", "base (relayouted)", "-L", branch,
                                *map(str, files)], capture_output=True)
            path.write_bytes(files[0].read_bytes())
        merged += 1
        if r.returncode:
            conflicts.append(f"{rel} ({r.returncode} conflict(s), marked)")
    git(root, "add", "-A")
    print(f"relayout --merge {branch}: took {taken} files from the branch, merged {merged} changed on both sides")
    for c in conflicts:
        print(f"CONFLICT: {c}")
    print("resolve any conflicts, then `git add -A && git commit`" if conflicts else
          "no conflicts: review (`git diff --cached HEAD`) and `git commit`")
    return 1 if conflicts else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="the checkout to change (default: the current one)")
    ap.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    ap.add_argument("--merge", metavar="BRANCH", help="merge a branch still in the flat layout into this laid-out "
                    "checkout, with the relayouted merge base as the base (see merge())")
    args = ap.parse_args(argv)
    root = Path(git(args.root or Path.cwd(), "rev-parse", "--show-toplevel").strip()).resolve()
    if args.merge:
        return merge(root, args.merge)
    changed, moves, created = relayout(root, args.dry_run)
    verb = "would change" if args.dry_run else "changed"
    print(f"relayout: {verb} {changed} files, {moves} moves, {created} new files"
          + ("" if changed or moves or created else " (nothing to do)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
