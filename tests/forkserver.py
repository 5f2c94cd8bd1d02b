"""Run repo scripts as forks of one process that has already imported torch (conftest.run_script(fork=True)).

A fresh `python train.py ...` spends ~2 s importing torch before it reads its first flag; the bad-input battery runs
a hundred such processes that each stop at their first check, so that import was nearly all of its time. This server
imports the heavy third-party modules once (never the repo's own, so each case imports this checkout's code fresh),
then forks one child per request. The child takes the request's argv, working directory and environment, sends its
stdout and stderr to the request's files, and runs the script as `python` would (`-c CODE` too); the server reports
the child's exit status. Protocol, one JSON object per line: in {"id", "argv", "cwd", "env", "out", "err"};
out {"id", "pid"} when it starts and {"id", "rc"} when it ends (rc negative: killed by that signal, as subprocess
reports it).
"""
import json
import os
import runpy
import select
import sys
import traceback

import numpy  # noqa: F401  (imported once here: the point of the server)
import torch  # noqa: F401
import torch.distributed  # noqa: F401
import torch.distributed.checkpoint.state_dict  # noqa: F401
import torch.nn.parallel  # noqa: F401

IMPORT_TIME_ENV = [('TQDM_', 'tqdm')]  # (variable prefix, module that reads it when imported; torch imports tqdm)


def child(req):
    """become the requested `python ARGV...` process; never returns"""
    code = 1
    try:
        os.chdir(req['cwd'])
        changed = {k for k in set(os.environ) | set(req['env']) if os.environ.get(k) != req['env'].get(k)}
        os.environ.clear()
        os.environ.update(req['env'])
        for prefix, module in IMPORT_TIME_ENV:  # imported with the server's environment: import again with this one
            if any(k.startswith(prefix) for k in changed):
                for name in [m for m in sys.modules if m == module or m.startswith(module + '.')]:
                    del sys.modules[name]
        for fd, path in ((1, req['out']), (2, req['err'])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdin = open(os.devnull)
        argv = req['argv']
        if argv[0] == '-c':  # python -c CODE ARGS: sys.argv is ['-c', ARGS...], and '' (the cwd) leads sys.path
            sys.argv, sys.path[0] = ['-c', *argv[2:]], ''
            exec(compile(argv[1], '<string>', 'exec'), {'__name__': '__main__'})
        else:
            sys.argv = argv
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name='__main__')
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    try:
        import atexit
        atexit._run_exitfuncs()  # what the interpreter runs at exit (wandb, multiprocessing, logging)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main():
    running = {}  # pid -> request id
    buf = b''
    stdin = sys.stdin.buffer.raw
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.02 if running else None)
        if ready:
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                break  # the tests are done
            buf += chunk
            while b'\n' in buf:
                line, buf = buf.split(b'\n', 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    child(req)
                running[pid] = req['id']
                sys.stdout.write(json.dumps({'id': req['id'], 'pid': pid}) + '\n')
                sys.stdout.flush()
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            rc = os.waitstatus_to_exitcode(status)
            sys.stdout.write(json.dumps({'id': running.pop(pid), 'rc': rc}) + '\n')
            sys.stdout.flush()


if __name__ == '__main__':
    main()
