"""What twistd loads: the options class and makeService."""

from networkd.app import ReactorError, makeService as _makeService
from networkd.options import CommandLineOptions as Options

__all__ = ["Options", "makeService"]


def makeService(options):
    try:
        return _makeService(options)
    except ReactorError as e:
        raise SystemExit(f"networkd: error: {e}") from None
