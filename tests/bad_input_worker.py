"""Runs the bad-input cases (tests/bad_input_cases.py) from index START on, one
JSON line per case on stdout: {"start": i} before it runs, then {"index": i,
"passed": bool, "detail": str}. A crash leaves a "start" line without its result,
which tests/test_bad_input.py reports as that case's failure before resuming
with the next case in a fresh process.

    python tests/bad_input_worker.py START
"""

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bad_input_cases import CASES  # noqa: E402


def outcome(case):
    try:
        case.run()
    except Exception as e:  # noqa: BLE001 - every exception is an outcome to judge
        message = str(e)
        if case.error is None:
            return False, f"raised {type(e).__name__}: {message}\n{traceback.format_exc(limit=4)}"
        missing = [f for f in case.error if f.lower() not in message.lower()]
        if missing:
            return False, f"the {type(e).__name__} does not say {missing}: {message!r}"
        return True, message
    if case.error is not None:
        return False, f"returned without an error; expected one mentioning {case.error}"
    return True, "ok"


def main(start):
    for i in range(start, len(CASES)):
        print(json.dumps({"start": i}), flush=True)
        passed, detail = outcome(CASES[i])
        print(json.dumps({"index": i, "passed": passed, "detail": detail}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
