"""The grading harness: this file's source runs inside a fresh sandbox worker, not here.

:mod:`coding_gym.tasks.grading` sends it with ``run_tests(loads("<payload as JSON>"))``
appended. It runs the candidate program in a new ``__main__`` module, runs the tests, and
writes one line per test to fd 1: ``<nonce> <json record>``. The parent keeps only lines
that start with the nonce it chose for this grading and compares values itself.

Everything the harness relies on is bound before the candidate's code runs, so patching
``builtins``, ``json`` or ``sys`` from the candidate does not change how results are encoded
or written. Only the standard library is used.
"""

import builtins
import io
import json
import os
import sys
import types
from _json import encode_basestring_ascii

_write = os.write
loads = json.loads
_exec, _compile, _callable = exec, compile, callable
_type, _len, _repr = type, len, repr
_str, _int, _float, _bool = str, int, float, bool
_list, _tuple, _dict, _set, _frozenset, _bytes, _complex = (
    list, tuple, dict, set, frozenset, bytes, complex)
_INF = float("inf")
_MAX_MESSAGE = 300
_MAX_DEPTH = 200

# Type checks use ``is`` only: ``in`` and ``==`` would consult a metaclass's __eq__.


class NotPlainData(TypeError):
    """A result that is not built only of exact builtin types."""


def _encode(value, depth=0):
    """JSON text for ``value``, which must be built of exact JSON-able builtin types."""
    if depth > _MAX_DEPTH:
        raise NotPlainData(f"the result is nested more than {_MAX_DEPTH} levels deep")
    kind = _type(value)
    if value is None:
        return "null"
    if kind is _bool:
        return "true" if value else "false"
    if kind is _int:
        return _int.__repr__(value)
    if kind is _float:
        if value != value:
            return "NaN"
        if value == _INF or value == -_INF:
            return "Infinity" if value > 0 else "-Infinity"
        return _float.__repr__(value)
    if kind is _str:
        return encode_basestring_ascii(value)
    if kind is _list or kind is _tuple:
        return "[" + ",".join([_encode(item, depth + 1) for item in value]) + "]"
    if kind is _dict:
        parts = []
        for key, item in _dict.items(value):
            if _type(key) is not _str:
                raise NotPlainData(f"dict key of type {_type_name(key)}; JSON keys are strings")
            parts.append(encode_basestring_ascii(key) + ":" + _encode(item, depth + 1))
        return "{" + ",".join(parts) + "}"
    raise NotPlainData(f"a {_type_name(value)} is not JSON data")


def _plain_copy(value, depth=0):
    """A copy of ``value`` built only of exact builtin types, or NotPlainData."""
    if depth > _MAX_DEPTH:
        raise NotPlainData(f"the result is nested more than {_MAX_DEPTH} levels deep")
    kind = _type(value)
    if (value is None or kind is _bool or kind is _int or kind is _float or kind is _str
            or kind is _bytes or kind is _complex):
        return value
    if kind is _list:
        return [_plain_copy(item, depth + 1) for item in value]
    if kind is _tuple:
        return _tuple([_plain_copy(item, depth + 1) for item in value])
    if kind is _set or kind is _frozenset:
        return kind([_plain_copy(item, depth + 1) for item in value])
    if kind is _dict:
        return {_plain_copy(k, depth + 1): _plain_copy(v, depth + 1)
                for k, v in _dict.items(value)}
    raise NotPlainData(f"returned a {_type_name(value)}, which is not plain data")


def _type_name(value):
    name = _type.__dict__["__name__"].__get__(_type(value))
    return name if _type(name) is _str else "?"


def _describe(error):
    """``Type: message`` of an exception, whatever its ``__str__`` does."""
    try:
        text = _repr(error.code) if _type(error) is SystemExit else _str(error)
        if _type(text) is not _str:
            text = "<unprintable>"
    except BaseException:  # noqa: BLE001 - the candidate's exception may raise anything
        text = "<unprintable>"
    text = f"{_type_name(error)}: {text}"
    return text if _len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 3] + "..."


class _Sink(io.RawIOBase):
    """A write-only byte stream that keeps the first ``cap`` bytes."""

    def __init__(self, cap):
        self.cap = cap
        self.parts = []
        self.size = 0

    def writable(self):
        return True

    def write(self, data):
        data = _bytes(data)
        room = self.cap - self.size
        if room > 0:
            self.parts.append(data[:room])
            self.size += _len(data[:room])
        return _len(data)

    def value(self):
        return b"".join(self.parts)


def _text_stream(raw):
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors="replace",
                            write_through=True)


def _fresh_main():
    module = types.ModuleType("__main__")
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    return module.__dict__


def run_tests(payload):
    """Grade ``payload["program"]`` on ``payload["tests"]``; see the module docstring."""
    nonce = payload["nonce"]
    cap = payload["max_output_bytes"]
    real = (sys.stdout, sys.stderr, sys.stdin)

    def emit(record):
        data = ("\n" + nonce + " " + _encode(record) + "\n").encode("ascii")
        while data:
            data = data[_write(1, data):]

    def isolate(stdin_text=""):
        """Point the standard streams at buffers while candidate code runs."""
        sink = _Sink(cap)
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin_text.encode("utf-8")), encoding="utf-8")
        sys.stdout = _text_stream(sink)
        sys.stderr = _text_stream(_Sink(cap))
        return sink

    def restore():
        sys.stdout, sys.stderr, sys.stdin = real

    tests = payload["tests"]
    try:
        program = _compile(payload["program"], "<program>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as e:
        _fail_all(tests, emit, f"the program does not compile: {_describe(e)}")
        emit({"done": True})
        return
    io_tests = [t for t in tests if t["kind"] == "io"]
    other = [t for t in tests if t["kind"] != "io"]
    for test in io_tests:
        emit(_run_io(program, test, isolate, restore))
    if other:
        _run_function_tests(payload, program, other, emit, isolate, restore)
    emit({"done": True})


def _run_io(program, test, isolate, restore):
    sink = isolate(test["stdin"])
    status, error = 0, None
    try:
        _exec(program, _fresh_main())
    except SystemExit as e:
        code = e.code
        status = 0 if code is None else code if _type(code) is _int else 1
        if status:
            error = f"exited with status {status}"
    except Exception as e:  # noqa: BLE001 - the program's own failure is the test's result
        status, error = 1, _describe(e)
    finally:
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001 - the program may have closed its stdout
            pass
        restore()
    stdout = sink.value().decode("utf-8", errors="replace")
    return {"i": test["i"], "stdout": stdout, "status": status, "error": error}


def _run_function_tests(payload, program, tests, emit, isolate, restore):
    entry_point = payload["entry_point"]
    namespace = _fresh_main()
    isolate()
    try:
        try:
            _exec(program, namespace)
        except SystemExit as e:
            return _fail_all(tests, emit, f"the program exited ({_describe(e)}) "
                                          "before the tests ran")
        except Exception as e:  # noqa: BLE001
            return _fail_all(tests, emit, f"the program raised {_describe(e)}")
        function = namespace.get(entry_point)
        if not _callable(function):
            return _fail_all(tests, emit, f"the program defines no function {entry_point!r}")

        def candidate(*args, **kwargs):
            return _plain_copy(function(*args, **kwargs))

        test_namespace = _dict(namespace)
        test_namespace["candidate"] = candidate
        test_namespace[entry_point] = candidate
        setup_error = None
        if payload["setup"]:
            try:
                _exec(_compile(payload["setup"], "<setup>", "exec"), test_namespace)
            except Exception as e:  # noqa: BLE001
                setup_error = f"the test setup raised {_describe(e)}"
        for test in tests:
            if test["kind"] == "call":
                emit(_call(function, test))
            elif setup_error is not None:
                emit({"i": test["i"], "passed": False, "error": setup_error})
            else:
                emit(_check(test, test_namespace))
    finally:
        restore()


def _call(function, test):
    try:
        value = function(*test["args"])
    except (Exception, SystemExit) as e:  # noqa: BLE001
        return {"i": test["i"], "error": f"raised {_describe(e)}"}
    try:
        # Encoded here, so a result that is not JSON data fails this test alone; the trusted
        # parent decodes the text and compares it with the expected value.
        return {"i": test["i"], "value_json": _encode(value)}
    except NotPlainData as e:
        return {"i": test["i"], "error": _str(e.args[0])}
    except RecursionError:
        return {"i": test["i"], "error": "the result is nested too deeply or contains itself"}


def _check(test, namespace):
    try:
        _exec(_compile(test["code"], "<test>", "exec"), namespace)
    except (Exception, SystemExit) as e:  # noqa: BLE001
        return {"i": test["i"], "passed": False, "error": _describe(e)}
    return {"i": test["i"], "passed": True}


def _fail_all(tests, emit, message):
    for test in tests:
        emit({"i": test["i"], "passed": False, "error": message})
