"""Options shared by several commands: the device, memory sizes, the sliding-window overlap."""

from __future__ import annotations

import argparse

DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """The --device option every command that runs a network has."""
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto: a CUDA GPU if there is one, else Apple's MPS, else the CPU")


def parse_size(text: str) -> int:
    """'16G', '16GB', '500M', '2.5g' or a plain number of bytes -> bytes (decimal units, as 'df -H')."""
    units = {"": 1, "B": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a memory size such as 16G or 500M") from None
    if not value > 0 or value != value:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive memory size")
    return int(value)


def overlap_value(text: str) -> float:
    """Sliding-window overlap: a fraction in [0, 1) (1 would never advance the window)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1): give a fraction such as 0.25 or 0.5")
    return value
