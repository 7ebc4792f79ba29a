"""One typed config per job: dataclasses whose YAML form is merged and checked by OmegaConf.

A config file is only the stored form of a dataclass. `load_config` merges, in order, the dataclass
defaults, a YAML file and `key.sub=value` overrides, and turns every mistake into one line that names
the key and where it came from. Each field carries a docstring (a string literal under it), which
`field_docs` reads to generate the reference in docs/CONFIG.md.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import functools
import inspect
import re
import textwrap
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from plumbing.errors import UserError
from plumbing.files import atomic_write_text

T = TypeVar("T")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class ConfigError(UserError):
    """A config that cannot be used; the message names the file or override and the key."""


class FieldError(ValueError):
    """Raised by a config's `__post_init__`: `field` of `owner` holds a value it cannot use."""

    def __init__(self, owner: object, field: str = "", expected: str = "") -> None:
        if not field:  # re-raised by OmegaConf with only a message
            super().__init__(str(owner))
            self.owner, self.field = type(None), ""
            return
        self.owner = type(owner)
        self.field = field  # may be dotted, e.g. "cifar10.source"
        super().__init__(f"{field}: expected {expected}, got {_get(owner, field)!r}")


def _get(owner: object, dotted: str) -> Any:
    value: Any = owner
    for part in dotted.split("."):
        value = getattr(value, part, None)
    return value


def require(ok: bool, owner: object, field: str, expected: str) -> None:
    """The check every `__post_init__` uses: `require(self.epochs >= 1, self, "epochs", "an int >= 1")`.

    A field still at MISSING is not checked here: OmegaConf reports it as a required value."""
    if not ok and _get(owner, field) != MISSING:
        raise FieldError(owner, field, expected)


def load_config(
    schema: type[T],
    path: Path | None = None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> T:
    """Defaults of `schema`, the YAML at `path`, `flags` (dotted key → value, from named command-line
    options), then each `key.sub=value` override; checked by OmegaConf and the `__post_init__`s."""
    if path is None and not overrides:
        built = _from_flags(schema, flags or {})
        if built is not None:
            return built
    return _load(schema, path, overrides, flags)


def _load(schema: type[T], path: Path | None, overrides: Sequence[str], flags: Mapping[str, Any] | None) -> T:
    cfg = OmegaConf.structured(schema)
    where = "command line"
    if path is not None:
        where = str(path)
        cfg = _merge(cfg, _read_yaml(path), where)
    if flags:
        given = {key: str(value) if isinstance(value, Path) else value for key, value in flags.items()}
        cfg = _merge(cfg, OmegaConf.create(_nested(given)), "command-line options")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not _KEY.fullmatch(key):
            raise ConfigError(
                f"override {item!r}: expected key.sub=value (a dotted key of letters, digits and _)"
            )
        try:  # `key=` is the empty string, as in Hydra (the shell turns key='' into key=)
            dotlist = OmegaConf.create(_nested({key: ""})) if not value else OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, IndexError) as err:
            raise ConfigError(f"override {item!r}: cannot parse the value ({_first_line(err)})") from None
        cfg = _merge(cfg, dotlist, f"override {item!r}")
    try:
        return typing.cast(T, OmegaConf.to_object(cfg))
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{where}: {err.full_key}: a value is required (set it in the file or as {err.full_key}=...)"
        ) from None
    except FieldError as err:
        if not err.field:
            raise ConfigError(f"{where}: {err}") from None
        key = _dotted_path(schema, err.owner, err.field)
        raise ConfigError(f"{where}: {key}: {str(err).split(': ', 1)[1]}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_describe(err)}") from None
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
        raise ConfigError(f"{where}: a value of the wrong shape ({_first_line(err)})") from None


def _from_flags(schema: type[T], flags: Mapping[str, Any]) -> T | None:
    """The config straight from the dataclasses when every flag names a field and already holds a
    value of its exact type (what argparse's typed options give: str, int, bool, a list of str), and
    nothing is left MISSING: what OmegaConf would build, without its ~15 ms of node trees (most of a
    data_prep command's start-up, bench.prep). None for anything else: OmegaConf converts or refuses
    it, with its messages."""
    try:
        built = _build(schema, _nested(flags))
    except (FieldError, TypeError, ValueError, IndexError, KeyError, AttributeError):
        return None  # OmegaConf says it in one line, naming the key
    return typing.cast(T, built) if built is not None and not _missing(built) else None


def _build(cls: type, given: Mapping[str, Any]) -> Any:
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for key, value in given.items():
        kind = hints.get(key)
        if kind is None:
            return None  # an unknown key
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                return None
            values[key] = _build(typing.cast(type, kind), value)
            if values[key] is None:
                return None
        elif kind in (str, int, bool) and type(value) is kind:
            if kind is str and not _plain_string(value):
                return None
            values[key] = value
        elif (
            kind == list[str]
            and type(value) is list
            and all(type(v) is str and _plain_string(v) for v in value)
        ):
            values[key] = list(value)
        else:
            return None
    return cls(**values)


def _plain_string(value: str) -> bool:
    """A string OmegaConf keeps as it is: no interpolation (`${…}`, escaped or not), not MISSING."""
    return "${" not in value and value != MISSING


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's fields and their types (annotations are strings under `from __future__ import
    annotations`: resolved once)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _missing(cfg: Any) -> bool:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if (isinstance(value, str) and value == MISSING) or (
            dataclasses.is_dataclass(value) and _missing(value)
        ):
            return True
    return False


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} → {"a": {"b": 1}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def parse_mixed(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> dict[str, Any]:
    """Parse options with `key=value` overrides anywhere among them (argparse alone wants the
    positionals together); the parser must have an `overrides` positional (nargs="*")."""
    args, extra = parser.parse_known_args(argv)
    stray = [word for word in extra if word.startswith("-") or "=" not in word]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    values = vars(args)
    values["overrides"] = [*values.get("overrides", []), *extra]
    return values


def config_from_dict(schema: type[T], data: Mapping[str, Any], where: str) -> T:
    """A config stored inside an artifact (a checkpoint, an export) back as its typed dataclass."""
    cfg = _merge(OmegaConf.structured(schema), OmegaConf.create(dict(data)), where)
    try:
        return typing.cast(T, OmegaConf.to_object(cfg))
    except (OmegaConfBaseException, FieldError) as err:
        raise ConfigError(f"{where}: stored config no longer valid ({err})") from None


def _read_yaml(path: Path) -> DictConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line} ({getattr(err, 'problem', err)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return OmegaConf.create(data)


def _merge(cfg: Any, other: Any, where: str) -> Any:
    try:
        return OmegaConf.merge(cfg, other)
    except ConfigKeyError as err:
        raise ConfigError(f"{where}: unknown key {err.full_key!r} ({_first_line(err)})") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_describe(err)}") from None
    except (
        TypeError,
        ValueError,
        IndexError,
        KeyError,
        AttributeError,
    ) as err:  # OmegaConf lets some through raw
        raise ConfigError(f"{where}: a value of the wrong shape ({_first_line(err)})") from None


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    return f"{key}: {_first_line(err)}" if key else _first_line(err)


def _first_line(err: BaseException) -> str:
    text = getattr(err, "msg", None) or str(err)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _dotted_path(schema: type, owner: type, field: str) -> str:
    for prefix, cls in walk_schema(schema):
        if cls is owner:
            return f"{prefix}.{field}" if prefix else field
    return field


def walk_schema(schema: type, prefix: str = "") -> Iterator[tuple[str, type]]:
    """(dotted prefix, dataclass type) for `schema` and every nested dataclass field, depth first."""
    yield prefix, schema
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from walk_schema(typing.cast(type, kind), f"{prefix}.{f.name}" if prefix else f.name)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config instance (paths as strings), for JSON manifests."""
    return typing.cast(dict[str, Any], _plain(dataclasses.asdict(cfg)))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config beside an artifact (atomically)."""
    atomic_write_text(path, to_yaml(cfg))


def field_docs(schema: type) -> dict[str, str]:
    """Field name → the docstring written under it in the class body."""
    source = textwrap.dedent(inspect.getsource(schema))
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for stmt, nxt in zip(body.body, body.body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def reference_markdown(schema: type, title: str) -> str:
    """A Markdown table per (sub)config: key, type, default, meaning — generated, never hand-copied."""
    lines = [f"## {title}", ""]
    defaults = _defaults(schema)
    for prefix, cls in walk_schema(schema):
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            default = _lookup(defaults, key)
            shown = (
                "required"
                if default in ("???", "(required)")
                else f"`{default!r}`"
                if default == ""
                else f"`{default}`"
            )
            rows.append(f"| `{key}` | `{_type_name(hints[f.name])}` | {shown} | {docs.get(f.name, '')} |")
        if rows:
            lines += [
                f"**`{prefix or '(top level)'}`** ({cls.__name__})",
                "",
                "| key | type | default | meaning |",
                "|---|---|---|---|",
                *rows,
                "",
            ]
    return "\n".join(lines)


def _defaults(schema: type) -> dict[str, Any]:
    """Field defaults without building the class (its checks may need values the user gives)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def _lookup(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "(required)"
        node = node[part]
    return "???" if node == "???" else node


def _type_name(kind: Any) -> str:
    text = getattr(kind, "__name__", None) if not typing.get_args(kind) else None
    return text or str(kind).replace("typing.", "").replace("pathlib.", "")
