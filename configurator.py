"""
nanoGPT-style configuration, hardened.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False

Arguments are applied left to right: a path ending in .py is a config file (plain Python whose
top-level names are config keys), `--key=value` overrides one key. Every key must be a field of
the run's config dataclass (train.py's TrainConfig, average.py's, ...), so a typo is an error that
names the closest valid key instead of a silently ignored setting. Values are Python literals
(`--lr_schedule=wsd` also works: a value that is not a literal is taken as a string) and are
checked against the field's type: an int may set a float, `None` may set an Optional field, and
nothing else is converted behind the user's back.
"""

import ast
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A bad config key or value; the message names the culprit and the fix."""


def load_config(config_cls, argv):
    """Build a `config_cls` dataclass from config files and --key=value overrides in `argv`."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {}
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")  # partition: the value may contain '='
            if not sep:
                raise ConfigError(f"argument {arg!r} has no value; write --{key}=VALUE")
            _check_known(key, fields, f"command-line argument {arg!r}")
            values[key] = _coerce(key, _parse_literal(text, hints[key]), hints[key], arg)
        elif arg.endswith(".py"):
            for key, value in _read_config_file(arg).items():
                _check_known(key, fields, f"config file {arg}")
                values[key] = _coerce(key, value, hints[key], arg)
        else:
            raise ConfigError(
                f"argument {arg!r} is neither a config file (*.py) nor --key=value")
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as e:  # __post_init__ checks of cross-key invariants
        raise ConfigError(str(e)) from e


def config_to_dict(cfg):
    return dataclasses.asdict(cfg)


def save_config(cfg, path):
    """Write the resolved config as JSON (the record of what actually ran)."""
    from checkpoint import atomic_write  # the one atomic writer (fsync + rename)
    text = json.dumps(config_to_dict(cfg), indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def parse_choices(key, text, allowed):
    """'a, b' (the string value of config key `key`) -> ['a', 'b'], each entry one of `allowed`
    and listed once; at least one."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if not items or bad or len(set(items)) != len(items):
        why = f"{bad[0]!r} is unknown" if bad else "empty or repeated entries"
        raise ValueError(f"{key}={text!r}: {why}; give a comma-separated subset of "
                         f"{','.join(allowed)}")
    return items


def _read_config_file(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    namespace = {"__file__": str(path)}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    # Imports and helper names starting with '_' are allowed in config files; they are not keys.
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def _check_known(key, fields, where):
    if key in fields:
        return
    close = difflib.get_close_matches(key, sorted(fields), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown config key {key!r} in {where}{hint}")


def _parse_literal(text, annotation):
    # A str field takes the text verbatim (so --out_dir=123 stays "123"), except None for
    # Optional[str]; every other field parses a Python literal.
    base, optional = _unwrap_optional(annotation)
    if base is str:
        return None if (optional and text == "None") else text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _unwrap_optional(annotation):
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


def _coerce(key, value, annotation, where):
    base, optional = _unwrap_optional(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} = None in {where}, but {key} must be a {_name(base)}")
    ok = _convert(value, base)
    if ok is _REJECT:
        raise ConfigError(
            f"{key} = {value!r} ({type(value).__name__}) in {where}, but {key} must be a "
            f"{_name(base)}{' or None' if optional else ''}")
    return ok


_REJECT = object()


def _convert(value, base):
    origin = typing.get_origin(base) or base
    if base is typing.Any:
        return value
    if base is bool:
        return value if isinstance(value, bool) else _REJECT
    if base is int:
        if isinstance(value, bool):
            return _REJECT
        if isinstance(value, float) and value.is_integer():  # --max_iters=1e4
            return int(value)
        return value if isinstance(value, int) else _REJECT
    if base is float:
        if isinstance(value, bool):
            return _REJECT
        return float(value) if isinstance(value, (int, float)) else _REJECT
    if base is str:
        return value if isinstance(value, str) else _REJECT
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _REJECT
        (item,) = typing.get_args(base)[:1] or (typing.Any,)
        items = [_convert(v, item) for v in value]
        return _REJECT if any(i is _REJECT for i in items) else origin(items)
    if origin in (typing.Union, types.UnionType):  # e.g. float | list[float] (sweepable hyperparameters)
        for option in typing.get_args(base):
            converted = _convert(value, option)
            if converted is not _REJECT:
                return converted
        return _REJECT
    return value if isinstance(value, base) else _REJECT


def _name(annotation):
    return getattr(annotation, "__name__", str(annotation))
