"""networkd: the layer-0 network daemon of a LAIN-style container cluster."""

__version__ = "0.1.0"
