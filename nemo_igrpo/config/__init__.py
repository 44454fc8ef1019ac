"""Typed YAML configuration: composition, overrides, validation."""

from nemo_igrpo.config.loader import ConfigError, load_config, save_config, to_yaml
from nemo_igrpo.config.schema import IGRPOConfig

__all__ = ["ConfigError", "IGRPOConfig", "load_config", "save_config", "to_yaml"]
