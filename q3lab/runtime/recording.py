"""Record the thinker's routing: `with q3lab.record(model) as rec:` ... `rec.to_frame()`.

Dimensions: B batch, T tokens in one forward call, N = B*T, L layers, A active experts, E experts.

Hooks keep references to the tensors the model already made (top-k ids and weights, optionally router
logits); all conversion to numpy/pandas happens in `to_frame()`, so a recorded forward costs a few Python
calls per layer and no device synchronisation.

Prompts: a forward call without a cache (or with an empty one) starts one new prompt per batch row; a call
whose cache already holds tokens continues the prompts of the call that filled that cache, with
`token_index` going on from `cache.length`. Left-padding tokens (attention_mask 0) are dropped from frames.

The fast decoders (`q3lab.fast.decoders`) do not call hooks in their steps: they write each step's routing on the
device into preallocated buffers, and hand them over with `Recorder.add_steps` after the generation, as the
calls `Thinker.generate` would have made (`active_recorders(model)` tells them who records).
"""
from __future__ import annotations

import io
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from q3lab.errors import InputError

TRACE_COLUMNS = ("prompt", "token_index", "position", "token", "layer", "rank", "expert", "weight", "call")
_CSV_MAGIC = "# q3lab-trace "
_ACTIVE: dict[int, list["Recorder"]] = {}     # id(model) -> recorders attached to it, innermost last


def active_recorders(model) -> list["Recorder"]:
    """The recorders currently attached to `model` (inside `with record(model)`)."""
    return list(_ACTIVE.get(id(model), ()))


@dataclass
class _Call:
    """One forward call of the thinker: its inputs and, per layer, what the router chose."""
    prompts: list[Any]                      # prompt id per batch row
    start: int                              # token_index of the first new token (cache.length)
    ids: torch.Tensor                       # [B, T]
    positions: torch.Tensor                 # [B, T] text positions the model used
    valid: torch.Tensor | None              # [B, T] False for padding, None if no mask
    cache: Any
    topk_ids: dict[int, torch.Tensor] = field(default_factory=dict)      # layer -> [N, A]
    topk_weights: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [N, A]
    logits: dict[int, torch.Tensor] = field(default_factory=dict)        # layer -> [N, E]
    done: bool = False
    media: frozenset = frozenset()          # media the call was given (q3lab.omni.modality.media_of)


class Recorder:
    """Collects routing per forward call while its hooks are registered (see `record`)."""

    def __init__(self, model, *, probs: bool = False, prompt: Any = None, domain: str | None = None,
                 **labels: Any):
        self.model = model
        self.probs = probs
        self.num_layers = len(model.model.layers)
        self.num_experts = model.config.num_experts
        self.top_k = model.config.num_experts_per_tok
        from q3lab.omni.modality import tokens_of
        self.modality_tokens = tokens_of(model)     # ids that carry or frame media (the `modality` column)
        self.calls: list[_Call] = []
        self.labels: dict[Any, dict[str, Any]] = {}    # prompt id -> {"domain": ..., other labels}
        self._pending: list[tuple[Any, dict[str, Any]]] = []
        self._current: _Call | None = None
        self._handles: list = []
        if prompt is not None:
            self.set_prompt(prompt, domain=domain, **labels)
        elif domain is not None or labels:
            raise InputError("record(): domain/labels given without a prompt id; pass prompt=...")

    # -- prompt ids -----------------------------------------------------------------------------
    def set_prompt(self, prompt: Any, domain: str | None = None, **labels: Any) -> None:
        """Name the next prompt started (one batch row), with an optional domain and other labels.

        Call it once per row before a batched call. Ids must be unique within one recording.
        """
        taken = set(self.labels) | {p for p, _ in self._pending}
        if prompt in taken:
            raise InputError(f"record: prompt id {prompt!r} is already used in this recording")
        self._pending.append((prompt, {"domain": domain, **labels}))

    def _new_prompt_ids(self, batch: int) -> list[Any]:
        ids = []
        for _ in range(batch):
            if self._pending:
                pid, lab = self._pending.pop(0)
            else:
                pid = len(self.labels)
                while pid in self.labels:
                    pid += 1
                lab = {}
            self.labels[pid] = lab
            ids.append(pid)
        return ids

    # -- hooks ----------------------------------------------------------------------------------
    def _attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._on_call_end))
        for i, layer in enumerate(self.model.model.layers):
            mlp = layer.mlp
            self._handles.append(mlp.hook_topk_ids.register_forward_hook(self._keeper("topk_ids", i)))
            self._handles.append(mlp.hook_topk_weights.register_forward_hook(self._keeper("topk_weights", i)))
            if self.probs:
                self._handles.append(mlp.hook_router_logits.register_forward_hook(self._keeper("logits", i)))
        _ACTIVE.setdefault(id(self.model), []).append(self)

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._current = None
        recs = _ACTIVE.get(id(self.model), [])
        if self in recs:
            recs.remove(self)
        if not recs:
            _ACTIVE.pop(id(self.model), None)

    def add_steps(self, cache, tokens: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor,
                  weights: torch.Tensor, logits: torch.Tensor | None = None, *, masked: bool = False) -> None:
        """Record `n` one-token decode steps that ran without hooks (a fast decoder), continuing the last recorded
        call on `cache`: tokens and positions [n, B] (the steps' inputs), ids and weights [n, L, B, A] (renormalised
        weights), logits [n, L, B, E] (router logits, needed when recording probs). Each step becomes one call,
        as `Thinker.generate` makes one forward call per step. Tensors may stay on the device (read in to_frame)."""
        n = tokens.shape[0]
        prev = next((c for c in reversed(self.calls) if c.cache is cache and c.done), None)
        if prev is None:
            raise InputError("record: decode steps continue a cache that no recorded call filled (start recording "
                             "before the prompt's first call)")
        if tokens.shape[1] != len(prev.prompts):
            raise InputError(f"record: decode steps of batch {tokens.shape[1]} continue a call of batch "
                             f"{len(prev.prompts)}")
        if self.probs and logits is None:
            raise InputError("record(probs=True): the decoder handed no router logits")
        start = prev.start + prev.ids.shape[1]
        B = tokens.shape[1]
        valid = torch.ones(B, 1, dtype=torch.bool) if masked else None
        # unbind: one call per step makes all its layers' views (indexing them one by one cost ~40 ms per
        # 64-token generate at 48 layers: most of what recording added to a fast decoder's generate, issue 15)
        tok, pos = tokens.view(n, B, 1).unbind(0), positions.view(n, B, 1).unbind(0)
        ids_s, w_s = ids.unbind(0), weights.unbind(0)
        lg_s = logits.unbind(0) if self.probs else None
        for i in range(n):
            call = _Call(prev.prompts, start + i, tok[i], pos[i], valid, cache)
            call.topk_ids = dict(enumerate(ids_s[i].unbind(0)))
            call.topk_weights = dict(enumerate(w_s[i].unbind(0)))
            if self.probs:
                call.logits = dict(enumerate(lg_s[i].unbind(0)))
            call.done = True
            self.calls.append(call)

    def _keeper(self, what: str, layer: int):
        def hook(module, args, out):
            call = self._current
            if call is None:
                raise InputError(f"record: layer {layer} routed tokens outside a forward call of the recorded "
                                 f"Thinker (call the model itself, not its layers)")
            getattr(call, what)[layer] = out.detach() if out.requires_grad else out
        return hook

    def _on_call(self, module, args, kwargs) -> None:
        names = ("input_ids", "position_ids", "cache")
        given = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        ids, pos, cache = given.get("input_ids"), given.get("position_ids"), given.get("cache")
        mask = kwargs.get("attention_mask")
        if ids is None or ids.dim() != 2:
            return  # the model's own input check raises the proper error
        B, T = ids.shape
        past = cache.length if cache is not None else 0
        if past == 0:
            prompts = self._new_prompt_ids(B)
        else:
            prev = next((c for c in reversed(self.calls) if c.cache is cache and c.done), None)
            if prev is None:
                raise InputError(f"record: a call continues a cache holding {past} tokens, but no recorded call "
                                 f"filled that cache (start recording before the prompt's first call)")
            end = prev.start + prev.ids.shape[1]
            if end != past or len(prev.prompts) != B:
                raise InputError(f"record: cache continuation mismatch: the last recorded call on this cache "
                                 f"ended at token {end} with batch {len(prev.prompts)}; this call starts at "
                                 f"{past} with batch {B}")
            prompts = prev.prompts
        if pos is None:
            if mask is not None:
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                pos = torch.arange(past, past + T, device=ids.device)[None].expand(B, T)
        elif pos.dim() == 3:
            pos = pos[0]   # temporal axis: equal to the text position for text tokens
        valid = mask.bool()[:, past:] if mask is not None else None
        from q3lab.omni.modality import media_of
        self._current = _Call(prompts, past, ids.detach().clone(), pos.detach().clone(),
                              None if valid is None else valid.clone(), cache, media=media_of(kwargs))
        self.calls.append(self._current)

    def _on_call_end(self, module, args, out) -> None:
        call = self._current
        if call is not None:
            missing = [i for i in range(self.num_layers) if i not in call.topk_ids or i not in call.topk_weights]
            if missing:
                raise InputError(f"record: forward call ended without routing from layers {missing}")
            call.done = True
        self._current = None

    # -- output ---------------------------------------------------------------------------------
    def _calls(self) -> list[_Call]:
        return [c for c in self.calls if c.done]

    def to_frame(self) -> pd.DataFrame:
        """Long frame, one row per (prompt, token_index, layer, rank): the expert chosen and its weight.

        Columns: prompt, token_index (int32, from 0 over the input as given), position (int32), token (int32),
        layer (int16), rank (int16), expert (int16), weight (float32, renormalised), call (int32, the index of
        the recorded forward call: what one expert-cache step sees), then `prob` (float32,
        softmax probability before renormalisation) when recording with probs=True, then `modality` (category: text,
        audio, image, video or special; `q3lab.omni.modality`), then `domain` and other
        labels when any prompt has them. Sorted by prompt (in order of first appearance), token, layer, rank.
        """
        from q3lab.omni.modality import modality_labels
        L, A = self.num_layers, self.top_k
        parts = []
        for n_call, call in enumerate(self._calls()):
            B, T = call.ids.shape
            ex = torch.stack([call.topk_ids[i] for i in range(L)]).view(L, B, T, A)
            w = torch.stack([call.topk_weights[i] for i in range(L)]).float().view(L, B, T, A)
            cols = {
                "call": np.full((L, B, T, A), n_call, dtype=np.int32),
                "prompt_row": np.broadcast_to(np.arange(B)[None, :, None, None], (L, B, T, A)),
                "token_index": np.broadcast_to((call.start + np.arange(T, dtype=np.int32))[None, None, :, None],
                                               (L, B, T, A)),
                "position": np.broadcast_to(call.positions.cpu().numpy().astype(np.int32)[None, :, :, None],
                                            (L, B, T, A)),
                "token": np.broadcast_to(call.ids.cpu().numpy().astype(np.int32)[None, :, :, None], (L, B, T, A)),
                "layer": np.broadcast_to(np.arange(L, dtype=np.int16)[:, None, None, None], (L, B, T, A)),
                "rank": np.broadcast_to(np.arange(A, dtype=np.int16)[None, None, None, :], (L, B, T, A)),
                "expert": ex.cpu().numpy().astype(np.int16),
                "weight": w.cpu().numpy().astype(np.float32),
                "modality": np.broadcast_to(modality_labels(call.ids, self.modality_tokens, media=call.media)
                                            [None, :, :, None], (L, B, T, A)),
            }
            if self.probs:
                lg = torch.stack([call.logits[i] for i in range(L)])                   # [L, N, E]
                p = torch.softmax(lg.float(), dim=-1).view(L, B, T, -1)
                cols["prob"] = torch.gather(p, -1, ex).cpu().numpy().astype(np.float32)
            keep = None
            if call.valid is not None:
                keep = np.broadcast_to(call.valid.cpu().numpy()[None, :, :, None], (L, B, T, A)).reshape(-1)
            flat = {k: (v.reshape(-1) if keep is None else v.reshape(-1)[keep]) for k, v in cols.items()}
            order = {pid: n for n, pid in enumerate(self.labels)}
            flat["prompt_order"] = np.array([order[p] for p in call.prompts], dtype=np.int32)[flat.pop("prompt_row")]
            parts.append(flat)
        return self._assemble(parts)

    def _assemble(self, parts: list[dict[str, np.ndarray]]) -> pd.DataFrame:
        names = ["prompt_order", "token_index", "position", "token", "layer", "rank", "expert", "weight", "call"]
        if self.probs:
            names.append("prob")
        names.append("modality")
        if parts:
            data = {k: np.concatenate([p[k] for p in parts]) for k in names}
        else:
            data = {k: np.zeros(0, dtype=object if k == "modality" else np.float32 if k in ("weight", "prob")
                                else np.int32) for k in names}
        sort = np.lexsort((data["rank"], data["layer"], data["token_index"], data["prompt_order"]))
        data = {k: v[sort] for k, v in data.items()}
        pids = list(self.labels)
        po = data.pop("prompt_order")
        prompt = _prompt_column(pids, po)
        # a category (1 byte a row, not a string): lexically ordered, as a CSV trace reads it back
        data["modality"] = pd.Categorical(data["modality"].astype(str))
        frame = pd.DataFrame({"prompt": prompt, **data})
        label_keys = sorted({k for lab in self.labels.values() for k, v in lab.items() if v is not None})
        for key in label_keys:
            values = [self.labels[p].get(key) for p in pids]
            frame[key] = pd.Categorical.from_codes(*_codes(values, po)) if values else pd.Categorical([])
        frame.attrs.update(num_experts=int(self.num_experts), top_k=int(self.top_k),
                           num_layers=int(self.num_layers))
        return frame

    def router_probs(self, layer: int) -> tuple[pd.DataFrame, np.ndarray]:
        """Full router probabilities of one layer: (index frame prompt/token_index/position/token, [rows, E]).

        Needs probs=True. Rows follow the order of `to_frame()`'s tokens.
        """
        if not self.probs:
            raise InputError("record: router_probs() needs record(model, probs=True)")
        if not 0 <= layer < self.num_layers:
            raise InputError(f"record: layer {layer} is outside [0, {self.num_layers})")
        order = {pid: n for n, pid in enumerate(self.labels)}
        idx, mats = [], []
        for call in self._calls():
            B, T = call.ids.shape
            p = torch.softmax(call.logits[layer].float(), dim=-1).view(B, T, -1).cpu().numpy()
            ti = call.start + np.arange(T, dtype=np.int32)
            for b in range(B):
                keep = np.ones(T, bool) if call.valid is None else call.valid[b].cpu().numpy()
                idx.append(pd.DataFrame({"prompt_order": order[call.prompts[b]], "token_index": ti[keep],
                                         "position": call.positions[b].cpu().numpy().astype(np.int32)[keep],
                                         "token": call.ids[b].cpu().numpy().astype(np.int32)[keep]}))
                mats.append(p[b][keep])
        if not idx:
            return pd.DataFrame(columns=["prompt", "token_index", "position", "token"]), \
                np.zeros((0, self.num_experts), np.float32)
        index = pd.concat(idx, ignore_index=True)
        mat = np.concatenate(mats).astype(np.float32)
        sort = np.lexsort((index["token_index"].to_numpy(), index["prompt_order"].to_numpy()))
        index = index.iloc[sort].reset_index(drop=True)
        po = index.pop("prompt_order").to_numpy()
        index.insert(0, "prompt", _prompt_column(list(self.labels), po))
        return index, mat[sort]

    def probs_frame(self) -> pd.DataFrame:
        """Full router probabilities as a long frame: prompt, token_index, layer, expert, prob (needs probs=True)."""
        frames = []
        for layer in range(self.num_layers):
            index, mat = self.router_probs(layer)
            n, E = mat.shape
            frames.append(pd.DataFrame({
                "prompt": np.repeat(index["prompt"].to_numpy(), E),
                "token_index": np.repeat(index["token_index"].to_numpy(), E),
                "layer": np.full(n * E, layer, np.int16),
                "expert": np.tile(np.arange(E, dtype=np.int16), n),
                "prob": mat.reshape(-1)}))
        out = pd.concat(frames, ignore_index=True)
        out = out.sort_values(["prompt", "token_index", "layer", "expert"], kind="stable", ignore_index=True) \
            if len(out) else out
        out.attrs.update(num_experts=int(self.num_experts), top_k=int(self.top_k), num_layers=int(self.num_layers))
        return out


def _prompt_column(pids: list[Any], codes: np.ndarray) -> np.ndarray | pd.Categorical:
    """Prompt ids per row: int32 when every id is an int, else strings."""
    if all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in pids):
        return np.asarray(pids, dtype=np.int32)[codes] if pids else np.zeros(0, np.int32)
    return np.asarray([str(p) for p in pids], dtype=object)[codes]


def _codes(values: list[Any], po: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    cats = sorted({v for v in values if v is not None}, key=str)
    lookup = {v: i for i, v in enumerate(cats)}
    per_prompt = np.array([lookup.get(v, -1) for v in values], dtype=np.int32)
    return per_prompt[po], cats


@contextmanager
def record(model, *, probs: bool = False, prompt: Any = None, domain: str | None = None,
           **labels: Any) -> Iterator[Recorder]:
    """Record routing of every forward call of `model` (a `q3lab.runtime.thinker.Thinker`) inside the block.

    probs: also keep router logits, giving a `prob` column and `rec.router_probs(layer)`.
    prompt/domain/labels: id and labels of the first prompt (see `Recorder.set_prompt`).
    Hooks are removed on exit, also when the block raises.
    """
    rec = Recorder(model, probs=probs, prompt=prompt, domain=domain, **labels)
    rec._attach()
    try:
        yield rec
    finally:
        rec._detach()


# -- saving and loading ----------------------------------------------------------------------------
TRACE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


def trace_format(path: str | Path) -> str:
    """"parquet" or "csv", from the file name; InputError for any other (checked before tracing, not after)."""
    fmt = TRACE_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown trace format {Path(path).suffix!r}; use .parquet or .csv")
    return fmt


def check_trace_destination(path: str | Path) -> Path:
    """Refuse, before any work, a trace path that cannot be written: an unknown format, a folder, a parent
    that is a file. InputError names the path."""
    path = Path(path)
    trace_format(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a trace file name ending in .parquet or .csv")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{path}: cannot write the trace: {parent} is not a folder")
            break
    return path


def save_trace(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a trace frame to `.parquet` (pyarrow) or `.csv` (a first comment line keeps frame.attrs).

    Atomic (q3lab.weights.outdir.write_file): a failed or interrupted write leaves an existing file as it was, and an
    existing file is replaced only when it is a q3lab trace (anything else there is an `OutputError`). A
    destination that cannot be written (a folder, a file as parent, no permission, a full disk) raises
    InputError naming it."""
    from q3lab.base.jsonio import describe_os_error
    from q3lab.weights.outdir import write_file
    path = Path(path)
    fmt = trace_format(path)
    _check_trace(frame, str(path))
    check_trace_destination(path)
    if fmt == "parquet":
        def write(f) -> None:
            frame.to_parquet(f, engine="pyarrow", index=False)
    else:
        def write(f) -> None:
            text = io.TextIOWrapper(f, encoding="utf-8", newline="")
            # the header keeps what CSV loses: attrs, and which columns hold text or categories
            kinds = {c: ("category" if isinstance(frame[c].dtype, pd.CategoricalDtype) else
                         "str" if not pd.api.types.is_numeric_dtype(frame[c]) else "num") for c in frame.columns}
            text.write(_CSV_MAGIC + json.dumps({"attrs": dict(frame.attrs), "kinds": kinds}, sort_keys=True) + "\n")
            frame.to_csv(text, index=False)
            text.flush()
            text.detach()   # the binary file stays open for write_atomic's fsync and rename
    try:
        return write_file(path, write, what="trace", is_ours=_is_trace_file)
    except OSError as e:
        raise InputError(f"{e.filename or path}: cannot write the trace: {describe_os_error(e)}") from None


def _is_trace_file(path: Path) -> bool:
    """Does `path` hold a q3lab trace (judged from its content: the CSV magic line, or a parquet schema with
    the trace columns)? Only such a file may be replaced by `save_trace`."""
    if path.suffix.lower() == ".csv":
        from q3lab.weights.outdir import first_line
        return first_line(path).startswith(_CSV_MAGIC)
    try:
        import pyarrow.parquet as pq
        names = set(pq.read_schema(path).names)
    except Exception:   # any unreadable file is not one of ours, whatever pyarrow raises
        return False
    return {"prompt", "token_index", "layer", "expert"} <= names and bool({"rank", "prob"} & names)


_DTYPES = {"token_index": np.int32, "position": np.int32, "token": np.int32, "layer": np.int16,
           "rank": np.int16, "expert": np.int16, "weight": np.float32, "prob": np.float32, "call": np.int32}
_KINDS = ("category", "str", "num")


def load_trace(path: str | Path) -> pd.DataFrame:
    """Read a trace written by `save_trace`, checking its columns and restoring compact dtypes.

    A file that is missing, not a regular file, corrupt, truncated or not a trace raises InputError naming it
    (pyarrow's and pandas' own exceptions never escape)."""
    import stat

    from q3lab.base import jsonio
    path = Path(path)
    fmt = trace_format(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such trace file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the trace: {jsonio.describe_os_error(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (expected a .parquet or .csv trace)")
    try:
        if fmt == "parquet":
            frame = pd.read_parquet(path, engine="pyarrow")
        else:
            with open(path, "rb") as f:
                first = f.readline(jsonio.CAPS["trace"] + 1)
            head = {}
            if first.startswith(_CSV_MAGIC.encode()):
                head = jsonio.loads(first[len(_CSV_MAGIC):], f"{path}: line 1", InputError, what="trace header")
                if not (isinstance(head, dict) and isinstance(head.get("attrs", {}), dict)
                        and isinstance(head.get("kinds", {}), dict)
                        and all(k in _KINDS for k in head.get("kinds", {}).values())):
                    raise InputError(f"{path}: line 1: malformed trace header: expected attrs (object) and kinds "
                                     f"(column -> one of {list(_KINDS)})")
            kinds = head.get("kinds", {})
            frame = pd.read_csv(path, skiprows=1 if head else 0, encoding="utf-8",
                                dtype={c: str for c, kind in kinds.items() if kind != "num"})
            for col, kind in kinds.items():
                if kind == "category" and col in frame:
                    frame[col] = frame[col].astype("category")
            frame.attrs.update(head.get("attrs", {}))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow and pandas raise many types (ArrowInvalid, OSError, ...)
        raise InputError(f"{path}: not a readable {fmt} trace: {type(e).__name__}: {str(e)[:200]}") from None
    _check_trace(frame, str(path))
    col, dt = "prompt", np.int32
    try:
        if pd.api.types.is_integer_dtype(frame["prompt"]) and frame["prompt"].dtype != np.int32:
            frame["prompt"] = frame["prompt"].astype(np.int32)
        for col, dt in _DTYPES.items():
            if col in frame and frame[col].dtype != dt:
                frame[col] = frame[col].astype(dt)
    except (ValueError, TypeError, OverflowError) as e:
        raise InputError(f"{path}: column {col!r} is not {np.dtype(dt).name}: {str(e)[:200]}") from None
    return frame


def _check_trace(frame: pd.DataFrame, where: str) -> None:
    need = ("prompt", "token_index", "layer", "expert", "prob" if "rank" not in frame.columns else "rank")
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise InputError(f"{where}: not a routing trace: missing columns {missing} "
                         f"(found {list(frame.columns)[:12]})")


# -- tracing a file of prompts (the `q3lab trace` command) ----------------------------------------------
def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompts from a file: `.jsonl` (objects with `prompt`, optional `domain`, `id`, `expected` and any other
    fields, kept), else one per line.

    Blank lines are skipped; each prompt's id is `id` when given (an integer or a string), else its 0-based
    index among the prompts. Ids must be unique, also across types: a trace stores mixed ids as text, so `1`
    and `"1"` would become one prompt. The file is read within `q3lab.base.jsonio`'s bounds (a regular UTF-8 file,
    capped size and nesting); every problem raises InputError naming the file and line.
    """
    from q3lab.base import jsonio
    path = Path(path)
    text = jsonio.read_text(path, InputError, kind="prompts", missing="no such prompts file")
    items: list[dict[str, Any]] = []
    seen: dict[str, tuple[Any, int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            obj = jsonio.loads(line, f"{path}:{n}", InputError, what="JSON line")
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise InputError(f"{path}:{n}: expected an object with a string 'prompt', got {line[:80]!r}")
            pid, domain = obj.get("id", len(items)), obj.get("domain")
            if not (type(pid) is int or isinstance(pid, str)):
                raise InputError(f"{path}:{n}: 'id' must be an integer or a string, got {pid!r:.80}")
            if not (domain is None or isinstance(domain, str)):
                raise InputError(f"{path}:{n}: 'domain' must be a string, got {domain!r:.80}")
            item = {**obj, "id": pid, "domain": domain, "line": n}
        else:
            item = {"id": len(items), "prompt": line, "domain": None, "line": n}
        key = str(item["id"])
        if key in seen:
            other, where = seen[key]
            raise InputError(f"{path}:{n}: prompt id {item['id']!r} repeats the id {other!r} of line {where}"
                             f"{' (a trace stores mixed ids as text)' if other != item['id'] else ''}")
        seen[key] = (item["id"], n)
        items.append(item)
    if not items:
        raise InputError(f"{path}: no prompts (the file is empty or blank)")
    return items


def trace_prompts(model, tokenizer, items: list[dict[str, Any]], *, max_new_tokens: int = 0,
                  probs: bool = False, progress: bool = True, where: str = "prompts") -> Recorder:
    """Record the routing of each prompt (tokenised, then greedy decode of `max_new_tokens`); the Recorder.

    Generation stops early at the tokenizer's EOS token. A prompt that tokenises to nothing raises InputError.
    """
    from tqdm.auto import tqdm
    eos = getattr(tokenizer, "eos_token_id", None)
    with record(model, probs=probs) as rec:
        bar = tqdm(items, desc="trace", unit="prompt", disable=not progress)
        for item in bar:
            ids = tokenizer.encode(item["prompt"])
            if not ids:
                raise InputError(f"{where}:{item.get('line', '?')}: the prompt gives no tokens")
            rec.set_prompt(item["id"], domain=item.get("domain"))
            x = torch.tensor([ids], device=model.device)
            with torch.inference_mode():
                if max_new_tokens:
                    model.generate(x, max_new_tokens, eos_token_id=eos)
                else:
                    model(x, last_only=True)
            bar.set_postfix(tokens=sum(c.ids.shape[1] for c in rec.calls if c.done))
        bar.close()
    return rec

