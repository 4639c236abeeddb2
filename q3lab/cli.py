"""The `q3lab` command line. Each subcommand is a `_add_<name>(sub)` parser builder plus a `_cmd_<name>(args)`.

Anticipated failures (`Q3LabError`) print one clear line to stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

from .errors import Q3LabError


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="check a checkpoint against its config: every thinker tensor, shape, dtype")
    p.add_argument("checkpoint", help="checkpoint folder (config.json + model.safetensors[.index.json])")
    p.add_argument("--csv", help="also write the per-tensor table to this CSV file")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args) -> int:
    from .checkpoint import Checkpoint, audit_checkpoint
    report = audit_checkpoint(Checkpoint(args.checkpoint))
    print(report.summary())
    if args.csv:
        report.frame.to_csv(args.csv, index=False)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="q3lab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in sorted(globals().items()):
        if name.startswith("_add_") and callable(fn):
            fn(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Q3LabError as e:
        print(f"q3lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"q3lab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
