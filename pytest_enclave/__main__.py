"""``python -m pytest_enclave demo | doctor | clean``."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    summary = run(count=args.count)
    ok = (
        summary["max_loss_before"] < 0.02
        and summary["max_loss_inside"] < 0.02
        and summary["min_loss_crossing"] > 0.8
        and summary["max_loss_crossing"] < 0.97
    )
    if not ok:
        print("demo: measured loss is not what was configured", file=sys.stderr)
    return 0 if ok else 1


def _doctor(args: argparse.Namespace) -> int:
    from .caps import report

    text, ok = report()
    print(text)
    return 0 if ok else 1


def _clean(args: argparse.Namespace) -> int:
    from .reaper import clean

    removed = clean(include_kept=not args.keep_kept, enclave_ids=args.ids or None)
    for line in removed:
        print(f"removed {line}")
    print(f"{len(removed)} leftover resource(s) removed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_enclave")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the seed scenario: 6 services, 2 subnetworks, 90%% loss")
    demo.add_argument("--count", type=int, default=2000, help="datagrams per directed pair")
    demo.set_defaults(fn=_demo)
    doctor = sub.add_parser("doctor", help="what this machine can do, and how to fix the rest")
    doctor.set_defaults(fn=_doctor)
    clean = sub.add_parser(
        "clean", help="remove enclaves left by killed runs or kept for inspection (--enclave-keep)"
    )
    clean.add_argument(
        "ids", nargs="*", metavar="ID", help="only these enclaves (e.g. pe12); default: all free"
    )
    clean.add_argument(
        "--keep-kept", action="store_true", help="leave enclaves kept for inspection alone"
    )
    clean.set_defaults(fn=_clean)
    args = parser.parse_args(argv)
    from .errors import EnclaveError

    try:
        return int(args.fn(args))
    except EnclaveError as exc:
        print(f"python -m pytest_enclave {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
