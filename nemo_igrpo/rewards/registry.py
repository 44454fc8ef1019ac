"""Name -> reward function.

Built-in terms register themselves with `@register_reward("name")` when their module is
imported; `resolve_reward` imports the built-in modules on first use, so `import
nemo_igrpo.rewards.registry` alone stays cheap (math-verify pulls in sympy).

A term whose name contains ":" is a user function given by import path, e.g.
`my_pkg.rewards:score` or `my_pkg.rewards:Scorers.exact` (dotted attribute after the colon).
It must follow the contract in `rewards/base.py`:

    def score(prompt: str, response: str, reference: Any, **kwargs) -> float
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

from nemo_igrpo.utils.errors import RewardResolutionError


class RewardFunction(Protocol):
    def __call__(self, prompt: str, response: str, reference: Any, **kwargs: Any) -> float: ...


REWARD_FUNCTIONS: dict[str, Callable[..., float]] = {}

# Modules holding the built-in terms; imported lazily by `resolve_reward`.
_BUILTIN_MODULES = (
    "nemo_igrpo.rewards.math",
    "nemo_igrpo.rewards.format",
    "nemo_igrpo.rewards.judge",
    "nemo_igrpo.rewards.code",
)
_builtins_loaded = False


def register_reward(name: str) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Decorator: make `fn` available as reward term `name`."""
    if not name or ":" in name:
        raise ValueError(f"reward name {name!r}: must be non-empty and contain no ':' (':' marks an import path)")

    def decorate(fn: Callable[..., float]) -> Callable[..., float]:
        existing = REWARD_FUNCTIONS.get(name)
        # Re-registering the same function (a module imported twice under two names) is harmless;
        # two different functions under one name would make configs ambiguous.
        if existing is not None and existing is not fn and _qualified_name(existing) != _qualified_name(fn):
            raise ValueError(f"reward name {name!r} is already registered to {_qualified_name(existing)}")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return decorate


def _qualified_name(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def load_builtin_rewards() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    _builtins_loaded = True


def _import_path(term: str) -> Callable[..., float]:
    module_name, _, attr_path = term.partition(":")
    if not module_name or not attr_path:
        raise RewardResolutionError(f"reward term {term!r}: an import path must look like 'my_pkg.rewards:score'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the module raises while importing
        raise RewardResolutionError(
            f"reward term {term!r}: cannot import module '{module_name}' ({type(e).__name__}: {e})"
        ) from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RewardResolutionError(
                f"reward term {term!r}: module '{module_name}' has no attribute '{attr_path}'"
            ) from None
    if not callable(obj):
        raise RewardResolutionError(f"reward term {term!r}: '{attr_path}' is a {type(obj).__name__}, not a callable")
    return obj


def resolve_reward(term: str) -> Callable[..., float]:
    """The function for a registered name or a `module:attr` import path."""
    if ":" in term:
        return _import_path(term)
    if term not in REWARD_FUNCTIONS:
        load_builtin_rewards()
    if term not in REWARD_FUNCTIONS:
        known = ", ".join(sorted(REWARD_FUNCTIONS))
        raise RewardResolutionError(
            f"reward term {term!r} is not registered (registered: {known}); "
            "for your own function use an import path like 'my_pkg.rewards:score'"
        )
    return REWARD_FUNCTIONS[term]
