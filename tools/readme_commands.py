"""Prints the README's two commands, one per line, exactly as the README writes
them: the non-comment lines of the first ```bash block under "## Two commands".
CI runs what this prints, so the README and CI cannot drift apart.

    python tools/readme_commands.py [README.md]
"""

from __future__ import annotations

import sys


def readme_commands(text: str) -> list[str]:
    lines = text.splitlines()
    try:
        start = lines.index("## Two commands")
        fence = next(i for i in range(start, len(lines)) if lines[i].strip() == "```bash")
        end = next(i for i in range(fence + 1, len(lines)) if lines[i].strip() == "```")
    except (ValueError, StopIteration):
        raise SystemExit("README: no ```bash block under '## Two commands'") from None
    commands = [line for line in lines[fence + 1:end] if line.strip() and not line.lstrip().startswith("#")]
    if len(commands) != 2:
        raise SystemExit(f"README: expected two commands under '## Two commands', found {len(commands)}")
    return commands


if __name__ == "__main__":
    with open(sys.argv[1] if len(sys.argv) > 1 else "README.md") as f:
        print("\n".join(readme_commands(f.read())))
