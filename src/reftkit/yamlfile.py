"""YAML as reftkit reads it (config files and the command line's stage sections): PyYAML's safe loader with
two changes, so that a config file takes what the command line takes and says nothing it did not mean.

* Floats follow YAML 1.2's rule: `1e-3`, `1E5`, `2.5e+3`, `.5` are numbers, as `--lr 1e-3` is. PyYAML keeps
  YAML 1.1's, where an exponent needs a dot and a sign (`1.0e-3`), so `lr: 1e-3` was the text "1e-3".
* A key given twice in one mapping is an error naming it and both lines, not "the last one wins". Keys a
  merge (`<<: *base`) brings in may be overridden: that is what merging is for.
"""

from __future__ import annotations

import re

import yaml

_FLOAT_TAG = "tag:yaml.org,2002:float"
# YAML 1.2 core schema floats, plus 1.1's underscores and the .inf / .nan spellings PyYAML already reads.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names one key twice."""


class Loader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 floats and duplicate keys refused (see the module's docstring)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[object, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise DuplicateKeyError(None, None, f"key {key!r} is given twice: line {first} and line {line}",
                                            key_node.start_mark)
                seen[key] = line
        return super().construct_mapping(node, deep)


# Loader's own resolver table: the float rule is replaced for this class only, never for yaml.SafeLoader.
Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def load(text: str):
    """The value of one YAML document, read with `Loader`."""
    return yaml.load(text, Loader=Loader)  # noqa: S506 -- Loader is a SafeLoader


def problem(error: yaml.YAMLError) -> str:
    """One line: where and what, e.g. "line 4: key 'lr' is given twice: line 2 and line 4"."""
    mark = getattr(error, "problem_mark", None)
    what = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}: {what}" if mark is not None else what
