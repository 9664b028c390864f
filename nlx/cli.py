"""The ``nlx`` command line.

Commands:

* ``nlx bench ops [flags]``: tokens/s and peak memory of the associative-memory ops
  (``nlx.bench``; ``nlx bench ops --help`` lists the flags).
* ``nlx bench models [flags]``: train-step tokens/s and peak memory of every model family
  (``nlx.bench_models``).
* ``nlx demo [args]``: the end-to-end demo (``nlx.demo.main``; ``nlx demo --help`` shows its own
  flags, which are passed through unchanged).

``main(argv)`` returns the exit status; the console script calls ``sys.exit(main())``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
  # Imported here so that ``nlx --help`` does not need JAX; nlx.bench itself imports JAX lazily.
  from nlx import bench  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="nlx", description="nlx: Nested Learning in JAX.",
      epilog="Run 'nlx COMMAND --help' for the flags of a command.")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  bench_parser = commands.add_parser(
      "bench", help="benchmarks ('nlx bench ops': tokens/s and peak memory of the memory ops)",
      description="Benchmarks of nlx.")
  bench.configure_parser(bench_parser)

  # The demo parses its own flags: everything after 'demo' is passed to nlx.demo.main unchanged
  # (see main), so this parser declares none, not even --help.
  commands.add_parser("demo", add_help=False,
                      help="the end-to-end demo (its flags: 'nlx demo --help')",
                      description="Runs nlx.demo.main with the remaining arguments.")
  return parser


def _run_demo(argv: list) -> int:
  from nlx import demo  # pylint: disable=g-import-not-at-top  (lazy: heavy, and optional)
  status = demo.main(argv)
  return 0 if status is None else int(status)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if args.command == "demo":
    # Everything after the first 'demo' belongs to the demo, in order.
    return _run_demo(argv[argv.index("demo") + 1:])
  if extra:
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  if args.command == "bench":
    from nlx import bench  # pylint: disable=g-import-not-at-top
    return bench.run_parsed(args, "nlx " + " ".join(argv))
  parser.error(f"unknown command {args.command!r}")
  return 2


if __name__ == "__main__":
  sys.exit(main())
