"""Small formatting helpers shared by the writers, the HTML report and the baseline diff."""

from __future__ import annotations

import math
from typing import Any

from .record import ClaimResult, ControlResult

MISSING = "—"


def fmt_num(x: Any, digits: int = 3) -> str:
    """A number with `digits` significant digits; None → "—"."""
    if x is None:
        return MISSING
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return str(x)
    if not isinstance(x, float):
        try:
            x = float(x)
        except (TypeError, ValueError):
            return str(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        x = 0.0  # no "-0"
    s = f"{x:.{digits}g}"
    if "e" in s and 1 <= abs(x) < 1e6:  # 1.23e+03 → 1230
        s = f"{float(s):.0f}"
    return s


def fmt_delta(x: float | None) -> str:
    if x is None:
        return MISSING
    s = fmt_num(x)
    return s if s.startswith("-") or s in ("nan", "0") else "+" + s


def fmt_ci(ci: tuple[float, float] | None) -> str:
    if ci is None:
        return MISSING
    return f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]"


def fmt_threshold(claim: ClaimResult) -> str:
    if claim.threshold is None:
        return MISSING
    sign = {"at_least": "≥ ", "at_most": "≤ "}.get(claim.comparison or "", "")
    return sign + fmt_num(claim.threshold)


def control_name(control: ControlResult) -> str:
    return control.name.replace("_", " ")


def fmt_control(control: ControlResult | None) -> str:
    """e.g. "random direction: 0.03 (p=0.001)"."""
    if control is None:
        return MISSING
    s = control_name(control)
    if control.effect is not None:
        s += f": {fmt_num(control.effect)}"
    if control.p_value is not None:
        s += f" (p={fmt_num(control.p_value)})"
    return s


def fmt_value(v: Any, max_items: int = 8) -> str:
    """A details / settings value in one short line (long lists are summarised)."""
    if v is None:
        return MISSING
    if isinstance(v, (bool, int, float)):
        return fmt_num(v)
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        nums = [x for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if len(v) > max_items:
            if nums and len(nums) == len(v):
                finite = [float(x) for x in nums if math.isfinite(x)]
                if finite:
                    mean = sum(finite) / len(finite)
                    return (
                        f"{len(v)} values (min {fmt_num(min(finite))}, mean {fmt_num(mean)}, "
                        f"max {fmt_num(max(finite))})"
                    )
            return f"{len(v)} items: " + ", ".join(fmt_value(x, 3) for x in v[:3]) + ", …"
        return "[" + ", ".join(fmt_value(x, 3) for x in v) + "]"
    if isinstance(v, dict):
        items = list(v.items())
        s = ", ".join(f"{k}={fmt_value(x, 3)}" for k, x in items[:max_items])
        return "{" + s + (", …" if len(items) > max_items else "") + "}"
    return str(v)


def one_line(s: str, limit: int | None = None) -> str:
    s = " ".join(str(s).split())
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return s
