"""BFCL's schema vocabulary: its type names, what they mean, and checks against schemas.

BFCL writes function schemas with its own type names ("dict", "float",
"tuple", "any"), not JSON Schema's. Three readers need them, each its own way:

* the scorer (``scoring``) judges values as BFCL's official checker does:
  ``python_type`` is its PYTHON_TYPE_MAPPING, quirks included ("any" is a str);
* the prompt (``prompts``) shows the model JSON Schema names, as BFCL's own
  harness does for native tool-calling models: ``to_json_schema``;
* validation and best-of-N ask whether a schema is well formed
  (``function_problem``) and whether a parsed call fits the offered schemas
  (``call_problem``), a plain runtime check that knows nothing of the answer.

Standard library only, like the scorer.
"""

# BFCL type name -> the Python type the official checker compares with ``type(x) == T``.
PYTHON_TYPES = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
# Types whose items are typed too (``items.type``).
NESTED_TYPES = ("array", "tuple")
# BFCL type name -> JSON Schema name, where they differ.
JSON_SCHEMA_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": "string"}


def python_type(bfcl_type):
    """The Python type BFCL's checker expects for ``bfcl_type``; ValueError for an unknown name."""
    try:
        return PYTHON_TYPES[bfcl_type]
    except KeyError:
        raise ValueError(f"unsupported BFCL parameter type {bfcl_type!r}") from None


def retyped(schema, names):
    """``schema`` (recursively) with each ``"type"`` name found in ``names`` replaced by its value."""
    if isinstance(schema, dict):
        out = {k: retyped(v, names) for k, v in schema.items()}
        if isinstance(schema.get("type"), str):
            out["type"] = names.get(schema["type"], schema["type"])
        return out
    if isinstance(schema, list):
        return [retyped(v, names) for v in schema]
    return schema


def to_json_schema(schema):
    """A BFCL schema (recursively) with JSON Schema type names, for what the model is shown."""
    return retyped(schema, JSON_SCHEMA_TYPES)


def function_problem(fn):
    """What is wrong with one BFCL function schema (``schema:<reason>``), or None."""
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        return "schema:no_name"
    params = fn.get("parameters")
    if not isinstance(params, dict) or not isinstance(params.get("properties"), dict):
        return "schema:no_properties"
    props = params["properties"]
    for spec in props.values():
        if not isinstance(spec, dict) or spec.get("type") not in PYTHON_TYPES:
            return "schema:bad_type"
        if spec["type"] in NESTED_TYPES and not isinstance(spec.get("items", {}).get("type"), str):
            return "schema:array_without_item_type"
    required = params.get("required", [])
    if not isinstance(required, list) or any(r not in props for r in required):
        return "schema:required_not_in_properties"
    return None


def value_fits(value, spec):
    """Whether ``value`` has the type ``spec`` names, as a caller of the function would see it.

    Laxer than the scorer on purpose (this judges "would it run", not "is it
    BFCL-correct"): an int passes for a float, "any" and unknown types accept
    anything. A bool is never a number, although Python makes it an int.
    """
    name = spec.get("type")
    if name not in PYTHON_TYPES or name == "any":
        return True
    allowed = (PYTHON_TYPES[name], int) if name == "float" else (PYTHON_TYPES[name],)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        return False
    if isinstance(value, list) and isinstance(spec.get("items"), dict):
        return all(value_fits(item, spec["items"]) for item in value)
    return True


def call_problem(call, functions):
    """What makes one parsed call (``{"name", "arguments"}``) unfit for the offered schemas, or None."""
    fn = next((f for f in functions if f["name"] == call["name"]), None)
    if fn is None:
        return "schema:unknown_function"
    params = fn.get("parameters", {})
    props = params.get("properties", {})
    if any(r not in call["arguments"] for r in params.get("required", [])):
        return "schema:missing_required"
    for name, value in call["arguments"].items():
        if name not in props:
            return "schema:unknown_parameter"
        if not value_fits(value, props[name]):
            return "schema:wrong_type"
    return None
