"""One file per on-disk format; importing this package registers them all in `FORMATS`."""

from . import bitmask, block4, dense, nm


__all__ = ["bitmask", "block4", "dense", "nm"]
