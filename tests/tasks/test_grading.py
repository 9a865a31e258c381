"""Grader: each kind of test, partial credit, failure messages, limits and infra errors."""

from __future__ import annotations

import pytest

from coding_gym.errors import BackendError
from coding_gym.models import ExecResult, Limits
from coding_gym.tasks import AssertTest, CallTest, Grader, IOTest, Task
from coding_gym.tasks.grading import _harness, grading_limits, json_equal, normalize_output

ADD = Task("t/add", "Define add(a, b).", (
    CallTest((1, 2), 3), CallTest((-1, 1), 0), CallTest(("a", "b"), "ab"),
), entry_point="add")

ECHO_SUM = Task("t/echo_sum", "Print the sum of the numbers on stdin.", (
    IOTest("1 2\n", "3\n"), IOTest("", "0"), IOTest("5 5 5", "15\n\n"),
))

SQUARE_ASSERTS = Task("t/square", "Define square(x).", (
    AssertTest("assert candidate(3) == 9"),
    AssertTest("assert square(-2) == 4"),
    AssertTest("assert abs(candidate(0.5) - HALF_SQUARED) < 1e-9"),
), entry_point="square", setup="HALF_SQUARED = 0.25")


@pytest.fixture(scope="module")
def grader():
    with Grader(limits=Limits(timeout_s=5.0)) as g:
        yield g


def test_call_tests_full_and_partial_credit(grader):
    assert grader.grade(ADD, "def add(a, b):\n    return a + b\n").fraction == 1.0
    report = grader.grade(ADD, "def add(a, b):\n    return a + b if a > 0 else 99\n")
    assert [r.passed for r in report.results] == [True, False, False]
    assert report.results[1].message == "wrong answer: returned 99"
    assert "TypeError" in report.results[2].message
    assert (report.passed, report.total, report.all_passed) == (1, 3, False)


def test_call_test_results_compare_as_json(grader):
    task = Task("t/pair", "p", (CallTest((1,), [1, 2]), CallTest((0,), False)),
                entry_point="f")
    report = grader.grade(task, "def f(x):\n    return (1, 2) if x else 0\n")
    assert [r.passed for r in report.results] == [True, False]


def test_expected_value_never_reaches_the_sandbox(grader):
    task = Task("t/secret", "p", (CallTest((), "s3cr3t-answer"),), entry_point="f")
    program = ("import sys\n"
               "def f():\n"
               "    return 'found' if 's3cr3t-answer' in open('/proc/self/cmdline').read() "
               "+ str(sys.argv) + repr(globals()) else 'absent'\n")
    report = grader.grade(task, program)
    assert report.results[0].message == 'wrong answer: returned "absent"'


def test_program_that_does_not_compile(grader):
    report = grader.grade(ADD, "def add(a, b) return a")
    assert report.fraction == 0.0
    assert report.results[0].message.startswith("the program does not compile: SyntaxError")


def test_program_without_the_entry_point(grader):
    report = grader.grade(ADD, "def plus(a, b):\n    return a + b\n")
    assert report.results[0].message == "the program defines no function 'add'"


def test_program_that_raises_at_import(grader):
    report = grader.grade(ADD, "def add(a, b):\n    return a + b\n1/0\n")
    assert report.results[0].message == "the program raised ZeroDivisionError: division by zero"


def test_io_tests_compare_output_ignoring_trailing_whitespace(grader):
    program = "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))   \n"
    assert grader.grade(ECHO_SUM, program).fraction == 1.0
    report = grader.grade(ECHO_SUM, "print(input())")
    assert [r.passed for r in report.results] == [False, False, False]
    assert report.results[0].message == "wrong output: printed '1 2\\n'"
    assert report.results[1].message == "EOFError: EOF when reading a line"


def test_io_test_program_may_exit_zero_but_not_fail(grader):
    task = Task("t/exit", "p", (IOTest("", "ok\n"), IOTest("fail", "ok\n")))
    program = ("import sys\nprint('ok')\n"
               "if sys.stdin.read():\n    sys.exit(3)\nsys.exit(0)\n")
    report = grader.grade(task, program)
    assert [r.passed for r in report.results] == [True, False]
    assert report.results[1].message == "exited with status 3"


def test_io_tests_start_from_a_fresh_module_each_time(grader):
    task = Task("t/fresh", "p", (IOTest("", "1\n"), IOTest("", "1\n")))
    program = "import builtins\nbuiltins.n = getattr(builtins, 'n', 0) + 1\nprint(n)\n"
    assert grader.grade(task, program).passed == 1
    assert grader.grade(task, "count = globals().get('count', 0) + 1\nprint(count)").passed == 2


def test_assert_tests_with_setup_and_both_names(grader):
    assert grader.grade(SQUARE_ASSERTS, "def square(x):\n    return x * x\n").fraction == 1.0
    report = grader.grade(SQUARE_ASSERTS, "def square(x):\n    return abs(x) * 3\n")
    assert [r.passed for r in report.results] == [True, False, False]
    assert report.results[1].message == "AssertionError: "


def test_assert_tests_see_plain_copies_of_results(grader):
    task = Task("t/tuple", "p", (AssertTest("r = candidate(); assert type(r) is tuple"),
                                 AssertTest("assert isinstance(candidate(), tuple)")),
                entry_point="f")
    program = ("class Pair(tuple):\n    pass\n"
               "def f():\n    return Pair((1, 2))\n")
    report = grader.grade(task, program)
    assert not any(r.passed for r in report.results)
    assert "returned a Pair, which is not plain data" in report.results[0].message
    assert grader.grade(task, "def f():\n    return (1, [2, {3}])\n").fraction == 1.0


def test_setup_failure_fails_assert_tests(grader):
    task = Task("t/setup", "p", (AssertTest("assert True"),), entry_point="f",
                setup="import no_such_module_here")
    report = grader.grade(task, "def f():\n    pass\n")
    assert report.results[0].message.startswith("the test setup raised ModuleNotFoundError")


def test_timeout_fails_unreported_tests_and_keeps_reported_ones(grader):
    program = ("import time\n"
               "def add(a, b):\n"
               "    if a < 0:\n"
               "        while True:\n"
               "            pass\n"
               "    return a + b\n")
    with Grader(limits=Limits(timeout_s=1.0)) as quick:
        report = quick.grade(ADD, program)
    assert [r.passed for r in report.results] == [True, False, False]
    assert report.results[1].message == "not finished within the grading time limit"


def test_printing_does_not_disturb_grading(grader):
    program = ("print('x' * 3_000_000)\n"
               "def add(a, b):\n"
               "    print('noise ' * 1000)\n"
               "    return a + b\n")
    assert grader.grade(ADD, program).fraction == 1.0


def test_each_grading_starts_in_a_fresh_process(grader):
    task = Task("t/fresh_process", "p", (CallTest((), 1),), entry_point="f")
    program = ("import builtins\n"
               "builtins.graded = getattr(builtins, 'graded', 0) + 1\n"
               "def f():\n    return graded\n")
    assert grader.grade(task, program).fraction == 1.0
    assert grader.grade(task, program).fraction == 1.0


class _NotLocal:
    """A local backend behind another class: a grader sends it the harness as source."""

    def __init__(self) -> None:
        from coding_gym.backends.local import LocalBackend

        self.inner = LocalBackend(grading_limits(Limits(timeout_s=5.0)))
        self.codes: list[str] = []

    def reset(self) -> None:
        self.inner.reset()

    def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        self.codes.append(code)
        return self.inner.run(code, timeout_s=timeout_s)

    def describe(self) -> dict:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("program", [
    "def add(a, b):\n    return a + b\n",
    "def add(a, b):\n    return a - b\n",
    "import sys\nsys.exit(3)\n",
    "def add(a, b):\n    print('noise')\n    return [a, b]\n",
])
def test_the_compiled_harness_grades_as_its_source_does(grader, program):
    with Grader(_NotLocal()) as by_source:
        from_source = by_source.grade(ADD, program)
        assert "def run_tests(" in by_source.backend.codes[-1]  # the source went
    assert "def run_tests(" not in _harness(True)  # a code object goes to a local worker
    assert grader.grade(ADD, program) == from_source


class _BrokenBackend:
    def reset(self) -> None:
        raise BackendError("worker could not start")

    def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        raise AssertionError("unreachable")

    def describe(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def test_backend_failure_raises_instead_of_scoring():
    with Grader(_BrokenBackend()) as broken, pytest.raises(BackendError, match="could not start"):
        broken.grade(ADD, "def add(a, b): return a + b")


def test_program_must_be_text(grader):
    with pytest.raises(TypeError, match="Expected the program to be a str, got bytes"):
        grader.grade(ADD, b"def add(a, b): return a + b")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("got", "expected", "equal"),
    [([1, 2], (1, 2), True), (1, 1.0, True), (True, 1, False), (0, False, False),
     ({"a": [True]}, {"a": [True]}, True), ({"a": 1}, {"a": 1, "b": 2}, False),
     ("1", 1, False), (None, None, True), ([[1]], [[1, 2]], False)],
)
def test_json_equal(got, expected, equal):
    assert json_equal(got, expected) is equal


def test_normalize_output():
    assert normalize_output("a  \r\nb\t\n\n\n") == normalize_output("a\nb") == "a\nb"
    assert normalize_output(" a") != normalize_output("a")
