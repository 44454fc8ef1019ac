"""Name -> function registries behind the config keys that pick an implementation
(algorithm.advantage, algorithm.policy_loss, algorithm.loss_aggregation, algorithm.kl_estimator).

A registry is a dict (so `name in registry`, `registry[name]` and `sorted(registry)` work) with
a decorator that refuses to register a second, different function under a taken name, and a
lookup whose error names the config key and lists the registered names.

    ESTIMATORS = Registry("estimator", "algorithm.advantage")

    @ESTIMATORS.register("my_estimator")
    def my_estimator(...): ...
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(dict):
    def __init__(self, kind: str, config_key: str):
        super().__init__()
        self.kind = kind  # what an entry is, for messages: "estimator", "policy loss", ...
        self.config_key = config_key  # the config key whose value names an entry

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register the function under `name` (the value users put in the config)."""

        def decorator(fn: F) -> F:
            if name in self and self[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self[name]!r})")
            self[name] = fn
            return fn

        return decorator

    def lookup(self, name: str) -> Callable:
        try:
            return self[name]
        except KeyError:
            raise ValueError(
                f"{self.config_key}: {name!r} is not a registered {self.kind} ({', '.join(sorted(self))})"
            ) from None
