"""Config values from text: YAML files and command-line strings coerced to a dataclass's
field types. Knows nothing of :class:`~mlx_dpo.config.fields.DPOConfig` (it is passed in)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from ..errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: Union[str, Path]) -> dict:
    """The mapping of config keys in the YAML file ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if values is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping of config keys (see configs/toy.yaml)")
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def coerce_fields(obj: Any) -> None:
    """Coerce the fields of the dataclass instance ``obj`` in place to their annotated
    types: strings from the command line (``--beta 0.2``), YAML flow lists and mappings."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        setattr(obj, f.name, _coerce(f.name, value, hints[f.name]))


def as_bool(name: str, value: Any) -> bool:
    """A boolean option as YAML, the command line or Python gives it (``true``, ``yes``, ``1``...)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is Union:
        if isinstance(value, str) and list in [typing.get_origin(a) or a for a in args]:
            return _parse_structured(name, value, keep_string=str in args)
        for arg in args:
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: cannot interpret {value!r}")
    if hint is bool:
        return as_bool(name, value)
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = hint(value) if hint is float else int(float(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {'an integer' if hint is int else 'a number'}, got {value!r}") from None
        if hint is int and float(value) != number:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if hint in (dict, list):
        if isinstance(value, str):
            value = _parse_structured(name, value)
        if not isinstance(value, hint):
            raise ConfigError(f"{name} must be a {'mapping' if hint is dict else 'list'}, got {value!r}")
        return value
    return value


def _parse_structured(name: str, value: str, keep_string: bool = False) -> Any:
    """Parse ``'[a, b]'`` or ``'{bits: 4}'`` given on the command line (YAML flow syntax)."""
    text = value.strip()
    if keep_string and not text.startswith(("[", "{")):
        return value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{name}: cannot parse {value!r} (use YAML, e.g. [a, b] or {{bits: 4}})") from None


__all__ = ["ConfigError", "load_yaml", "coerce_fields", "as_bool"]
