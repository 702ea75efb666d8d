"""A fork server for the fault-injection tests: pay Python's import cost once, fork a process per run.

Starting ``python -m mobizo train`` costs ~4 s, almost all of it importing torch and
transformers. This process imports them once, then serves JSON commands on stdin:

* ``{"cmd": "run", "argv": [...], "env": {...}, "log": path}``: fork a child that runs
  ``mobizo.cli.main(argv)`` (stdout/stderr to ``log``) and exits with its return code;
  answers ``{"pid": pid}``. The child is a real separate process: the test SIGKILLs it.
* ``{"cmd": "wait", "pid": pid, "block": bool}``: reap it; answers ``{"rc": code}`` (``-signal``
  when killed) or ``{"rc": null}`` if still running and not blocking.

The server itself never runs a torch op, so forking it is safe (no thread pools yet).
"""

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings

warnings.filterwarnings("ignore")

import peft  # noqa: F401
import safetensors.torch  # noqa: F401
import torch
import tqdm  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401

import mobizo.checkpoint
import mobizo.cli
import mobizo.engines.eager
import mobizo.models
import mobizo.tasks.custom
import mobizo.tasks.synthetic
import mobizo.trainer


def _child(argv, env, log) -> None:
    code = 1
    try:
        os.environ.update(env)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdin.close()
        torch.set_num_threads(1)
        code = mobizo.cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)


def _status(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main() -> None:
    out = sys.stdout
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "run":
            pid = os.fork()
            if pid == 0:
                _child(req["argv"], req.get("env", {}), req["log"])
            reply = {"pid": pid}
        elif req["cmd"] == "wait":
            pid, status = os.waitpid(req["pid"], 0 if req.get("block", True) else os.WNOHANG)
            reply = {"rc": _status(status) if pid else None}
        else:
            reply = {"error": f"unknown command {req['cmd']!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
