"""A test app whose one command type takes APPLY_S seconds to apply.

The writer thread applies a command inside its commit, so a test can send a
`slow.note` and then SIGTERM while that commit is in progress. The sleep
breaks the rule that handlers are pure, which only a test app may do.
"""

from __future__ import annotations

import time
from typing import Any

from cmdlog.app import App, Domain, State
from cmdlog.model import Command

APPLY_S = 1.0

slow = Domain("slow")


@slow.command("slow.note")
def note(state: State, command: Command) -> dict[str, Any]:
    time.sleep(APPLY_S)
    return {}


app = App([slow])
