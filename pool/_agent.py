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
import json
import os
import selectors
import shutil
import signal
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

_out = sys.stdout.buffer
_out_lock = threading.Lock()


def send(header, body=b""):
    data = json.dumps(header, separators=(",", ":")).encode()
    with _out_lock:
        _out.write(HEAD.pack(len(data), len(body)) + data + body)
        _out.flush()


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

    def serve(self):
        stdin = sys.stdin.buffer.raw.fileno()
        os.set_blocking(stdin, False)
        self.sel.register(stdin, selectors.EVENT_READ, self.on_host)
        while self.open or self.runs:
            wakes = [w for w in (r.wake_at() for r in self.runs.values()) if w is not None]
            wake = min(wakes, default=None)
            timeout = None if wake is None else max(wake - time.monotonic(), 0)
            for key, events in self.sel.select(timeout):
                try:
                    key.data(key.fd, events)
                except Exception as exc:  # one run's failure must not end the agent
                    owner = getattr(key.data, "__self__", None)
                    if not isinstance(owner, Run):
                        raise
                    owner.abort(exc)
            now = time.monotonic()
            for run in list(self.runs.values()):
                try:
                    run.tick(now)
                except Exception as exc:
                    run.abort(exc)
        # The host went away: nothing we run may outlive the connection.
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
        elif op == "hello":
            send({"ev": "hello", "pid": self.me, "python": list(sys.version_info[:3]),
                  "oom": oom_kills() is not None, "uid": self.id.uid,
                  "separate": self.id.switch})
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
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return


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
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.oom_before = self.agent.oom_count
        self.started = time.monotonic()
        try:
            self.pid = self.agent.id.spawn(path, argv, env, (stdin_r, out_w, err_w))
        except OSError as exc:
            for fd in (stdin_r, stdin_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            return self.failed_to_start(code, "%s: %s" % (h["argv"][0], exc.strerror))
        for fd in (stdin_r, out_w, err_w):
            os.close(fd)
        sel = self.agent.sel
        for stream, fd in ((1, out_r), (2, err_r)):
            os.set_blocking(fd, False)
            self.pipes[fd] = stream
            sel.register(fd, selectors.EVENT_READ, self.on_output)
        self.stdin_fd = stdin_w
        os.set_blocking(stdin_w, False)
        self.watch_exit()
        if h.get("timeout") is not None:
            self.deadline = self.started + h["timeout"]
        files_size = sum(f["size"] for f in h.get("files", []))
        self.feed(self.body[files_size:], h.get("stdin_eof", True))
        self.body = None
        if self.cancelled:
            self.kill()

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
            self.status = _decode_status(os.waitpid(self.pid, 0)[1])
            os.write(w, b"x")
            os.close(w)
        threading.Thread(target=wait, daemon=True).start()

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
        try:
            data = os.read(fileno, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
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
        if self.status is None:
            self.status = _decode_status(os.waitpid(self.pid, 0)[1])
        self.duration = (time.monotonic() - self.started) * 1000.0
        # Its group, and anything it left behind, may still hold our pipes: end every
        # process so the pipes reach EOF, and so nothing survives into the next function.
        self.clean = self.agent.clean()
        self.deadline = None
        self.drain_until = time.monotonic() + DRAIN
        self.maybe_done()

    def wake_at(self):
        """When the loop must call tick() at the latest, or None."""
        times = [t for t in (self.deadline, self.drain_until) if t is not None]
        return min(times) if times else None

    def tick(self, now):
        if self.deadline is not None and now >= self.deadline:
            self.deadline = None
            self.timed_out = True
            self.kill()
        if self.drain_until is not None and now >= self.drain_until:
            for fileno in list(self.pipes):
                self.close_pipe(fileno)
            self.maybe_done()

    def maybe_done(self):
        if self.pidfd is not None or self.pipes or self.pid is None:
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
            "clean": self.clean,
        })

    def abort(self, exc):
        """End this run on an error of our own; the container is replaced."""
        if self.id not in self.agent.runs:
            return
        self.kill()
        sel = self.agent.sel
        for fileno in [self.pidfd, self.stdin_fd, *self.pipes]:
            if fileno is not None and fileno in sel.get_map():
                sel.unregister(fileno)
        self.agent.kill_functions()
        self.finish({"error": "agent: %s: %s" % (type(exc).__name__, exc), "clean": False})

    def finish(self, fields):
        self.agent.runs.pop(self.id, None)
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
            except OSError:
                pass


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
