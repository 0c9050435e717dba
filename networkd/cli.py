"""``networkd [options]``: the daemon in the foreground, same options as twistd's plugin."""

import sys


def main(argv=None) -> None:
    from twisted.scripts.twistd import run

    argv = sys.argv[1:] if argv is None else argv
    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "networkd", *argv]
    run()


if __name__ == "__main__":
    main()
