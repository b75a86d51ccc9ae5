"""Radcrypt: ``python main.py`` opens the desktop client; ``python main.py <command>``, the CLI.

Either way a SIGTERM or SIGHUP stops what the run started (the embedded store, the search
service, a demo's temporary folder) before the process ends: the GUI closes its window
(app.gui.app.quit_on_signals), the CLI unwinds (cloud.processes.exit_on_termination_signals).
"""

from __future__ import annotations

import sys


def main() -> int:
    args = sys.argv[1:]
    if not args or args[0] in ("--demo", "--gui"):
        try:
            from app.gui.app import run
        except ModuleNotFoundError as exc:  # an install without the gui extra (PyQt6)
            if not (exc.name or "").startswith("PyQt6"):
                raise
            print("radcrypt: the desktop client needs the gui extra: pip install "
                  "'radcrypt[gui]' (the command line works without it: python main.py --help)",
                  file=sys.stderr)
            return 1
        return run(demo="--demo" in args)
    from app.cli import main as cli_main
    from cloud.processes import exit_on_termination_signals

    exit_on_termination_signals()  # SIGTERM/SIGHUP unwind: the servers started are stopped
    return cli_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
