"""The README's walk-through of a retried charge, run against a live node."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.nodes import NodeProcess

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## A retried charge, by hand"


def walkthrough_commands() -> list[str]:
    text = README.read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL):
        joined = block.replace("\\\n", " ")
        commands += [line.strip() for line in joined.splitlines() if line.strip()]
    return commands


def test_readme_curl_walkthrough(node: NodeProcess) -> None:
    """Every curl line of the README's walk-through answers as the text says."""
    commands = walkthrough_commands()
    curls = [command for command in commands if command.startswith("curl")]
    assert len(curls) == 7
    assert any("cmdlog serve" in command for command in commands)

    outputs = []
    for command in curls:
        command = command.replace("127.0.0.1:7001", f"127.0.0.1:{node.port}")
        result = subprocess.run(
            command, shell=True, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)

    first_charge, retried_charge, balance = outputs[2], outputs[3], outputs[4]
    assert first_charge.startswith("HTTP/1.1 201")
    assert retried_charge.startswith("HTTP/1.1 200")
    assert "Idempotent-Replayed: true" in retried_charge
    # subprocess turns the header lines' CRLF into LF (text mode).
    assert first_charge.split("\n\n")[1] == retried_charge.split("\n\n")[1]
    assert json.loads(balance)["result"]["balance"] == 3750
    assert outputs[5].startswith("HTTP/1.1 201")
    assert outputs[6].startswith("HTTP/1.1 200")
    assert "Idempotent-Replayed: true" in outputs[6]
