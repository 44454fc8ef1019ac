"""Checks on `algorithm.*` (and the generation keys it depends on) that type-checking cannot do.

`algorithm_config_problems` returns every problem as (key, message) instead of raising, so
config/validate.py can report them with the config's file name in its own error type.
`check_algorithm_config` raises ValueError with the first problem, for library users.
"""

from __future__ import annotations

import math

from nemo_igrpo.algorithms.config import AlgorithmConfig


def probe_drafts(cfg: AlgorithmConfig) -> int:
    """Drafts generated before the adaptive budget decides (see AlgorithmConfig)."""
    if cfg.adaptive_probe_drafts is not None:
        return cfg.adaptive_probe_drafts
    return max(2, math.ceil(cfg.num_drafts / 2))


def algorithm_config_problems(
    cfg: AlgorithmConfig, generation=None, *, import_plugins: bool = True
) -> list[tuple[str, str]]:
    """All problems with `cfg`; `generation` (a GenerationConfig) enables the length checks.

    The advantage, policy loss, aggregation and KL estimator accept a registered name or a
    `module:function` import path; import paths are imported and their signature checked here,
    unless import_plugins=False (a login node rendering a job for another machine)."""
    from nemo_igrpo.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from nemo_igrpo.algorithms.kl import KL_ESTIMATORS
    from nemo_igrpo.algorithms.losses import LOSS_AGGREGATIONS, POLICY_LOSSES
    from nemo_igrpo.algorithms.selection import ALL_ZERO_POLICIES, TIE_BREAK_RULES
    from nemo_igrpo.algorithms.templates import TRUNCATION_SIDES, check_draft_wrapper

    problems: list[tuple[str, str]] = []

    def bad(key: str, msg: str) -> None:
        problems.append((f"algorithm.{key}", msg))

    def choice(key: str, value, allowed) -> None:
        if value not in allowed:
            bad(key, f"{value!r} is not one of {sorted(allowed)}")

    if cfg.num_drafts < 0:
        bad("num_drafts", "must be >= 0 (0 means plain GRPO)")
    if cfg.num_refinements < 2:
        bad(
            "num_refinements",
            f"must be >= 2: group-relative advantages over {cfg.num_refinements} sample(s) are always zero, "
            "so nothing would be learned",
        )
    if cfg.refinement_rounds < 1:
        bad("refinement_rounds", "must be >= 1")
    elif cfg.refinement_rounds > 1 and cfg.num_drafts == 0:
        bad("refinement_rounds", "extra refinement rounds refine a draft: they need algorithm.num_drafts > 0")
    choice("tie_break", cfg.tie_break, TIE_BREAK_RULES)
    choice("all_zero_drafts", cfg.all_zero_drafts, ALL_ZERO_POLICIES)
    for key, registry in (
        ("advantage", ADVANTAGE_ESTIMATORS),
        ("policy_loss", POLICY_LOSSES),
        ("loss_aggregation", LOSS_AGGREGATIONS),
        ("kl_estimator", KL_ESTIMATORS),
    ):
        problem = registry.problem(getattr(cfg, key), import_paths=import_plugins)
        if problem is not None:
            bad(key, problem)
    if not cfg.advantage_eps >= 0:
        bad("advantage_eps", "must be >= 0")
    if cfg.kl_beta < 0:
        bad("kl_beta", "must be >= 0 (0: no reference model)")
    if not 0 <= cfg.clip_eps_low < 1:
        bad("clip_eps_low", "must be in [0, 1)")
    if cfg.clip_eps_high < 0:
        bad("clip_eps_high", "must be >= 0")
    if cfg.dual_clip_c is not None and cfg.dual_clip_c <= 1:
        bad("dual_clip_c", "must be > 1 (dual clip caps the loss of negative advantages at -A*c)")
    if cfg.minibatches_per_step < 1:
        bad("minibatches_per_step", "must be >= 1")
    if cfg.tis_cap is not None and not cfg.tis_cap >= 1:
        bad("tis_cap", "must be >= 1 (the cap of the weight pi_old / pi_gen; verl uses 2.0) or null for off")

    t = cfg.template
    try:
        check_draft_wrapper(t.draft_wrapper)
    except ValueError as e:
        bad("template.draft_wrapper", str(e).split(": ", 1)[-1])
    choice("template.truncation_side", t.truncation_side, TRUNCATION_SIDES)
    if t.max_draft_tokens is not None and t.max_draft_tokens < 1:
        bad("template.max_draft_tokens", "must be >= 1 (or null: generation.max_new_tokens)")

    if cfg.dynamic_sampling.max_generation_batches < 0:
        bad("dynamic_sampling.max_generation_batches", "must be >= 0 (extra batches to refill dropped groups)")

    o = cfg.overlong_shaping
    if o.enabled:
        if o.buffer_tokens < 1:
            bad("overlong_shaping.buffer_tokens", "must be >= 1")
        elif generation is not None and o.buffer_tokens >= generation.max_new_tokens:
            bad(
                "overlong_shaping.buffer_tokens",
                f"{o.buffer_tokens} >= generation.max_new_tokens={generation.max_new_tokens}: every response would be "
                "penalised; use a buffer smaller than the response budget (DAPO: 4096 of 20480)",
            )
        if o.penalty < 0:
            bad("overlong_shaping.penalty", "must be >= 0 (it is subtracted from the reward)")

    if cfg.adaptive_draft_budget:
        probe = probe_drafts(cfg)
        if cfg.num_drafts < 3 and cfg.adaptive_probe_drafts is None:
            bad("adaptive_draft_budget", "needs algorithm.num_drafts >= 3 (2 probe drafts plus at least one to move)")
        elif not 2 <= probe < cfg.num_drafts:
            bad(
                "adaptive_probe_drafts",
                f"must be in [2, num_drafts - 1] = [2, {cfg.num_drafts - 1}] (one draft is always 'unanimous'; "
                "num_drafts probes leave nothing to move)",
            )
    return problems


def check_algorithm_config(cfg: AlgorithmConfig, generation=None) -> None:
    problems = algorithm_config_problems(cfg, generation)
    if problems:
        key, msg = problems[0]
        raise ValueError(f"'{key}': {msg}")
