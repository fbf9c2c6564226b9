"""The one door through which modelprobe touches a model: hooks, tagged, and weight edits, on a ledger.

Every hook the package puts on a module goes on through `add_hook`, which tags it with what it is
("hooked(): Add, capture", "rank-1 update", "Jacobian capture", ...). Weight edits in place are not hooks,
so each one is written on a ledger for as long as the original values are out (`note_edit` before the
first write, `edit_restored` after the write-back). `leaked_hooks` reads both after every probe
(`preflight.check_no_hooks_left`): a hook still tagged, or a weight still on the ledger, is named with
what put it there. The user's own hooks carry no tag and are never reported or removed.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

TAG = "_modelprobe"  # the attribute a hook of ours carries: what it is, as words

# key -> (the parameter edited in place, who edited it); a weak reference, so a dropped model frees its entries
_EDITS: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
_keys = itertools.count()


def add_hook(module: nn.Module, fn: Callable[..., Any], what: str, *, pre: bool = False,
             with_kwargs: bool = False) -> RemovableHandle:
    """Register `fn` on `module` (a forward hook, or a forward pre-hook with `pre`), tagged with `what`."""
    try:
        setattr(fn, TAG, what)
    except AttributeError:  # a bound method takes no attribute: wrap it in a function that does
        inner = fn

        def fn(*args: Any, **kwargs: Any) -> Any:
            return inner(*args, **kwargs)
        setattr(fn, TAG, what)
    if pre:
        return module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
    return module.register_forward_hook(fn, with_kwargs=with_kwargs)


def note_edit(param: torch.Tensor, what: str) -> int:
    """Put an in-place edit of `param` on the ledger before its first write; returns the key to clear."""
    key = next(_keys)
    _EDITS[key] = (weakref.ref(param), what)
    return key


def edit_restored(key: int) -> None:
    """Take an edit off the ledger once its original values are written back."""
    _EDITS.pop(key, None)


def _hooks_left(model: nn.Module) -> list[str]:
    out: list[str] = []
    for name, mod in model.named_modules():
        for d in (mod._forward_hooks, mod._forward_pre_hooks, mod._backward_hooks, mod._backward_pre_hooks):
            for h in d.values():
                what = getattr(h, TAG, None)
                if what:
                    entry = f"{name or '<root>'} ({what if isinstance(what, str) else 'hook'})"
                    if entry not in out:
                        out.append(entry)
    return out


def _edits_left(model: nn.Module) -> list[str]:
    names: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), name)  # a tied weight is named once, by its first name
    out: list[str] = []
    for key, (ref, what) in list(_EDITS.items()):
        p = ref()
        if p is None:
            _EDITS.pop(key, None)
        elif id(p) in names:
            entry = f"{names[id(p)]} (weight edit by {what}, not restored)"
            if entry not in out:
                out.append(entry)
    return out


def leaked_hooks(model: nn.Module) -> list[str]:
    """What modelprobe left on `model`: each tagged hook as "module (what)", each weight edited in place
    and not yet restored as "parameter (weight edit by what, not restored)". Empty when clean."""
    return _hooks_left(model) + _edits_left(model)


__all__ = ["TAG", "add_hook", "edit_restored", "leaked_hooks", "note_edit"]
