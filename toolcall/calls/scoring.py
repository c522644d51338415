"""Score parsed tool calls against BFCL's possible answers, as BFCL does.

This mirrors ``bfcl_eval/eval_checker/ast_eval/ast_checker.py`` of bfcl-eval
2026.3.23 (the Python-language path, with no model-specific renaming of
function names): the verdict *and* the ``error_type`` string are the official
ones on any input, which ``tests/test_scoring.py`` checks against the real
checker over the BFCL data. Its quirks are kept on purpose, because a score
that differs from the leaderboard's is not comparable with it. The main ones:

* types are compared with ``type(x) == T``, so ``True`` is not an integer; an
  int is accepted for a ``float`` parameter (converted first), a float is not
  accepted for an ``integer`` one; a tuple counts as a list for ``tuple``;
  ``any`` means ``str``;
* a value whose type differs from the schema's still passes the type check
  when it has the type of the first non-empty allowed value ("is_variable");
  it is then compared by plain Python equality (so ``1 == 1.0 == True``);
* strings (also inside lists and dicts, one level deep) are compared after
  ``_standardize``: no spaces or ``,./-_*^``, lower case, ``'`` as ``"``;
* array items are type-checked one level deep, and that check passes outright
  when any allowed value is not a list (such as ``""``, "may be omitted");
* ``simple`` checks the first offered function and wants exactly one call;
  ``multiple`` wants as many calls as answers but checks only the first;
  ``parallel*`` matches calls to answers greedily, in answer order, whatever
  the call order.

Where the official code would crash, this module does not:

* a call to a function that is not offered is just a wrong call (the official
  code never looks the call's name up, so this agrees with it);
* malformed arguments (calls that are not ``{"name": str, "arguments": dict}``,
  an empty or oddly shaped ground truth, a ground-truth function missing from
  ``functions``, an unknown BFCL type) raise ``ValueError``: they are bugs in
  the data or the caller, not model errors;
* a list-of-dict value whose item is not a dict, reaching the dict comparison
  (possible only when an allowed value is not a list of dicts), is invalid
  with ``type_error:nested`` where the official code raises AttributeError.

Allowed values BFCL's code cannot handle (say a number among the allowed
values of a list parameter) raise here as they do there; the BFCL data has
none.

Standard library only (with ``schema``), so the scorer can run anywhere.
"""

import re
from dataclasses import dataclass

from toolcall.calls.schema import NESTED_TYPES, python_type

__all__ = ["CheckResult", "check", "to_bfcl_output"]


@dataclass(frozen=True)
class CheckResult:
    valid: bool
    error_type: str | None = None  # None exactly when valid
    error: str | None = None  # human-readable message


_VALID = CheckResult(True)


def _fail(error_type, error):
    return CheckResult(False, error_type, error)


def to_bfcl_output(calls):
    """``[{"name": n, "arguments": a}, ...]`` -> BFCL's decoded form ``[{n: a}, ...]``."""
    return [{call["name"]: call["arguments"]} for call in calls]


def check(functions, calls, ground_truth, category):
    """Judge ``calls`` (``[{"name", "arguments"}]``) like BFCL's AST checker.

    ``functions`` are the offered BFCL schemas, ``ground_truth`` BFCL's
    possible answers (``[{fn: {param: [allowed, ...]}}]``, ``""`` allowed
    meaning "may be omitted"). ``category`` picks the rule as BFCL does, by
    substring: "parallel" (also parallel_multiple), else "multiple", else
    "simple"; so BFCL's own names such as "simple_python" work too.
    """
    _validate(functions, calls, ground_truth)
    output = to_bfcl_output(calls)
    if "parallel" in category:
        return _parallel_check(functions, output, ground_truth)
    if "multiple" in category:
        return _multiple_check(functions, output, ground_truth)
    if "simple" in category:
        if len(output) != 1:
            return _fail("simple_function_checker:wrong_count", "Wrong number of functions.")
        # BFCL checks the first offered function here, not the answer's one.
        return _simple_check(functions[0], output[0], ground_truth[0])
    raise ValueError(f"unknown category {category!r}: expected simple, multiple, parallel or parallel_multiple")


def _validate(functions, calls, ground_truth):
    for call in calls:
        if not (
            isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict)
        ):
            raise ValueError(f"a call must be {{'name': str, 'arguments': dict}}, got {call!r}")
    if not isinstance(ground_truth, list) or not ground_truth:
        raise ValueError(f"ground truth must be a non-empty list, got {ground_truth!r}")
    offered = {f["name"] for f in functions}
    for answer in ground_truth:
        if not (isinstance(answer, dict) and len(answer) == 1):
            raise ValueError(f"each ground-truth entry must be {{function: {{param: [values]}}}}, got {answer!r}")
        ((name, params),) = answer.items()
        if name not in offered:
            raise ValueError(f"ground-truth function {name!r} is not among the offered functions {sorted(offered)}")
        if not isinstance(params, dict) or not all(isinstance(v, list) for v in params.values()):
            raise ValueError(f"ground truth of {name!r} must map each parameter to a list of allowed values")


def _find_description(functions, name):
    return next(f for f in functions if f["name"] == name)  # present: checked by _validate


#### Category rules ####


def _multiple_check(functions, output, ground_truth):
    if len(output) != len(ground_truth):
        return _fail("multiple_function_checker:wrong_count", "Wrong number of functions.")
    # BFCL's "multiple" has one answer; only the first call/answer pair is checked.
    (name,) = ground_truth[0]
    return _simple_check(_find_description(functions, name), output[0], ground_truth[0])


def _parallel_check(functions, output, ground_truth):
    """BFCL's parallel_function_checker_no_order: greedy, first unmatched call that fits."""
    if len(output) != len(ground_truth):
        return _fail("parallel_function_checker_no_order:wrong_count", "Wrong number of functions.")
    matched = set()
    for i, answer in enumerate(ground_truth):
        (name,) = answer
        description = _find_description(functions, name)
        errors = []
        for index, item in enumerate(output):
            if index in matched:
                continue
            result = _simple_check(description, item, answer)
            if result.valid:
                matched.add(index)
                break
            errors.append(f"model result index {index}: {result.error_type}: {result.error}")
        else:  # lengths are equal, so there was at least one candidate and none fitted
            considered = [j for j in range(len(output)) if j not in matched]
            head = (
                f"Could not find a matching function among index {considered} of model output "
                f"for index {i} of possible answers."
            )
            return _fail("parallel_function_checker_no_order:cannot_find_match", " ".join([head, *errors]))
    return _VALID


#### One call against one answer ####


def _simple_check(description, output_item, answer):
    """BFCL's simple_function_checker: one decoded call ``{name: args}`` against one answer."""
    possible = next(iter(answer.values()))
    func_name = description["name"]
    properties = description["parameters"]["properties"]
    required = description["parameters"]["required"]

    if func_name not in output_item:
        return _fail("simple_function_checker:wrong_func_name", f"Function name {func_name!r} not found in model output.")
    arguments = output_item[func_name]

    for param in required:
        if param not in arguments:
            return _fail("simple_function_checker:missing_required", f"Missing required parameter: {param!r}.")

    for param, value in arguments.items():
        if param not in properties or param not in possible:
            return _fail("simple_function_checker:unexpected_param", f"Unexpected parameter: {param!r}.")
        allowed = possible[param]
        type_name = properties[param]["type"]
        expected = python_type(type_name)
        nested = python_type(properties[param]["items"]["type"]) if type_name in NESTED_TYPES else None

        # Answers went through JSON, where tuples become lists.
        if type_name == "tuple" and type(value) == tuple:
            value = list(value)
        # Python would accept an int where a float is expected.
        if type_name == "float" and type(value) == int:
            value = float(value)

        failure, is_variable = _type_check(param, value, allowed, type_name, expected, nested)
        if failure:
            return failure

        # A "variable" (value typed like the answer, not the schema) skips the
        # structured comparisons and falls through to plain equality.
        if not is_variable:
            if expected == dict:
                result = _dict_check(param, value, allowed)
            elif expected == list and nested == dict:
                result = _list_dict_check(param, value, allowed)
            elif expected == str:
                result = _string_check(param, value, allowed)
            elif expected == list:
                result = _list_check(param, value, allowed)
            else:
                result = None
            if result is not None:
                if not result.valid:
                    return result
                continue

        if value not in allowed:
            return _fail(
                "value_error:others", f"Invalid value for parameter {param!r}: {value!r}. Expected one of {allowed}."
            )

    for param, allowed in possible.items():
        if param not in arguments and "" not in allowed:
            return _fail(
                "simple_function_checker:missing_optional",
                f"Optional parameter {param!r} not provided and not marked as optional.",
            )
    return _VALID


def _answer_type(allowed):
    """Type of the first allowed value that is not "" (omission), or None."""
    for answer in allowed:
        if answer != "":
            return type(answer)
    return None


def _type_check(param, value, allowed, type_name, expected, nested):
    """BFCL's type_checker; returns ``(failure or None, is_variable)``."""
    answer_type = _answer_type(allowed)
    is_variable = answer_type is not None and answer_type != expected
    nested_failed = False

    if type(value) == expected:
        if nested is None:
            return None, is_variable
        # Items are checked against each allowed list in turn; an allowed value
        # that is not a list (e.g. "") accepts any items.
        for answer in allowed:
            if type(answer) != list or all(
                _type_check(param, item, answer, str(nested), nested, None)[0] is None for item in value
            ):
                return None, is_variable
        nested_failed = True

    # BFCL falls through here after a failed nested check as well.
    if answer_type is not None and type(value) == answer_type:
        if nested_failed:
            return _fail(
                "type_error:nested",
                f"Nested type checking failed for parameter {param!r}. Expected outer type {type_name} "
                f"with inner type {nested}. Parameter value: {value!r}.",
            ), True
        return None, True
    return _fail(
        "type_error:simple",
        f"Incorrect type for parameter {param!r}. Expected type {type_name}, got {type(value).__name__}. "
        f"Parameter value: {value!r}.",
    ), False


#### Value comparisons ####


def _standardize(text):
    """Forgive spacing, some punctuation, case and quote style (BFCL's standardize_string)."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _standardize_if_str(value):
    return _standardize(value) if type(value) == str else value


def _indexed(values):
    """``values`` read by index as BFCL does, so odd ground truths fail (or not) the same way."""
    return [values[i] for i in range(len(values))]


def _string_check(param, value, allowed):
    if _standardize(value) not in [_standardize(a) for a in allowed if type(a) == str]:
        return _fail(
            "value_error:string",
            f"Invalid value for parameter {param!r}: {value!r}. Expected one of {allowed}. Case insensitive.",
        )
    return _VALID


def _list_check(param, value, allowed):
    # Only top-level string items are standardized; an allowed "" becomes [],
    # so an empty list is then accepted.
    standardized = [_standardize_if_str(item) for item in value]
    if standardized not in [[_standardize_if_str(item) for item in _indexed(answer)] for answer in allowed]:
        return _fail(
            "value_error:list/tuple", f"Invalid value for parameter {param!r}: {value!r}. Expected one of {allowed}."
        )
    return _VALID


def _dict_check(param, value, allowed):
    """A dict against each allowed dict (``{key: [allowed values]}``); the last failure is reported."""
    result = _fail("dict_checker:unclear", f"No allowed value to compare parameter {param!r} with.")
    for answer in allowed:
        if answer == "":
            continue
        result = _dict_match(value, answer)
        if result.valid:
            return result
    return result


def _dict_match(value, answer):
    if type(value) != dict:  # official code crashes here (see module docstring)
        return _fail("type_error:nested", f"Expected a dict, got {type(value).__name__}: {value!r}.")
    failure = None
    for key, item in value.items():
        if key not in answer:
            failure = _fail("value_error:dict_key", f"Unexpected dict key parameter: {key!r}.")
            break
        allowed = [_standardize_if_str(a) for a in _indexed(answer[key])]
        if _standardize_if_str(item) not in allowed:
            failure = _fail(
                "value_error:dict_value", f"Invalid value for parameter {key!r}: {item!r}. Expected one of {allowed}."
            )
            break
    # BFCL runs this loop even after a failure above, so a missing key wins.
    for key, allowed in answer.items():
        if key not in value and "" not in allowed:
            failure = _fail("value_error:dict_key", f"Missing dict key parameter: {key!r}.")
            break
    return failure or _VALID


def _list_dict_check(param, value, allowed):
    """A list of dicts against each allowed list, item by item in order; the last failure is reported."""
    result = _fail("list_dict_checker:unclear", f"No allowed value to compare parameter {param!r} with.")
    for answer in allowed:
        if len(value) != len(answer):  # an allowed "" has length 0: only [] matches it
            result = _fail("value_error:list_dict_count", "Wrong number of dictionaries in the list.")
            continue
        for item, expected_item in zip(value, _indexed(answer)):
            result = _dict_check(param, item, [expected_item])
            if not result.valid:
                break
        else:
            return _VALID
    return result
