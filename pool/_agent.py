"""The in-container agent: started once per warm container, then runs functions on request.

Stdlib only, Python >= 3.7, because it runs under whatever python3 the image has. Its
source travels as ``python3 -c`` text, so this module must import nothing from ``pool``.
Wire format both ways: ``>II`` (header length, body length), a JSON header, raw body bytes.
One thread, one selector loop: host messages, the function's pipes, its exit (a pidfd) and
its deadline are all events, so a run costs no thread and no polling.
"""

import json
import os
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

HEAD = struct.Struct(">II")
CHUNK = 65536
# The parent of every working directory: write+search but no read for its owner, so a
# function cannot list its siblings by accident (best effort: same uid could chmod it).
ROOT = os.environ.get("UFAAS_ROOT", "/tmp/ufaas")
# World-writable places a function may leave files in, outside its working directory.
TEMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
IN_CONTAINER = "--in-pool-container"

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
            except IsADirectoryError:
                raise Refused("%s: is a directory" % spec["path"])
            except PermissionError:
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


def disk_low():
    """True when the working directories' own filesystem has under 1/8 of it free."""
    try:
        st = os.statvfs(ROOT)
    except OSError:
        return False
    return os.path.ismount(ROOT) and st.f_bavail * 8 < st.f_blocks


def other_pids(protected):
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            pid = int(name)
            if pid not in protected:
                pids.append(pid)
    return pids


class Agent:
    def __init__(self):
        self.me = os.getpid()
        # Everything alive now (init, the keep-alive command, us) survives clean-ups.
        self.protected = set(other_pids(())) | {1, self.me}
        self.runs = {}
        self.sel = selectors.DefaultSelector()
        self.env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
        self.inbox = bytearray()
        self.open = True
        os.makedirs(ROOT, exist_ok=True)
        try:
            os.chmod(ROOT, 0o311)
        except OSError:
            pass

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
        self.kill_others()

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
                  "oom": oom_kills() is not None})
        else:
            send({"ev": "error", "message": "unknown op %r" % op})

    def wipe_temp(self):
        """Empty the shared temporary directories: only a working directory outlives a run.

        Only inside a pool's container (the pool passes IN_CONTAINER), and only what our
        own uid owns: run anywhere else, by hand or in a test, the agent deletes nothing.
        """
        if IN_CONTAINER not in sys.argv[1:]:
            return
        uid = os.getuid()
        for top in TEMP_DIRS:
            try:
                names = os.listdir(top)
            except OSError:
                continue
            for name in names:
                path = os.path.join(top, name)
                if path == ROOT:
                    continue
                try:
                    if os.lstat(path).st_uid != uid:
                        continue
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)
                except OSError:
                    pass  # not ours to delete (another user's, or the image's own)

    def drop(self, token):
        shutil.rmtree(os.path.join(ROOT, os.path.basename(token)), ignore_errors=True)

    def kill_others(self):
        """SIGKILL every process but the protected ones; True when none is left."""
        for _ in range(50):
            pids = other_pids(self.protected)
            if not pids:
                return True
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.reap()
            pids = other_pids(self.protected)
            if not pids:
                return True
            time.sleep(0.005)
        return not other_pids(self.protected)

    def reap(self):
        # Orphans of our functions are re-parented to us: we are their child subreaper.
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return


class Run:
    def __init__(self, agent, header, body):
        self.agent = agent
        self.id = header["id"]
        self.header = header
        self.body = body
        self.proc = None
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
            return self.finish({"error": "%s: %s" % (type(exc).__name__, exc),
                                "clean": self.agent.kill_others()})
        # Bytes, from a copy encoded once: Popen would encode every variable on every run.
        env = dict(self.agent.env)
        for key, value in (("UFAAS_WORKDIR", workdir), ("HOME", workdir), ("PWD", workdir),
                           *(h.get("env") or {}).items()):
            env[os.fsencode(key)] = os.fsencode(value)
        self.oom_before = oom_kills()
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                h["argv"], cwd=workdir, env=env, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            message = "%s: %s\n" % (h["argv"][0], exc.strerror)
            send({"ev": "out", "id": self.id, "fd": 2}, message.encode())
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            return self.finish({"exit_code": code, "signal": None, "duration_ms": 0.0,
                                "clean": True})
        sel = self.agent.sel
        for fd, pipe in ((1, self.proc.stdout), (2, self.proc.stderr)):
            os.set_blocking(pipe.fileno(), False)
            self.pipes[pipe.fileno()] = (fd, pipe)
            sel.register(pipe.fileno(), selectors.EVENT_READ, self.on_output)
        self.stdin_fd = self.proc.stdin.fileno()
        os.set_blocking(self.stdin_fd, False)
        self.watch_exit()
        if h.get("timeout") is not None:
            self.deadline = self.started + h["timeout"]
        files_size = sum(f["size"] for f in h.get("files", []))
        self.feed(self.body[files_size:], h.get("stdin_eof", True))
        self.body = None
        if self.cancelled:
            self.kill()

    def prepare(self, h):
        token = os.path.basename(h["workdir"])
        workdir = os.path.join(ROOT, token)
        try:
            os.mkdir(workdir, 0o700)
        except FileExistsError:
            pass
        wfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            write_files(wfd, h.get("files", []), self.body)
        finally:
            os.close(wfd)
        return workdir

    def watch_exit(self):
        pid = self.proc.pid
        try:
            self.pidfd = os.pidfd_open(pid)
            self.agent.sel.register(self.pidfd, selectors.EVENT_READ, self.on_exit)
            return
        except (AttributeError, OSError):
            pass
        # No pidfd (old kernel or Python): a thread waits, and wakes the loop with a pipe.
        r, w = os.pipe()
        self.pidfd = r
        self.agent.sel.register(r, selectors.EVENT_READ, self.on_exit)

        def wait():
            self.status = self.proc.wait()
            os.write(w, b"x")
            os.close(w)
        threading.Thread(target=wait, daemon=True).start()

    # -- events ----------------------------------------------------------------------------

    def feed(self, data, eof):
        stdin = self.proc.stdin if self.proc is not None else None
        if stdin is None or stdin.closed:
            return
        self.stdin_buf += data
        self.stdin_eof = self.stdin_eof or eof
        self.flush_stdin()

    def flush_stdin(self, fd=None, events=None):
        stdin = self.proc.stdin
        if stdin.closed:
            return
        sel = self.agent.sel
        fileno = self.stdin_fd
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
                stdin.close()

    def on_output(self, fileno, events):
        fd, pipe = self.pipes[fileno]
        try:
            data = os.read(fileno, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.agent.sel.unregister(fileno)
            del self.pipes[fileno]
            pipe.close()
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

    def on_exit(self, fileno, events):
        self.agent.sel.unregister(fileno)
        os.close(fileno)
        self.pidfd = None
        if self.status is None:
            _, status = os.waitpid(self.proc.pid, 0)
            self.proc.returncode = self.status = (
                -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))
        self.duration = (time.monotonic() - self.started) * 1000.0
        # Its group, and anything it left behind, may still hold our pipes: end every
        # process so the pipes reach EOF, and so nothing survives into the next function.
        self.clean = self.agent.kill_others()
        self.agent.wipe_temp()
        self.deadline = None
        self.drain_until = time.monotonic() + 2.0
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
                self.agent.sel.unregister(fileno)
                self.pipes.pop(fileno)[1].close()
            self.maybe_done()

    def maybe_done(self):
        if self.pidfd is not None or self.pipes or self.proc is None:
            return
        if self.stdin_fd in self.agent.sel.get_map():
            self.agent.sel.unregister(self.stdin_fd)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        status = self.status
        oom_after = oom_kills()
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
        self.agent.kill_others()
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
        if self.proc is not None and self.status is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass


def become_subreaper():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def main():
    become_subreaper()
    Agent().serve()


if __name__ == "__main__":
    main()
