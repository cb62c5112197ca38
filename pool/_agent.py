"""The in-container agent: a pool container's main process, it runs functions on request.

Stdlib only, Python >= 3.7, because it runs under whatever python3 the image has. Its
source travels as ``python3 -c`` text, so this module must import nothing from ``pool``.
Wire format both ways: ``>II`` (header length, body length), a JSON header, raw body bytes.
One thread, one selector loop: host messages, the function's pipes, its exit (a pidfd) and
its deadline are all events, so a run costs no thread and no polling.

The agent runs as root with only SETUID, SETGID and KILL; functions run as the pool's user
(``--user``) with none, so a function can neither signal, trace nor read the agent. All
file work in a function's places is done as that user. Its stdin is the host's stream:
when it ends, whoever ended it, the agent kills everything and exits, and so does the
container.
"""

import contextlib
import ctypes
import fcntl
import fnmatch
import json
import marshal
import os
import selectors
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time

HEAD = struct.Struct(">II")
CHUNK = 65536
# The parent of every working directory: owned by root, mode 1733 (set by its tmpfs):
# a function can make its own working directory but neither list nor touch another's.
ROOT = os.environ.get("UFAAS_ROOT", "/tmp/ufaas")
# The writable places a function may leave something in, outside its working directory.
TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue")
IN_CONTAINER = "--in-pool-container"
# How long the pipes of a function that has exited may stay open (held by what it left).
DRAIN = 2.0
_libc = ctypes.CDLL(None, use_errno=True)
# SysV IPC: /proc lists each kind, and IPC_RMID removes one by id.
_IPC_RMID = 0
_SYSV = (("/proc/sysvipc/shm", lambda i: _libc.shmctl(i, _IPC_RMID, None)),
         ("/proc/sysvipc/sem", lambda i: _libc.semctl(i, 0, _IPC_RMID)),
         ("/proc/sysvipc/msg", lambda i: _libc.msgctl(i, _IPC_RMID, None)))
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36
# The zygote (pool/_zygote.py): how long it may take to preload, to fork a spare a run waits
# for or to report a child's exit; how many children one forks before a new one takes over
# (they share its str hash seed); and how often it may die before the container does
# without one.
ZYGOTE_START = 15.0
ZYGOTE_GRACE = 2.0
ZYGOTE_FORKS = 100
ZYGOTE_DEATHS = 3
ZYGOTE_MESSAGE = 1 << 20

_out_lock = threading.Lock()
# Output files: how many directory entries one collection looks at, at most, and the size
# of the pieces a file is sent in.
SCAN_LIMIT = 20000
FILE_CHUNK = 262144


def send(header, body=b""):
    data = json.dumps(header, separators=(",", ":")).encode()
    with _out_lock:
        out = sys.stdout.buffer
        out.write(HEAD.pack(len(data), len(body)) + data + body)
        out.flush()


def frames(buf):
    """Pop complete frames off the front of ``buf`` (a bytearray)."""
    while len(buf) >= HEAD.size:
        hlen, blen = HEAD.unpack_from(buf)
        end = HEAD.size + hlen + blen
        if len(buf) < end:
            return
        header = json.loads(bytes(buf[HEAD.size:HEAD.size + hlen]).decode())
        body = bytes(buf[HEAD.size + hlen:end])
        del buf[:end]
        yield header, body


def read_some(fd):
    """What a non-blocking pipe has: None when nothing yet, b"" at its end (or error)."""
    try:
        return os.read(fd, CHUNK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class Refused(Exception):
    """A file the function asked for would land outside its working directory."""


def _open_dir(parent_fd, name):
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except FileNotFoundError:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        # ELOOP/ENOTDIR: a symlink or a file where a directory should be.
        raise Refused("%s: not a directory inside the working directory (%s)"
                      % (name, exc.strerror))


def check_path(path):
    parts = path.split("/")
    if (not path or path.startswith("/") or "\x00" in path
            or any(p in ("", ".", "..") for p in parts)):
        raise Refused("%r: not a plain relative path" % path)
    return parts


def write_files(workdir_fd, files, body):
    """Write each file below ``workdir_fd`` without following any symlink on the way."""
    offset = 0
    for spec in files:
        parts = check_path(spec["path"])
        size = spec["size"]
        data = body[offset:offset + size]
        offset += size
        fd = os.dup(workdir_fd)
        try:
            for name in parts[:-1]:
                nfd = _open_dir(fd, name)
                os.close(fd)
                fd = nfd
            try:
                os.unlink(parts[-1], dir_fd=fd)
            except FileNotFoundError:
                pass
            except (IsADirectoryError, PermissionError):
                raise Refused("%s: is a directory" % spec["path"])
            out = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                          spec["mode"] & 0o777, dir_fd=fd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view):]
                os.fchmod(out, spec["mode"] & 0o777)
            finally:
                os.close(out)
        finally:
            os.close(fd)


_OOM_FILES = ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control")
_oom_file = []  # type: list  # the one that exists here, found on first use


def oom_kills():
    """The container cgroup's OOM kill count, or None where the kernel does not say."""
    for path in _oom_file or _OOM_FILES:
        try:
            with open(path, "rb") as f:
                for line in f:
                    name, _, value = line.partition(b" ")
                    if name == b"oom_kill":
                        if not _oom_file:
                            _oom_file.append(path)
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


_ROOT_IS_MOUNT = []  # type: list  # known once: a mount point does not come and go


def disk_low():
    """True when the working directories' own filesystem has under 1/8 of it free."""
    if not _ROOT_IS_MOUNT:
        _ROOT_IS_MOUNT.append(os.path.ismount(ROOT))
    if not _ROOT_IS_MOUNT[0]:
        return False
    try:
        st = os.statvfs(ROOT)
    except OSError:
        return False
    return st.f_bavail * 8 < st.f_blocks


def pids():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def real_uid(pid):
    """The real uid of process ``pid`` (whatever it made of its dumpability), or None."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


_found = {}  # type: dict  # (command, PATH) -> a file outside every working directory


def which(command, path, cwd):
    """The file ``command`` names, searched in ``path`` (bytes) as exec would."""
    if b"/" in command:
        return command
    path = path or b"/usr/local/bin:/usr/bin:/bin"
    known = _found.get((command, path))
    if known is not None:  # on a read-only root it is where it was
        return known
    for directory in path.split(b":"):
        candidate = os.path.join(cwd, directory or b".", command)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            if directory.startswith(b"/") and not candidate.startswith(os.fsencode(ROOT)):
                _found[(command, path)] = candidate
            return candidate
    return None


class Identity:
    """Who the functions run as, and how the agent acts as them.

    With ``switch`` (the agent is root and the functions are not) file work in their places
    is done as their uid, and they are spawned with their uid and gid. Otherwise (the agent
    run by hand, or functions as root) everything runs as the agent.
    """

    def __init__(self, user):
        uid, _, gid = (user or "").partition(":")
        self.uid = int(uid) if uid else os.getuid()
        self.gid = int(gid or uid) if uid else os.getgid()
        self.switch = os.geteuid() == 0 and self.uid != 0
        if self.switch:
            os.setgroups([])
            # The real gid is the functions' for good: a spawn with resetids hands it over.
            os.setresgid(self.gid, 0, 0)
            # Nothing of the agent may be read through /proc, core dumps included.
            _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)

    @contextlib.contextmanager
    def acting(self):
        """Act as the functions' user: what is made is theirs, what is refused to them is
        refused to us."""
        if not self.switch:
            yield
            return
        os.setegid(self.gid)
        os.seteuid(self.uid)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)

    def spawn(self, path, argv, env, fds):
        """Start a function in the current directory: ``fds`` become its stdin, stdout and
        stderr; it leads a session of its own. Uses vfork (posix_spawn): the agent's memory
        is never copied."""
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        if self.switch:
            # No process of the user exists now (the last function's were killed): for
            # the instant of the spawn, the agent's real uid can be theirs, which the
            # child takes as its own (resetids) on its way to exec.
            os.setresuid(self.uid, 0, 0)
        try:
            return os.posix_spawn(
                path, argv, env, file_actions=actions, setsid=True,
                resetids=self.switch, setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
        finally:
            if self.switch:
                os.setresuid(0, 0, 0)

    def owns(self, pid):
        """Whether process ``pid`` is a function's (when the agent cannot tell by uid: every
        process it did not see at its start)."""
        return real_uid(pid) == self.uid if self.switch else None


class Agent:
    def __init__(self, user):
        self.me = os.getpid()
        self.id = Identity(user)
        # Unprivileged (by hand, or functions as root): everything alive now survives.
        self.protected = set(pids()) | {1, self.me}
        self.runs = {}
        self.workdirs = set()
        self.sel = selectors.DefaultSelector()
        self.env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
        self.inbox = bytearray()
        self.open = True
        self.in_container = IN_CONTAINER in sys.argv[1:]
        # The OOM count as the last run left it: nothing else runs here in between.
        self.oom_count = oom_kills()
        # Exit statuses that reap() collected for processes a run still waits for.
        self.exits = {}
        self.zygotes = Zygotes(self)

    def serve(self):
        stdin = sys.stdin.buffer.raw.fileno()
        os.set_blocking(stdin, False)
        self.sel.register(stdin, selectors.EVENT_READ, self.on_host)
        while self.open or self.runs:
            wakes = [w for w in (r.wake_at() for r in self.runs.values()) if w is not None]
            wake = min(wakes + self.zygotes.wake_at(), default=None)
            timeout = None if wake is None else max(wake - time.monotonic(), 0)
            for key, events in self.sel.select(timeout):
                try:
                    key.data(key.fd, events)
                except Exception as exc:  # one run's failure must not end the agent
                    owner = getattr(key.data, "__self__", None)
                    if isinstance(owner, Run):
                        owner.abort(exc)
                    elif isinstance(owner, Zygote):  # nor a zygote's: runs start fresh
                        self.zygotes.lost(owner, "agent: %s: %s" % (type(exc).__name__, exc))
                    else:
                        raise
            now = time.monotonic()
            for run in list(self.runs.values()):
                try:
                    run.tick(now)
                except Exception as exc:
                    run.abort(exc)
            self.zygotes.tick(now)
        # The host went away: nothing we run may outlive the connection.
        self.zygotes.stop()
        self.kill_functions()

    def on_host(self, fd, events):
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(fd)
            self.open = False
            for run in self.runs.values():
                run.cancel()
            return
        self.inbox += data
        for header, body in frames(self.inbox):
            try:
                self.handle(header, body)
            except Exception as exc:  # a bad request must not end the agent
                send({"ev": "error", "id": header.get("id"),
                      "message": "%s: %s" % (type(exc).__name__, exc)})

    def handle(self, header, body):
        op = header.get("op")
        run = self.runs.get(header.get("id"))
        if op == "run":
            for token in header.get("drop") or ():
                self.drop(token)
            run = Run(self, header, body)
            self.runs[run.id] = run
            run.start()
        elif op == "stdin":
            if run is not None:
                run.feed(body, header.get("eof", False))
        elif op == "cancel":
            if run is not None:
                run.cancel()
        elif op == "collect":
            self.collect_outputs(header)
        elif op == "hello":
            # Answered once the zygote asked for is ready, or has failed.
            self.zygotes.configure(header.get("zygote"), body, lambda: send({
                "ev": "hello", "pid": self.me, "python": list(sys.version_info[:3]),
                "oom": oom_kills() is not None, "uid": self.id.uid,
                "separate": self.id.switch, "zygote": self.zygotes.describe()}))
        else:
            send({"ev": "error", "message": "unknown op %r" % op})

    # -- places ----------------------------------------------------------------------------

    def workdir(self, token):
        """The working directory ``token`` names, made if it is new (call it acting as the
        user), and an open descriptor of it."""
        token = os.path.basename(token)
        path = os.path.join(ROOT, token)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # a symlink or a file that a function left in its place
            raise Refused("the working directory is not a directory of its own")
        self.workdirs.add(token)
        return path, fd

    def collect_outputs(self, h):
        """After a run: send the files of its working directory that ``h`` names, read as
        the functions' user. The container is this run's alone, so nothing waits meanwhile."""
        path = os.path.join(ROOT, os.path.basename(h["workdir"]))
        with self.id.acting():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                send({"ev": "collected", "id": h["id"], "truncated": False,
                      "error": "the working directory is not a directory of its own"})
                return
            try:
                send_outputs(h["id"], fd, h)
            finally:
                os.close(fd)

    def drop(self, token):
        token = os.path.basename(token)
        self.workdirs.discard(token)
        with self.id.acting():
            _remove(os.path.join(ROOT, token))

    def clean(self):
        """After a function: none of its processes left, nothing of it outside its working
        directory. True when that holds."""
        clean = self.kill_functions()
        if not self.in_container:
            return clean  # by hand or in a test, the agent deletes nothing
        with self.id.acting():
            for top in TEMP_DIRS:
                try:
                    names = os.listdir(top)
                except OSError:
                    continue
                for name in names:
                    path = os.path.join(top, name)
                    if path != ROOT:
                        _remove(path)
            try:
                strays = [n for n in os.listdir(ROOT) if n not in self.workdirs]
            except OSError:
                strays = []
            for name in strays:  # made by a function beside its own working directory
                _remove(os.path.join(ROOT, name))
            clean = self.remove_ipc() and clean
        return clean

    def remove_ipc(self):
        """Remove every SysV shared memory segment, semaphore set and message queue (as the
        user: only theirs can go, and no other user runs here). True when none is left."""
        left = False
        for path, remove in _SYSV:
            try:
                with open(path) as f:
                    next(f, None)  # the header
                    ids = [int(line.split()[1]) for line in f if line.strip()]
            except (OSError, ValueError, IndexError):
                continue
            for ipc_id in ids:
                if remove(ipc_id) != 0:
                    left = True
        return not left

    def kill_functions(self):
        """SIGKILL every process of the functions; True when none is left."""
        for _ in range(50):
            mine = self.function_pids()
            if not mine:
                return True
            for pid in mine:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.reap()
            if not self.function_pids():
                return True
            time.sleep(0.005)
        return not self.function_pids()

    def function_pids(self):
        found = []
        for pid in pids():
            if pid in self.protected:
                continue
            owned = self.id.owns(pid)
            if owned or owned is None:
                found.append(pid)
        return found

    def reap(self):
        # Orphans of our functions are re-parented to us: we are their child subreaper.
        waited = {run.pid for run in self.runs.values()}
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in waited:
                self.exits[pid] = (_decode_status(status), usage)

    def collect(self, pid, block=False):
        """The exit status and usage of our child ``pid`` if it has ended, else None."""
        if pid in self.exits:
            return self.exits.pop(pid)
        try:
            got, status, usage = os.wait4(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # not ours (yet): a zygote's child
            return None
        return (_decode_status(status), usage) if got else None


def output_matches(path, pattern):
    """Whether relative ``path`` matches ``pattern`` part by part: ``*`` and ``?`` stay
    within a part, and a ``**`` part matches any number of parts. (The host imports this
    too: the exec path matches there.)"""
    return _matches(path.split("/"), pattern.split("/"), False)


def _matches(parts, pattern, below):
    """With ``below``: whether a directory at ``parts`` may hold a match. The states are the
    pattern positions reachable so far, so the cost is parts times pattern, whatever the
    ``**``."""
    k = len(pattern)

    def closure(states):
        for j in sorted(states):
            while j < k and pattern[j] == "**":
                j += 1
                states.add(j)
        return states

    states = closure({0})
    for part in parts:
        states = closure({j if pattern[j] == "**" else j + 1 for j in states
                          if j < k and (pattern[j] == "**"
                                        or fnmatch.fnmatchcase(part, pattern[j]))})
        if not states:
            return False
    return any(j < k for j in states) if below else k in states


def find_outputs(workdir_fd, patterns, limit=SCAN_LIMIT):
    """The regular files below ``workdir_fd`` that match a pattern, in path order, and
    whether the scan stopped at ``limit`` entries. No symlink is followed, and a directory
    is entered only when a pattern may match below it."""
    found, seen = [], 0
    stack = [((), os.dup(workdir_fd))]
    try:
        while stack:
            parts, fd = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    names = sorted((e.name, e.is_dir(follow_symlinks=False),
                                    e.is_file(follow_symlinks=False)) for e in entries)
            except OSError:
                names = []
            inner = []
            for name, is_dir, is_file in names:
                seen += 1
                if seen > limit:
                    os.close(fd)
                    return sorted(found), True
                path = parts + (name,)
                rel = "/".join(path)
                if is_file and any(output_matches(rel, p) for p in patterns):
                    found.append(rel)
                elif is_dir and any(_matches(list(path), p.split("/"), True)
                                    for p in patterns):
                    try:
                        inner.append((path, os.open(name, os.O_RDONLY | os.O_DIRECTORY
                                                    | os.O_NOFOLLOW, dir_fd=fd)))
                    except OSError:
                        pass
            os.close(fd)
            stack.extend(reversed(inner))
    finally:
        for _, fd in stack:
            os.close(fd)
    return sorted(found), False


def _open_output(workdir_fd, rel):
    """A descriptor of the regular file ``rel``, reached without following a symlink."""
    parts = rel.split("/")
    fd = os.dup(workdir_fd)
    try:
        for name in parts[:-1]:
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        out = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(out).st_mode):
        os.close(out)
        raise OSError("not a regular file")
    return out


def send_outputs(rid, workdir_fd, h):
    """Send the files ``h`` asks for: per file a ``file`` frame, then its bytes in ``data``
    frames; then ``collected``. Each file is cut at ``max_file`` bytes, all of them at
    ``max_total``, their number at ``max_count``."""
    found, more = find_outputs(workdir_fd, h["patterns"])
    if len(found) > h["max_count"]:
        found, more = found[:h["max_count"]], True
    room = h["max_total"]
    for rel in found:
        if room <= 0:
            more = True
            break
        try:
            fd = _open_output(workdir_fd, rel)
        except OSError:
            continue  # gone, or not a plain file of its own
        try:
            size = os.fstat(fd).st_size
            keep = min(size, h["max_file"], room)
            send({"ev": "file", "id": rid, "path": rel, "truncated": keep < size})
            left = keep
            while left > 0:
                piece = os.read(fd, min(FILE_CHUNK, left))
                if not piece:
                    break
                left -= len(piece)
                send({"ev": "data", "id": rid}, piece)
            room -= keep - left
        finally:
            os.close(fd)
    send({"ev": "collected", "id": rid, "truncated": more})


def _remove(path):
    """Remove a file or a tree, as whoever we act as now; a directory the function made
    unreadable is opened up first. Gone already, or not ours: nothing."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(path)
        return

    def unlock(func, failed, exc_info):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed) or failed, 0o700)
            os.chmod(failed, 0o700)
            func(failed)

    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    shutil.rmtree(path, onerror=unlock)


class Zygote:
    """One zygote process (pool/_zygote.py), as the agent sees it: its socket, its stderr,
    its spare child and the children it was asked to hand a function to."""

    def __init__(self, owner, source, preload):
        self.owner = owner
        self.sel = owner.agent.sel
        self.ready = False
        self.info = {}
        self.spare = None  # (pid, socket, pidfd) of the child waiting for a job
        self.asked = None  # since when a spare was asked for and has not come
        self.waiting = []  # runs waiting for a spare
        self.waiting_since = None
        self.running = {}  # pid -> Run: children given a job whose exit is not reported
        self.forks = 0
        self.retiring = False
        self.stopped = False
        self.tail = bytearray()
        self.ready_by = time.monotonic() + ZYGOTE_START
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Above 3, so that its dup2 to 3 is a real one (and clears close-on-exec).
        fd3 = fcntl.fcntl(theirs.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
        err_r, err_w = os.pipe()
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        actions = [(os.POSIX_SPAWN_DUP2, fd, target)
                   for target, fd in enumerate((null, null, err_w, fd3))]
        try:
            # Its own session: killing its group kills it and its spare, not its functions.
            self.pid = os.posix_spawn(
                sys.executable,
                [sys.executable, "-c", source, marshal.dumps(list(preload)).hex()],
                owner.agent.env, file_actions=actions, setsid=True)
        except OSError:
            ours.close()
            os.close(err_r)
            raise
        finally:
            for fd in (fd3, err_w, null):
                os.close(fd)
            theirs.close()
        ours.setblocking(False)
        os.set_blocking(err_r, False)
        self.sock, self.stderr = ours, err_r
        self.sel.register(ours, selectors.EVENT_READ, self.on_message)
        self.sel.register(err_r, selectors.EVENT_READ, self.on_stderr)

    def on_stderr(self, fd, events):
        data = read_some(fd)
        if data is None:
            return
        if not data:
            self.sel.unregister(fd)
            os.close(fd)
            self.stderr = None
            return
        self.tail = (self.tail + data)[-2000:]

    def on_message(self, fd, events):
        try:
            data, ancillary, _, _ = self.sock.recvmsg(
                ZYGOTE_MESSAGE, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            data, ancillary = b"", []
        fds = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += [int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True)
                        for i in range(0, len(payload) - len(payload) % 4, 4)]
        try:
            message = marshal.loads(data) if data else None
        except (EOFError, ValueError, TypeError):
            message = {}
        ev = message.get("ev") if isinstance(message, dict) else None
        if ev == "spare" and len(fds) == 1:
            return self.on_spare(message["pid"], fds[0])
        for extra in fds:
            os.close(extra)
        if ev == "ready":
            self.on_ready(message)
        elif ev == "exit":
            self.on_exit(message)
        else:
            why = "exited" if message is None else "sent %r" % data[:80]
            self.owner.lost(self, "the zygote %s%s" % (why, self.stderr_tail()))

    def stderr_tail(self):
        text = bytes(self.tail).decode(errors="replace").strip()
        return ": " + text.splitlines()[-1][-300:] if text else ""

    def on_ready(self, message):
        self.info, self.ready_by = message, None
        if message.get("unusable"):
            return self.owner.lost(self, message["unusable"], fatal=True)
        self.ready = True
        self.ask()
        self.owner.on_ready(self)

    def on_spare(self, pid, fd):
        self.asked = None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # gone already
            os.close(fd)
            return self.ask()
        self.spare = (pid, socket.socket(fileno=fd), pidfd)
        if self.waiting:
            self.hand(self.waiting.pop(0))

    def on_exit(self, message):
        pid = message.get("pid")
        run = self.running.pop(pid, None)
        if run is not None:
            run.on_status(message["status"], message.get("cpu_ms"), message.get("max_rss"))
        elif self.spare is not None and self.spare[0] == pid:  # died unused
            self.drop_spare()
            self.ask()
        if self.retiring and not self.running:
            self.stop()

    def ask(self):
        if not self.ready or self.retiring or self.spare is not None or self.asked is not None:
            return
        try:
            self.sock.send(marshal.dumps({"op": "spare"}))
        except OSError as exc:
            return self.owner.lost(self, "the zygote stopped listening: %s" % exc)
        self.asked = time.monotonic()

    def take(self, run, first=False):
        """Hand ``run`` to a spare now, or to the next one."""
        if self.spare is not None:
            return self.hand(run)
        if not self.waiting:
            self.waiting_since = time.monotonic()
        self.waiting.insert(0 if first else len(self.waiting), run)
        self.ask()

    def hand(self, run):
        pid, sock, pidfd = self.spare
        self.spare = None
        fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in run.child_fds)
        try:
            sock.sendmsg([run.job], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError:  # the spare died: the next one
            sock.close()
            os.close(pidfd)
            return self.take(run, first=True)
        # The child says on it what it used before it had the job (Run.on_took).
        sock.setblocking(False)
        run.spare_sock = sock
        self.sel.register(sock, selectors.EVENT_READ, run.on_took)
        self.forks += 1
        self.running[pid] = run
        run.handed(self, pid, pidfd)
        # The next spare comes once this run is over (Zygotes.after_run): made while a
        # function runs, it slows the function more than it saves.

    def forget(self, run):
        if run in self.waiting:
            self.waiting.remove(run)

    def drop_spare(self):
        if self.spare is not None:
            _, sock, pidfd = self.spare
            self.spare = None
            sock.close()
            os.close(pidfd)

    def wake_at(self):
        if self.ready_by is not None:
            return self.ready_by
        if self.waiting and self.asked is not None:
            return max(self.asked, self.waiting_since) + ZYGOTE_GRACE
        return None

    def tick(self, now):
        wake = self.wake_at()
        if wake is None or now < wake:
            return
        if self.ready_by is not None:
            self.owner.lost(self, "the zygote did not start within %g s%s"
                            % (ZYGOTE_START, self.stderr_tail()))
        else:
            self.owner.lost(self, "the zygote did not fork within %g s" % ZYGOTE_GRACE)

    def retire(self):
        """Stop once the children it runs are reported; fork no more."""
        self.retiring = True
        self.drop_spare()
        if not self.running:
            self.stop()

    def stop(self):
        """Kill it and its spare; the runs it was to start, and those whose children it
        ran, are told (its running children are ours now: we are their subreaper)."""
        if self.stopped:
            return
        self.stopped, self.ready = True, False
        for fd in (self.sock, self.stderr):
            if fd is not None and fd in self.sel.get_map():
                self.sel.unregister(fd)
        self.sock.close()
        if self.stderr is not None:
            os.close(self.stderr)
            self.stderr = None
        self.drop_spare()
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)
        for _ in range(200):  # SIGKILL takes it in a moment; reap() takes it if not
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:  # reaped already
                break
            time.sleep(0.005)
        waiting, running = self.waiting, self.running
        self.waiting, self.running = [], {}
        for run in running.values():
            run.orphaned()
        for run in waiting:
            run.launch_fresh()


class Zygotes:
    """The zygote functions fork from, if the host asked for one: started at its hello
    (answered once it is ready or has failed), replaced when it dies and when it has forked
    ZYGOTE_FORKS children (its successor starts while it serves), and given up on after
    ZYGOTE_DEATHS deaths. While there is none, Python functions start fresh."""

    def __init__(self, agent):
        self.agent = agent
        self.config = None  # (source, preload)
        self.current = None  # the zygote runs fork from, once ready
        self.next = None  # its successor, starting
        self.old = []  # retired, until their last child is reported
        self.deaths = 0
        self.error = None
        self.greet = None

    def configure(self, options, source, greet):
        if self.config is not None or not options:
            return greet()
        if not self.agent.id.switch:
            # A function of the agent's own uid could trace the zygote, and reach into
            # every function forked after it.
            self.error = "functions run as the agent's user: no zygote"
        elif not hasattr(os, "pidfd_open"):
            self.error = "no zygote without os.pidfd_open (Python 3.9, Linux 5.3)"
        else:
            self.config = (source.decode(), list(options.get("preload") or ()))
            self.greet = greet
            self.current = self.spawn()
            if self.current is not None:
                return None
        greet()

    def spawn(self):
        try:
            return Zygote(self, *self.config)
        except OSError as exc:
            self.error = "the zygote could not start: %s" % exc
            sys.stderr.write("agent: %s\n" % self.error)
            return None

    def serving(self):
        z = self.current
        return z if z is not None and z.ready else None

    def all(self):
        return [z for z in (self.current, self.next, *self.old) if z is not None]

    def on_ready(self, z):
        if z is self.next:
            old, self.current, self.next = self.current, z, None
            if old is not None:
                # Runs waiting for the old one's next spare take the new one's.
                waiting, old.waiting = old.waiting, []
                for run in waiting:
                    z.take(run)
                self.old.append(old)
                old.retire()
        self.answer()
        self.report()

    def lost(self, z, reason, fatal=False):
        z.stop()
        if z in self.old:
            self.old.remove(z)
            return
        self.deaths += 1
        self.error = reason
        sys.stderr.write("agent: %s\n" % reason)
        if z is self.next:
            self.next = None
        elif z is self.current:
            self.current, self.next = self.next, None
            if self.current is None and not fatal and self.deaths < ZYGOTE_DEATHS:
                self.current = self.spawn()
        self.answer()
        self.report()

    def after_run(self):
        z = self.serving()
        if z is None:
            return
        z.ask()
        if z.forks >= ZYGOTE_FORKS and self.next is None:
            self.next = self.spawn()

    def answer(self):
        if self.greet is not None:
            greet, self.greet = self.greet, None
            greet()

    def describe(self):
        z = self.serving()
        if z is not None:
            state = "ready"
        elif self.current is not None:
            state = "starting"
        else:
            state = "failed" if self.config is not None else "off"
        info = (z or self.current).info if (z or self.current) is not None else {}
        return {"state": state, "error": self.error, "failed": info.get("failed") or {},
                "rss": info.get("rss"), "forks": z.forks if z is not None else 0}

    def report(self):
        if self.greet is None and self.config is not None:
            send(dict(self.describe(), ev="zygote"))

    def wake_at(self):
        return [w for w in (z.wake_at() for z in self.all()) if w is not None]

    def tick(self, now):
        for z in self.all():
            try:
                z.tick(now)
            except Exception as exc:
                self.lost(z, "agent: %s: %s" % (type(exc).__name__, exc))

    def stop(self):
        for z in self.all():
            z.stop()
        self.current, self.next, self.old = None, None, []


_PYTHON_FLAGS = frozenset("uB")
_real = {}  # type: dict  # an interpreter's path -> its real path (the root is read-only)


def python_job(agent, zygote, h, path, env, workdir):
    """The job a zygote's child runs, marshalled, when ``h`` asks for a plain Python run
    that a fork can start as a fresh interpreter would; None when only a fresh one can."""
    real = _real.get(path)
    if real is None:
        real = os.path.realpath(path)
        if not real.startswith(os.fsencode(ROOT)):
            _real[path] = real
    if real != os.fsencode(zygote.info.get("executable", "")):
        return None
    for key in h.get("env") or ():
        if key.startswith(("PYTHON", "LC_")) or key in ("LANG", "HOME"):
            return None  # they change how an interpreter starts
    argv = h["argv"]
    unbuffered = dont_write_bytecode = False
    i = 1
    while (i < len(argv) and len(argv[i]) > 1 and argv[i][0] == "-"
           and set(argv[i][1:]) <= _PYTHON_FLAGS):
        unbuffered = unbuffered or "u" in argv[i]
        dont_write_bytecode = dont_write_bytecode or "B" in argv[i]
        i += 1
    if i >= len(argv):
        return None
    if argv[i] in ("-c", "-m") and i + 1 < len(argv):
        kind = "command" if argv[i] == "-c" else "module"
        target, sys_argv = argv[i + 1], [argv[i]] + argv[i + 2:]
    elif argv[i].startswith("-"):
        return None
    else:
        kind, target, sys_argv = "script", argv[i], argv[i:]
    modules = set(zygote.info.get("modules") or ())
    with agent.id.acting():
        try:
            if kind == "script":
                script = os.path.join(workdir, target)
                with open(script, "rb") as f:
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        return None
                    head = f.read(4)
                if head[:2] == b"PK" or head[2:4] == b"\r\n":
                    return None  # a zip application, or compiled code
                first = os.path.dirname(os.path.realpath(script))
            else:
                first = workdir
            names = os.listdir(first)
            home = names if first == workdir else os.listdir(workdir)
        except OSError:
            return None  # as python3 would say it
    # The user's site directory, and a file that would shadow a module the zygote has
    # imported (the zygote's would win): a fresh interpreter does these right.
    if ".local" in home or any(name.partition(".")[0] in modules for name in names):
        return None
    rlimits = {}
    if h.get("cpu_limit") is not None:
        rlimits["RLIMIT_CPU"] = int(h["cpu_limit"])
    job = marshal.dumps({
        "uid": agent.id.uid, "gid": agent.id.gid, "cwd": workdir, "env": env,
        "argv": sys_argv, "orig_argv": list(argv), "kind": kind, "target": target,
        "unbuffered": unbuffered, "dont_write_bytecode": dont_write_bytecode,
        "rlimits": rlimits})
    return job if len(job) <= 1 << 17 else None  # past what one message carries


class Run:
    def __init__(self, agent, header, body):
        self.agent = agent
        self.id = header["id"]
        self.header = header
        self.body = body
        self.pid = None
        self.pidfd = None
        self.status = None
        self.cancelled = False
        self.timed_out = False
        self.deadline = None
        self.drain_until = None
        self.started = None
        self.duration = 0.0
        self.oom_before = None
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.stdin_fd = None
        self.clean = True
        self.pipes = {}
        self.cap = header.get("cap", 1 << 20)
        self.sent = {1: 0, 2: 0}
        self.truncated = {1: False, 2: False}
        # A forked run: its job for a zygote's child, the child's ends of its pipes until
        # it has them, what a fresh start needs if the zygote fails it, and when the
        # zygote must have told its exit status at the latest.
        self.forked = False
        self.zygote = None
        self.job = None
        self.child_fds = None
        self.launch = None
        self.ended = None
        self.status_by = None
        self.orphan = False
        self.reaped = False  # its end and its status are known
        self.cpu_ms = None
        self.max_rss = None
        self.spare_sock = None  # a forked run's socket to its child, until it has said
        self.cpu_before = 0.0  # the CPU time its child used before it had the job

    # -- start -----------------------------------------------------------------------------

    def start(self):
        h = self.header
        try:
            workdir = self.prepare(h)
        except Refused as exc:
            return self.finish({"refused": str(exc), "clean": True})
        except Exception as exc:
            os.chdir("/")
            return self.finish({"error": "%s: %s" % (type(exc).__name__, exc),
                                "clean": self.agent.kill_functions()})
        try:
            self.spawn(h, workdir)
        finally:
            os.chdir("/")  # prepare() entered the working directory, for the spawn

    def spawn(self, h, workdir):
        # Bytes, from a copy encoded once: encoding every variable on every run costs.
        env = dict(self.agent.env)
        for key, value in (("UFAAS_WORKDIR", workdir), ("HOME", workdir), ("PWD", workdir),
                           *(h.get("env") or {}).items()):
            env[os.fsencode(key)] = os.fsencode(value)
        argv = [os.fsencode(a) for a in h["argv"]]
        path = which(argv[0], env.get(b"PATH"), os.fsencode(workdir))
        if path is None:
            return self.failed_to_start(127, "%s: not found" % h["argv"][0])
        # A fork starts with the zygote's address space: under a memory limit it would
        # have less room than a fresh interpreter.
        fork = not h.get("fresh") and h.get("memory_limit") is None
        zygote = self.agent.zygotes.serving() if fork else None
        if zygote is not None:
            self.job = python_job(self.agent, zygote, h, path, env, workdir)
        if self.job is None and (h.get("cpu_limit") is not None
                                 or h.get("memory_limit") is not None):
            path, argv = _limited(h, argv)
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.child_fds = (stdin_r, out_w, err_w)
        self.launch = (path, argv, env)
        self.oom_before = self.agent.oom_count
        if self.job is None:
            try:
                self.start_fresh()
            except OSError as exc:
                for fd in (stdin_w, out_r, err_r):
                    os.close(fd)
                code = 127 if isinstance(exc, FileNotFoundError) else 126
                return self.failed_to_start(code, "%s: %s" % (h["argv"][0], exc.strerror))
        sel = self.agent.sel
        for stream, fd in ((1, out_r), (2, err_r)):
            os.set_blocking(fd, False)
            self.pipes[fd] = stream
            sel.register(fd, selectors.EVENT_READ, self.on_output)
        self.stdin_fd = stdin_w
        os.set_blocking(stdin_w, False)
        if self.job is not None:
            self.forked = True
            zygote.take(self)
        files_size = sum(f["size"] for f in h.get("files", []))
        self.feed(self.body[files_size:], h.get("stdin_eof", True))
        self.body = None

    def start_fresh(self):
        """Spawn the command (in the current directory); its clock starts."""
        path, argv, env = self.launch
        self.started = time.monotonic()
        try:
            self.pid = self.agent.id.spawn(path, argv, env, self.child_fds)
        finally:
            self.close_child_fds()
        self.begun()

    def begun(self):
        if self.pidfd is None:
            self.watch_exit()
        if self.header.get("timeout") is not None:
            self.deadline = self.started + self.header["timeout"]
        if self.cancelled:
            self.kill()

    def close_child_fds(self):
        for fd in self.child_fds or ():
            os.close(fd)
        self.child_fds = None

    def handed(self, zygote, pid, pidfd):
        """A zygote's child has taken this run (see Zygote.hand)."""
        self.zygote, self.pid, self.pidfd, self.job = zygote, pid, pidfd, None
        self.started = time.monotonic()
        self.close_child_fds()
        self.agent.sel.register(pidfd, selectors.EVENT_READ, self.on_exit)
        self.begun()

    def launch_fresh(self):
        """The zygote failed before a child took this run: start it fresh after all."""
        self.forked, self.job = False, None
        try:
            with self.agent.id.acting():
                _, wfd = self.agent.workdir(self.header["workdir"])
                try:
                    os.fchdir(wfd)
                finally:
                    os.close(wfd)
            self.start_fresh()
        except (OSError, Refused) as exc:
            self.abort(exc)
        finally:
            os.chdir("/")

    def on_took(self, fd, events):
        try:
            data = self.spare_sock.recv(4096)
            said = marshal.loads(data) if data else {}
            self.cpu_before = float(said.get("cpu_ms") or 0.0)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, EOFError, ValueError, TypeError, AttributeError):
            pass
        self.close_spare_sock()

    def close_spare_sock(self):
        if self.spare_sock is not None:
            if self.spare_sock in self.agent.sel.get_map():
                self.agent.sel.unregister(self.spare_sock)
            self.spare_sock.close()
            self.spare_sock = None

    def orphaned(self):
        """Its zygote is gone: the child is ours now, and so is its exit status."""
        self.orphan = True
        if self.pidfd is None and self.status is None:
            self.status_by = time.monotonic()

    def failed_to_start(self, code, message):
        send({"ev": "out", "id": self.id, "fd": 2}, (message + "\n").encode())
        return self.finish({"exit_code": code, "signal": None, "duration_ms": 0.0,
                            "clean": True})

    def prepare(self, h):
        """Its working directory, with its files, entered: all of it as the user."""
        with self.agent.id.acting():
            workdir, wfd = self.agent.workdir(h["workdir"])
            try:
                write_files(wfd, h.get("files", []), self.body)
                os.fchdir(wfd)  # the spawn's cwd: a place only the user may enter
            finally:
                os.close(wfd)
        return workdir

    def watch_exit(self):
        try:
            self.pidfd = os.pidfd_open(self.pid)
            self.agent.sel.register(self.pidfd, selectors.EVENT_READ, self.on_exit)
            return
        except (AttributeError, OSError):
            pass
        # No pidfd (old kernel or Python): a thread waits, and wakes the loop with a pipe.
        r, w = os.pipe()
        self.pidfd = r
        self.agent.sel.register(r, selectors.EVENT_READ, self.on_exit)

        def wait():
            _, status, usage = os.wait4(self.pid, 0)
            self.status = _decode_status(status)
            self.usage(usage)
            os.write(w, b"x")
            os.close(w)
        threading.Thread(target=wait, daemon=True).start()

    def usage(self, usage):
        self.cpu_ms = round((usage.ru_utime + usage.ru_stime) * 1000, 3)
        self.max_rss = usage.ru_maxrss * 1024

    # -- events ----------------------------------------------------------------------------

    def feed(self, data, eof):
        if self.stdin_fd is None:
            return
        self.stdin_buf += data
        self.stdin_eof = self.stdin_eof or eof
        self.flush_stdin()

    def flush_stdin(self, fd=None, events=None):
        fileno = self.stdin_fd
        if fileno is None:
            return
        sel = self.agent.sel
        try:
            while self.stdin_buf:
                n = os.write(fileno, self.stdin_buf[:CHUNK])
                del self.stdin_buf[:n]
        except BlockingIOError:
            pass
        except OSError:  # the function closed its stdin: drop what it will never read
            self.stdin_buf = bytearray()
            self.stdin_eof = True
        registered = fileno in sel.get_map()
        if self.stdin_buf and not registered:
            sel.register(fileno, selectors.EVENT_WRITE, self.flush_stdin)
        elif not self.stdin_buf:
            if registered:
                sel.unregister(fileno)
            if self.stdin_eof:
                self.close_stdin()

    def close_stdin(self):
        if self.stdin_fd is not None:
            if self.stdin_fd in self.agent.sel.get_map():
                self.agent.sel.unregister(self.stdin_fd)
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def on_output(self, fileno, events):
        fd = self.pipes[fileno]
        data = read_some(fileno)
        if data is None:
            return
        if not data:
            self.close_pipe(fileno)
            self.maybe_done()
            return
        room = self.cap - self.sent[fd]
        if room <= 0:
            self.truncated[fd] = True
            return  # keep draining so the function never blocks on a full pipe
        if len(data) > room:
            data = data[:room]
            self.truncated[fd] = True
        self.sent[fd] += len(data)
        send({"ev": "out", "id": self.id, "fd": fd}, data)

    def close_pipe(self, fileno):
        self.agent.sel.unregister(fileno)
        del self.pipes[fileno]
        os.close(fileno)

    def on_exit(self, fileno, events):
        self.agent.sel.unregister(fileno)
        os.close(fileno)
        self.pidfd = None
        self.ended = time.monotonic()
        if self.status is None and (not self.forked or self.orphan):
            self.collected(self.agent.collect(self.pid, block=not self.forked))
        if self.status is None:  # its zygote reports it (on_status), or tick() asks
            self.status_by = self.ended + (0 if self.orphan else ZYGOTE_GRACE)
            return
        self.exited()

    def collected(self, got):
        if got is not None:
            self.status = got[0]
            self.usage(got[1])

    def on_status(self, status, cpu_ms, max_rss):
        """A zygote's report of its child's end."""
        self.status, self.cpu_ms, self.max_rss = status, cpu_ms, max_rss
        if self.ended is not None and self.status_by is not None:
            self.exited()  # else on_exit() comes next: the child's pidfd is readable

    def exited(self):
        self.status_by, self.reaped = None, True
        self.duration = (self.ended - self.started) * 1000.0
        # Its group, and anything it left behind, may still hold our pipes: end every
        # process so the pipes reach EOF, and so nothing survives into the next function.
        self.clean = self.agent.clean()
        self.deadline = None
        self.drain_until = time.monotonic() + DRAIN
        self.maybe_done()

    def wake_at(self):
        """When the loop must call tick() at the latest, or None."""
        times = [t for t in (self.deadline, self.drain_until, self.status_by) if t is not None]
        return min(times) if times else None

    def tick(self, now):
        if self.status_by is not None and now >= self.status_by:
            self.status_wait(now)
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            self.timed_out = True
            self.kill()
        if self.drain_until is not None and now >= self.drain_until:
            for fileno in list(self.pipes):
                self.close_pipe(fileno)
            self.maybe_done()

    def status_wait(self, now):
        """The child has ended and its zygote has not said how."""
        if not self.orphan:  # it is stuck: without it, the child is ours to reap
            self.agent.zygotes.lost(self.zygote, "the zygote did not report an exit "
                                    "within %g s" % ZYGOTE_GRACE)
        self.collected(self.agent.collect(self.pid))
        if self.status is not None:
            return self.exited()
        if now - self.ended < 2 * ZYGOTE_GRACE:
            self.status_by = now + 0.01
            return
        self.status_by = None
        self.abort(RuntimeError("the function's exit status was lost with its zygote"))

    def maybe_done(self):
        if self.pipes or not self.reaped:
            return
        self.close_stdin()
        status = self.status
        oom_after = self.agent.oom_count = oom_kills()
        self.finish({
            "exit_code": status if status >= 0 else None,
            "signal": -status if status < 0 else None,
            "duration_ms": round(self.duration, 3),
            "timed_out": self.timed_out, "cancelled": self.cancelled,
            "oom": bool(self.oom_before is not None and oom_after is not None
                        and oom_after > self.oom_before),
            "truncated": {"stdout": self.truncated[1], "stderr": self.truncated[2]},
            "clean": self.clean, "forked": self.forked,
            "cpu_ms": (None if self.cpu_ms is None
                       else round(max(self.cpu_ms - self.cpu_before, 0.0), 3)),
            "max_rss": self.max_rss,
        })

    def abort(self, exc):
        """End this run on an error of our own; the container is replaced."""
        if self.id not in self.agent.runs:
            return
        self.kill()
        if self.zygote is None and self.forked:  # waiting for a spare
            serving = self.agent.zygotes.serving()
            if serving is not None:
                serving.forget(self)
        self.close_child_fds()
        sel = self.agent.sel
        for fileno in [self.pidfd, self.stdin_fd, *self.pipes]:
            if fileno is not None and fileno in sel.get_map():
                sel.unregister(fileno)
        self.agent.kill_functions()
        self.finish({"error": "agent: %s: %s" % (type(exc).__name__, exc), "clean": False})

    def finish(self, fields):
        self.close_spare_sock()
        self.agent.runs.pop(self.id, None)
        self.agent.zygotes.after_run()
        if disk_low():  # the next function would find no room: have the container replaced
            fields["clean"] = False
        fields.update({"ev": "exit", "id": self.id})
        send(fields)

    def cancel(self):
        self.cancelled = True
        self.kill()

    def kill(self):
        if self.pid is not None and self.status is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:  # a zygote's child that has not made its group yet
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGKILL)


def _limited(h, argv):
    """The command under its limits: spawn cannot set them, so a shell does, then execs it."""
    limits = []  # one per ulimit: dash takes no more
    if h.get("cpu_limit") is not None:
        limits.append("ulimit -t %d" % int(h["cpu_limit"]))
    if h.get("memory_limit") is not None:
        limits.append("ulimit -v %d" % max(int(h["memory_limit"]) // 1024, 1))
    script = ('%s || { echo "ufaas: the limits could not be set" >&2; exit 125; }; '
              'exec "$@"' % " && ".join(limits))
    return b"/bin/sh", [b"sh", b"-c", script.encode(), b"sh"] + argv


def _decode_status(status):
    """A wait status as a return code: the exit code, or minus the signal."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _option(name):
    args = sys.argv[1:]
    return args[args.index(name) + 1] if name in args[:-1] else None


def main():
    try:
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:
        pass
    Agent(_option("--user")).serve()


if __name__ == "__main__":
    main()
