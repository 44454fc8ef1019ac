"""Load a YAML config into a typed `IGRPOConfig`.

Composition follows the familiar `defaults:` list (as in Hydra, without depending on
hydra-core, whose antlr pin breaks math-verify):

    defaults:
      - base                 # conf/base.yaml (a file next to this one, or in a parent folder)
      - model: tiny          # conf/model/tiny.yaml
      - algorithm: igrpo     # conf/algorithm/igrpo.yaml
      - _self_               # where this file's own keys are merged (default: last)

Fragments hold full key paths from the root (`policy: {tensor_parallel_size: 2}`), so a
fragment reads the same wherever it is used. Command-line overrides are dotted
(`trainer.max_steps=20`, values parsed as YAML) or pick a group (`model=smollm2`).

Every error is raised before any heavy work, and names the file (or the override) and the
full key path, with the closest valid key when the key is unknown.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_igrpo.config.schema import IGRPOConfig
from nemo_igrpo.config.validate import validate_config
from nemo_igrpo.utils.errors import ConfigError


@dataclass
class _Fragment:
    source: str  # a file path or "command-line override '...'"
    data: dict


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _find_fragment(start_dir: Path, group: Optional[str], name: str, declared_in: Path) -> Path:
    """Look for `[group/]name.yaml` beside the declaring file, then in its parent folders."""
    rel = Path(group, f"{name}.yaml") if group else Path(f"{name}.yaml")
    tried = []
    for d in [start_dir, *start_dir.parents]:
        candidate = d / rel
        tried.append(str(candidate))
        if candidate.is_file():
            return candidate
        if d.name == "conf" or len(tried) > 4:
            break
    hint = ""
    group_dir = next((d / group for d in [start_dir, *start_dir.parents] if group and (d / group).is_dir()), None)
    if group_dir is not None:
        choices = sorted(p.stem for p in group_dir.glob("*.yaml"))
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f"; available in {group_dir}: {', '.join(choices)}" + (f" (did you mean '{close[0]}'?)" if close else "")
    raise ConfigError(f"{declared_in}: defaults entry '{(group + ': ') if group else ''}{name}' not found{hint}")


def _expand(path: Path, group_choices: dict[str, str], seen: tuple[Path, ...] = ()) -> list[_Fragment]:
    """Depth-first expansion of a file's `defaults:` list into an ordered list of fragments."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: defaults form a cycle: {' -> '.join(map(str, seen + (path,)))}")
    data = _read_yaml(path)
    defaults = data.pop("defaults", [])
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list")
    fragments: list[_Fragment] = []
    self_added = False
    for entry in defaults:
        if entry == "_self_":
            fragments.append(_Fragment(str(path), data))
            self_added = True
            continue
        if isinstance(entry, str):
            group, name = None, entry
        elif isinstance(entry, dict) and len(entry) == 1:
            group, name = next(iter(entry.items()))
            name = group_choices.get(group, name)
            if name is None:  # `model: null` disables a group
                continue
        else:
            raise ConfigError(f"{path}: bad defaults entry {entry!r}: use 'name' or 'group: name'")
        frag_path = _find_fragment(path.parent, group, str(name), path)
        fragments.extend(_expand(frag_path, group_choices, seen + (path,)))
    if not self_added:
        fragments.append(_Fragment(str(path), data))
    return fragments


def _groups_declared(path: Path, seen: Optional[set] = None) -> set[str]:
    seen = seen if seen is not None else set()
    path = path.resolve()
    if path in seen or not path.is_file():
        return set()
    seen.add(path)
    groups = set()
    for entry in _read_yaml(path).get("defaults", []) or []:
        if isinstance(entry, dict) and len(entry) == 1:
            groups.add(next(iter(entry)))
        elif isinstance(entry, str) and entry != "_self_":
            try:
                groups |= _groups_declared(_find_fragment(path.parent, None, entry, path), seen)
            except ConfigError:
                pass
    return groups


def _closest_key(schema: DictConfig, full_key: str) -> str:
    parent_path, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(schema, parent_path) if parent_path else schema
    if isinstance(node, DictConfig) and leaf:
        close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1, cutoff=0.5)
        if close:
            return f" (did you mean '{parent_path + '.' if parent_path else ''}{close[0]}'?)"
    return ""


def _merge(cfg: DictConfig, fragment: _Fragment) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, fragment.data)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(getattr(e, "msg", None) or e).splitlines()[0]
        if "not in struct" in msg or "Key '" in msg and "not" in msg:
            raise ConfigError(f"{fragment.source}: unknown key '{key}'{_closest_key(cfg, key)}") from None
        raise ConfigError(f"{fragment.source}: bad value for '{key}': {msg}") from None


def _override_fragment(override: str, groups: set[str]) -> tuple[Optional[tuple[str, str]], Optional[_Fragment]]:
    if "=" not in override:
        raise ConfigError(f"command-line override '{override}': expected key=value (e.g. trainer.max_steps=20)")
    key, raw = override.split("=", 1)
    key = key.strip()
    if key in groups and "." not in key:
        return (key, raw.strip()), None
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command-line override '{override}': value is not valid YAML: {e}") from None
    nested: Any = value
    for part in reversed(key.split(".")):
        if not part:
            raise ConfigError(f"command-line override '{override}': empty key segment")
        nested = {part: nested}
    return None, _Fragment(f"command-line override '{override}'", nested)


def compose(path: str | os.PathLike, overrides: Iterable[str] = ()) -> DictConfig:
    """Compose YAML files and overrides onto the typed schema (interpolations unresolved)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    groups = _groups_declared(path)
    group_choices: dict[str, str] = {}
    value_overrides: list[_Fragment] = []
    extra_groups: list[_Fragment] = []
    for ov in overrides:
        choice, frag = _override_fragment(ov, groups)
        if choice:
            group_choices[choice[0]] = choice[1]
            continue
        added = _undeclared_group(path, ov)
        if added is not None:
            # `algorithm=grpo` where the file's defaults do not list the group: apply the
            # fragment after the file, before dotted overrides (as Hydra's `+group=name`).
            extra_groups.extend(_expand(added, group_choices))
        else:
            value_overrides.append(frag)  # type: ignore[arg-type]
    cfg: DictConfig = OmegaConf.structured(IGRPOConfig)
    for fragment in _expand(path, group_choices) + extra_groups + value_overrides:
        cfg = _merge(cfg, fragment)
    return cfg


def _undeclared_group(path: Path, override: str) -> Optional[Path]:
    """The fragment file for `group=name` when `group/` exists beside the config (or above)."""
    key, _, name = override.partition("=")
    key, name = key.strip(), name.strip()
    if "." in key or not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        return None
    schema_node = OmegaConf.select(OmegaConf.structured(IGRPOConfig), key)
    if not isinstance(schema_node, DictConfig):
        return None  # a plain value such as `seed=3`
    start = path.resolve().parent
    for d in [start, *start.parents][:5]:
        if (d / key).is_dir():
            return _find_fragment(d, key, name, Path(f"command-line override '{override}'"))
        if d.name == "conf":
            break
    return None


def load_config(
    path: str | os.PathLike, overrides: Iterable[str] = (), *, import_reward_terms: bool = True
) -> IGRPOConfig:
    """Compose, check required values, resolve interpolations, validate, and return typed objects.

    import_reward_terms=False: do not import `module:function` reward terms (for tools that only
    render a job for another machine, e.g. the Slurm launcher on a login node)."""
    cfg = compose(path, overrides)
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(getattr(e, "msg", None) or e).splitlines()[0]
        raise ConfigError(f"{path}: cannot resolve interpolation at '{key}': {msg}") from None
    if missing:
        raise ConfigError(
            f"{path}: required value(s) missing: {', '.join(missing)} (set them in the file or as key=value)"
        )
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(getattr(e, "msg", None) or e).splitlines()[0]
        raise ConfigError(f"{path}: cannot resolve interpolation at '{key}': {msg}") from None
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{path}: bad value for '{key}': {e}") from None

    validate_config(obj, source=str(path), import_reward_terms=import_reward_terms)
    return obj  # type: ignore[return-value]


def to_yaml(cfg: IGRPOConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: IGRPOConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config (what actually ran) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
