"""``CodingVectorEnv``: N coding envs in one process, their code run at once.

``gymnasium.make_vec("CodingEnv-v0", num_envs=N)`` returns it. Each sub-env is a full
:class:`~coding_gym.env.CodingEnv` (tasks, rewards, limits and snapshots included); only the
running of the code is batched: a step sends the N programs to the N workers, then drives them
all with one ``epoll`` loop (:class:`coding_gym.sandbox.fanout.StepLoop`), with no process
or thread per env in between. Resets of several envs run side by side in threads, as they mostly
wait for the zygote. Backends other than the local one are stepped through the same
:class:`~coding_gym.backends.Backend` interface in threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from coding_gym.backends.local import LocalBackend
from coding_gym.batching import ObservationBatcher, batch_infos, plain_infos
from coding_gym.env import CodingEnv, Observation, backend_failure, observation_of
from coding_gym.errors import BackendError
from coding_gym.models import ExecResult
from coding_gym.sandbox.fanout import StepLoop
from coding_gym.sandbox.steps import StepRun

#: A sub-env's code has run: its result, and the backend's failure if any.
Ran = tuple[ExecResult, "str | None"]
StepTuple = tuple[Observation, float, bool, bool, dict[str, Any]]
VectorStep = tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]


class CodingVectorEnv(VectorEnv[dict[str, Any], tuple[str, ...], np.ndarray]):
    """``num_envs`` :class:`~coding_gym.env.CodingEnv` stepped together.

    ## Spaces

    Gymnasium's batched spaces of the sub-env's: an action is a tuple (or list) of ``num_envs``
    programs; an observation is a dict whose ``stdout`` and ``stderr`` (and ``prompt`` with
    tasks) are tuples of ``num_envs`` strings and whose ``exit_code`` is an int64 array.
    Rewards, terminations and truncations are arrays; ``info`` has one array per key with a
    boolean ``_key`` mask, as for every Gymnasium vector env.

    ## Autoreset

    ``autoreset_mode`` (in ``metadata["autoreset_mode"]``) is ``AutoresetMode.SAME_STEP``
    by default: when a sub-env's episode ends, it is reset within the same ``step``, which
    returns the first observation of the new episode; the last observation and info of the
    ended episode are in ``info["final_obs"]`` and ``info["final_info"]`` (masked by
    ``info["_final_obs"]``). Every action an agent writes is then run: with Gymnasium's
    default ``NEXT_STEP`` mode the action after an episode's end is thrown away, which for a
    program that took a model a while to write is a waste. ``NEXT_STEP`` and ``DISABLED``
    (reset with ``options={"reset_mask": mask}``) behave as in
    :class:`gymnasium.vector.SyncVectorEnv`.

    ## Scheduling

    The workers run wherever the kernel puts them, under the normal policy, their episodes
    together weighing four normal processes per CPU (see :mod:`coding_gym.sandbox.cgroups`):
    beside other busy programs, the vector env keeps most of its speed. The thread that
    calls ``step`` keeps its policy. With one env, a step runs as ``CodingEnv.step`` runs
    one, in the calling thread: its worker waits on that thread's CPU while no other thread
    steps a worker (see :mod:`coding_gym.sandbox.affinity`).

    ## Arguments

    - ``num_envs``: number of sub-envs.
    - ``autoreset_mode``: see Autoreset.
    - ``max_episode_steps``: truncate an episode after this many steps (``gymnasium.make_vec``
      passes the one of the registration or of its keyword arguments).
    - Any other keyword goes to every :class:`~coding_gym.env.CodingEnv`.

    Example:
        >>> import gymnasium as gym, coding_gym
        >>> envs = gym.make_vec("CodingEnv-v0", num_envs=2)
        >>> obs, info = envs.reset(seed=0)
        >>> obs, rewards, terminated, truncated, info = envs.step(("print(1)", "print(2)"))
        >>> obs["stdout"]
        ('1\\n', '2\\n')
        >>> envs.close()
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP,
                                "render_modes": ["ansi"]}

    def __init__(self, num_envs: int = 1, *,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.SAME_STEP,
                 max_episode_steps: int | None = None, **env_kwargs: Any) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if max_episode_steps is not None and max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be positive or None, got {max_episode_steps}")
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.max_episode_steps = max_episode_steps
        self.envs: list[CodingEnv] = []
        try:
            for _ in range(num_envs):
                self.envs.append(CodingEnv(**env_kwargs))
        except BaseException:
            for env in self.envs:
                env.close()
            raise
        first = self.envs[0]
        self.num_envs = num_envs
        self.metadata = {**first.metadata, "autoreset_mode": self.autoreset_mode}
        self.render_mode = first.render_mode
        self.single_observation_space = first.observation_space
        self.single_action_space = first.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._batch_observations = ObservationBatcher(self.single_observation_space)
        self._every_env = list(range(num_envs))
        #: No sub-env has tasks: the vector env may finish their steps itself (_plain_batch).
        self._no_tasks = all(env._tasks is None for env in self.envs)
        self._env_obs: list[Observation] = [{} for _ in range(num_envs)]
        self._rewards = np.zeros(num_envs, dtype=np.float64)
        self._terminations = np.zeros(num_envs, dtype=np.bool_)
        self._truncations = np.zeros(num_envs, dtype=np.bool_)
        self._autoreset_envs = np.zeros(num_envs, dtype=np.bool_)
        self._pool: ThreadPoolExecutor | None = None
        self._loop = StepLoop()

    # -- Gymnasium API -------------------------------------------------------------------------

    def reset(self, *, seed: int | Sequence[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reset the sub-envs (those of ``options["reset_mask"]`` when given).

        ``seed``: None, an int (sub-env ``i`` gets ``seed + i``) or one seed per sub-env.
        """
        if seed is None:
            seeds: list[int | None] = [None] * self.num_envs
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"Expected {self.num_envs} seeds (one per sub-env), got {len(seeds)}")
        options = dict(options) if options else {}
        mask = self._reset_mask(options.pop("reset_mask", None))
        self._terminations[mask] = False
        self._truncations[mask] = False
        self._autoreset_envs[mask] = False
        indices = [i for i in range(self.num_envs) if mask[i]]
        entries = []
        for i, (obs, info) in zip(indices, self._reset_envs(indices, seeds, options or None),
                                  strict=True):
            self._env_obs[i] = obs
            entries.append((i, info))
        return self._batch_observations(self._env_obs), batch_infos(entries, self.num_envs)

    def step(self, actions: Sequence[str]) -> VectorStep:
        """Run one program in each sub-env, all at once; autoreset as ``autoreset_mode`` says."""
        actions = self._check_actions(actions)
        if self.autoreset_mode is AutoresetMode.DISABLED and self._autoreset_envs.any():
            done = np.flatnonzero(self._autoreset_envs).tolist()
            raise ValueError(
                f"Sub-envs {done} ended their episode and autoreset is disabled: reset them "
                "with reset(options={'reset_mask': mask}) first"
            )
        if self.autoreset_mode is AutoresetMode.NEXT_STEP and self._autoreset_envs.any():
            resetting = np.flatnonzero(self._autoreset_envs).tolist()
            stepping = np.flatnonzero(~self._autoreset_envs).tolist()
        else:
            resetting, stepping = [], self._every_env
        envs = self.envs
        # Every action is checked before any env counts a step: a bad one changes nothing.
        codes = [envs[i]._check_action(actions[i]) for i in stepping]
        for i in stepping:
            envs[i]._start_step()
        ran = self._run(stepping, codes)
        limit = self.max_episode_steps
        if not resetting and self._no_tasks and (
                limit is None or max(env.step_count for env in envs) < limit):
            plain = [result for result, infra_error in ran
                     if infra_error is None and not result.extra]
            if len(plain) == len(ran):  # no backend failure, no extra info
                return self._plain_batch(codes, plain)
        steps = self._finish_steps(stepping, codes, ran)
        # Each sub-env's infos (a step's; or the end of its episode and the reset after it),
        # batched in the sub-envs' order, as Gymnasium's vector envs add them.
        infos: dict[int, list[dict[str, Any]]] = {}
        ended: list[int] = []
        same_step = self.autoreset_mode is AutoresetMode.SAME_STEP
        env_obs, rewards = self._env_obs, self._rewards
        terminations, truncations = self._terminations, self._truncations
        for i, (obs, reward, terminated, truncated, info) in zip(stepping, steps, strict=True):
            if limit is not None and envs[i].step_count >= limit:
                truncated = True
            env_obs[i] = obs
            rewards[i] = reward
            terminations[i] = terminated
            truncations[i] = truncated
            if same_step and (terminated or truncated):
                infos[i] = [{"final_obs": obs, "final_info": info}]
                ended.append(i)
            else:
                infos[i] = [info]
        restarted = ended + resetting
        for i, (obs, info) in zip(restarted, self._reset_envs(restarted, None, None),
                                  strict=True):
            env_obs[i] = obs
            infos.setdefault(i, []).append(info)
        entries = [(i, info) for i in sorted(infos) for info in infos[i]]
        for i in resetting:
            rewards[i] = 0.0
            terminations[i] = truncations[i] = False
        if not same_step:
            np.logical_or(terminations, truncations, out=self._autoreset_envs)
        return (self._batch_observations(env_obs), rewards.copy(), terminations.copy(),
                truncations.copy(), batch_infos(entries, self.num_envs))

    def _plain_batch(self, codes: list[str], results: list[ExecResult]) -> VectorStep:
        """:meth:`step`'s return when every sub-env stepped without a task, none reached its
        episode's end, and every result is plain (no extra info, no backend failure)."""
        env_obs, rewards = self._env_obs, self._rewards
        for i, (env, code, result) in enumerate(zip(self.envs, codes, results, strict=True)):
            env._last = (code, result)
            env_obs[i] = observation_of(result)
            rewards[i] = env.reward_transforms(code, result, 0.0)
        self._terminations.fill(False)
        self._truncations.fill(False)
        self._autoreset_envs.fill(False)
        return (self._batch_observations(env_obs), rewards.copy(), self._terminations.copy(),
                self._truncations.copy(),
                plain_infos(results, [env.episode_id for env in self.envs],
                            [env.step_count for env in self.envs]))

    def render(self) -> tuple[Any, ...] | None:
        """What each sub-env renders (``render_mode="ansi"``: the last step as text)."""
        return tuple(env.render() for env in self.envs)

    def close_extras(self, **kwargs: Any) -> None:
        for env in self.envs:
            env.close()
        self._loop.close()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> CodingVectorEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call method ``name`` (or get attribute ``name``) of every sub-env."""
        results = []
        for env in self.envs:
            attribute = getattr(env, name)
            results.append(attribute(*args, **kwargs) if callable(attribute) else attribute)
        return tuple(results)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """Attribute ``name`` of every sub-env."""
        return tuple(getattr(env, name) for env in self.envs)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        """Set attribute ``name`` of every sub-env: one value each, or the same for all."""
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError(f"Expected {self.num_envs} values, one per sub-env, got {len(values)}")
        for env, value in zip(self.envs, values, strict=True):
            setattr(env, name, value)

    # -- Internals -----------------------------------------------------------------------------

    def _check_actions(self, actions: Any) -> list[Any]:
        if isinstance(actions, (str, bytes)) or not isinstance(actions, Sequence):
            raise TypeError(
                f"Expected a tuple or list of {self.num_envs} programs (one per sub-env), got "
                f"{type(actions).__name__}"
            )
        if len(actions) != self.num_envs:
            raise ValueError(
                f"Expected {self.num_envs} actions (one per sub-env), got {len(actions)}"
            )
        return list(actions)

    def _reset_mask(self, mask: Any) -> np.ndarray:
        if mask is None:
            return np.ones(self.num_envs, dtype=np.bool_)
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ \
                or mask.shape != (self.num_envs,):
            raise ValueError(
                f"options['reset_mask'] must be a bool numpy array of shape ({self.num_envs},), "
                f"got {mask!r}"
            )
        if not mask.any():
            raise ValueError("options['reset_mask'] must select at least one sub-env")
        return mask

    def _run(self, indices: list[int], codes: list[str]) -> list[Ran]:
        """Run ``codes[k]`` in sub-env ``indices[k]``, all at once; each one's result and
        infra error, in that order."""
        backends = [self.envs[i].backend for i in indices]
        if self.num_envs == 1:
            # Stepped as CodingEnv.step steps it, in this thread: a local worker follows the
            # thread while no other thread steps one (LocalBackend.run).
            return [_run_one(backend, code) for backend, code in zip(backends, codes, strict=True)]
        if all(isinstance(backend, LocalBackend) for backend in backends):
            return _run_local(backends, codes, self._loop)  # type: ignore[arg-type]
        return list(self._threads().map(_run_one, backends, codes))

    def _finish_steps(self, indices: list[int], codes: list[str],
                      ran: list[Ran]) -> list[StepTuple]:
        """Each sub-env's step; the gradings of sub-envs with tasks run at once, a thread each."""
        def finish(k: int) -> StepTuple:
            return self.envs[indices[k]]._finish_step(codes[k], *ran[k])

        graded = [k for k, i in enumerate(indices) if self.envs[i]._tasks is not None]
        done = dict(zip(graded, self._threads().map(finish, graded) if len(graded) > 1
                        else map(finish, graded), strict=True))
        return [done[k] if k in done else finish(k) for k in range(len(indices))]

    def _reset_envs(self, indices: list[int], seeds: Sequence[int | None] | None,
                    options: dict[str, Any] | None) -> list[tuple[Observation, dict[str, Any]]]:
        def reset(i: int) -> tuple[Observation, dict[str, Any]]:
            return self.envs[i].reset(seed=None if seeds is None else seeds[i], options=options)

        if len(indices) <= 1:
            return [reset(i) for i in indices]
        return list(self._threads().map(reset, indices))

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.num_envs,
                                            thread_name_prefix="coding-gym-vector")
        return self._pool


def _run_one(backend: Any, code: str) -> Ran:
    try:
        return backend.run(code), None
    except BackendError as e:
        return backend_failure(e), str(e)


#: The place of a step in :func:`_run_local`'s results until it is finished.
_UNFINISHED: Ran = (ExecResult(), None)


def _run_local(backends: list[LocalBackend], codes: list[str], loop: StepLoop) -> list[Ran]:
    """One ``epoll`` loop over every worker (see :class:`coding_gym.sandbox.fanout.StepLoop`);
    the steps are finished once every result is in.

    Each step used to be finished as its result came in, by a callback of the loop, so that
    the work overlapped the code of the others: it made no measurable difference (the
    parent's CPU per env-step, 8 envs stepping ``print(1)`` on 2 CPUs: 29.7-33.2 µs with it,
    29.1-32.9 µs without, three runs each in turns), and the loop is simpler without.
    """
    ran: list[Ran] = []
    started: list[tuple[int, StepRun]] = []
    for k, (backend, code) in enumerate(zip(backends, codes, strict=True)):
        try:
            started.append((k, backend.begin(code)))
        except BackendError as e:
            ran.append((backend_failure(e), str(e)))
            continue
        ran.append(_UNFINISHED)
    results = loop.run([step for _, step in started])
    for (k, step), result in zip(started, results, strict=True):
        try:
            ran[k] = (backends[k].finish(step, result), None)
        except BackendError as e:
            ran[k] = (backend_failure(e), str(e))
    return ran
