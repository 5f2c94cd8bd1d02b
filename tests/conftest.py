"""Shared test fixtures: paths, the optional ../shared data, offline tiktoken, and how scripts are run."""
import os
import string
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), 'shared')
SHAKESPEARE = os.path.join(SHARED, 'data', 'tinyshakespeare', 'input.txt')
R50K_FILE = '0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4'  # tiktoken's cache name for r50k_base (sha1 of its URL)


def find_tiktoken_cache():
    """a folder holding GPT-2's BPE, searched as tiktoken searches (so as the scripts find it): $TIKTOKEN_CACHE_DIR,
    $DATA_GYM_CACHE_DIR, the temp dir's data-gym-cache; then this project's ../shared/tiktoken_cache. None if none has it"""
    import tempfile
    for d in (os.environ.get('TIKTOKEN_CACHE_DIR'), os.environ.get('DATA_GYM_CACHE_DIR'),
              os.path.join(tempfile.gettempdir(), 'data-gym-cache'), os.path.join(SHARED, 'tiktoken_cache')):
        if d and os.path.isfile(os.path.join(d, R50K_FILE)):
            return d
    return None


TIKTOKEN_CACHE = find_tiktoken_cache()
sys.path.insert(0, REPO)


def pytest_addoption(parser):
    parser.addoption('--full', action='store_true', default=False,
                     help="run the long acceptance tests at full size (CI runs their short versions)")


@pytest.fixture(scope='session')
def full(request):
    """True under `pytest --full`: acceptance tests run at their documented full size instead of the CI size"""
    return request.config.getoption('--full')


@pytest.fixture(autouse=True, scope='session')
def _one_thread():
    """Tiny models in this process: extra threads only add contention (several times slower on a busy 2-core box)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiktoken_offline(monkeypatch):
    """Make tiktoken.get_encoding('r50k_base') work offline from the cache the scripts would use, or skip."""
    if not TIKTOKEN_CACHE:
        pytest.skip("GPT-2's BPE is not cached here: set TIKTOKEN_CACHE_DIR to a tiktoken cache that holds r50k_base "
                    "(see the README's offline set-up) to run this test")
    monkeypatch.setenv('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)
    return TIKTOKEN_CACHE


def text_corpus(n_chars=200_000):
    """Tiny Shakespeare from ../shared when there, else deterministic generated English-like text."""
    if os.path.isfile(SHAKESPEARE):
        return open(SHAKESPEARE).read()[:n_chars]
    rng = np.random.default_rng(0)
    words = [''.join(rng.choice(list(string.ascii_lowercase), size=rng.integers(1, 8))) for _ in range(300)]
    out, n = [], 0
    while n < n_chars:
        line = ' '.join(rng.choice(words, size=rng.integers(3, 12))).capitalize() + '.\n'
        out.append(line)
        n += len(line)
    return ''.join(out)[:n_chars]


def write_char_dataset(path, text=None, val_frac=0.1):
    """A char-level dataset (train.bin, val.bin, meta.json) in path, like data/shakespeare_char makes."""
    import json
    text = text or text_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * (1 - val_frac))
    os.makedirs(path, exist_ok=True)
    ids[:n].tofile(os.path.join(path, 'train.bin'))
    ids[n:].tofile(os.path.join(path, 'val.bin'))
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump({'vocab_size': len(chars), 'itos': chars}, f)
    return path


class ForkServer:
    """tests/forkserver.py, started once: a script run as a fork of a process that has imported torch already"""
    def __init__(self):
        import threading
        self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'forkserver.py')], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, 'OMP_NUM_THREADS': '1'})
        self.lock, self.next_id, self.waiting = threading.Lock(), 0, {}
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        import json
        for line in self.proc.stdout:
            msg = json.loads(line)
            w = self.waiting[msg['id']]
            w.update(msg)
            if 'rc' in msg:
                w['done'].set()

    def run(self, args, cwd, env, timeout):
        import json
        import shutil
        import tempfile
        import threading
        d = tempfile.mkdtemp()
        out, err = os.path.join(d, 'out'), os.path.join(d, 'err')
        with self.lock:
            self.next_id += 1
            i, w = self.next_id, {'done': threading.Event()}
            self.waiting[i] = w
            self.proc.stdin.write(json.dumps({'id': i, 'argv': list(args), 'cwd': str(cwd), 'env': env,
                                              'out': out, 'err': err}) + '\n')
            self.proc.stdin.flush()
        try:
            if not w['done'].wait(timeout):
                os.kill(w['pid'], 9)
                raise subprocess.TimeoutExpired(args, timeout)
            read = lambda path: open(path, errors='backslashreplace').read()
            return subprocess.CompletedProcess(args, w['rc'], read(out), read(err))
        finally:
            shutil.rmtree(d, ignore_errors=True)


_fork_server = []


def run_script(*args, cwd=REPO, env=None, timeout=600, check=True, fork=False):
    """Run a repo script as a user would; returns the CompletedProcess (stdout/stderr as text). fork=True runs it as
    a fork of tests/forkserver.py (torch already imported: ~2 s less per run) unless it is a `-m` module run."""
    # one thread per process: tiny models run faster so, and torchrun's processes don't fight over 2 cores
    full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'OMP_NUM_THREADS': '1', **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # env={'X': None} removes X
    if fork and args[0] != '-m':
        if not _fork_server:
            _fork_server.append(ForkServer())
        p = _fork_server[0].run(args, cwd, full_env, timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
        return p
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 and 'torch.distributed.run' in args and 'terminate called without an active exception' in p.stderr:
        # a rare abort inside gloo's teardown at process exit (upstream, after all work is done and saved);
        # the runs are deterministic, so running again gives the same result
        p = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                           timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}")
    return p


def logged(out_dir, key='loss'):
    """{step: value} of `key` from a run's log.jsonl, at full precision (the printed log line rounds to 4 decimals,
    so two runs 1e-6 apart can print values 1e-4 apart: compare these, never the printout)"""
    import json
    records = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    return {r['iter']: r[key] for r in records if r.get(key) is not None}


def full_disk(limit):
    """python's arguments that run a script (the next argument) as on a disk that fills up: every write taking a file
    past `limit` bytes fails. RLIMIT_FSIZE makes the kernel refuse it, in any library, as a full disk does (with
    EFBIG, 'File too large', where a full disk says ENOSPC), and needs neither root nor a mount."""
    return ['-c', "import os, resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                  f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); sys.argv = sys.argv[1:]; "
                  "sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0])); "
                  "runpy.run_path(sys.argv[0], run_name='__main__')"]


def leftovers(path):
    """temp files (NAME.tmp, NAME.tmp.<pid>) and unfinished replacements (files.JOURNAL) anywhere under path"""
    return [os.path.join(d, f) for d, dirs, files in os.walk(path) for f in files + dirs
            if '.tmp' in f or f == '.commit.json']


def snapshot(path):
    """relative name -> sha256 of every file under path (or of path itself), None if it does not exist"""
    import hashlib
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return hashlib.sha256(open(path, 'rb').read()).hexdigest()
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest()
            for d, _, files in os.walk(path) for f in files}


def run_bad_inputs(cases, protect=(), workers=2):
    """Run each (args, expected message) case as a subprocess, two at a time (they are mostly start-up), and assert
    what a user must see: a non-zero exit, exactly one 'error: ...' line on stderr containing the message, no
    traceback, and every path in `protect` byte-identical afterwards. Returns the CompletedProcesses."""
    from concurrent.futures import ThreadPoolExecutor
    before = {p: snapshot(p) for p in protect}
    run = lambda case: run_script(*case[0], check=False, env=case[2] if len(case) > 2 else None, fork=True)
    with ThreadPoolExecutor(workers) as pool:
        done = list(pool.map(run, cases))
    for case, p in zip(cases, done):
        args, message = case[0], case[1]
        err = p.stderr.strip()
        assert p.returncode != 0, (args, p.stdout[-500:])
        assert 'Traceback' not in p.stderr, (args, err[-2000:])
        assert len(err.splitlines()) == 1 and err.startswith('error: '), (args, err[-2000:])
        assert message in err, (args, message, err)
    for path, snap in before.items():
        assert snapshot(path) == snap, f"{path} changed"
    return done
