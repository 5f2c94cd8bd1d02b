"""
Files written so that a crash, a kill or a full disk never leaves a file half-written or a set of files that do not
belong together (a dataset's bins and meta.json, a run's log), and so that one process at a time writes a directory.
train.py, the prepare scripts (dataprep.py) and export.py write through here; a checkpoint, one file, through
runtime.save_atomic.

    lock_dir(folder)             make this process the one writer of folder until it exits: '' or who holds it now
    write_files(folder, {name: bytes or None})   replace a set of files together or not at all (None removes a name)
    commit(folder, {name: temp name or None})    the same for files already streamed to temp names (dataprep's bins)
    temp_name(name)              name.tmp.<pid>, this process's temp name for name
    sweep(folder, name)          remove the temp files (and directories) that killed writers left behind
    finish_pending(folder)       for a reader: complete a replacement that a killed writer left half done
    why(e)                       what went wrong with a write, in a few words ('No space left on device')

A set is replaced in two steps. First every new file is written whole under its temp name in the target folder and
fsynced; a failure here (a full disk) removes the temp files and raises OSError with one line, the old files
untouched. Then a journal (.commit.json) records the renames, they are done, and the journal is removed: a kill
during the renames leaves the journal, and the next writer (lock_dir) or reader (finish_pending) completes them
before anything else, so the set is never seen half old, half new.
The lock is flock(2) on the directory itself: no lock file is written, and the kernel releases it when the process
ends, however it ends, so a killed writer never blocks the next one.
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import time

JOURNAL = '.commit.json'
held = {}  # real path -> open descriptor of each directory this process has locked (closing it would unlock)


def why(e):
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def temp_name(name):
    return f"{name}.tmp.{os.getpid()}"


def sync_dir(folder):
    """make renames in folder durable (best effort: some filesystems cannot fsync a directory)"""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path):
    with contextlib.suppress(OSError):
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def write_files(folder, contents):
    """contents {name: bytes, or None to remove that name}: all of them in place in folder, or (OSError) none."""
    os.makedirs(folder, exist_ok=True)
    temps = {}
    try:
        for name, data in contents.items():
            temps[name] = None if data is None else temp_name(name)
            if data is not None:
                with open(os.path.join(folder, temps[name]), 'wb') as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        commit(folder, temps)
    except OSError as e:
        if os.path.exists(os.path.join(folder, JOURNAL)):  # the journal needs the temp files to finish the change
            raise OSError(f"could not finish replacing files in {folder} ({why(e)}); the next run there completes "
                          f"it") from None
        for tmp in temps.values():
            if tmp:
                remove(os.path.join(folder, tmp))
        raise OSError(f"could not write {os.path.join(folder, name)} ({why(e)}); the files there are "
                      f"unchanged") from None


def commit(folder, temps):
    """temps {name: its temp name in folder (complete, fsynced), or None to remove name}: every name put in place as one
    change. OSError before the journal is down: nothing changed (the temp files are the caller's to remove). After it
    the change is done now, or, if this process dies or a rename fails, by the next lock_dir or finish_pending."""
    if len(temps) == 1 and None not in temps.values():  # one file: its rename is all or nothing already
        (name, tmp), = temps.items()
        os.replace(os.path.join(folder, tmp), os.path.join(folder, name))
        return sync_dir(folder)
    journal, tmp = os.path.join(folder, JOURNAL), os.path.join(folder, temp_name(JOURNAL))
    try:
        with open(tmp, 'w') as f:
            json.dump(temps, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, journal)
    except OSError:
        remove(tmp)
        raise
    sync_dir(folder)
    finish(folder)


def finish(folder):
    """do the renames the journal lists (those not done yet: their temp file is still there), then drop the journal"""
    journal = os.path.join(folder, JOURNAL)
    with open(journal) as f:
        temps = json.load(f)
    for name, tmp in temps.items():
        if tmp is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
        elif os.path.exists(os.path.join(folder, tmp)):
            os.replace(os.path.join(folder, tmp), os.path.join(folder, name))
    sync_dir(folder)
    os.remove(journal)
    sync_dir(folder)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def recover(folder):
    """with folder locked: complete an interrupted replacement, and remove the temp files and directories
    (NAME.tmp.<pid>) of writers that were killed mid-write"""
    if os.path.exists(os.path.join(folder, JOURNAL)):
        finish(folder)
    sweep(folder)


def sweep(folder, name=None):
    """remove the temp files and directories (NAME.tmp.<pid>, or only name's) of writers killed mid-write: those whose
    process is gone (a live writer's are left alone, so this is safe without the lock)"""
    for entry in os.listdir(folder):
        m = re.fullmatch(r'(.+)\.tmp\.(\d+)', entry)
        if m and name in (None, m.group(1)) and not alive(int(m.group(2))):
            remove(os.path.join(folder, entry))


def holder(folder):
    """who holds folder's lock: 'pid N: its command' from /proc/locks (Linux), or 'another process'"""
    inode = f":{os.stat(folder).st_ino}"
    with contextlib.suppress(OSError, IndexError):
        for line in open('/proc/locks'):
            f = line.split()  # N: FLOCK ADVISORY WRITE pid major:minor:inode start end ('->' marks a waiter)
            if f[1] == 'FLOCK' and f[5].endswith(inode):
                args = open(f'/proc/{f[4]}/cmdline', 'rb').read().decode(errors='replace').split('\0')
                if os.path.basename(args[0]).startswith('python'):
                    args = args[1:]  # the script and its flags say more than the interpreter's path
                cmd = ' '.join(' '.join(args).split())
                return f"pid {f[4]}: {cmd[:100]}{'...' if len(cmd) > 100 else ''}"
    return "another process"


def lock_dir(folder):
    """Make this process the one writer of folder (created if missing) until it exits, then complete what a killed
    writer left there. Returns '' when it is ours, or who holds it (holder) when another process does."""
    key = os.path.realpath(folder)
    if key in held:
        return ''
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return holder(folder)
    except OSError as e:  # a filesystem without locks (some network mounts): write unlocked, but say so
        print(f"note: {folder} cannot be locked ({why(e)}); make sure no other process writes it", file=sys.stderr)
    held[key] = fd
    recover(folder)
    return ''


def finish_pending(folder):
    """For a reader of a set of files (a dataset): complete a replacement in folder that a killed writer left half
    done (the lock is free), or wait the moment a live writer (it holds the lock) takes to complete its own."""
    journal = os.path.join(folder, JOURNAL)
    if not os.path.exists(journal):
        return
    if os.path.realpath(folder) in held:
        return recover(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(100):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not os.path.exists(journal):
                    return
                time.sleep(0.05)
                continue
            if os.path.exists(journal):
                finish(folder)
            return
    finally:
        os.close(fd)
    raise OSError(f"its writer ({holder(folder)}) has not finished replacing it")
