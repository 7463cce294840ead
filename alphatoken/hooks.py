"""One owner at a time for the hooks this package installs on a model's modules.

The valuation's capture (`TokenValuer.capture`, `set_validation`) and its re-run of the scored blocks,
the Fisher's per-linear capture, LESS's per-example gradients, ssToken's attention capture and the
attention-deviation diagnostic each install forward hooks on modules of the model (some also switch
the attention kernel), and each assumes that its hooks are the only ones of this package there: two
sets at once would record each other's calls or cut each other's graphs. `owned(owner, modules)`
marks the modules with the owner's name for the lifetime of its hooks and raises `HookConflictError`
when one of them already carries another set, as opacus' GradSampleModule refuses hooks added twice."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

ATTRIBUTE = "_alphatoken_hooks"  # in the module's __dict__: the owner of its hooks


class HookConflictError(RuntimeError):
    """A module already carries another owner's hooks."""


def claim(owner: str, modules: Iterable[nn.Module]) -> list[nn.Module]:
    """Mark `modules` as carrying `owner`'s hooks; raise if any carries another set. Returns them (once each)."""
    modules = list(dict.fromkeys(modules))
    for module in modules:
        current = module.__dict__.get(ATTRIBUTE)
        if current is not None:
            raise HookConflictError(
                f"{type(module).__name__} already carries the hooks of {current}; they must be removed (leave "
                f"its `with` block) before {owner} installs its own")
    for module in modules:
        module.__dict__[ATTRIBUTE] = owner
    return modules


def release(modules: Iterable[nn.Module]) -> None:
    for module in modules:
        module.__dict__.pop(ATTRIBUTE, None)


@contextlib.contextmanager
def owned(owner: str, modules: Iterable[nn.Module]) -> Iterator[None]:
    claimed = claim(owner, modules)
    try:
        yield
    finally:
        release(claimed)
