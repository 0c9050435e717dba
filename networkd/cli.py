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
    from twisted.application import app
    from twisted.scripts.twistd import runApp

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "networkd", *argv]
    app.run(runApp, server_options())


def server_options():
    """twistd's options with networkd as the only sub-command.

    ``twistd`` finds its sub-commands by loading every Twisted plugin
    (twisted.plugin.getPlugins): the dropin caches' unpickling imports trial,
    unittest, argparse, cred and words (~1.2 MB of the daemon's RSS), and
    where the caches cannot be written (a read-only /opt under the unit's
    ProtectSystem=strict) every plugin module is imported anew at each start
    (~3.4 MB).  ``twistd networkd`` still works the same.
    """
    from twisted.scripts.twistd import ServerOptions

    class NetworkdServerOptions(ServerOptions):
        @staticmethod
        def _getPlugins(interface):
            from twisted.plugins.networkd_plugin import networkd

            return [networkd]

    return NetworkdServerOptions


if __name__ == "__main__":
    main()
