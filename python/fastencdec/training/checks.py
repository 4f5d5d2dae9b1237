"""Small value checks shared by the training config and the run-file schema.

Every error names the option by its full dotted path (``data.batch_size``) and says
what was expected; unknown keys get a did-you-mean suggestion.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

__all__ = ["ConfigError", "did_you_mean", "unknown_keys_error", "check_value"]


class ConfigError(ValueError):
    """A run configuration is invalid (the message names the key)."""


# names other libraries use for the same option
ALIASES = {"learning_rate": "lr", "steps": "max_steps", "num_steps": "max_steps",
           "train_steps": "max_steps", "batchsize": "batch_size", "bs": "batch_size",
           "gradient_accumulation_steps": "grad_accum", "output_dir": "out_dir",
           "arch": "architecture", "model_type": "architecture", "warmup": "warmup_steps",
           "fp16": "precision", "bf16": "precision", "epochs": "max_steps",
           # vision-language models
           "tower": "vision", "vision_tower": "vision", "language_model": "lm", "llm": "lm",
           "text": "lm", "mm_projector": "projector", "freeze_tower": "freeze_vision",
           "freeze_vision_tower": "freeze_vision", "freeze_language_model": "freeze_lm",
           "freeze_llm": "freeze_lm", "freeze_mm_projector": "freeze_projector",
           "vision_lr": "lr_multipliers", "tower_lr": "lr_multipliers",
           "pinpoints": "grid", "image_grid_pinpoints": "grid", "top_k": "variance_k",
           "k": "variance_k"}


def did_you_mean(name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    alias = ALIASES.get(str(name).lower())
    if alias in known:
        return f" (did you mean '{alias}'?)"
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_keys_error(where: str, unknown: Iterable[str], known: Iterable[str]) -> ConfigError:
    unknown, known = sorted(map(str, unknown)), sorted(known)
    hints = "; ".join(f"'{k}'{did_you_mean(k, known)}" for k in unknown)
    return ConfigError(f"{where}: unknown key(s) {hints}; known keys: {', '.join(known)}")


def check_value(path: str, value, kind: str, *, low=None, high=None, low_open=False,
                choices=None, optional=False):
    """Check ``value`` and return it (ints given for floats become floats).

    ``kind``: ``int``, ``float``, ``bool``, ``str``, ``strs`` (a str or a list of str),
    ``pair`` (two floats) or ``mapping``. ``low``/``high`` bound numbers
    (``low_open``: strictly above ``low``); ``choices`` limits strings.
    """
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path} must be set (got null)")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{path} must be a finite number, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path} must be a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            raise ConfigError(f"{path} must be one of {', '.join(map(str, choices))}; got "
                              f"{value!r}{did_you_mean(value, choices)}")
        return value
    elif kind == "strs":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or not all(
                isinstance(v, str) and v for v in items):
            raise ConfigError(f"{path} must be a string or a non-empty list of strings, "
                              f"got {value!r}")
        return value if isinstance(value, str) else list(items)
    elif kind == "pair":
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or
                       not math.isfinite(v) for v in value)):
            raise ConfigError(f"{path} must be a list of two numbers, got {value!r}")
        value = tuple(float(v) for v in value)
        for v in value:
            _check_range(path, v, low, high, low_open)
        return value
    elif kind == "mapping":
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping (key: value), got {value!r}")
        return value
    else:  # pragma: no cover - a programming error
        raise AssertionError(kind)
    _check_range(path, value, low, high, low_open)
    return value


def _check_range(path, value, low, high, low_open):
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{path} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{path} must be <= {high}, got {value!r}")
