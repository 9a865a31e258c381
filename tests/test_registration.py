from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_registers_env_and_starts_no_process():
    out = _run("""
        import os, gymnasium
        import coding_gym
        from coding_gym.sandbox.processes import descendants
        print("CodingEnv-v0" in gymnasium.registry, len(descendants(os.getpid())))
    """)
    assert out.split() == ["True", "0"]


def test_make_with_module_prefix_in_fresh_interpreter():
    out = _run("""
        import gymnasium
        env = gymnasium.make("coding_gym:CodingEnv-v0")
        env.reset(seed=0)
        obs, *_ = env.step("print(6 * 7)")
        env.close()
        print(obs["stdout"].strip())
    """)
    assert out.strip() == "42"
