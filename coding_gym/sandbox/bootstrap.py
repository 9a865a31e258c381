"""The command line that starts a sandbox process (a worker or the zygote) with ``sys.executable``.

The process loads the sandbox modules without running ``coding_gym/__init__.py`` (which imports
Gymnasium): a stand-in package points at the real directory, then leaves ``sys.modules`` so
agent code cannot import ``coding_gym``.
"""

from __future__ import annotations

import os
import sys

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BOOTSTRAP = """\
import sys, types
def _boot():
    package = types.ModuleType("coding_gym")
    package.__path__ = [sys.argv[1]]
    sys.modules["coding_gym"] = package
    import importlib
    module = importlib.import_module("coding_gym.sandbox." + sys.argv[2])
    for name in [n for n in sys.modules if n.split(".")[0] == "coding_gym"]:
        del sys.modules[name]
    return module.main
main = _boot()
del _boot, types
main(sys.argv[3:])
"""


def python_command(module: str, *args: str) -> list[str]:
    """``sys.executable`` in isolated mode, running ``coding_gym.sandbox.<module>.main(args)``."""
    return [sys.executable, "-I", "-c", _BOOTSTRAP, PACKAGE_DIR, module, *args]
