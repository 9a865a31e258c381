"""``CodingEnv``: a Gymnasium environment whose actions are Python programs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from coding_gym import transforms
from coding_gym.backends import Backend, make_backend
from coding_gym.env_snapshot import EpisodeSnapshots
from coding_gym.errors import BackendError, InvalidAction
from coding_gym.models import ExecResult, Limits, coarse
from coding_gym.spaces import AnyText
from coding_gym.tasks.episode import TaskEpisodes
from coding_gym.tasks.loaders import resolve_tasks
from coding_gym.tasks.task import Task
from coding_gym.transforms import RewardTransform

Observation = dict[str, Any]

#: Room above ``max_output_bytes`` in the text spaces for the notes the sandbox appends.
_NOTE_ROOM = 4096


class CodingEnv(EpisodeSnapshots, gym.Env[Observation, str]):
    """Run Python code, step by step, in one persistent sandboxed interpreter per episode.

    ## Description

    Each action is a piece of Python source. It runs in the episode's interpreter, where
    variables, functions and imports persist from step to step (like cells of a notebook);
    the observation is what it printed and how it ended. Code runs in a separate worker
    process with limits enforced from inside and outside (see :class:`coding_gym.Limits`), so
    the code can neither hang nor crash the env.

    With the local backend, :meth:`snapshot`, :meth:`restore` and :meth:`fork` save, bring
    back and copy a whole episode, interpreter included, in milliseconds (for tree search and
    agents that must not lose work). ``gymnasium.make_vec("CodingEnv-v0", num_envs=N)`` gives
    :class:`coding_gym.vector.CodingVectorEnv`, which runs the N envs' code at once.

    With the local backend, the worker waits between steps on the CPU of the thread that
    calls :meth:`step` (unless another thread steps an env at the same time), as an
    idle-priority process, so that neither the request nor the reply has to wake another CPU
    (where that is slow, in a VM, a step takes about half the time); a step that runs past
    4 ms may use every CPU. See :mod:`coding_gym.sandbox.affinity`.

    ## Action Space

    ``AnyText(max_length=max_code_length)``: any ``str`` of Python source. Anything else
    raises :class:`coding_gym.errors.InvalidAction` (a ``TypeError``) and the env stays usable.

    ## Observation Space

    ``Dict(stdout=AnyText, stderr=AnyText, exit_code=Discrete(256))``:

    - ``stdout`` / ``stderr``: output of the step, captured at the file-descriptor level
      (``print``, ``os.system``, C code and child processes alike), at most
      ``max_output_bytes`` each, decoded as UTF-8 with invalid bytes replaced.
    - ``exit_code``: 0 success; 1 uncaught exception (its traceback, showing only the agent's
      code, is in ``stderr``); ``n`` for ``SystemExit(n)`` (the interpreter survives);
      ``128 + N`` when the interpreter died of signal N (137 after a hard timeout kill).
    - ``prompt`` (only with ``tasks``): the episode's task, the same at every step;
      ``AnyText`` as long as the longest prompt of the task set.

    ## Rewards

    Free execution (no ``tasks``): 0.0, shaped by ``reward_transforms``. The default is no
    shaping, because the shaping below is a textual heuristic that also penalises legitimate
    code. ``reward_transforms="openenv"`` reproduces OpenEnv coding_env's: -1.0 when the code
    matches a dangerous pattern (``import os``, ``import subprocess``, ``eval(``, ``exec(``,
    ``__import__``, ``open(``), +0.1 when it is at most 100 characters, -0.2 when it does not
    parse (see :mod:`coding_gym.transforms`).

    With ``tasks``: after every step the episode's program is graded, and the reward is the
    fraction of the task's tests it passes (with ``binary_reward=True``: 1.0 when all pass,
    else 0.0), then shaped by ``reward_transforms``. The graded program is

    - function tasks (the task has an entry point): the code of the episode's steps that
      ended with exit code 0, in order, since the interpreter last lost its state. That is the
      code that built the definitions the interpreter holds, so a solution can grow over
      several steps like notebook cells; failed steps are left out, their effect being partial.
    - stdin tasks: the step's own code, run as a whole script once per test. Earlier steps are
      left out, or their prints would be part of its output; the episode's interpreter has no
      stdin, so such a step may fail there and still pass its tests.

    It is graded in a fresh sandbox process, never in the episode's interpreter, so nothing
    done to that interpreter (patched builtins, rigged objects, a printed fake summary)
    reaches the grading, and returned values and output are compared in this process, with
    expected values that never enter the sandbox. Assert-based tests (HumanEval, MBPP) must
    pass or fail inside the sandbox: each result is reported on a line tagged with a random
    nonce of that grading, so printed imitations and early exits earn nothing, but a program
    that deliberately inspects the harness while it runs can read the nonce and forge these
    reports (see :mod:`coding_gym.tasks.grading`). The reward is
    the state of the program after the step, not a difference: a step that changes nothing
    earns the same reward again. A program the env has already graded in full on the same
    task is not run again: its results are remembered (4096 gradings per env). A backend
    failure is never reward: 0.0 (see Episode End).

    ## Starting State

    A fresh interpreter with empty globals, in a new empty working directory; the reset
    observation has empty output and exit code 0.

    ## Episode End

    ``terminated`` is always False in free execution; with ``tasks`` it is True when the graded
    program passes every test. ``truncated`` is True when the backend failed, running the step
    or grading it (``info["infra_error"]`` says why), and when ``max_episode_steps`` given to
    ``gymnasium.make`` is reached. A task episode has no step limit of its own: pass
    ``max_episode_steps``.

    ## Arguments

    - ``backend``: ``"local"`` (default: a worker process on this machine), ``"remote"``,
      ``"docker"``, or a :class:`coding_gym.backends.Backend` instance (the env closes it).
    - ``timeout_s`` (10.0): wall-clock limit of one step. Python code is interrupted and keeps
      its variables; code that ignores the interrupt is killed 0.5 s later and the
      interpreter is replaced (``info["state_lost"]``). The limit includes the wait for
      that replacement at the next step (the code gets what is left).
    - ``memory_mb`` (1024): memory limit of the interpreter.
    - ``max_output_bytes`` (1 MiB): stdout and stderr kept per step; the rest is dropped.
    - ``max_code_length`` (100,000): longest action accepted, in characters.
    - ``render_mode``: ``None`` or ``"ansi"`` (``render()`` returns the last step as text).
    - ``tasks`` (None: free execution): ``"builtin"`` (the built-in suite), a path to a JSONL
      file (coding_gym, HumanEval or MBPP format) or a list of
      :class:`coding_gym.tasks.Task`. ``reset`` picks a task uniformly with ``np_random``, or
      the one named by ``options={"task_id": ...}``. Grading runs on a second backend of the
      same kind (a ``"local"`` one when ``backend`` is an instance) with the same limits:
      ``timeout_s`` bounds one grading, all tests of the task included.
    - ``binary_reward`` (False): with ``tasks``, reward 1.0 only when every test passes.
    - ``reward_transforms`` (None): ``"openenv"``, or a list of callables
      ``(code, result, reward) -> reward`` applied in order (see Rewards).
    - Any other keyword goes to the backend (for example ``base_url`` for ``"remote"``). The
      local backend takes ``start_method`` (``"zygote"``, the default: a reset forks a
      warmed-up interpreter in milliseconds; or ``"spawn"``: a fresh one), ``preload``
      (modules that interpreter has imported, default ``["numpy"]`` when installed) and
      ``transactional`` (True: a step that times out or dies rolls the interpreter back to
      its state before the step instead of losing it) and ``start_ahead`` (True, the
      default: after each reset the next episode's interpreter starts in the background,
      so that a reset takes well under a millisecond, for a second idle interpreter; False:
      one interpreter, which each reset starts, 3-5 ms); see
      :class:`coding_gym.backends.local.LocalBackend`.
    - ``isolation`` (local backend): the sandbox layers around the interpreter, an
      :class:`coding_gym.models.Isolation` or a dict such as ``{"network": False}``. Every
      layer the machine allows is on by default; ``env.unwrapped.backend.describe()`` says
      which are active, and ``coding-gym doctor`` why the others are not (see SECURITY.md).

    ## Information

    ``reset`` returns ``episode_id`` and ``step`` (and ``task_id`` with ``tasks``). Every
    ``step`` returns:

    - ``episode_id``: identifier of the episode.
    - ``step``: number of steps taken in the episode, this one included.
    - ``wall_time_s``: wall-clock time the code ran, in seconds (10 ms resolution).
    - ``cpu_time_s``: CPU time of the interpreter and its children during the step, in
      seconds (10 ms resolution).
    - ``stdout_truncated``: True when stdout exceeded ``max_output_bytes``.
    - ``stderr_truncated``: True when stderr exceeded ``max_output_bytes``.
    - ``kill_reason``: None, or why the step was stopped: ``"timeout"``, ``"memory"``,
      ``"signal"`` (the interpreter died of a signal) or ``"crash"`` (it exited).
    - ``state_lost``: True when the interpreter was replaced during this step, so variables
      of earlier steps are gone.
    - ``infra_error``: None, or a message when the backend itself failed (never the agent's
      fault, never reward; the step is truncated).

    With ``tasks``, every ``step`` also returns:

    - ``task_id``: identifier of the episode's task.
    - ``tests_passed``: number of tests the graded program passed.
    - ``tests_total``: number of tests of the task.
    - ``test_results``: one dict per test, in the task's order:
      ``{"passed": bool, "message": str}``; the message says why a test failed (expected
      values are never shown). Empty when grading failed.

    With ``transactional=True`` (local backend), ``info`` also has ``rolled_back``: True when
    the step timed out or the interpreter died, and the interpreter was rolled back to its
    state before the step (``state_lost`` is then False).

    ## Version History

    - v0: initial version.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        backend: str | Backend = "local",
        *,
        timeout_s: float = 10.0,
        memory_mb: int = 1024,
        max_output_bytes: int = 1 << 20,
        max_code_length: int = 100_000,
        render_mode: str | None = None,
        tasks: str | os.PathLike[str] | Sequence[Task] | None = None,
        binary_reward: bool = False,
        reward_transforms: str | RewardTransform | Sequence[RewardTransform] | None = None,
        **backend_options: Any,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, "
                f"got {render_mode!r}"
            )
        self.render_mode = render_mode
        self.limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb,
                             max_output_bytes=max_output_bytes)
        self.max_code_length = max_code_length
        self.reward_transforms = transforms.resolve(reward_transforms)
        task_list = None if tasks is None else resolve_tasks(tasks)
        self.backend: Backend = make_backend(backend, self.limits, **backend_options)
        self._tasks: TaskEpisodes | None = None
        if task_list is not None:
            self._tasks = _task_episodes(task_list, backend, self.limits, backend_options,
                                         binary_reward)
        self.action_space = AnyText(max_length=max_code_length)
        text = AnyText(max_length=max_output_bytes + _NOTE_ROOM)
        observation_spaces: dict[str, spaces.Space[Any]] = {
            "stdout": text, "stderr": text, "exit_code": spaces.Discrete(256)
        }
        if self._tasks is not None:
            observation_spaces["prompt"] = AnyText(max_length=self._tasks.max_prompt_length)
        self.observation_space = spaces.Dict(observation_spaces)
        self.episode_id: str | None = None
        self.step_count = 0
        self._last: tuple[str, ExecResult] | None = None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Observation, dict[str, Any]]:
        super().reset(seed=seed)
        self.backend.reset()
        # From np_random, so a seeded reset repeats its episode id like everything else.
        self.episode_id = uuid.UUID(bytes=self.np_random.bytes(16), version=4).hex
        self.step_count = 0
        self._last = None
        observation: Observation = {"stdout": "", "stderr": "", "exit_code": 0}
        info: dict[str, Any] = {"episode_id": self.episode_id, "step": 0}
        if self._tasks is not None:
            task = self._tasks.start(self.np_random, options)
            observation["prompt"] = task.prompt
            info["task_id"] = task.task_id
        return observation, info

    def step(self, action: str) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        code = self._check_action(action)
        self._start_step()
        try:
            result = self.backend.run(code)
        except BackendError as e:
            return self._finish_step(code, backend_failure(e), infra_error=str(e))
        return self._finish_step(code, result)

    # step() in parts around the run of the code: the native vector env (coding_gym.vector)
    # checks every action, then starts every step, and runs the code of all its envs at once
    # before finishing them.

    def _start_step(self) -> None:
        """Count a step whose action :meth:`_check_action` accepted."""
        if self.episode_id is None:
            raise ResetNeeded("Call reset() before step(): no episode has started.")
        self.step_count += 1

    def _finish_step(self, code: str, result: ExecResult, infra_error: str | None = None
                     ) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        """Observation, reward, termination and info of a step whose code ran as ``result``
        (``infra_error``: the backend failed, and ``result`` is :func:`backend_failure`)."""
        # Infrastructure failed, not the agent: end the episode without reward.
        truncated = infra_error is not None
        self._last = (code, result)
        observation = observation_of(result)
        info = result.info()
        info["wall_time_s"] = coarse(result.wall_time_s)
        info["cpu_time_s"] = coarse(result.cpu_time_s)
        reward, terminated = 0.0, False
        tasks = self._tasks
        if infra_error is None:
            reward, terminated, infra_error = self._score(code, result, info)
            truncated = infra_error is not None
        elif tasks is not None:
            info.update(tasks.info(None))
        info["episode_id"] = self.episode_id
        info["step"] = self.step_count
        info["infra_error"] = infra_error
        if tasks is not None and tasks.task is not None:
            observation["prompt"] = tasks.task.prompt
        return observation, reward, terminated, truncated, info

    def _score(self, code: str, result: ExecResult,
               info: dict[str, Any]) -> tuple[float, bool, str | None]:
        """(reward, terminated, infra error) of a step that ran; adds the task keys to info."""
        if self._tasks is None:
            return self.reward_transforms(code, result, 0.0), False, None
        try:
            report = self._tasks.grade(self._tasks.program(code, result))
        except BackendError as e:
            # The grader's infrastructure failed: not the agent's fault, so never reward.
            info.update(self._tasks.info(None))
            return 0.0, False, f"grading failed: {e}"
        info.update(self._tasks.info(report))
        reward = self.reward_transforms(code, result, self._tasks.reward(report))
        return reward, report.all_passed, None

    @property
    def task(self) -> Task | None:
        """The episode's task (None in free execution or before the first reset)."""
        return None if self._tasks is None else self._tasks.task

    def _check_action(self, action: Any) -> str:
        if not isinstance(action, str):
            hint = (
                "Decode it first: action.decode()"
                if isinstance(action, (bytes, bytearray))
                else "Pass the program's source text as a str."
            )
            raise InvalidAction(
                f"Expected the action to be a str of Python source, got "
                f"{type(action).__name__} ({_preview(action)}). {hint}"
            )
        if len(action) > self.max_code_length:
            raise InvalidAction(
                f"Expected at most max_code_length={self.max_code_length} characters of code, "
                f"got {len(action)}. Shorten the program or raise max_code_length."
            )
        return str(action)

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        if self._last is None:
            return f"[episode {self.episode_id}: no step yet]\n"
        code, result = self._last
        lines = [">>> " + line for line in code.splitlines()] or [">>>"]
        text = "\n".join(lines) + "\n" + result.stdout + result.stderr
        return text + f"[exit code {result.exit_code}, {result.wall_time_s:.3f} s]\n"

    def close(self) -> None:
        """End the worker and release the backend; safe to call twice."""
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()
        task_episodes = getattr(self, "_tasks", None)
        if task_episodes is not None:
            task_episodes.close()
        super().close()


def _task_episodes(tasks: list[Task], backend: str | Backend, limits: Limits,
                   backend_options: dict[str, Any], binary_reward: bool) -> TaskEpisodes:
    """Task sampling and grading, on a second backend of the episode's kind."""
    from coding_gym.tasks.grading import Grader, grading_limits

    if not isinstance(backend, str):
        # An instance cannot be cloned; grade on this machine's sandbox instead.
        backend, backend_options = "local", {}
    grading_backend = make_backend(backend, grading_limits(limits), **backend_options)
    return TaskEpisodes(tasks, Grader(grading_backend), binary_reward=binary_reward)


def observation_of(result: ExecResult) -> Observation:
    """A step's observation, but for a task's prompt."""
    return {"stdout": result.stdout, "stderr": result.stderr, "exit_code": result.exit_code}


def backend_failure(error: BackendError) -> ExecResult:
    """The result that stands in for a step the backend failed to run."""
    return ExecResult(stderr=f"[coding_gym] backend error: {error}\n", exit_code=1,
                      state_lost=True)


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
