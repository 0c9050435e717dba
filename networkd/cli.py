"""``networkd [options]``: the daemon in the foreground, same options as twistd's plugin.

``networkd check ...`` and ``networkd status ...`` are the operator's
commands (networkd/tools/); anything else is the daemon's command line.
"""

import sys

COMMANDS = {
    "check": "networkd.tools.check",
    "status": "networkd.tools.status",
}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        from importlib import import_module

        import_module(COMMANDS[argv[0]]).main(argv[1:])
        return
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "networkd", *argv]
    run()


if __name__ == "__main__":
    main()
