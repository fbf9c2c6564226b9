"""Every modelprobe option, defined once: flag, ini name, parser, default and help, in one table.

Each value is checked when it is read (command line first, then the ini file, then the default), and a
bad one is one line naming the option: a nonsense batch size must stop the run, never measure nothing.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class OptionError(ValueError):
    """A bad option value; the message names the option."""


@dataclass(frozen=True)
class Option:
    flag: str  # --probe-batch-size
    ini: str  # probe_batch_size (also the argparse dest)
    parse: Callable[[str], Any]  # text -> value; raises ValueError with the reason
    default: Any
    help: str

    @property
    def is_flag(self) -> bool:
        return self.parse is parse_bool


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false (or 1/0, yes/no, on/off)")


def _int_at_least(low: int, high: int = 1 << 31) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise ValueError(f"expected a whole number >= {low}") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value
    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = str(text).strip()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value
    return parse


def parse_batch_size(text: str) -> int | str:
    """`auto` (rows from a memory budget, subject/batching.py) or a fixed number of rows per forward."""
    if str(text).strip() == "auto":
        return "auto"
    try:
        int(str(text).strip())
    except ValueError:
        raise ValueError("expected auto or a whole number >= 1") from None
    return _int_at_least(1, 1 << 16)(text)


_DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d{1,3})?)$")


def parse_device(text: str) -> str:
    value = str(text).strip()
    if not _DEVICE.match(value):
        raise ValueError("expected cpu, cuda, cuda:N, mps or auto")
    why = device_unusable(value)
    if why:
        raise ValueError(why)
    return value


def device_unusable(device: str) -> str | None:
    """Why this build of torch on this machine cannot use `device` (None when it can): said in one line
    when the option is read, not as a traceback when the model is moved there."""
    if device in ("cpu", "auto"):
        return None
    import torch

    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        return None if mps is not None and mps.is_available() else \
            "this build of torch cannot use mps here (no Apple Metal device); use cpu"
    if not torch.cuda.is_available():
        return "no CUDA device is available to this build of torch; use cpu"
    index = int(device.split(":")[1]) if ":" in device else 0
    count = torch.cuda.device_count()
    return None if index < count else f"there is no CUDA device {index} ({count} visible: cuda:0..cuda:{count - 1})"


def _non_empty(text: str) -> str:
    value = str(text).strip()
    if not value:
        raise ValueError("must not be empty")
    return value


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_baseline_name(text: str) -> str:
    value = str(text).strip()
    if not _NAME.match(value) or value.endswith(".json"):
        raise ValueError("a baseline NAME: letters, digits, '.', '_' or '-' (no path, no .json)")
    return value


# A branch, tag or commit sha as git allows them, short enough to print; no '..' (a path out of the cache).
_REVISION = re.compile(r"^(?!.*\.\.)(?!.*//)[A-Za-z0-9][A-Za-z0-9._/-]{0,127}(?<![/.])$")


def parse_revision(text: str) -> str:
    value = str(text).strip()
    if not _REVISION.match(value):
        raise ValueError("expected a branch, tag or commit sha (letters, digits, '.', '_', '-', '/'; at most 128 "
                         "characters; no '..')")
    return value


def parse_tolerance(text: str) -> tuple[float | None, float | None]:
    """'0.05' or 'abs:0.05' or 'rel:0.1' or 'abs:0.05,rel:0.1' → (abs, rel), each finite and >= 0."""
    tol_abs = tol_rel = None
    for part in str(text).split(","):
        key, _, value = part.strip().rpartition(":")
        try:
            number = float(value)
        except ValueError:
            raise ValueError("expected e.g. 0.05, abs:0.05, rel:0.1 or abs:0.05,rel:0.1") from None
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{value.strip()} is not a finite number >= 0")
        if key in ("", "abs"):
            tol_abs = number
        elif key == "rel":
            tol_rel = number
        else:
            raise ValueError(f"unknown part {key!r} (abs or rel)")
    return tol_abs, tol_rel


def _tolerance_text(text: str) -> str:
    parse_tolerance(text)
    return str(text).strip()


def _shard(text: str) -> tuple[int, int]:
    from .shard import parse_shard  # no torch: the shard module reads records only
    return parse_shard(text)


DEFAULT_MODEL = "smollm2-135m-instruct"

OPTIONS: tuple[Option, ...] = (
    Option("--model", "probe_model", _non_empty, DEFAULT_MODEL,
           f"model under test: alias, local HF directory, .gguf file or hub id org/name[@REVISION] (default "
           f"{DEFAULT_MODEL})"),
    Option("--probe-revision", "probe_revision", parse_revision, None,
           "hub revision of a hub id --model: branch, tag or commit sha (default: the repo's default branch)"),
    Option("--probe-allow-pickle", "probe_allow_pickle", parse_bool, False,
           "let a hub model without .safetensors weights download and load its PyTorch pickles (.bin), which can "
           "run code (off by default)"),
    Option("--probe-device", "probe_device", parse_device, "cpu",
           "cpu, cuda, cuda:N, mps or auto (device_map='auto' across GPUs)"),
    Option("--probe-dtype", "probe_dtype", _choice("float32", "bfloat16", "float16"), "float32",
           "float32 (default), bfloat16 or float16"),
    Option("--probe-report-dir", "probe_report_dir", _non_empty, "reports",
           "where reports/<model-slug>/report.* go (default reports)"),
    Option("--probe-data-root", "probe_data_root", _non_empty, None,
           "also allow data files under this folder (default: only the probe's folder and the rootdir)"),
    Option("--trust-remote-code", "trust_remote_code", parse_bool, False,
           "allow model code from the model directory (off by default)"),
    Option("--probe-allow-inconclusive", "probe_allow_inconclusive", parse_bool, False,
           "do not fail the run on inconclusive claims"),
    Option("--probe-batch-size", "probe_batch_size", parse_batch_size, "auto",
           "prompts per forward pass: auto (default: as many as fit a quarter of the free memory, capped "
           "where more stop paying off) or a fixed number 1-65536"),
    Option("--probe-threads", "probe_threads", _int_at_least(0, 4096), 0,
           "torch threads (default 0: all cores; 1 per xdist worker)"),
    Option("--probe-save", "probe_save", parse_baseline_name, None,
           "save this run as baseline NAME under <report-dir>/baselines/<model-slug>/"),
    Option("--probe-compare", "probe_compare", _non_empty, None,
           "compare with a baseline (NAME or path to a report.json); every baseline claim the selection "
           "includes must be measured now"),
    Option("--probe-tolerance", "probe_tolerance", _tolerance_text, None,
           "allowed effect move vs the baseline: 0.05, abs:0.05, rel:0.1 (needs --probe-compare)"),
    Option("--probe-strict", "probe_strict", parse_bool, False,
           "claims new since the baseline fail the comparison too"),
    Option("--probe-allow-model-change", "probe_allow_model_change", parse_bool, False,
           "allow comparing with another model's baseline"),
    Option("--probe-shard", "probe_shard", _shard, None,
           "run shard i of n (e.g. 2/4): a deterministic share of the probe files balanced by the baseline's "
           "durations; join the shards' reports with `modelprobe merge`"),
    Option("--probe-allow-dtype-change", "probe_allow_dtype_change", parse_bool, False,
           "allow comparing with a baseline made in another dtype or on another device class (cpu, cuda, mps)"),
)

BY_INI = {o.ini: o for o in OPTIONS}
# Options that only mean something with --probe-compare: on the command line without it they are a mistake.
NEEDS_COMPARE = ("probe_tolerance", "probe_strict", "probe_allow_model_change", "probe_allow_dtype_change")


def seed(text: str) -> int:
    """A seed, as the probe files' `seed` field takes it: 0 <= seed < 2**32."""
    return _int_at_least(0, 2**32 - 1)(text)


def as_argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type=` from a parser of this table, so that `modelprobe find` / `discover` flags are
    checked as the pytest options are (argparse turns the ValueError into one line naming the flag)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


# Flags of `modelprobe find` / `discover` that mean what a pytest option means take its parser; a fixed
# batch size there (no memory budget to size `auto` from).
CLI_TYPES: dict[str, Callable[[str], Any]] = {
    "device": as_argument(BY_INI["probe_device"].parse),
    "dtype": as_argument(BY_INI["probe_dtype"].parse),
    "threads": as_argument(BY_INI["probe_threads"].parse),
    "batch_size": as_argument(_int_at_least(1, 1 << 16)),
    "seed": as_argument(seed),
    "count": as_argument(_int_at_least(1, 1_000_000)),
}


def read_options(from_cli: Callable[[str], Any], from_ini: Callable[[str], Any]) -> dict[str, Any]:
    """{ini name: checked value}. `from_cli`/`from_ini` return None (or '') when the option is not set."""
    values: dict[str, Any] = {}
    given_on_cli: set[str] = set()
    for o in OPTIONS:
        raw, where = from_cli(o.ini), f"{o.flag}"
        if raw is None:
            raw, where = from_ini(o.ini), f"ini option {o.ini}"
            if raw in ("", None, []):
                values[o.ini] = o.default
                continue
        else:
            given_on_cli.add(o.ini)
        if isinstance(raw, bool) and o.is_flag:
            values[o.ini] = raw
            continue
        text = raw if isinstance(raw, str) else str(raw)
        try:
            values[o.ini] = o.parse(text)
        except ValueError as e:
            shown = f"{where}={text}" if o.flag == where else f"{where} = {text!r}"
            raise OptionError(f"{shown}: {e}") from None
    if values["probe_compare"] is None:
        for name in NEEDS_COMPARE:
            if name in given_on_cli and values[name]:
                raise OptionError(f"{BY_INI[name].flag} needs --probe-compare (it says how to compare with a "
                                  "baseline)")
    return values
