"""Which device a process's model goes on: under pytest-xdist, each worker takes its own GPU."""

from __future__ import annotations

import re

_WORKER = re.compile(r"^gw(\d+)$")


def worker_device(device: str, worker: str | None) -> str:
    """`cuda` in xdist worker gwN → `cuda:{N mod the visible GPUs}`, so `-n N --probe-device=cuda` spreads
    the workers over the GPUs instead of stacking every copy of the model on GPU 0. Anything else as asked:
    an explicit `cuda:K` is the user's choice, `auto` splits one model over every GPU itself, and with no
    GPU visible the load fails with its own message."""
    m = _WORKER.match(worker or "")
    if device != "cuda" or m is None:
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    count = torch.cuda.device_count()
    return f"cuda:{int(m.group(1)) % count}" if count > 0 else device
