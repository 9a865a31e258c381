"""Walk through one episode of CodingEnv: reset, run three programs, print what they did.

    python examples/example_usage.py                       # local sandbox (default)
    python examples/example_usage.py --backend remote --base-url http://127.0.0.1:8000
    python examples/example_usage.py --backend docker --image coding-env:latest
"""

from __future__ import annotations

import argparse

import gymnasium as gym

import coding_gym  # noqa: F401 - registers CodingEnv-v0

SAMPLES = [
    ("Hello world", 'print("Hello, World!")'),
    ("State persists between steps", "x = 5\ny = 10\nprint(f'{x} + {y} = {x + y}')"),
    ("Errors come back as observations", "import math\nprint(math.sqrt(-1))"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="local", choices=["local", "remote", "docker"])
    parser.add_argument("--base-url", help="server URL for --backend remote")
    parser.add_argument("--image", help="image for --backend docker")
    parser.add_argument("--token", help="bearer token of the server, if it needs one")
    args = parser.parse_args()

    options = {"backend": args.backend}
    for name in ("base_url", "image", "token"):
        if getattr(args, name):
            options[name] = getattr(args, name)

    env = gym.make("CodingEnv-v0", **options)
    try:
        _, info = env.reset(seed=0)
        print(f"Episode {info['episode_id']} on the {args.backend} backend\n")
        for title, code in SAMPLES:
            observation, reward, terminated, truncated, info = env.step(code)
            print(f"--- {title}")
            print(code)
            print(f"stdout:    {observation['stdout']!r}")
            if observation["stderr"]:
                print(f"stderr:    {observation['stderr'].strip().splitlines()[-1]!r}")
            print(f"exit code: {observation['exit_code']}  "
                  f"({info['wall_time_s'] * 1000:.0f} ms, reward {reward})\n")
    finally:
        env.close()


if __name__ == "__main__":
    main()
