"""The ``ufaas`` command as the tests run it: the console script installed beside this
interpreter when there is one (running it proves the entry point), else ``python -m``."""

from __future__ import annotations

import os
import sys


def ufaas_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "ufaas")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "ufaas.cli"]
