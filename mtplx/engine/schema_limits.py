"""What a JSON Schema must satisfy before the grammar engine sees it: bounded nesting, patterns
whose automata stay small, and a language that holds at least one value.

Each check answers a failure that otherwise comes late or badly:

* nesting: jsonschema's metaschema check and llguidance both recurse over the schema, so a
  schema nested a few hundred levels raised ``RecursionError`` (a 500 with a long traceback in
  the server). The depth is measured here without recursion and refused past
  :data:`MAX_SCHEMA_DEPTH`.
* patterns: llguidance builds a regex's automaton lazily, while decoding, so a counted
  repetition such as ``b{1000000}`` compiled fine and failed mid-generation (mid-stream when
  streaming) with "too many expressions constructed". Measured on llguidance 1.9.1 with the
  demo's tokenizer (masks computed every token): ``^(a|a)*b{N}$`` costs 0.5 ms per token at
  N = 2,000, 2 ms at 10,000, 7 ms at 30,000 and fails after about 50 tokens at 100,000; so
  the counts of a pattern, multiplied through nested groups, must stay within
  :data:`MAX_PATTERN_REPEAT`. (``maxLength`` and ``minLength`` are handled natively by
  llguidance and cost nothing like this: long strings are bounded with them.)
* a value must exist: a ``$ref`` that points at itself, or an object that requires a property
  whose schema requires the object again, describes no finite JSON value. llguidance accepts
  such a schema, and decoding then emits only end-of-sequence (an empty, unparseable answer)
  or nests until max_tokens. Which subschemas can produce a value is computed as a least
  fixpoint over the ``$ref`` graph, conservatively: a keyword this module does not model
  never makes a schema count as empty, so no schema that has a value is refused.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator
from urllib.parse import unquote

# Nesting of the schema document (objects and arrays inside each other). 64 is about 31
# levels of {"type": "object", "properties": {...}} (OpenAI's structured outputs allow 10);
# jsonschema and llguidance each overflow somewhere past 100.
MAX_SCHEMA_DEPTH = 64
# The product of a pattern's counted repetitions through nested groups (see the module doc).
MAX_PATTERN_REPEAT = 1000

# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = ("additionalProperties", "items", "additionalItems", "contains", "propertyNames", "not", "if", "then",
        "else", "unevaluatedItems", "unevaluatedProperties")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def check(schema: Any, fail: Callable[[str, str], Exception]) -> None:
    """Raise ``fail(message, fix)`` for the first limit ``schema`` breaks (depth first: the
    other checks walk the schema, and it bounds them)."""
    depth = nesting(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise fail(f"is nested {depth} levels deep (objects and arrays inside each other); mtplx takes at most "
                   f"{MAX_SCHEMA_DEPTH}", "flatten the schema, or move repeated parts into $defs and $ref them")
    for where, pattern in _patterns(schema):
        weight = pattern_repeat(pattern)
        if weight > MAX_PATTERN_REPEAT:
            raise fail(f"has a pattern at {where} whose counted repetitions reach {weight} characters; mtplx takes "
                       f"at most {MAX_PATTERN_REPEAT} (the grammar engine builds such patterns while decoding)",
                       "bound long strings with maxLength/minLength instead of {n} counts in the pattern")
    if not Values(schema).possible(schema):
        raise fail("describes no JSON value at all (e.g. a $ref that leads back to itself before any value, or a "
                   "required property whose schema requires its parent again), so nothing could be generated",
                   "give the recursion a way out, e.g. make the recursive property optional")


def nesting(value: Any) -> int:
    """How deep objects and arrays nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def _subschemas(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    if not isinstance(node, dict):
        return
    for key in _ONE:
        if isinstance(node.get(key), (dict, bool)):
            yield f"{where}/{key}", node[key]
    for key in _MANY + ("items",):
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                yield f"{where}/{key}/{i}", sub
    for key in _MAP:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                yield f"{where}/{key}/{name}", sub


def _patterns(schema: Any) -> Iterator[tuple[str, str]]:
    """(where, regex) for every ``pattern`` and ``patternProperties`` name in the schema."""
    stack = [("#", schema)]
    while stack:
        where, node = stack.pop()
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("pattern"), str):
            yield f"{where}/pattern", node["pattern"]
        if isinstance(node.get("patternProperties"), dict):
            for name in node["patternProperties"]:
                yield f"{where}/patternProperties", name
        stack.extend(_subschemas(node, where))


_COUNT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def pattern_repeat(pattern: str) -> int:
    """The largest number of characters a pattern's counted repetitions ask for: each ``{m}``,
    ``{m,}`` or ``{m,n}`` multiplies the atom before it by its largest bound, through nested
    groups, and alternatives and sequences add up (an upper bound, cheap to compute)."""
    frames = [[0, 0]]  # per open group: [total so far, weight of the last atom]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        top = frames[-1]
        if c == "\\":
            top[0] += top[1]
            top[1] = 1
            i += 2
            continue
        if c == "[":  # a character class is one atom; skip to its closing bracket
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            top[0] += top[1]
            top[1] = 1
            i = j + 1
            continue
        if c == "(":
            frames.append([0, 0])
            i += 1
            continue
        if c == ")" and len(frames) > 1:
            inner = frames.pop()
            group = inner[0] + inner[1]
            top = frames[-1]
            top[0] += top[1]
            top[1] = max(group, 1)
            i += 1
            continue
        if c == "{":
            m = _COUNT.match(pattern, i)
            if m:
                low, high = int(m.group(1)), m.group(2)
                bound = max(low, int(high)) if high else low
                top[1] *= max(bound, 1)
                i = m.end()
                continue
        if c == "|":
            top[0] += top[1]
            top[1] = 0
            i += 1
            continue
        if c in "*+?^$":
            i += 1
            continue
        top[0] += top[1]
        top[1] = 1
        i += 1
    while len(frames) > 1:  # an unclosed group: the regex compiler reports it; bound what is there
        inner = frames.pop()
        frames[-1][1] += inner[0] + inner[1]
    return frames[0][0] + frames[0][1]


class Values:
    """Which subschemas of one document can produce a finite JSON value (see the module doc).
    Only local ``$ref`` ("#", "#/$defs/a", any JSON pointer) is followed; another reference
    counts as able to produce a value."""

    def __init__(self, root: Any):
        self.root = root
        self.known: dict[int, bool] = {}  # ref target -> has a value (the fixpoint, from False up)

    def possible(self, schema: Any) -> bool:
        targets = {id(t): t for t in self._ref_targets()}
        self.known = {k: False for k in targets}
        changed = True
        while changed:
            changed = False
            for key, target in targets.items():
                if not self.known[key] and self._has_value(target):
                    self.known[key] = changed = True
        return self._has_value(schema)

    def resolve(self, ref: str) -> Any:
        if ref == "#":
            return self.root
        if not ref.startswith("#/"):
            return None
        node = self.root
        for part in ref[2:].split("/"):
            part = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def _ref_targets(self) -> Iterator[Any]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("$ref"), str):
                    target = self.resolve(node["$ref"])
                    if isinstance(target, (dict, bool)):
                        yield target
                stack.extend(sub for _, sub in _subschemas(node, ""))

    def _has_value(self, node: Any) -> bool:
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            return True
        if isinstance(node.get("$ref"), str):
            target = self.resolve(node["$ref"])
            if isinstance(target, (dict, bool)) and not self.known.get(id(target), True):
                return False
        if isinstance(node.get("enum"), list) and not node["enum"]:
            return False
        if "const" in node or node.get("enum"):
            return True  # the value is given; whether it fits the rest is llguidance's check
        if isinstance(node.get("allOf"), list) and not all(self._has_value(s) for s in node["allOf"]):
            return False
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and not any(self._has_value(s) for s in node[key]):
                return False
        kinds = node.get("type")
        if kinds is None:
            return True  # any type: a string or a number always exists
        kinds = kinds if isinstance(kinds, list) else [kinds]
        return any(self._type_has_value(node, k) for k in kinds)

    def _type_has_value(self, node: dict, kind: Any) -> bool:
        if kind == "object":
            props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
            # A required name outside ``properties`` may match a patternProperties regex (not
            # modelled here: count it as possible) or else falls to additionalProperties.
            extra = True if node.get("patternProperties") else node.get("additionalProperties", True)
            for name in node.get("required") or []:
                sub = props.get(name, extra) if isinstance(name, str) else True
                if not self._has_value(sub):
                    return False
            return True
        if kind == "array":
            low = node.get("minItems", 0)
            low = low if isinstance(low, int) and not isinstance(low, bool) else 0
            prefix = node.get("prefixItems")
            items = node.get("items", True)
            if isinstance(items, list):  # draft 7: items as a tuple, then additionalItems
                prefix, items = items, node.get("additionalItems", True)
            prefix = prefix if isinstance(prefix, list) else []
            needed = prefix[:low] + ([items] if low > len(prefix) else [])
            if not all(self._has_value(s) for s in needed):
                return False
            contains, least = node.get("contains"), node.get("minContains", 1)
            return contains is None or least == 0 or self._has_value(contains)
        return True
