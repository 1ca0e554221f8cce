"""Run command lines of tools/*.py one after another in this process, each exactly as
``python tools/X.py ARGS`` runs it (the script executed as ``__main__`` with ``sys.argv`` set),
so a test can try many bad command lines for the price of one interpreter start.

    python corpus_cli_cases.py CASES.json   # [[tool_path, [arg, ...]], ...]
prints a JSON list of {"rc": exit status or "traceback", "output": stdout + stderr, "seconds"}.
"""

import contextlib
import io
import json
import runpy
import sys
import time
import traceback

results = []
for tool, argv in json.load(open(sys.argv[1])):
    out = io.StringIO()
    start = time.perf_counter()
    sys.argv = [tool, *argv]
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        try:
            runpy.run_path(tool, run_name="__main__")
            rc = 0
        except SystemExit as exc:  # what the interpreter does with it at exit
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
                rc = 1
            else:
                rc = exc.code or 0
        except BaseException:  # noqa: BLE001 - an uncaught exception is what the test looks for
            traceback.print_exc()
            rc = "traceback"
    results.append({"rc": rc, "output": out.getvalue(), "seconds": round(time.perf_counter() - start, 2)})
sys.__stdout__.write(json.dumps(results))
