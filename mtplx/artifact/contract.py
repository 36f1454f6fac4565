"""The runtime contract ``mtplx_runtime.json``: parse, validate, write.

A contract says what an artifact is (architecture, trunk quantization), where its MTP sidecar
lives and how it is stored, the conventions the head was trained with, where it came from
(with hashes that tie the sidecar to its trunk) and the decoding defaults. Validation is the
JSON Schema in ``runtime_contracts/schema.json`` plus the semantic checks a schema cannot say.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import jsonschema

from mtplx.errors import ContractError
from mtplx.artifact.catalog import schema

CONTRACT_FILE = "mtplx_runtime.json"
SIDECAR_DEFAULT_PATH = "mtp/weights.safetensors"
FORMAT = "mtplx-runtime"
FORMAT_VERSION = 1
MAX_DEPTH = 8


@dataclass
class RuntimeContract:
    """A validated contract. ``data`` is the JSON document; ``inferred`` lists what was not
    stated by the file and had to be inferred (only for artifacts of other runtimes)."""

    data: dict[str, Any]
    path: Path | None = None
    inferred: list[str] = field(default_factory=list)
    # Weight fixes applied when loading a sidecar of another runtime (e.g. a norm shift).
    sidecar_transforms: list[Callable[[dict], dict]] = field(default_factory=list)

    @property
    def model_type(self) -> str:
        return self.data["architecture"]["model_type"]

    @property
    def sidecar_path(self) -> str:
        return self.data["sidecar"]["path"]

    @property
    def hidden_source(self) -> str:
        return self.data["conventions"]["hidden_source"]

    @property
    def chain_hidden(self) -> str:
        return self.data["conventions"]["chain_hidden"]

    @property
    def defaults(self) -> dict[str, Any]:
        return self.data["defaults"]

    @property
    def provenance(self) -> dict[str, Any]:
        return self.data["provenance"]

    @property
    def trunk_quantization(self) -> dict[str, Any]:
        return self.data["trunk"]["quantization"]

    @property
    def sidecar_quantization(self) -> dict[str, Any]:
        return self.data["sidecar"]["quantization"]


def quantization_of_trunk(trunk_dir: str | Path) -> dict[str, Any]:
    """The contract's ``trunk.quantization`` section, read from an MLX trunk's config.json."""
    config = json.loads((Path(trunk_dir) / "config.json").read_text(encoding="utf-8"))
    q = config.get("quantization")
    if q:
        return {"mode": q.get("mode", "affine"), "bits": q["bits"], "group_size": q["group_size"]}
    return {"mode": "none", "bits": 16, "dtype": "bfloat16"}


def text_config_digest(text_config: dict[str, Any]) -> str:
    """sha256 of the text config's canonical JSON: the architecture fingerprint."""
    canonical = json.dumps(text_config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _field_name(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else "?"
        parts.append(missing)
    return ".".join(parts) or "(top level)"


def _schema_fix(error: jsonschema.ValidationError) -> str:
    v = error.validator
    if v == "required":
        return "add the missing field (runtime_contracts/schema.json lists every field), or rebuild the artifact with `mtplx graft`"
    if v == "enum":
        return f"use one of {', '.join(json.dumps(x) for x in error.validator_value)}"
    if v == "const":
        return f"it must be {json.dumps(error.validator_value)}"
    if v == "pattern":
        return "a sha256 is 64 lowercase hex digits; rebuild the artifact with `mtplx graft` to recompute it"
    if v == "additionalProperties":
        return "remove the unknown field or check its spelling against runtime_contracts/schema.json"
    if v == "type":
        return f"give it a value of type {error.validator_value}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"keep it within the schema's bound ({v} {error.validator_value})"
    return "edit it to match runtime_contracts/schema.json, or rebuild the artifact with `mtplx graft`"


def _semantic_problems(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Checks a JSON Schema cannot express: (field, problem, fix)."""
    problems = []
    sidecar = PurePosixPath(data["sidecar"]["path"])
    if sidecar.is_absolute() or ".." in sidecar.parts:
        problems.append(("sidecar.path", f"'{sidecar}' must be a path inside the artifact directory",
                         f"use a relative path such as '{SIDECAR_DEFAULT_PATH}'"))
    if sidecar.suffix != ".safetensors":
        problems.append(("sidecar.path", f"'{sidecar}' is not a .safetensors file",
                         "point it at the sidecar's safetensors file"))
    q = data["sidecar"]["quantization"]
    overlap = set(q["quantized"]) & set(q["unquantized"])
    if overlap:
        problems.append(("sidecar.quantization", f"{sorted(overlap)[0]} is listed as both quantized and unquantized",
                         "list every tensor once"))
    if q["scheme"] == "body-int4" and (q["bits"], q["mode"]) != (4, "affine"):
        problems.append(("sidecar.quantization", "scheme body-int4 requires bits 4 and mode affine",
                         "set bits to 4 and mode to \"affine\""))
    if any(n.startswith("mtp.fc") or "norm" in n.rsplit(".", 1)[-1] for n in q["quantized"]):
        problems.append(("sidecar.quantization.quantized", "mtp.fc and the norms must stay bf16",
                         "move them to 'unquantized' and rebuild the sidecar with `mtplx graft`"))
    tq = data["trunk"]["quantization"]
    if tq["mode"] == "affine" and ("group_size" not in tq or tq["bits"] not in (4, 8)):
        problems.append(("trunk.quantization", "an affine-quantized trunk needs bits 4 or 8 and a group_size",
                         "copy bits and group_size from the trunk's config.json 'quantization' entry"))
    if tq["mode"] == "none" and tq["bits"] != 16:
        problems.append(("trunk.quantization.bits", "an unquantized trunk has bits 16", "set bits to 16"))
    for name, value in _numbers(data):
        if isinstance(value, float) and not math.isfinite(value):
            problems.append((name, f"{value} is not a finite number", "give it a finite value"))
    d = data["defaults"]
    if d["depth"] > MAX_DEPTH:
        problems.append(("defaults.depth", f"depth {d['depth']} is above the maximum {MAX_DEPTH}",
                         f"choose a depth between 0 and {MAX_DEPTH}"))
    return problems


def _numbers(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted field, value) of every number in a document (NaN compares false with every
    schema bound, so the schema alone lets it through)."""
    if isinstance(node, dict):
        return [n for k, v in node.items() for n in _numbers(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [n for i, v in enumerate(node) for n in _numbers(v, f"{prefix}{i}.")]
    return [(prefix.rstrip("."), node)] if isinstance(node, (int, float)) and not isinstance(node, bool) else []


def validate(data: Any, path: str | Path = CONTRACT_FILE) -> None:
    """Raise :class:`ContractError` naming the file, the field and the fix, or return."""
    if not isinstance(data, dict):
        raise ContractError("the contract must be a JSON object", path=path,
                            fix="rebuild the artifact with `mtplx graft`")
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(list(e.absolute_path)), str(e.message)))
    if errors:
        e = errors[0]
        more = f" ({len(errors) - 1} more problem(s) after this one)" if len(errors) > 1 else ""
        message = e.message if len(e.message) <= 200 else e.message[:200] + "..."  # a 4,000-digit value stays one line
        raise ContractError(f"field '{_field_name(e)}' is invalid: {message}{more}", path=path,
                            fix=_schema_fix(e))
    problems = _semantic_problems(data)
    if problems:
        name, problem, fix = problems[0]
        raise ContractError(f"field '{name}' is invalid: {problem}", path=path, fix=fix)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str, path: str | Path = CONTRACT_FILE) -> Any:
    """The JSON document, or one line naming the file: malformed JSON, NaN or Infinity, an
    integer too long for Python to read (over 4,300 digits), nesting too deep to parse."""
    fix = "repair the JSON or rebuild the artifact with `mtplx graft`"
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ContractError(f"not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", path=path, fix=fix) from None
    except RecursionError:
        raise ContractError("the JSON is nested too deeply to read", path=path, fix=fix) from None
    except ValueError as e:  # NaN/Infinity, or an integer over sys.get_int_max_str_digits()
        raise ContractError(f"not a valid contract ({str(e).split(':')[0]})", path=path, fix=fix) from None


def read_json(file: str | Path) -> Any:
    """:func:`parse_json` of a file that must be UTF-8 text."""
    try:
        text = Path(file).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ContractError("no runtime contract here", path=file,
                            fix="build an artifact with `mtplx graft --source CHECKPOINT --out DIR`") from None
    except UnicodeDecodeError as e:
        raise ContractError(f"not UTF-8 text (byte {e.start})", path=file,
                            fix="repair the file or rebuild the artifact with `mtplx graft`") from None
    except OSError as e:
        raise ContractError(f"cannot be read ({e.strerror or e})", path=file, fix="check the file's permissions") from None
    return parse_json(text, file)


def parse(text: str, path: str | Path = CONTRACT_FILE) -> RuntimeContract:
    data = parse_json(text, path)
    validate(data, path)
    return RuntimeContract(data=data, path=Path(path))


def read(artifact_dir: str | Path) -> RuntimeContract:
    """Read and validate ``<artifact_dir>/mtplx_runtime.json`` (format version 1 only)."""
    path = Path(artifact_dir) / CONTRACT_FILE
    data = read_json(path)
    validate(data, path)
    return RuntimeContract(data=data, path=path)


def write(contract: RuntimeContract | dict[str, Any], artifact_dir: str | Path) -> Path:
    """Validate, then write the contract as stable, human-readable JSON."""
    data = contract.data if isinstance(contract, RuntimeContract) else contract
    path = Path(artifact_dir) / CONTRACT_FILE
    validate(data, path)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
