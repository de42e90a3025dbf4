"""Scoring structured output: is the answer JSON, has it exactly the expected keys, is every value right, and
does it follow a JSON Schema? The accuracy metric of "answer with a JSON object" tasks.

    score_json(answer_text, expected, schema=None)
      -> {"valid_json", "exact_keys", "all_correct", "schema_valid" (with a schema), "errors": [...]}

  valid_json   the answer starts with a JSON object (text after it is ignored: a model may add a newline or stop late)
  exact_keys   its keys are exactly the expected object's (no key missing, none extra)
  all_correct  it equals the expected object (every value right, no extra key)
  schema_valid it satisfies `schema`

Schemas. `validate_schema` checks the subset of JSON Schema that describes such answers: type (string, number,
integer, boolean, null, object, array, or a list of them), properties, required, additionalProperties (false or a
schema), enum, const, items, minimum / maximum, minLength / maxLength, minItems / maxItems. It is written here
rather than taken from the `jsonschema` package so that scoring needs no extra dependency; a keyword outside the
subset is reported once as unsupported instead of being silently ignored.
"""

from __future__ import annotations

import json
from typing import Optional

SUPPORTED = {"type", "properties", "required", "additionalProperties", "enum", "const", "items", "minimum", "maximum",
             "minLength", "maxLength", "minItems", "maxItems", "$schema", "title", "description", "$id", "default",
             "examples"}
TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,), "null": (type(None),),
         "object": (dict,), "array": (list,)}


def parse_json_object(text: str) -> Optional[dict]:
    """The JSON object a generation starts with (trailing text is ignored), or None if it is not one."""
    text = text.strip()
    try:
        obj, _ = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _is_type(value, name: str) -> bool:
    if isinstance(value, bool) and name in ("number", "integer"):
        return False  # JSON's true is not a number, though Python's bool is an int
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, TYPES[name])


def validate_schema(value, schema: dict, path: str = "$") -> list[str]:
    """The ways `value` breaks `schema` (the subset above), one message each; [] when it is valid."""
    errors = []
    unknown = set(schema) - SUPPORTED
    if unknown:
        errors.append(f"{path}: schema keyword(s) {', '.join(sorted(unknown))} not supported by lora_lab's validator")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            return errors + [f"{path}: {json.dumps(value)} is not of type {' or '.join(names)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {json.dumps(value)} is not one of {json.dumps(schema['enum'])}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: {json.dumps(value)} is not {json.dumps(schema['const'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} is less than the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} is more than the maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{path}: the required key {key!r} is missing")
        for key, item in value.items():
            if key in props:
                errors += validate_schema(item, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: the key {key!r} is not allowed")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate_schema(item, schema["additionalProperties"], f"{path}.{key}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: more than {schema['maxItems']} items")
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                errors += validate_schema(item, schema["items"], f"{path}[{i}]")
    return errors


def score_json(answer: str, expected, schema: Optional[dict] = None) -> dict:
    """One answer's scores (see the module docstring); `expected` is the expected object or its JSON text."""
    if isinstance(expected, str):
        expected = json.loads(expected)
    obj = parse_json_object(answer)
    row = {"valid_json": obj is not None, "exact_keys": False, "all_correct": False, "errors": []}
    if schema is not None:
        row["schema_valid"] = False
    if obj is None:
        row["errors"].append("not a JSON object")
        return row
    missing, extra = sorted(set(expected) - set(obj)), sorted(set(obj) - set(expected))
    row["exact_keys"] = not missing and not extra
    if missing:
        row["errors"].append(f"missing key(s) {', '.join(missing)}")
    if extra:
        row["errors"].append(f"extra key(s) {', '.join(extra)}")
    wrong = [k for k in expected if k in obj and obj[k] != expected[k]]
    if wrong:
        row["errors"].append("wrong value(s): " + ", ".join(f"{k}={json.dumps(obj[k])} (expected "
                                                             f"{json.dumps(expected[k])})" for k in wrong))
    row["all_correct"] = obj == expected
    if schema is not None:
        schema_errors = validate_schema(obj, schema)
        row["schema_valid"] = not schema_errors
        row["errors"] += [f"schema: {e}" for e in schema_errors]
    return row


def summarize(rows: list[dict]) -> dict:
    """Shares of the rows that are valid JSON, have exactly the keys, are all correct (and schema-valid)."""
    n = max(len(rows), 1)
    keys = ["valid_json", "exact_keys", "all_correct"] + (["schema_valid"] if rows and "schema_valid" in rows[0] else [])
    return {"n": len(rows), **{k: sum(bool(r[k]) for r in rows) / n for k in keys}}
