"""`python -m q3lab`: the command line (q3lab/cli.py), with its exit statuses."""
import sys

try:
    from q3lab.cli import main
except KeyboardInterrupt:  # Ctrl-C while importing: the same status as during a command, without a traceback
    print("q3lab: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
