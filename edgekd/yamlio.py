"""A strict YAML loader: safe_load semantics, minus PyYAML's surprises.

- duplicate keys are an error (PyYAML silently keeps the last one);
- `1e-3` is a float (YAML 1.1's float pattern needs a dot, so PyYAML returns the string '1e-3');
- only `true` / `false` are booleans (YAML 1.1 also turns `no`, `off`, `y` into booleans, which breaks
  values such as `mode: no`); the schema coerces the string 'no' where it expects a bool;
- what PyYAML accepts but no config can be is refused with one line: a list or mapping as a mapping key,
  an alias that contains itself, aliases that expand to more than MAX_EXPANDED_VALUES values (a "billion
  laughs" file would otherwise hang validation, which walks the expanded tree), nesting too deep to parse.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from edgekd.errors import ConfigError

# A real pipeline.yaml has a few hundred values; aliases may share subtrees, but their expansion is capped
# so that an alias bomb is refused in milliseconds instead of expanding exponentially in later tree walks.
MAX_EXPANDED_VALUES = 100_000


class NotAConfig(yaml.constructor.ConstructorError):
    """Valid YAML that no config can be (reported as such, not as a syntax error)."""


class StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader with duplicate-key detection, YAML 1.2-style floats and booleans, and bounded aliases."""

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, {}, set())
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Values in the tree once every alias is expanded (each shared node is measured once)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise NotAConfig(None, None, "an alias refers to a node that contains it "
                                                "(a recursive structure cannot be a config)", node.start_mark)
    open_nodes.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_nodes) + _expanded_size(v, sizes, open_nodes) for k, v in node.value)
    open_nodes.discard(key)
    if size > MAX_EXPANDED_VALUES:
        raise NotAConfig(
            None, None, f"aliases expand to more than {MAX_EXPANDED_VALUES:,} values (an alias bomb?)", node.start_mark)
    sizes[key] = size
    return size


# Rebuild the implicit resolvers without YAML 1.1 booleans / floats, then add the YAML 1.2 ones.
StrictSafeLoader.yaml_implicit_resolvers = {
    first_char: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first_char, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
StrictSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping_no_duplicates(loader: StrictSafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (list, dict, set)):  # `? [a, b]` or `? {a: 1}`: unhashable, and never a setting name
            raise NotAConfig(
                None, None, f"a mapping key must be a plain value, not a {type(key).__name__}", key_node.start_mark
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_no_duplicates)


def load_yaml_text(text: str, source: str) -> Any:
    """Parse YAML text; errors become ConfigError('<source>:<line>: <problem>')."""
    try:
        return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 - StrictSafeLoader derives from SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = exc.problem or exc.context or "invalid YAML"
        kind = "valid YAML but not a config" if isinstance(exc, NotAConfig) else "YAML syntax error"
        raise ConfigError(f"{where}: {kind}: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: YAML error: {exc}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: YAML nested too deeply to be a config") from None


def load_yaml_file(path: Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    return load_yaml_text(text, Path(path).name)


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
