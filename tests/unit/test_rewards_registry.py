"""Reward registry: built-ins, the decorator, user functions by import path, clear errors."""

from __future__ import annotations

import textwrap

import pytest

from nemo_igrpo.rewards.registry import REWARD_FUNCTIONS, RewardResolutionError, register_reward, resolve_reward


def test_builtins_resolve_by_name():
    for name in ("math_accuracy", "format", "judge", "code_tests"):
        assert callable(resolve_reward(name))
        assert name in REWARD_FUNCTIONS


def test_register_reward_decorator_and_conflicts():
    @register_reward("test_registry_constant")
    def constant(prompt, response, reference, **kwargs):
        return 0.25

    assert resolve_reward("test_registry_constant") is constant
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_registry_constant")(lambda p, r, ref: 0.0)
    with pytest.raises(ValueError, match="':'"):
        register_reward("a:b")


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(RewardResolutionError, match="'no_such_reward' is not registered.*math_accuracy"):
        resolve_reward("no_such_reward")


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    package = tmp_path / "my_rewards_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "rewards.py").write_text(
        textwrap.dedent("""
        NOT_CALLABLE = 3

        def length_bonus(prompt, response, reference, scale=1.0):
            return min(1.0, scale * len(response) / 100)

        class Scorers:
            @staticmethod
            def exact(prompt, response, reference):
                return float(response.strip() == str(reference))
    """)
    )
    (package / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_pkg"


def test_user_function_by_import_path(user_package):
    fn = resolve_reward(f"{user_package}.rewards:length_bonus")
    assert fn("q", "x" * 50, None, scale=1.0) == 0.5
    exact = resolve_reward(f"{user_package}.rewards:Scorers.exact")
    assert exact("q", " 7 ", 7) == 1.0


@pytest.mark.parametrize(
    "path,message",
    [
        ("my_rewards_pkg.nope:score", "cannot import module 'my_rewards_pkg.nope'.*ModuleNotFoundError"),
        ("my_rewards_pkg.broken:score", "cannot import module 'my_rewards_pkg.broken'.*boom at import"),
        ("my_rewards_pkg.rewards:missing", "has no attribute 'missing'"),
        ("my_rewards_pkg.rewards:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable"),
        ("my_rewards_pkg.rewards:", "must look like"),
    ],
)
def test_import_path_errors_name_the_term(user_package, path, message):
    with pytest.raises(RewardResolutionError, match=message) as info:
        resolve_reward(path)
    assert repr(path) in str(info.value)
