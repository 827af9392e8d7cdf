"""The names a compute device may be given (torch-free, for the CLI and the HELM client's config)."""

from __future__ import annotations

import re

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "simulated")


def check_device_name(device: str) -> str:
    """`device` if it is auto, cpu, cuda, cuda:N or simulated (a simulated GPU); else a ValueError."""
    if isinstance(device, str) and (device in ("auto", "cpu", "cuda", "simulated")
                                    or re.fullmatch(r"cuda:[0-9]+", device)):
        return device
    raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
