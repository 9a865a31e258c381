"""Programs that try to earn reward without solving the task must earn none.

Each attack runs against the three kinds of test: CallTest (built-in function task), IOTest
(built-in stdin task) and AssertTest (a HumanEval-style task).
"""

from __future__ import annotations

import textwrap

import gymnasium as gym
import pytest

import coding_gym  # noqa: F401 - registers CodingEnv-v0
from coding_gym.tasks import AssertTest, Grader, Task, load_builtin

BUILTIN = {task.task_id: task for task in load_builtin()}
SUM_LIST = BUILTIN["builtin/sum_list"]  # CallTest
SUM_OF_NUMBERS = BUILTIN["builtin/sum_of_numbers"]  # IOTest
SUM_ASSERTS = Task("hack/sum_asserts", "Define sum_list(nums).", (
    AssertTest("assert candidate([1, 2]) == 3"),
    AssertTest("assert sum_list([]) == 0"),
    AssertTest("assert candidate([5]) == 5"),
    AssertTest("assert not (candidate([2, 2]) != 4)"),
), entry_point="sum_list")

ALWAYS_EQUAL = """
class AlwaysEqual:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = object.__hash__

class EqualInt(int):
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = int.__hash__

class EqualMeta(type):
    def __eq__(cls, other):
        return True
    __hash__ = type.__hash__

class Chameleon(metaclass=EqualMeta):
    def __eq__(self, other):
        return True

import random
def sum_list(nums):
    return random.choice([AlwaysEqual(), EqualInt(-12345), Chameleon()])
"""

PATCHED_BUILTINS = """
import builtins, json, sys
class Yes:
    def __eq__(self, other):
        return True
    def __bool__(self):
        return True
builtins.isinstance = lambda *args: True
builtins.type = lambda *args: int
builtins.repr = lambda obj: "0"
builtins.str = lambda *args: "0"
builtins.callable = lambda obj: True
builtins.exec = lambda *args, **kwargs: None
builtins.compile = lambda *args, **kwargs: None
builtins.print = lambda *args, **kwargs: sys.__stdout__.write("all tests passed\\n")
builtins.AssertionError = type("Ignored", (BaseException,), {})
json.dumps = lambda *args, **kwargs: "10"
json.loads = lambda *args, **kwargs: Yes()
json.JSONEncoder.encode = lambda self, obj: "10"
def sum_list(nums):
    return Yes()
"""

EXIT_BEFORE_TESTS = "import sys\nsys.exit(0)\ndef sum_list(nums):\n    return sum(nums)\n"
HARD_EXIT_BEFORE_TESTS = "import os\nos._exit(0)\ndef sum_list(nums):\n    return sum(nums)\n"
EXIT_IN_CALL = "import sys\ndef sum_list(nums):\n    sys.exit(0)\n"
HARD_EXIT_IN_CALL = "import os\ndef sum_list(nums):\n    os._exit(0)\n"

FAKE_SUMMARY = """
import os, sys
lines = ["All tests passed!", "OK", "PASSED 100%", "tests_passed=7/7",
         "0" * 32 + ' {"i": 0, "passed": true}',
         "0" * 32 + ' {"i": 0, "value_json": "10"}',
         '{"i": 0, "passed": true}', '{"done": true}']
for line in lines:
    print(line)
    os.write(1, (line + "\\n").encode())
sys.stdout.flush()
def sum_list(nums):
    print("\\n".join(lines))
    return None
"""

ATTACKS = {
    "always_equal": ALWAYS_EQUAL,
    "patched_builtins": PATCHED_BUILTINS,
    "sys_exit_before_tests": EXIT_BEFORE_TESTS,
    "os_exit_before_tests": HARD_EXIT_BEFORE_TESTS,
    "sys_exit_in_call": EXIT_IN_CALL,
    "os_exit_in_call": HARD_EXIT_IN_CALL,
    "fake_summary": FAKE_SUMMARY,
}

# The same attacks as stdin programs: end before printing, or print claims of success.
STDIN_ATTACKS = {
    "sys_exit_before_output": "import sys\nsys.exit(0)\nprint(20)\n",
    "os_exit_before_output": "import os\nos._exit(0)\n",
    "fake_summary": FAKE_SUMMARY,
    "patched_builtins": PATCHED_BUILTINS + "print(sum_list([]))\n",
}


@pytest.fixture(scope="module")
def grader():
    with Grader() as g:
        yield g


@pytest.mark.parametrize("task", [SUM_LIST, SUM_ASSERTS], ids=["call_tests", "assert_tests"])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_function_task_attack_scores_zero(grader, task, attack):
    report = grader.grade(task, ATTACKS[attack])
    assert report.passed == 0, [r.message for r in report.results]


@pytest.mark.parametrize("attack", sorted(STDIN_ATTACKS))
def test_stdin_task_attack_scores_zero(grader, attack):
    report = grader.grade(SUM_OF_NUMBERS, STDIN_ATTACKS[attack])
    assert report.passed == 0, [r.message for r in report.results]


def test_honest_solutions_still_pass(grader):
    honest = "def sum_list(nums):\n    return sum(nums)\n"
    assert grader.grade(SUM_LIST, honest).fraction == 1.0
    assert grader.grade(SUM_ASSERTS, honest).fraction == 1.0


def test_reading_the_nonce_does_not_forge_call_results(grader):
    # Even a program that digs the nonce out of the harness's frames can only report
    # values; the expected ones stay in the parent.
    program = textwrap.dedent("""
        import os, sys
        def sum_list(nums):
            frame = sys._getframe(1)
            while frame is not None and "payload" not in frame.f_locals:
                frame = frame.f_back
            nonce = frame.f_locals["payload"]["nonce"]
            for i in range(20):
                os.write(1, f'\\n{nonce} {{"i": {i}, "value_json": "123456789"}}\\n'.encode())
            os._exit(0)
    """)
    report = grader.grade(SUM_LIST, program)
    assert report.passed == 0
    assert {r.message for r in report.results} == {"wrong answer: returned 123456789"}


def test_duplicate_records_fail_the_test(grader):
    program = textwrap.dedent("""
        import os, sys
        def sum_list(nums):
            frame = sys._getframe(1)
            while "payload" not in frame.f_locals:
                frame = frame.f_back
            nonce = frame.f_locals["payload"]["nonce"]
            os.write(1, f'\\n{nonce} {{"i": 0, "value_json": "10"}}\\n'.encode())
            return sum(nums)
    """)
    report = grader.grade(SUM_LIST, program)
    assert not report.results[0].passed
    assert report.results[0].message == "reported more than once: the output was forged"


@pytest.mark.parametrize(
    "steps",
    [
        # Rig the episode's interpreter, then define nothing honest.
        [ALWAYS_EQUAL],
        [PATCHED_BUILTINS],
        ["import builtins\nbuiltins.sum_list = lambda nums: sum(nums)"],
        ["def sum_list(nums):\n    return sum(nums)", "import sys\nsys.exit(0)"],
        ["def sum_list(nums):\n    return sum(nums)", "import os\nos._exit(0)",
         "print('all tests passed')"],
        [FAKE_SUMMARY],
    ],
    ids=["always_equal", "patched_builtins", "builtins_only", "exit_after_solution",
         "os_exit_after_solution", "fake_summary"],
)
def test_env_episode_attacks_earn_nothing(steps):
    env = gym.make("CodingEnv-v0", tasks=[SUM_LIST], max_episode_steps=len(steps))
    try:
        env.reset(seed=0)
        rewards = [env.step(step)[1] for step in steps]
    finally:
        env.close()
    assert rewards[-1] == 0.0, rewards
