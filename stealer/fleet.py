"""Fleet configuration: ``stealer node --config node.toml``.

Every option of a command that has ``--config`` can come from a TOML file (stdlib
:mod:`tomllib`), and the command line overrides the file. The mapping is read from the
argparse parser itself, so an option added to the parser later needs no change here:

* a key is an option's long name or its ``dest``, with ``-`` or ``_`` (``max-inflight``,
  ``max_inflight``, ``no-reuse``, ``speculate``); the values are converted and checked by the
  option's own ``type`` and ``choices``, exactly as on the command line;
* a flag takes ``true`` or ``false`` (``gateway = true``; ``speculate = false`` is the same as
  ``no-speculate = true``);
* a repeatable option takes a list (``source = ["camera:0"]``, ``peer = [...]``) or a single
  value; a list given on the command line replaces the file's;
* a repeatable ``NAME=VALUE`` option also takes a table: ``[limits]`` with
  ``handshake_timeout = 10`` is ``--limit handshake_timeout=10``. The file's entries come
  first and the command line's after them, so a ``--limit`` of a name wins over the file's
  and the file's other limits stay;
* options of one mutually exclusive group (``--weights`` / ``--random-weights``) may not
  both be set in a file, and one given on the command line replaces the file's other.

An unknown key, a wrong type or a bad value is a :class:`~stealer.errors.ConfigError` that
names the file and the key (the CLI prints it as one line and exits 2, like argparse).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from .errors import ConfigError

__all__ = ["CONFIG_DEST", "add_config_arg", "config_settings", "parse_args"]

CONFIG_DEST = "config"
"""The ``dest`` of ``--config``: a parser with an action of this dest reads a config file."""

# Actions that are not settings: asking for help or a version, choosing a subcommand.
_NOT_SETTINGS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE``: the command's options from a TOML file (see :func:`parse_args`)."""
    parser.add_argument(
        "--config", metavar="TOML", default=None,
        help="read this command's options from a TOML file (keys are the long option names; "
             "see tools/node.example.toml); options on the command line override it")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; if the chosen (sub)command was given ``--config FILE``, the
    file's settings fill in every option the command line did not give.

    Parameters
    ----------
    parser
        The program's parser (with subcommands, or without).
    argv
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    argparse.Namespace
        As :meth:`argparse.ArgumentParser.parse_args` gives it, with the file applied.

    Raises
    ------
    ConfigError
        The file cannot be read, is not TOML, or names an unknown option or a bad value.
    SystemExit
        A usage error on the command line itself (argparse's own behaviour).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    path = getattr(args, CONFIG_DEST, None)
    if path is None:
        return args
    target = _chosen_parser(parser, args)
    if target is None:  # pragma: no cover - subcommands without a dest: not how stealer builds them
        raise ConfigError("--config: cannot tell which command it is for")
    settings = config_settings(target, path)
    given = _given_on_command_line(parser, target, argv)
    _apply(args, settings, given, target)
    return args


@dataclass
class Settings:
    """What a config file sets: ``dest -> value`` (converted), and which dests came from a
    table (their command-line entries are added to the file's instead of replacing them)."""

    values: dict[str, Any] = field(default_factory=dict)
    merged: set[str] = field(default_factory=set)
    keys: dict[str, str] = field(default_factory=dict)  # dest -> the file's key, for messages


def config_settings(parser: argparse.ArgumentParser, path: str) -> Settings:
    """Read a TOML config file and convert it with ``parser``'s own options.

    Parameters
    ----------
    parser
        The (sub)command's parser.
    path
        The TOML file.

    Returns
    -------
    Settings

    Raises
    ------
    ConfigError
        Naming the file and the key: unreadable file, invalid TOML, unknown key, wrong type,
        bad value, two keys for one option, or two options of one exclusive group.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    options = _Options(parser)
    out = Settings()
    chosen: dict[argparse.Action, str] = {}  # action -> key, for the exclusive groups
    for key, value in data.items():
        where = f"{path}: {key}"
        action, by_name = options.find(key, path)
        setting = _convert_setting(action, by_name, value, where)
        if setting is None:  # a flag set to false by its option's name: as if not given
            continue
        if action.dest in out.keys:
            raise ConfigError(f"{path}: {out.keys[action.dest]} and {key} set the same option")
        out.values[action.dest] = setting
        out.keys[action.dest] = key
        if isinstance(value, dict):
            out.merged.add(action.dest)
        chosen[action] = key
    for group in parser._mutually_exclusive_groups:
        keys = [chosen[a] for a in group._group_actions if a in chosen]
        if len(keys) > 1:
            raise ConfigError(f"{path}: {' and '.join(keys)} cannot both be set (they exclude each other)")
    return out


# ----------------------------------------------------------------------------- internals

class _Options:
    """A parser's options by every name a config key may use."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.by_name: dict[str, argparse.Action] = {}
        self.by_dest: dict[str, list[argparse.Action]] = {}
        for action in parser._actions:
            if isinstance(action, _NOT_SETTINGS) or not action.option_strings or action.dest == CONFIG_DEST:
                continue
            for opt in action.option_strings:
                if opt.startswith("--"):
                    self.by_name[_norm(opt[2:])] = action
            self.by_dest.setdefault(action.dest, []).append(action)

    def find(self, key: str, path: str) -> tuple[argparse.Action, bool]:
        """The action a key names, and whether by its option name (else by its dest)."""
        k = _norm(key)
        if k in self.by_name:
            return self.by_name[k], True
        actions = self.by_dest.get(k)
        if actions:
            # a dest shared by several options (--reuse, --no-reuse, --scheme): the one that
            # takes a value, else the only one
            takes_value = [a for a in actions if a.nargs != 0]
            return (takes_value or actions)[0], False
        if k == CONFIG_DEST:
            raise ConfigError(f"{path}: config: a config file cannot name another one")
        names = sorted({n.replace("_", "-") for n in self.by_name})
        near = difflib.get_close_matches(k.replace("_", "-"), names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else " (keys are the long option names of --help)"
        raise ConfigError(f"{path}: unknown key {key!r}{hint}")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{value!r}"


def _convert_setting(action: argparse.Action, by_name: bool, value: Any, where: str) -> Any:
    """The value a file's setting gives ``action.dest``; None: the setting sets nothing."""
    if isinstance(action, argparse._CountAction):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: expected a count (0, 1, 2, ...), got {_describe(value)}")
        return value
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) and not by_name:
            return value  # keyed by its dest: the value is the setting (speculate = false)
        if isinstance(action, argparse._AppendConstAction):
            raise ConfigError(f"{where}: this option can only be given on the command line")
        return action.const if value else None
    if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
        if isinstance(value, dict):
            items: list[Any] = []
            for name, v in value.items():
                if isinstance(v, (bool, dict, list)):
                    raise ConfigError(f"{where}.{name}: expected a number or a string, got {_describe(v)}")
                items.append(f"{name}={v}")
            where_of = [f"{where}.{name}" for name in value]
        else:
            items = value if isinstance(value, list) else [value]
            where_of = [where] * len(items)
        out: list[Any] = []
        for item, w in zip(items, where_of):
            if action.nargs is None:
                out.append(_convert_one(action, item, w))
            elif isinstance(action, argparse._ExtendAction):
                out.extend(_convert_one(action, x, w) for x in (item if isinstance(item, list) else [item]))
            else:
                if not isinstance(item, list):
                    raise ConfigError(f"{w}: expected a list of lists, got {_describe(item)} in it")
                out.append([_convert_one(action, x, w) for x in item])
        return out
    if isinstance(value, dict):
        raise ConfigError(f"{where}: expected a value, got a table")
    if action.nargs in (None, "?"):
        if isinstance(value, list):
            raise ConfigError(f"{where}: expected one value, got a list")
        return _convert_one(action, value, where)
    items = value if isinstance(value, list) else [value]  # nargs "*", "+" or a number
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise ConfigError(f"{where}: expected a list of {action.nargs} values, got {len(items)}")
    if action.nargs == "+" and not items:
        raise ConfigError(f"{where}: expected at least one value")
    return [_convert_one(action, x, where) for x in items]


def _convert_one(action: argparse.Action, raw: Any, where: str) -> Any:
    """One value, converted and checked by the option's ``type`` and ``choices``."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ConfigError(f"{where}: expected a number or a string, got {_describe(raw)}")
    convert = action.type
    if convert is None or convert is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: expected a string, got {raw!r}")
        value: Any = raw
    else:
        if not callable(convert):  # pragma: no cover - argparse itself refuses this
            raise ConfigError(f"{where}: the option's type cannot be used")
        try:
            value = convert(raw if isinstance(raw, str) else str(raw))
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"{where}: {e}") from None
        except (TypeError, ValueError):
            name = getattr(convert, "__name__", repr(convert))
            raise ConfigError(f"{where}: invalid {name} value: {raw!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(repr(c) for c in action.choices)
        raise ConfigError(f"{where}: invalid choice {value!r} (choose from {choices})")
    return value


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser | None:
    """The (sub)parser that parsed the command's options (the one with ``--config``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None) if action.dest != argparse.SUPPRESS else None
            choices: dict[str, argparse.ArgumentParser] = action.choices
            if name in choices:
                return _chosen_parser(choices[name], args)
            return None
    return parser if any(a.dest == CONFIG_DEST for a in parser._actions) else None


@contextlib.contextmanager
def _defaults_suppressed(parser: argparse.ArgumentParser) -> Iterator[None]:
    """While inside, ``parser`` sets only the options the command line gives."""
    saved = [(a, a.default) for a in parser._actions]
    saved_defaults = parser._defaults
    dests = {a.dest for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        # set_defaults() also keeps defaults of options' dests here (scheme="auto")
        parser._defaults = {k: v for k, v in saved_defaults.items() if k not in dests}
        yield
    finally:
        for a, default in saved:
            a.default = default
        parser._defaults = saved_defaults


def _given_on_command_line(parser: argparse.ArgumentParser, target: argparse.ArgumentParser,
                           argv: list[str]) -> set[str]:
    """The dests of ``target``'s options that the command line gives. (The same argv was
    parsed once already, so this parse cannot fail.)"""
    with _defaults_suppressed(target):
        ns = parser.parse_args(argv)
    return {a.dest for a in target._actions if hasattr(ns, a.dest)}


def _apply(args: argparse.Namespace, settings: Settings, given: set[str], parser: argparse.ArgumentParser) -> None:
    """The file's settings under the command line's."""
    overridden = set(given)
    for group in parser._mutually_exclusive_groups:
        dests = {a.dest for a in group._group_actions}
        if dests & given:  # --random-weights on the command line replaces the file's weights
            overridden |= dests
    for dest, value in settings.values.items():
        if dest in settings.merged and dest in given:
            setattr(args, dest, value + list(getattr(args, dest) or []))
        elif dest not in overridden:
            setattr(args, dest, value)
