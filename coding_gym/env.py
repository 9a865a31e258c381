"""``CodingEnv``: a Gymnasium environment whose actions are Python programs."""

from __future__ import annotations

import math
import uuid
from typing import Any

import gymnasium as gym
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from coding_gym.backends import Backend, make_backend
from coding_gym.errors import BackendError, InvalidAction
from coding_gym.models import ExecResult, Limits
from coding_gym.spaces import AnyText

Observation = dict[str, Any]

#: Room above ``max_output_bytes`` in the text spaces for the notes the sandbox appends.
_NOTE_ROOM = 4096


class CodingEnv(gym.Env[Observation, str]):
    """Run Python code, step by step, in one persistent sandboxed interpreter per episode.

    ## Description

    Each action is a piece of Python source. It runs in the episode's interpreter, where
    variables, functions and imports persist from step to step (like cells of a notebook);
    the observation is what it printed and how it ended. Code runs in a separate worker
    process with limits enforced from inside and outside (see :class:`coding_gym.Limits`), so
    the code can neither hang nor crash the env.

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

    ## Rewards

    0.0 for every step in free execution.

    ## Starting State

    A fresh interpreter with empty globals, in a new empty working directory; the reset
    observation has empty output and exit code 0.

    ## Episode End

    ``terminated`` is always False in free execution. ``truncated`` is True when the backend
    failed (``info["infra_error"]`` says why), and when ``max_episode_steps`` given to
    ``gymnasium.make`` is reached.

    ## Arguments

    - ``backend``: ``"local"`` (default: a worker process on this machine), ``"remote"``,
      ``"docker"``, or a :class:`coding_gym.backends.Backend` instance (the env closes it).
    - ``timeout_s`` (10.0): wall-clock limit of one step. Python code is interrupted and keeps
      its variables; code that ignores the interrupt is killed 0.5 s later and the
      interpreter is replaced (``info["state_lost"]``).
    - ``memory_mb`` (1024): memory limit of the interpreter.
    - ``max_output_bytes`` (1 MiB): stdout and stderr kept per step; the rest is dropped.
    - ``max_code_length`` (100,000): longest action accepted, in characters.
    - ``render_mode``: ``None`` or ``"ansi"`` (``render()`` returns the last step as text).
    - Any other keyword goes to the backend (for example ``base_url`` for ``"remote"``).

    ## Information

    ``reset`` returns ``episode_id`` and ``step``. Every ``step`` returns:

    - ``episode_id``: identifier of the episode.
    - ``step``: number of steps taken in the episode, this one included.
    - ``wall_time_s``: wall-clock time the code ran, in seconds (1 ms resolution).
    - ``cpu_time_s``: CPU time of the interpreter and its children during the step, in
      seconds (1 ms resolution).
    - ``stdout_truncated``: True when stdout exceeded ``max_output_bytes``.
    - ``stderr_truncated``: True when stderr exceeded ``max_output_bytes``.
    - ``kill_reason``: None, or why the step was stopped: ``"timeout"``, ``"memory"``,
      ``"signal"`` (the interpreter died of a signal) or ``"crash"`` (it exited).
    - ``state_lost``: True when the interpreter was replaced during this step, so variables
      of earlier steps are gone.
    - ``infra_error``: None, or a message when the backend itself failed (never the agent's
      fault, never reward; the step is truncated).

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
        self.backend: Backend = make_backend(backend, self.limits, **backend_options)
        self.action_space = AnyText(max_length=max_code_length)
        text = AnyText(max_length=max_output_bytes + _NOTE_ROOM)
        self.observation_space = spaces.Dict(
            {"stdout": text, "stderr": text, "exit_code": spaces.Discrete(256)}
        )
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
        observation = {"stdout": "", "stderr": "", "exit_code": 0}
        return observation, {"episode_id": self.episode_id, "step": 0}

    def step(self, action: str) -> tuple[Observation, float, bool, bool, dict[str, Any]]:
        code = self._check_action(action)
        if self.episode_id is None:
            raise ResetNeeded("Call reset() before step(): no episode has started.")
        self.step_count += 1
        truncated = False
        infra_error = None
        try:
            result = self.backend.run(code)
        except BackendError as e:
            # Infrastructure failed, not the agent: end the episode without reward.
            result = ExecResult(stderr=f"[coding_gym] backend error: {e}\n", exit_code=1,
                                state_lost=True)
            truncated, infra_error = True, str(e)
        self._last = (code, result)
        observation = {
            "stdout": result.stdout,
            "stderr": result.stderr,
            "exit_code": result.exit_code,
        }
        info = result.info()
        # Millisecond resolution: finer digits are noise, and a seeded step must be repeatable.
        info["wall_time_s"] = _millis(result.wall_time_s)
        info["cpu_time_s"] = _millis(result.cpu_time_s)
        info.update(episode_id=self.episode_id, step=self.step_count, infra_error=infra_error)
        return observation, 0.0, False, truncated, info

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
        super().close()


def _millis(seconds: float) -> float:
    return math.floor(seconds * 1000) / 1000


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
