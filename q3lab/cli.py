"""The `q3lab` command line. Each subcommand is a `_add_<name>(sub)` parser builder plus a `_cmd_<name>(args)`.

Exit statuses mean one thing each (`main`): 0 success; 1 ran and found problems (audit, extract --verify);
2 refused input: a `Q3LabError`, or what the environment did to a file (permissions, a folder or FIFO where a
file should be, a name too long, a full disk, bytes that are not UTF-8), one line naming the file, tensor,
option or layer; 3 an unexpected internal error (a bug: one line, the traceback with --debug or
Q3LAB_DEBUG=1); 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from .errors import InputError, Q3LabError

EXIT_OK, EXIT_PROBLEMS, EXIT_REFUSED, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
BUG_REPORT = "this is a bug in q3lab: please report it with the command line"
# Smallest sampling temperature and top-p accepted: the model divides float32 logits by the temperature and
# compares float32 sums with top-p, so values that round to 0 (or overflow the logits to inf) in float32 would
# sample from NaN or all-zero probabilities.
MIN_SAMPLING = 1e-30


def _device(arg: str) -> str:
    """`--device` checked before any work: a torch device that exists here and computes (not meta)."""
    import torch
    try:
        dev = torch.device(arg)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InputError(f"--device {arg!r} is not a torch device: {str(e).splitlines()[0][:160]}") from None
    if dev.type == "cpu":
        return arg
    if dev.type == "meta":
        raise InputError(f"--device {arg!r} holds shapes but no data: give a device that computes (cpu, cuda)")
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        built = " (this torch is built without CUDA)" if dev.type == "cuda" and torch.version.cuda is None else ""
        raise InputError(f"--device {arg!r}: no {dev.type} device is available{built}; use --device cpu")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise InputError(f"--device {arg!r}: only {count()} {dev.type} device(s) here (indices 0..{count() - 1})")
    return arg


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="check a checkpoint against its config: every thinker tensor, shape, dtype")
    p.add_argument("checkpoint", help="checkpoint folder (config.json + model.safetensors[.index.json])")
    p.add_argument("--csv", help="also write the per-tensor table to this CSV file (new, or an earlier audit table)")
    p.add_argument("--deep", action="store_true", help="also read every tensor: min, max, mean, std, nan and inf "
                                                       "counts (exit 1 if any tensor holds nan or inf)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--deep)")
    p.set_defaults(func=_cmd_audit)


# the audit frame's columns: an existing --csv file is replaced only when it is such a table
AUDIT_COLUMNS = ("name", "key", "component", "layer", "expert", "expected_shape", "shape", "dtype", "shard",
                 "bytes", "status", "detail")


def _cmd_audit(args) -> int:
    from .checkpoint import Checkpoint, audit_checkpoint
    from .finite import STATS_COLUMNS, nonfinite_lines, tensor_stats
    from .outdir import check_writable_name, csv_with_header, write_file
    if args.csv:
        check_writable_name(args.csv)
    ckpt = Checkpoint(args.checkpoint)
    report = audit_checkpoint(ckpt)
    print(report.summary())
    frame, bad = report.frame, []
    if args.deep:
        stats = tensor_stats(ckpt, keys=[(k, s) for k, s, st in zip(frame["key"], frame["shard"], frame["status"])
                                         if s and st != "unreadable"], progress=not args.no_progress)
        print("\nper-tensor statistics (finite values):")
        print(stats.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        bad = nonfinite_lines(stats)
        print(f"\nnon-finite: {len(bad)} tensor(s) hold nan or inf\n" + "\n".join(bad) if bad
              else "\nOK: every tensor read holds finite values only")
        frame = frame.merge(stats.drop(columns=["shard", "dtype"]), on="key", how="left")
    if args.csv:
        cols = list(frame.columns)
        write_file(args.csv, lambda f: frame.to_csv(f, index=False), what="audit table",
                   is_ours=csv_with_header([AUDIT_COLUMNS, [*AUDIT_COLUMNS, *STATS_COLUMNS], cols]))
    return 0 if report.ok and not bad else 1


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="write the thinker text model into a store (q3lab extract CKPT OUT), "
                                       "or re-check a store's checksums (q3lab extract --verify OUT)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder to extract from")
    p.add_argument("out", nargs="?", help="store folder to write (new, empty, or an interrupted extraction)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="convert tensors (default: keep the source's)")
    p.add_argument("--verify", metavar="OUT", help="re-check every checksum of the store OUT; exit 1 if any differs")
    p.add_argument("--source", metavar="CKPT", help="with --verify: also check that CKPT is the checkpoint OUT was "
                                                    "extracted from (shard sizes, mtimes, header sha256)")
    p.add_argument("--towers", action="store_true", help="also the audio and vision towers (towers.safetensors), for "
                                                         "q3lab.load(store, towers=True)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_extract, parser=p)


def _cmd_extract(args) -> int:
    from .extract import extract, verify
    if args.verify:
        if args.checkpoint or args.out or args.dtype or args.towers:
            args.parser.error("--verify OUT takes no checkpoint, output folder, --dtype or --towers")
        report = verify(args.verify, progress=not args.no_progress, strict=False, source=args.source)
        print(report.summary())
        return 0 if report.ok else 1
    if not (args.checkpoint and args.out):
        args.parser.error("expected CKPT OUT (or --verify OUT)")
    if args.source:
        args.parser.error("--source CKPT goes with --verify OUT")
    out = extract(args.checkpoint, args.out, dtype=args.dtype, progress=not args.no_progress, towers=args.towers)
    print(f"extracted {args.checkpoint} -> {out}")
    return 0


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a random checkpoint in the official Qwen3-Omni layout")
    p.add_argument("out", help="folder to write (created; an interrupted run with the same options resumes)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "medium", "full"],
                   help="model size: tiny/small/medium for tests and demos, full = the real dimensions (~61 GB)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    p.add_argument("--layers", type=int, help="override the preset's layer count")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--shards", type=int, help="number of shards (default: at least 3, about 4 GiB each)")
    p.add_argument("--no-stubs", action="store_true", help="leave out the audio/visual/talker/code2wav stubs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args) -> int:
    from .errors import CheckpointError
    from .jsonio import read_json
    from .synth import synth
    out = synth(args.out, args.preset, seed=args.seed, layers=args.layers, dtype=args.dtype, stubs=not args.no_stubs,
                shards=args.shards, progress=not args.no_progress)
    index = read_json(out / "model.safetensors.index.json", CheckpointError, kind="index")
    shards = sorted(set(index["weight_map"].values()))
    cfg = read_json(out / "config.json", CheckpointError, kind="config")["thinker_config"]["text_config"]
    print(f"wrote {out}: preset {args.preset}, {cfg['num_hidden_layers']} layers, {cfg['num_experts']} experts, "
          f"{args.dtype}, seed {args.seed}; {len(index['weight_map'])} tensors in {len(shards)} shards, "
          f"{index['metadata']['total_size'] / 2**20:.1f} MiB")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the thinker text model as a llama.cpp GGUF (qwen3moe architecture)")
    p.add_argument("checkpoint", help="checkpoint folder or extracted store (with its tokenizer)")
    p.add_argument("out", help="GGUF file to write (replaced atomically when complete)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"],
                   help="type of the matrices (default %(default)s); norms and the router are always f32")
    p.add_argument("--no-tokenizer", action="store_true", help="leave the vocabulary out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .llamacpp import export_gguf
    out = export_gguf(args.checkpoint, args.out, dtype=args.dtype, progress=not args.no_progress,
                      tokenizer=not args.no_tokenizer)
    print(f"exported {args.checkpoint} -> {out} (qwen3moe, {args.dtype}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _add_notebooks(sub) -> None:
    p = sub.add_parser("notebooks", help="run every numbered notebook headless (papermill) on a checkpoint")
    p.add_argument("--checkpoint", help="checkpoint folder or extracted store (default: the embedded data/mini)")
    p.add_argument("--out", help="folder for the executed notebooks and their outputs (default out/notebooks)")
    p.add_argument("--figures", help="folder for the figures (default: figures/ for the embedded checkpoint, "
                                     "OUT/figures when --checkpoint is given)")
    p.add_argument("--only", nargs="*", help="run only notebooks whose names start with these (e.g. 01 05)")
    p.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="override a notebook parameter (value parsed as JSON when possible)")
    p.add_argument("--in-place", action="store_true", help="also write the executed notebooks over the sources")
    p.set_defaults(func=_cmd_notebooks)


def _cmd_notebooks(args) -> int:
    import json as _json

    from .notebooks import run_notebooks
    params = {}
    for name, value in args.param:
        try:
            params[name] = _json.loads(value)
        except ValueError:
            params[name] = value
    # run_notebooks keeps the committed figures/ for the default run: any other sends figures to OUT/figures
    table = run_notebooks(args.checkpoint, args.out, figures_dir=args.figures, names=args.only,
                          parameters=params, in_place=args.in_place)
    print(table.to_string(index=False))
    return 0


def _add_trace(sub) -> None:
    p = sub.add_parser("trace", help="record routing (experts, weights) of every prompt in a file to a trace")
    p.add_argument("checkpoint", help="checkpoint folder or extracted store (with its tokenizer)")
    p.add_argument("--prompts", help="one prompt per line, or .jsonl with 'prompt' [, 'domain', 'id']")
    p.add_argument("--out", help="trace file, .parquet or .csv (default data/trace.parquet); with --corpus: "
                                 "the dataset folder (required)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="greedy tokens generated after each prompt")
    p.add_argument("--full-probs", action="store_true",
                   help="also write all router probabilities to OUT's name + '.probs' (and a prob column)")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # corpus form (the routing atlas, q3lab.atlas): teacher-forced windows into a resumable Parquet dataset
    p.add_argument("--corpus", help="text file, folder of them, .jsonl with 'text' [, 'domain', 'id'], or "
                                    ".parquet with a 'text' column: trace it into the dataset folder --out")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (--corpus; default %(default)s)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window (--corpus; default %(default)s)")
    p.add_argument("--stride", type=int, help="window advance for long documents (--corpus; default window/2)")
    p.add_argument("--max-tokens", type=int, help="trace at most N tokens of the corpus (--corpus)")
    p.add_argument("--logits", action="store_true", help="also write router log-probabilities (--corpus)")
    p.add_argument("--shard", help="trace only shard i of n (i/n) without torchrun (--corpus)")
    p.add_argument("--part-tokens", type=int, default=65536, help="tokens per part (--corpus; default %(default)s)")
    p.set_defaults(func=_cmd_trace, parser=p)


def _cmd_trace_corpus(args) -> int:
    import torch

    from .atlas.tracing import trace
    if not args.out:
        args.parser.error("--corpus needs --out DATASET (a folder)")
    _device(args.device)
    if args.prompts or args.max_new_tokens or args.full_probs:
        args.parser.error("--corpus traces teacher-forced windows: it takes no --prompts, --max-new-tokens or "
                          "--full-probs (use --logits)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    s = trace(args.checkpoint, args.corpus, args.out, device=args.device, dtype=dtype, shard=args.shard,
              batch_size=args.batch_size, window=args.window, stride=args.stride, max_tokens=args.max_tokens,
              logits=args.logits, part_tokens=args.part_tokens, progress=not args.no_progress)
    line = (f"{args.out}: rank {s['rank']}/{s['world']}: {s['written']} parts written, {s['already_complete']} "
            f"already complete, of {s['mine']} ({s['parts']} in the plan); {s['tokens']:,} tokens in "
            f"{s['seconds']:.1f} s ({s['tokens_per_s']:,.0f} tokens/s)")
    if "complete" in s:
        line += (f"; dataset {'complete' if s['complete'] else 'INCOMPLETE'}: {s['dataset_tokens']:,} tokens, "
                 f"{s['bytes_per_token']:.0f} bytes/token")
    print(line)
    return 0


def _cmd_trace(args) -> int:
    import torch

    from .errors import CheckpointError, InputError
    from .model import load
    from .record import read_prompts, save_trace, trace_prompts
    from .tokenizer import load_tokenizer
    from .record import check_trace_destination
    if args.corpus:
        return _cmd_trace_corpus(args)
    if not args.prompts:
        args.parser.error("expected --prompts FILE or --corpus PATH")
    args.out = args.out or "data/trace.parquet"
    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    _device(args.device)
    check_trace_destination(args.out)   # before tracing every prompt, not after
    items = read_prompts(args.prompts)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = load(args.checkpoint, device=args.device, dtype=dtype, progress=not args.no_progress)
    if model.source.tokenizer_dir is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    tok = load_tokenizer(model.source.tokenizer_dir)
    from .finite import guard
    from .outdir import check_writable_name
    check_writable_name(args.out)
    with guard(model):   # nan/inf logits stop the run, naming the first layer where they appear
        rec = trace_prompts(model, tok, items, max_new_tokens=args.max_new_tokens, probs=args.full_probs,
                            progress=not args.no_progress, where=args.prompts)
    frame = rec.to_frame()
    out = save_trace(frame, args.out)
    tokens = frame[["prompt", "token_index"]].drop_duplicates().shape[0]
    print(f"wrote {out}: {len(items)} prompts, {tokens} tokens, {frame['layer'].nunique()} layers, "
          f"{len(frame):,} rows")
    if args.full_probs:
        probs_out = save_trace(rec.probs_frame(), out.with_name(out.stem + ".probs" + out.suffix))
        print(f"wrote {probs_out}: router probabilities of every expert")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, printing tokens as they come (optionally with an "
                                        "on-demand expert cache)")
    p.add_argument("checkpoint", help="checkpoint folder or extracted store (with its tokenizer)")
    p.add_argument("--prompt", required=True, help="the text to continue (special tokens written out are kept)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default %(default)s)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument("--expert-cache", metavar="N", help="load experts on demand, keeping at most N (a count, or "
                                                       "a size such as 2GB); default: all experts resident")
    p.add_argument("--policy", default="lru", choices=["lru", "lfu", "score"],
                   help="eviction policy of the expert cache (default %(default)s)")
    p.add_argument("--per-layer", action="store_true", help="the cache capacity applies to each layer")
    p.add_argument("--device", default="cpu", help="torch device (default %(default)s)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    import time

    import torch

    from .errors import CheckpointError, InputError
    from .experts import ExpertCache
    from .model import load
    from .tokenizer import load_tokenizer
    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates U+DC80..U+DCFF
        c = ord(args.prompt[e.start])
        byte = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise InputError(f"--prompt is not UTF-8 text: {byte} at character {e.start}") from None
    if not args.greedy:
        if not (args.temperature >= MIN_SAMPLING):   # also refuses nan
            raise InputError(f"--temperature must be a number >= {MIN_SAMPLING:g} (or use --greedy), "
                             f"got {args.temperature}")
        if not MIN_SAMPLING <= args.top_p <= 1:
            raise InputError(f"--top-p must be a number in [{MIN_SAMPLING:g}, 1], got {args.top_p}")
    _device(args.device)
    cache = None
    if args.expert_cache is not None:
        # ASCII digits only: "²".isdigit() is True, yet int("²") fails; other text goes to parse_bytes
        digits = args.expert_cache.strip()
        cap = int(digits) if digits.isascii() and digits.isdigit() else args.expert_cache
        cache = ExpertCache(cap, policy=args.policy, per_layer=args.per_layer)
    elif args.per_layer or args.policy != "lru":
        raise InputError("--policy and --per-layer apply to the expert cache: add --expert-cache N")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = load(args.checkpoint, device=args.device, dtype=dtype, experts=cache)
    if model.source.tokenizer_dir is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    tok = load_tokenizer(model.source.tokenizer_dir)
    ids = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
    new: list[int] = []
    shown = 0

    def stream(token: torch.Tensor) -> None:
        nonlocal shown
        new.append(int(token[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):   # wait for the rest of a multi-byte character
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)

    t0 = time.perf_counter()
    model.generate(ids, args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, eos_token_id=tok.eos_token_id, streamer=stream)
    seconds = time.perf_counter() - t0
    text = tok.decode(new)
    sys.stdout.write(text[shown:] + "\n")
    print(f"{len(new)} tokens in {seconds:.2f} s ({len(new) / seconds if seconds else 0:.2f} tokens/s, prompt "
          f"{ids.shape[1]} tokens included in the time)", file=sys.stderr)
    if cache is not None:
        s = cache.summary()
        print(f"expert cache: {s['policy']}, capacity {s['capacity_experts']} experts"
              f"{' per layer' if s['per_layer'] else ''} ({s['capacity_bytes'] / 2**20:.1f} MiB); "
              f"{s['accesses']} accesses, hit rate {s['hit_rate']:.3f}, {s['misses']} misses, "
              f"{s['evictions']} evictions, {s['bytes_loaded'] / 2**20:.1f} MiB loaded in "
              f"{s['load_seconds']:.2f} s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="q3lab", description=__doc__.splitlines()[0],
                                     epilog="exit status: 0 success; 1 ran and found problems (audit, extract "
                                            "--verify); 2 refused input (one line naming it); 3 internal error "
                                            "(a bug: please report it); 130 interrupted")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an internal error (also: Q3LAB_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in sorted(globals().items()):
        if name.startswith("_add_") and callable(fn):
            fn(sub)
    for p in sub.choices.values():  # --debug also after the subcommand; SUPPRESS keeps the value given before it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _os_error_line(e: OSError) -> str:
    """One line for what the environment did to a file: `<file>: <reason>` (both files for a rename)."""
    from .jsonio import describe_os_error
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(names)}: {describe_os_error(e)}" if names else describe_os_error(e)


def main(argv: list[str] | None = None) -> int:
    """Run `q3lab ARGV`; returns the exit status (see the module docstring), never raises but SystemExit."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("Q3LAB_DEBUG", "") not in ("", "0")
    cmd = f"q3lab {args.command}"
    try:
        return int(args.func(args) or 0)
    except Q3LabError as e:
        print(f"{cmd}: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as e:  # permissions, folders, FIFOs, names too long, full disks: the environment, not a bug
        print(f"{cmd}: error: {_os_error_line(e)}", file=sys.stderr)
        return EXIT_REFUSED
    except UnicodeError as e:  # bytes that are not UTF-8 where text was expected
        print(f"{cmd}: error: text that is not valid UTF-8: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except MemoryError:
        print(f"{cmd}: error: out of memory", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"{cmd}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - anything else is a bug: say so, in one line, without the traceback
        if debug:
            traceback.print_exc()
        what = (str(e).splitlines() or [""])[0][:300]
        print(f"{cmd}: internal error: {type(e).__name__}: {what} ({BUG_REPORT}; "
              f"{'the traceback is above' if debug else 'rerun with --debug or Q3LAB_DEBUG=1 for the traceback'})",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
