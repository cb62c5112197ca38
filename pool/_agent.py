"""The in-container agent: started once per warm container, then runs functions on request.

Stdlib only, Python >= 3.7, because it runs under whatever python3 the image has. Its
source travels as ``python3 -c`` text, so this module must import nothing from ``pool``.
Wire format both ways: ``>II`` (header length, body length), a JSON header, raw body bytes.
"""

import json
import os
import queue
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

_out = sys.stdout.buffer
_out_lock = threading.Lock()


def send(header, body=b""):
    data = json.dumps(header, separators=(",", ":")).encode()
    with _out_lock:
        _out.write(HEAD.pack(len(data), len(body)) + data + body)
        _out.flush()


def read_exact(stream, n):
    parts = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def read_frame(stream):
    head = read_exact(stream, HEAD.size)
    if head is None:
        return None, None
    hlen, blen = HEAD.unpack(head)
    header = json.loads(read_exact(stream, hlen).decode())
    body = read_exact(stream, blen) if blen else b""
    return header, body


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


def oom_kills():
    """The container cgroup's OOM kill count, or None where the kernel does not say."""
    for path, key in (("/sys/fs/cgroup/memory.events", "oom_kill"),
                      ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill")):
        try:
            with open(path) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


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
        self.lock = threading.Lock()
        os.makedirs(ROOT, exist_ok=True)
        try:
            os.chmod(ROOT, 0o311)
        except OSError:
            pass

    def serve(self):
        stdin = sys.stdin.buffer
        while True:
            header, body = read_frame(stdin)
            if header is None:
                break
            op = header.get("op")
            try:
                if op == "run":
                    run = Run(self, header, body)
                    with self.lock:
                        self.runs[run.id] = run
                    threading.Thread(target=run.main, daemon=True).start()
                elif op == "stdin":
                    run = self.runs.get(header["id"])
                    if run is not None:
                        run.feed(body, header.get("eof", False))
                elif op == "cancel":
                    run = self.runs.get(header["id"])
                    if run is not None:
                        run.cancel()
                elif op == "drop":
                    self.drop(header["workdir"])
                elif op == "hello":
                    send({"ev": "hello", "pid": self.me, "python": list(sys.version_info[:3]),
                          "oom": oom_kills() is not None})
                elif op == "ping":
                    send({"ev": "pong", "n": header.get("n")})
                else:
                    send({"ev": "error", "message": "unknown op %r" % op})
            except Exception as exc:  # a bad request must not end the agent
                send({"ev": "error", "id": header.get("id"),
                      "message": "%s: %s" % (type(exc).__name__, exc)})
        # The host went away: nothing we run may outlive the connection.
        self.kill_others()

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
            time.sleep(0.01)
        return not other_pids(self.protected)

    def reap(self):
        # Orphans of our functions are re-parented to us (child subreaper) or to init.
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
        self.cancelled = False
        self.timed_out = False
        self.done = threading.Event()
        self.stdin_queue = queue.Queue()
        files_size = sum(f["size"] for f in header.get("files", []))
        self.feed(body[files_size:], header.get("stdin_eof", True))
        self.cap = header.get("cap", 1 << 20)
        self.sent = {1: 0, 2: 0}
        self.truncated = {1: False, 2: False}

    def feed(self, data, eof):
        self.stdin_queue.put((data, eof))

    def write_stdin(self):
        # Its own thread: a function that never reads stdin must not block anything else.
        stdin = self.proc.stdin
        while True:
            data, eof = self.stdin_queue.get()
            if data is None:
                break
            try:
                if data:
                    stdin.write(data)
                    stdin.flush()
                if eof:
                    break
            except (OSError, ValueError):
                break
        try:
            stdin.close()
        except (OSError, ValueError):
            pass

    def cancel(self):
        self.cancelled = True
        self.kill()

    def kill(self):
        proc = self.proc
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass

    def pump(self, pipe, fd):
        while True:
            try:
                data = os.read(pipe.fileno(), CHUNK)
            except OSError:
                break
            if not data:
                break
            room = self.cap - self.sent[fd]
            if room <= 0:
                self.truncated[fd] = True
                continue  # keep draining so the function never blocks on a full pipe
            if len(data) > room:
                data = data[:room]
                self.truncated[fd] = True
            self.sent[fd] += len(data)
            send({"ev": "out", "id": self.id, "fd": fd}, data)
        pipe.close()

    def main(self):
        h = self.header
        try:
            self.execute(h)
        except Refused as exc:
            send({"ev": "exit", "id": self.id, "refused": str(exc), "clean": True})
        except Exception as exc:
            send({"ev": "exit", "id": self.id, "error": "%s: %s" % (type(exc).__name__, exc),
                  "clean": self.agent.kill_others()})
        finally:
            with self.agent.lock:
                self.agent.runs.pop(self.id, None)

    def execute(self, h):
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
        self.body = None
        env = dict(os.environ)
        env.update({"UFAAS_WORKDIR": workdir, "HOME": workdir, "PWD": workdir})
        env.update(h.get("env") or {})
        oom_before = oom_kills()
        started = time.monotonic()
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
            send({"ev": "exit", "id": self.id, "exit_code": code, "signal": None,
                  "duration_ms": 0.0, "clean": True})
            return
        send({"ev": "started", "id": self.id, "pid": self.proc.pid})
        if self.cancelled:
            self.kill()
        pumps = [threading.Thread(target=self.pump, args=(self.proc.stdout, 1), daemon=True),
                 threading.Thread(target=self.pump, args=(self.proc.stderr, 2), daemon=True)]
        for t in pumps:
            t.start()
        threading.Thread(target=self.write_stdin, daemon=True).start()
        timeout = h.get("timeout")
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.kill()
            status = self.proc.wait()
        duration = (time.monotonic() - started) * 1000.0
        # The group may hold children that still have our pipes open: end them all so the
        # pumps see EOF, and so nothing survives into the next function.
        self.kill()
        clean = self.agent.kill_others()
        self.stdin_queue.put((None, True))
        for t in pumps:
            t.join(2.0)
        oom_after = oom_kills()
        send({
            "ev": "exit", "id": self.id,
            "exit_code": status if status >= 0 else None,
            "signal": -status if status < 0 else None,
            "duration_ms": round(duration, 3),
            "timed_out": self.timed_out, "cancelled": self.cancelled,
            "oom": bool(oom_before is not None and oom_after is not None
                        and oom_after > oom_before),
            "truncated": {"stdout": self.truncated[1], "stderr": self.truncated[2]},
            "clean": clean,
        })


def become_subreaper():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except Exception:
        pass


def main():
    become_subreaper()
    agent = Agent()
    reaper = threading.Thread(target=_reap_forever, args=(agent,), daemon=True)
    reaper.start()
    agent.serve()


def _reap_forever(agent):
    # Runs only reap children that are not ours: subprocess waits for its own by pid, and
    # waitpid(-1) could steal those, so only reap pids that no Run owns.
    while True:
        time.sleep(0.5)
        with agent.lock:
            owned = {r.proc.pid for r in agent.runs.values() if r.proc is not None}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            if pid in owned or pid == agent.me:
                continue
            try:
                with open("/proc/%d/stat" % pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == agent.me:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass


if __name__ == "__main__":
    main()
