"""Steps driven from the event loop: same results as LocalBackend.run, slow cases in a thread."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits
from coding_gym.sandbox import protocol
from coding_gym.sandbox.inbox import Inbox
from coding_gym.server import stepping


class CountingExecutor(Executor):
    """A thread pool that counts the calls handed to it."""

    def __init__(self) -> None:
        self.calls = 0
        self._pool = ThreadPoolExecutor(1)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.calls += 1
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        self._pool.shutdown(wait)


@pytest.fixture
def backend() -> Iterator[LocalBackend]:
    with LocalBackend(Limits(timeout_s=5.0)) as b:
        b.reset()
        yield b


@pytest.fixture
def executor() -> Iterator[CountingExecutor]:
    pool = CountingExecutor()
    yield pool
    pool.shutdown()


def drive(backend: LocalBackend, code: str, executor: Executor) -> Any:
    assert stepping.ready_on_loop(backend, code)
    return asyncio.run(stepping.drive(backend, code, backend.limits.timeout_s, executor,
                                      stepping.WorkerWatch()))


def test_a_quick_step_gives_the_result_of_run(backend, executor):
    result = drive(backend, "x = 21\nprint(x * 2)", executor)
    assert (result.stdout, result.stderr, result.exit_code) == ("42\n", "", 0)
    assert backend.run("print(x)").stdout == "21\n"


def test_a_step_printing_after_the_quiet_window_finishes_in_a_thread(backend, executor):
    result = drive(backend, "import time\ntime.sleep(0.05)\nprint('late')", executor)
    assert result.stdout == "late\n"
    assert executor.calls == 1


def test_a_long_step_without_output_is_answered_on_the_loop(backend, executor):
    result = drive(backend, "import time\ntime.sleep(0.05)\nx = 1", executor)
    assert (result.exit_code, result.kill_reason) == (0, None)
    assert executor.calls == 0


def test_a_worker_that_exits_is_cleaned_up_in_a_thread(backend, executor):
    result = drive(backend, "import os\nos._exit(3)", executor)
    assert result.kill_reason == "crash"
    assert result.exit_code == 3
    assert result.state_lost
    assert executor.calls == 1
    assert not stepping.ready_on_loop(backend, "print(1)")  # the next step restarts it
    assert backend.run("print(1)").stdout == "1\n"


def test_timeout_still_kills(backend, executor):
    result = asyncio.run(stepping.drive(backend, "while True:\n    pass", 0.2, executor,
                                        stepping.WorkerWatch()))
    assert result.kill_reason == "timeout"


def test_long_code_is_not_sent_from_the_loop(backend):
    assert not stepping.ready_on_loop(backend, "#" * (stepping.LOOP_CODE_CHARS + 1))


def test_not_ready_before_the_first_reset():
    with LocalBackend() as fresh:
        assert not stepping.ready_on_loop(fresh, "print(1)")


def result_frame(out: int = 0, err: int = 0) -> bytes:
    return protocol.encode_result(0, None, 1000, 1000, out, err)


@pytest.mark.parametrize("data, on_loop", [
    (result_frame(), True),
    (result_frame(out=5, err=7), True),
    (result_frame(out=1 << 20), True),
    (result_frame(out=(1 << 20) + 1), False),  # an output count no pipe holds: a thread
    (result_frame(err=1 << 30), False),
])
def test_only_a_reply_with_believable_output_counts_is_finished_on_the_loop(data, on_loop):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        fields = Inbox(ours).receive_result()
        assert fields is not None
        assert stepping.drains_on_loop(fields) is on_loop


def test_the_watch_keeps_its_readers_from_one_quick_step_to_the_next(backend, executor):
    watch = stepping.WorkerWatch()

    async def two_steps() -> None:
        for code in ("x = 5", "x += 1"):  # silent: answered on the loop however slow
            result = await stepping.drive(backend, code, 5.0, executor, watch)
            assert result.exit_code == 0
            assert watch.worker is not None and watch.worker.pid == backend.worker_pid

    asyncio.run(two_steps())
    assert executor.calls == 0
    assert backend.run("print(x)").stdout == "6\n"


def test_a_worker_dying_between_steps_stops_the_watch(backend, executor):
    watch = stepping.WorkerWatch()

    async def step_then_die() -> None:
        await stepping.drive(backend, "x = 1", 5.0, executor, watch)  # silent: on the loop
        assert watch.worker is not None
        backend.interrupt()
        for _ in range(200):  # the exit makes the readers fire once: they must go
            if watch.worker is None:
                return
            await asyncio.sleep(0.01)

    asyncio.run(step_then_die())
    assert watch.worker is None
    assert not stepping.ready_on_loop(backend, "print(1)")
    assert backend.run("print(2)").state_lost  # the run that finds the interpreter dead
    assert backend.run("print(3)").stdout == "3\n"
