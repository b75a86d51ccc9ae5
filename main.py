"""Radcrypt: ``python main.py`` opens the desktop client; ``python main.py <command>``, the CLI."""

from __future__ import annotations

import sys


def main() -> int:
    args = sys.argv[1:]
    if not args or args[0] in ("--demo", "--gui"):
        from app.gui.app import run

        return run(demo="--demo" in args)
    from app.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
