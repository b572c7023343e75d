"""The ``dataselect-report`` command: a sweep's results table (markdown, LaTeX, CSV, plots)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from dataselect.report.multirun import ReportError, write_report


def main(argv: list[str] | None = None) -> int:
    """Write the report of a multirun dir; print the markdown table and the files written."""
    parser = argparse.ArgumentParser(
        prog="dataselect-report",
        description="Turn a Hydra multirun dir into a results table over seeds.",
    )
    parser.add_argument("dir", type=Path, help="multirun dir (any dir holding run dirs)")
    parser.add_argument("--out", type=Path, help="output dir (default: <dir>/report)")
    parser.add_argument("--name", help="table title and LaTeX caption")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    command = shlex.join(["dataselect-report", *(sys.argv[1:] if argv is None else argv)])
    try:
        paths = write_report(args.dir, args.out, args.name, command)
    except ReportError as e:
        print(f"dataselect-report: {e}", file=sys.stderr)
        return 1
    print(paths["md"].read_text())
    for path in paths.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
