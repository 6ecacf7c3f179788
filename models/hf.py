"""Reading HF config.json files: from a path (file or checkpoint directory) or an already-parsed dict."""
from __future__ import annotations

import json
import os


class ConfigError(ValueError):
    """config.json is missing, unreadable, or describes something we do not support."""


def read_config(source) -> dict:
    """The config as a dict. `source` is a dict, a config.json path, a directory holding one, or a .gguf
    file (its metadata as the config.json it was converted from)."""
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if path.endswith(".gguf") and os.path.isfile(path):
        from meganeura.gguf_file import config_from_gguf
        return config_from_gguf(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"no config.json at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return cfg


def field(cfg: dict, key: str, default, kind=None):
    """cfg[key] (or `default` when absent or null), converted to `kind` with a clear error."""
    value = cfg.get(key)
    if value is None:
        return default
    if kind is None:
        return value
    try:
        if kind is bool and not isinstance(value, bool):
            raise TypeError
        if kind is int and (isinstance(value, bool) or int(value) != value):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config field {key!r} should be {kind.__name__}, got {value!r}") from None


def require(cfg: dict, key: str, kind):
    if cfg.get(key) is None:
        raise ConfigError(f"config.json lacks the required field {key!r}")
    return field(cfg, key, None, kind)
