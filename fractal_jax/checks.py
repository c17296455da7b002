"""Value checks with one wording everywhere: ``NAME=VALUE is invalid: WHAT IS ALLOWED.``

Configs, optimizers, models and data pipelines all reject bad values through these two
functions, so every error names the offending key and what it may be, the same way.
"""
from __future__ import annotations

from typing import Any, Sequence


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raises ValueError naming `name`, its `value` and what is `allowed`, unless `ok`."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raises ValueError unless `value` is one of `choices`."""
    require(value in choices, name, value, f"it must be one of {', '.join(map(repr, choices))}")
