"""The wall-clock timestamp every record carries (bench reports, saved step costs, tuned
entries): local time to the second, one format for all of them."""

from __future__ import annotations

import time


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
