"""Peak memory of a command and all its child processes (forked export workers included).

    python benchmarks/peak_tree.py -- mobizo export ...

Prints one JSON line: ``peak_rss_mib`` (the command's own high-water mark, ``ru_maxrss``),
``peak_tree_pss_mib`` (the highest sum over the process tree of PSS, proportional set size:
pages shared copy-on-write between a parent and its forked workers are counted once, split
between them; sampled every 0.5 s, so a short spike between samples can be missed) and ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], usage="%(prog)s [-h] -- COMMAND [ARG ...]")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command to run and measure, after --")
    argv = ap.parse_args().command
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        ap.error("no command given (peak_tree.py -- COMMAND ...)")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            tree, todo = [], [proc.pid]
            while todo:
                p = todo.pop()
                tree.append(p)
                todo += _children(p)
            peak[0] = max(peak[0], sum(_pss_kib(p) for p in tree))
            done.wait(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    t.join()
    print(
        json.dumps(
            {
                "exit": os.waitstatus_to_exitcode(status),
                "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
                "peak_tree_pss_mib": round(peak[0] / 1024, 1),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
