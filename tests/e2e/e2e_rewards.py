"""A user-defined reward (loaded by import path, as users do: `e2e_rewards:digit_fraction`).

A random tiny model never answers correctly, so math accuracy alone gives every sample 0 and
GRPO-style advantages vanish. This reward varies from sample to sample, so the end-to-end
tests exercise a real, non-zero policy update."""


def digit_fraction(prompt: str, response: str, reference, **kwargs) -> float:
    if not response:
        return 0.0
    return sum(ch.isdigit() for ch in response) / len(response)


def broken(prompt: str, response: str, reference, **kwargs) -> float:
    """A reward with a bug: it fails on every sample (the trainer must stop, not train on 0s)."""
    raise KeyError("tests")
