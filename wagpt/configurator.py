"""
nanoGPT-style configuration, hardened, and the command line of every entry point.

    python train.py config/train_shakespeare_char.py --batch_size=32 --compile=False
    python train.py --help

Arguments are applied left to right: a path ending in .py is a config file (plain Python whose
top-level names are config keys), `--key=value` overrides one key. Every key must be a field of
the run's config dataclass (train.py's TrainConfig, average.py's, ...), so a typo is an error that
names the closest valid key instead of a silently ignored setting. Values are Python literals
(`--lr_schedule=wsd` also works: a value that is not a literal is taken as a string) and are
checked against the field's type: an int may set a float, `None` may set an Optional field, and
nothing else is converted behind the user's back.

`--help` is generated from the config dataclass and the comments in its source: the keys grouped
as the class groups them (a comment line above a run of fields names the group), each with its
default and its trailing comment, so the help cannot drift from the code.

A problem with the user's input (a config key or value, a data file, a checkpoint, a run
directory) raises a UserError; `main()` prints it as one line `error: <message>` on stderr and
exits with status 2, from rank 0 only under torchrun (a lost peer: once per node). A config's
problems are collected before any is reported (errors.Problems): unknown keys, bad values and
every failed check of the config class's __post_init__ each get their line. Set WA_TRACEBACK=1
to see the traceback too. Any other exception is a bug and keeps its traceback.
"""

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import textwrap
import time
import traceback
import types
import typing
from pathlib import Path

from wagpt.errors import ConfigError, Problems, UserError

TRACEBACK_ENV = "WA_TRACEBACK"   # =1: user errors show their traceback too


def load_config(config_cls, argv):
    """Build a `config_cls` dataclass from config files and --key=value overrides in `argv`."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values, problems = {}, Problems()   # every problem is reported, all at once
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")  # partition: the value may contain '='
            with problems.check():
                if not sep:
                    raise ConfigError(f"argument {arg!r} has no value; write --{key}=VALUE "
                                      f"(--help lists the keys)")
                _check_known(key, fields, f"command-line argument {arg!r}")
                values[key] = _coerce(key, _parse_literal(text, hints[key]), hints[key], arg)
        elif arg.endswith(".py"):
            with problems.check():
                for key, value in _read_config_file(arg).items():
                    with problems.check():
                        _check_known(key, fields, f"config file {arg}")
                        values[key] = _coerce(key, value, hints[key], arg)
        else:
            problems.add(f"argument {arg!r} is neither a config file (*.py) nor --key=value")
    # the keys given are known to __post_init__ (was_given), so that it can tell a key the user
    # set from a default; not a field: asdict, == and config.json ignore it
    cfg = config_cls.__new__(config_cls)
    cfg.given_keys = frozenset(values)
    with problems.check():
        try:
            cfg.__init__(**values)
        except TypeError as e:  # __post_init__ checks of cross-key invariants
            raise ConfigError(str(e)) from None
    problems.raise_if_any()
    return cfg


def replace_config(cfg, **changes):
    """dataclasses.replace that keeps the record of the keys the user gave (was_given)."""
    given = getattr(cfg, "given_keys", None)
    if given is None:
        return dataclasses.replace(cfg, **changes)
    new = type(cfg).__new__(type(cfg))
    new.given_keys = given
    new.__init__(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                       if f.init}, **changes})
    return new


def was_given(cfg, key):
    """Whether the user set `key` (in a config file or on the command line). For a config built
    in code, without that record, whether it differs from the class default."""
    given = getattr(cfg, "given_keys", None)
    if given is not None:
        return key in given
    field = next(f for f in dataclasses.fields(cfg) if f.name == key)
    return getattr(cfg, key) != field.default


def check_finite_numbers(cfg):
    """ConfigError for any float field of `cfg` that is NaN or infinite."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}={value} must be a finite number")


def parse_choices(key, text, allowed):
    """'a, b' (the string value of config key `key`) -> ['a', 'b'], each entry one of `allowed`
    and listed once; at least one."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if not items or bad or len(set(items)) != len(items):
        why = f"{bad[0]!r} is unknown" if bad else "empty or repeated entries"
        raise ConfigError(f"{key}={text!r}: {why}; give a comma-separated subset of "
                          f"{','.join(allowed)}")
    return items


# ---------------------------------------------------------------------------------------------
# the command line of an entry point

def main(config_cls, run, doc, argv=None):
    """The `__main__` of an entry point: `--help`, parse the config, `run(cfg)`; a UserError
    becomes one line `error: ...` on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    prog = Path(sys.argv[0]).name
    if "-h" in argv or "--help" in argv:
        try:
            print(help_text(config_cls, doc, prog))
        except BrokenPipeError:   # `--help | head`
            pass
        return
    sys.stdout.reconfigure(line_buffering=True)  # progress appears at once under tee/nohup/SLURM
    try:
        run(load_config(config_cls, argv))
    except UserError as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            traceback.print_exc()
        if int(os.environ.get("RANK", "0")) == 0 or (     # under torchrun: once, not per rank
                e.every_node and int(os.environ.get("LOCAL_RANK", "0")) == 0):
            for problem in getattr(e, "problems", None) or [e]:   # several: one line each
                print(f"error: {one_line(problem)}", file=sys.stderr)
        else:   # torchrun stops every worker once one exits: let rank 0 say why first
            time.sleep(2)
        sys.exit(2)


def one_line(error):
    """The message of an exception on one line (white space folded)."""
    return " ".join(str(error).split()) or type(error).__name__


def help_text(config_cls, doc, prog="train.py"):
    """Usage, the entry point's docstring and every key, grouped as the dataclass groups them,
    with its default and comment."""
    intro = textwrap.dedent(doc or "").strip()
    lines = [f"usage: python {prog} [config.py ...] [--key=value ...]", "", intro, ""]
    lines += textwrap.wrap(
        "Arguments apply left to right: a config file (*.py) sets the keys it assigns, "
        "--key=value overrides one key. Values are Python literals. A bad key or value, data "
        "file or checkpoint stops the command with one line 'error: ...' and exit status 2 "
        f"({TRACEBACK_ENV}=1 shows the traceback).", 100)
    defaults = {f.name: _default_text(f) for f in dataclasses.fields(config_cls)}
    width = min(40, max(len(f"  --{k}={v}") for k, v in defaults.items()) + 2)
    for group, entries in describe_fields(config_cls):
        lines += ["", group.title]
        if group.note:
            lines += textwrap.wrap(" ".join(group.note.split()), 100, initial_indent="  ",
                                   subsequent_indent="  ")
        for key, comment in entries:
            head = f"  --{key}={defaults[key]}"
            body = textwrap.wrap(comment, 100 - width) or [""]
            if len(head) >= width:
                lines.append(head)
                lines += [" " * width + b for b in body if b]
            else:
                lines.append(head.ljust(width) + body[0])
                lines += [" " * width + b for b in body[1:]]
    return "\n".join(lines)


@dataclasses.dataclass
class FieldGroup:
    title: str
    note: str = ""
    generated: bool = False   # from field metadata (make_dataclass), listed after the others


def describe_fields(config_cls):
    """[(FieldGroup, [(key, comment), ...]), ...]: the fields of a config dataclass in the
    groups its source gives them, groups in source order. A field made by
    dataclasses.make_dataclass carries its group and comment in field.metadata ("group", a
    FieldGroup, and "help"); those groups come last. A subclass that sets a new default for an
    inherited field adds its own comment to the inherited one."""
    notes = {}
    for klass in reversed(config_cls.__mro__):   # base classes first
        if not dataclasses.is_dataclass(klass):
            continue
        source_notes = class_field_notes(klass)
        for f in dataclasses.fields(klass):
            if f.name in source_notes:
                group, comment = source_notes[f.name]
            elif "help" in f.metadata and f.name not in notes:
                group, comment = f.metadata["group"], f.metadata["help"]
            else:
                continue
            if f.name in notes:   # a default set again by a subclass
                first_group, first = notes[f.name]
                notes[f.name] = (first_group, f"{first} (here: {comment})" if comment else first)
            else:
                notes[f.name] = (group, comment)
    ordered = {}
    for generated in (False, True):
        for f in dataclasses.fields(config_cls):
            group, comment = notes.get(f.name, (FieldGroup("other"), ""))
            if group.generated == generated:
                ordered.setdefault(group.title, (group, []))[1].append((f.name, comment))
    return list(ordered.values())


_FIELD_LINE = re.compile(r"^(\s*)(\w+)\s*:[^=#]*(=[^#]*)?(#\s?(.*))?$")
_DICT_LINE = re.compile(r"^(\s*)[\"'](\w+)[\"']\s*:[^#]*(#\s?(.*))?$")


def class_field_notes(klass):
    """{field: (FieldGroup, comment)} from the source of a dataclass body: the trailing comment
    of each `name: type = default` line, continued by the comment-only lines below it that are
    indented deeper; a run of comment-only lines at the fields' indentation opens a group (its
    first line is the title, the rest a note)."""
    try:
        lines, _ = inspect.getsourcelines(klass)
    except (OSError, TypeError):   # made by make_dataclass: no source
        return {}
    body = lines[next(i for i, line in enumerate(lines) if line.lstrip().startswith("class ")) + 1:]
    return _notes(body, _FIELD_LINE, key_group=2, comment_group=5,
                  stop=re.compile(r"^\s*(def|class|@)\b"))


def dict_notes(klass, attribute):
    """{key: comment} of the lines `"key": value,  # comment` of a dict literal assigned to
    `attribute` in the source of `klass` (e.g. an averager's `defaults`); {} without source."""
    try:
        lines, _ = inspect.getsourcelines(klass)
        start = next(i for i, line in enumerate(lines)
                     if re.match(rf"^\s*{attribute}\s*=\s*\{{", line))
        end = next(i for i in range(start, len(lines)) if lines[i].rstrip().endswith("}"))
    except (OSError, TypeError, StopIteration):
        return {}
    body = lines[start + 1:end + 1]
    if body and body[-1].strip() == "}":
        body = body[:-1]
    found = _notes(body, _DICT_LINE, key_group=2, comment_group=4, stop=None)
    return {key: comment for key, (_, comment) in found.items()}


def _notes(lines, pattern, key_group, comment_group, stop):
    notes, group, pending, last_key, key_indent = {}, FieldGroup("options"), [], None, None
    for line in lines:
        if stop is not None and stop.match(line) and (key_indent is None or
                                                      _indent(line) <= key_indent):
            break
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if last_key is not None and not pending and _indent(line) > key_indent:
                g, comment = notes[last_key]
                notes[last_key] = (g, f"{comment} {text}".strip())
            else:
                pending.append(text)
            continue
        match = pattern.match(line.rstrip("\n"))
        if not match:
            if stripped:
                last_key = None
            continue
        if pending:
            group = FieldGroup(pending[0], " ".join(pending[1:]))
            pending = []
        key_indent = len(match.group(1))
        last_key = match.group(key_group)
        notes[last_key] = (group, (match.group(comment_group) or "").strip())
    return notes


def _indent(line):
    return len(line) - len(line.lstrip())


def _default_text(f):
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return value if isinstance(value, str) else repr(value)


# ---------------------------------------------------------------------------------------------
# parsing and type checks

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
    hint = f"; did you mean {close[0]!r}?" if close else "; --help lists the keys"
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
    for number in ok if isinstance(ok, (list, tuple)) else [ok]:
        # a step count, seed or size past int64 is a typo, and torch/numpy cannot hold it
        if isinstance(number, int) and not -2**63 < number < 2**63:
            digits = str(abs(number))
            shown = digits if len(digits) <= 24 else f"{digits[:12]}... ({len(digits)} digits)"
            raise ConfigError(f"{key} = {'-' if number < 0 else ''}{shown} in {where} is out of "
                              f"range: integers must lie strictly between -2**63 and 2**63")
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
    if origin in (typing.Union, types.UnionType):  # e.g. float | list[float] (sweepable keys)
        for option in typing.get_args(base):
            converted = _convert(value, option)
            if converted is not _REJECT:
                return converted
        return _REJECT
    return value if isinstance(value, base) else _REJECT


def _name(annotation):
    return getattr(annotation, "__name__", str(annotation))
