"""Name -> function registries behind the config keys that pick an implementation
(algorithm.advantage, algorithm.policy_loss, algorithm.loss_aggregation, algorithm.kl_estimator).

A registry is a dict (so `name in registry`, `registry[name]` and `sorted(registry)` work) with
a decorator that refuses to register a second, different function under a taken name, and a
lookup whose error names the config key and lists the registered names.

    ESTIMATORS = Registry("estimator", "algorithm.advantage", arity=2)

    @ESTIMATORS.register("my_estimator")
    def my_estimator(...): ...

Plug-ins without a fork: a value containing ':' is an import path, `my_pkg.losses:my_loss` (or
`my_pkg.losses:Losses.my_loss`, a dotted attribute after the colon), exactly like reward terms.
`lookup` imports the module, takes the attribute, checks that it is callable and that it accepts
the registry's positional arguments, and caches the result. Such names are never added to the
dict itself, so `sorted(registry)` keeps listing the built-in choices.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable, Optional, TypeVar

from nemo_igrpo.utils.errors import PluginResolutionError

F = TypeVar("F", bound=Callable)


def is_import_path(name: object) -> bool:
    """True for values that select a function by import path ('module:attr')."""
    return isinstance(name, str) and ":" in name


class Registry(dict):
    def __init__(self, kind: str, config_key: str, arity: Optional[int] = None, signature: str = ""):
        super().__init__()
        self.kind = kind  # what an entry is, for messages: "estimator", "policy loss", ...
        self.config_key = config_key  # the config key whose value names an entry
        # How many positional arguments the caller passes; an imported function that cannot
        # take them is refused at lookup (at config load), not with a TypeError mid-step.
        self.arity = arity
        self.signature = signature  # the contract, quoted in errors: "fn(rewards, eps) -> Tensor"
        self._imported: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register the function under `name` (the value users put in the config)."""
        if not name or ":" in name:
            # ':' is what marks an import path; a registered name with one could never be reached.
            raise ValueError(f"{self.kind} name {name!r}: must be non-empty and contain no ':'")

        def decorator(fn: F) -> F:
            if name in self and self[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self[name]!r})")
            self[name] = fn
            return fn

        return decorator

    def lookup(self, name: str) -> Callable:
        """The function for a registered name or a `module:attr` import path."""
        if is_import_path(name):
            fn = self._imported.get(name)
            if fn is None:
                fn = self._import(name)
                self._imported[name] = fn
            return fn
        try:
            return self[name]
        except (KeyError, TypeError):  # TypeError: an unhashable value from a hand-built config
            raise PluginResolutionError(
                f"{self.config_key}: {name!r} is not a registered {self.kind} ({', '.join(sorted(self))}); "
                f"for your own function use an import path like 'my_pkg.module:my_function'"
            ) from None

    def problem(self, name: object, *, import_paths: bool = True) -> Optional[str]:
        """Why `name` cannot be looked up (the message without the key), or None when it can.

        import_paths=False checks only the form of an import path (for a login node that renders
        a job but does not have the user's package installed)."""
        if is_import_path(name) and not import_paths:
            module_name, _, attr = str(name).partition(":")
            if not module_name or not attr:
                return f"{name!r}: an import path must look like 'my_pkg.module:my_function'"
            return None
        try:
            self.lookup(name)  # type: ignore[arg-type]
        except PluginResolutionError as e:
            return str(e).split(": ", 1)[-1]
        return None

    def _import(self, name: str) -> Callable:
        where = f"{self.config_key}: {name!r}"
        module_name, _, attr_path = name.partition(":")
        if not module_name or not attr_path:
            raise PluginResolutionError(f"{where}: an import path must look like 'my_pkg.module:my_function'")
        try:
            obj = importlib.import_module(module_name)
        except Exception as e:  # ImportError, or whatever the module raises while importing
            hint = " (is its folder on PYTHONPATH, or the package installed?)" if isinstance(e, ImportError) else ""
            raise PluginResolutionError(
                f"{where}: cannot import module '{module_name}'{hint} ({type(e).__name__}: {e})"
            ) from e
        for part in attr_path.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise PluginResolutionError(f"{where}: module '{module_name}' has no attribute '{attr_path}'") from None
        if not callable(obj):
            raise PluginResolutionError(f"{where}: '{attr_path}' is a {type(obj).__name__}, not a callable")
        self._check_signature(obj, where)
        return obj

    def _check_signature(self, fn: Callable, where: str) -> None:
        if self.arity is None:
            return
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return  # a builtin or C callable without introspection: trust it
        try:
            # Binding placeholders checks exactly what the call will do: enough positional
            # parameters (or *args), and no further parameter left without a default.
            sig.bind(*([None] * self.arity))
        except TypeError as e:
            contract = f" (expected {self.signature})" if self.signature else ""
            raise PluginResolutionError(
                f"{where}: {getattr(fn, '__qualname__', fn)!r}{sig} cannot be called with {self.arity} positional "
                f"argument(s){contract}: {e}"
            ) from None
