"""The zygote: a Python interpreter that has imported a pool's ``preload`` modules and forks
children ahead of time, each of which becomes one Python function when the agent hands it
one, behaving as a fresh ``python3 main.py`` would.

Stdlib only, and as little of it as can be: the agent starts it as ``python3 -c <this>``
and everything it imports is already imported in every function it forks. Function data
never reaches it: it only forks, reaps, and tells the agent. A child gets its job (argv,
env, working directory, user) and its stdin, stdout and stderr from the agent itself, over
a socket of its own, and drops to the function's user before it reads any of it.

Its socket to the agent is fd 3 (SOCK_SEQPACKET): ``marshal`` dicts, descriptors attached.
"""

import _socket
import ctypes  # to make a child dumpable again once it is the function's user
import io
import marshal
import os
import resource  # for a function's limits
import signal
import sys

AGENT_FD = 3
MAX_MESSAGE = 1 << 20
_PR_SET_DUMPABLE = 4

def _coercion():
    """What the interpreter added to its environment at start (PEP 538's LC_CTYPE): a fresh
    one started with the same locale variables adds it too."""
    try:
        with open("/proc/self/environ", "rb") as f:
            started = {k for k, _, _ in (e.partition(b"=") for e in f.read().split(b"\0"))}
    except OSError:
        return {}
    return {k: v for k, v in os.environb.items() if k == b"LC_CTYPE" and k not in started}


_coerced = _coercion()


def _send(sock, message, fds=()):
    data = marshal.dumps(message)
    ancillary = []
    if fds:
        ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                      b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds))]
    sock.sendmsg([data], ancillary)


def _receive(sock):
    """A message and the descriptors that came with it; (None, []) at end of stream."""
    data, ancillary, _, _ = sock.recvmsg(MAX_MESSAGE, _socket.CMSG_SPACE(4 * 8))
    fds = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True)
                    for i in range(0, len(payload) - len(payload) % 4, 4)]
    return (marshal.loads(data) if data else None), fds


def preload(names):
    failed = {}
    for name in names:
        try:
            __import__(name)
        except BaseException as exc:  # anything a module does at import: report, go on
            failed[name] = "%s: %s" % (type(exc).__name__, exc)
    return failed


def _rss():
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def serve(names):
    agent = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, AGENT_FD)
    os.chdir("/")
    if sys.path and sys.path[0] == "":  # -c put the working directory first: a child
        del sys.path[0]                 # puts its own first instead
    failed = preload(names)
    ready = {"ev": "ready", "failed": failed,
             # The agent starts fresh what a file beside it could shadow.
             "modules": sorted({name.partition(".")[0] for name in sys.modules} - {"__main__"}),
             "executable": os.path.realpath(sys.executable),
             "version": list(sys.version_info[:3])}
    if len(os.listdir("/proc/self/task")) > 1:
        # A preloaded module started a thread: a fork would copy it half-way through.
        ready["unusable"] = "a preloaded module started a thread; fork needs one"
    import gc

    gc.freeze()  # what is here stays here: children leave its pages shared
    ready["rss"] = _rss()
    _send(agent, ready)
    if "unusable" in ready:
        os._exit(0)
    # Exits are learnt from SIGCHLD, through a pipe the loop below waits on.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    import select  # for the loop only; a child never needs it

    poller = select.poll()
    poller.register(agent.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                os.read(wake_r, 4096)
                reap(agent)
                continue
            message, fds = _receive(agent)
            for extra in fds:
                os.close(extra)
            if message is None:  # the agent is gone: so are we (our children follow)
                os._exit(0)
            if message.get("op") == "spare":
                spare(agent, (agent, wake_r, wake_w))


def reap(agent):
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        _send(agent, {"ev": "exit", "pid": pid, "status": code,
                      "cpu_ms": round((usage.ru_utime + usage.ru_stime) * 1000, 3),
                      "max_rss": usage.ru_maxrss * 1024})


def spare(agent, ours):
    """Fork a child that waits for its job on a socket of its own; the agent gets the
    other end."""
    theirs, mine = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    # Flushed now, or a replaced stream's buffer would be written again by the child.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    pid = os.fork()
    if pid == 0:
        try:
            theirs.close()
            child(mine, ours)
        finally:
            os._exit(70)  # never reached: child() ends the process
    mine.close()
    _send(agent, {"ev": "spare", "pid": pid}, [theirs.fileno()])
    theirs.close()


def child(sock, ours):
    """A spare: do what needs no job, wait for one, then become it."""
    agent, wake_r, wake_w = ours
    signal.set_wakeup_fd(-1)
    for fd in (wake_r, wake_w):
        os.close(fd)
    agent.detach()  # its finaliser must not close a number a function reuses
    os.close(AGENT_FD)
    _signals()
    # On descriptors 0-2, which become the function's: made now, they are ready then.
    _stdio(False)
    prctl = ctypes.CDLL(None).prctl
    try:
        sock.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT)
    except BlockingIOError:  # no job yet: time to spare
        _warm()
    job, fds = _receive(sock)
    if job is None or len(fds) != 3:
        os._exit(0)  # not wanted any more
    # What this process used before it was the function's: not the function's to count.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        _send(sock, {"ev": "took", "cpu_ms": (usage.ru_utime + usage.ru_stime) * 1000})
    except OSError:
        pass
    sock.detach()
    os.setsid()
    _become(job, prctl)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # nothing of the zygote's or the agent's
    if job.get("unbuffered"):
        _stdio(True)
    _run(job)


def _warm():
    """Touch, while nothing waits, what running a function touches first: its pages are
    this process's own then, not copied on the function's time."""
    sink = open(os.devnull, "w")
    code = compile("def f(n):\n    return [str(i) * 2 for i in range(n)]\n"
                   "print(f(64), file=sink)\n", "<warm>", "exec")
    exec(code, {"sink": sink, "__builtins__": sys.modules["builtins"]})
    sink.close()


def _become(job, prctl):
    """The function's user, limits, directory and environment."""
    uid, gid = job["uid"], job["gid"]
    if os.geteuid() == 0 and uid != 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        # A changed uid made us undumpable: /proc/self is the function's again.
        prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    for name, limit in job.get("rlimits", {}).items():
        resource.setrlimit(getattr(resource, name), (limit, limit))
    os.chdir(job["cwd"])
    environ = dict(job["env"])
    for key, value in _coerced.items():  # as a fresh interpreter would set it (PEP 538)
        environ.setdefault(key, value)
    os.environb.clear()
    os.environb.update(environ)


def _signals():
    """The dispositions and mask a fresh interpreter starts with."""
    for number in range(1, signal.NSIG):
        if number in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(number, signal.SIG_DFL)
        except (OSError, RuntimeError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for ignored in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(ignored, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


# The zygote's own standard streams, kept from the collector: their finalisers would close
# descriptors 0-2, which are the function's by then.
_kept = []  # type: list


def _stdio(unbuffered):
    """New standard streams on the function's descriptors, made as create_stdio() makes
    them, with the encodings the zygote's own got from the same environment."""
    made = []
    for fd, name, mode in ((0, "<stdin>", "r"), (1, "<stdout>", "w"), (2, "<stderr>", "w")):
        old = (sys.__stdin__, sys.__stdout__, sys.__stderr__)[fd]
        _kept.append(old)
        write = mode == "w"
        buffering = 0 if unbuffered and write else -1
        buffered = open(fd, mode + "b", buffering, closefd=False)
        raw = buffered if buffering == 0 else buffered.raw
        raw.name = name
        text = io.TextIOWrapper(
            buffered, encoding=getattr(old, "encoding", None) or "utf-8",
            errors=getattr(old, "errors", None) or "strict", newline="\n",
            line_buffering=write and buffering != 0 and (fd == 2 or raw.isatty()),
            write_through=buffering == 0)
        text.mode = mode
        made.append(text)
    sys.stdin, sys.stdout, sys.stderr = made
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = made  # type: ignore[misc]


def _run(job):
    """Run the function's code as ``python3`` would, then end as it would."""
    import types

    if job.get("dont_write_bytecode"):
        sys.dont_write_bytecode = True
    sys.argv = list(job["argv"])
    sys.orig_argv = list(job["orig_argv"])
    _retitle(sys.orig_argv)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = sys.modules["builtins"]
    sys.modules["__main__"] = main
    _recursion()
    code, interrupted = 0, False
    try:
        code = _main(job, main)
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt as exc:
        _excepthook(exc)
        code, interrupted = 1, True
    except BaseException as exc:
        _excepthook(exc)
        code = 1
    _finish(code, interrupted)


def _recursion():
    """The script runs some frames deeper than in a fresh interpreter: the limit is higher
    by as many, and reads and sets as if it were not."""
    depth = 0
    frame = sys._getframe(1)
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    extra = depth + 2  # and _main's frame, and the one exec() adds
    get, set_ = sys.getrecursionlimit, sys.setrecursionlimit

    def getrecursionlimit():
        return get() - extra

    def setrecursionlimit(limit):
        set_(limit + extra if isinstance(limit, int) and limit >= 1 else limit)

    for fake, real in ((getrecursionlimit, get), (setrecursionlimit, set_)):
        fake.__name__ = fake.__qualname__ = real.__name__
        fake.__doc__, fake.__module__ = real.__doc__, "sys"
        setattr(sys, real.__name__, fake)
    set_(get() + extra)


def _retitle(argv):
    """/proc/self/cmdline as ps and psutil read it: the function's command, not the
    zygote's (written over the zygote's, which is longer, in the setproctitle way)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        start, end = int(fields[45]), int(fields[46])
    except (OSError, ValueError, IndexError):
        return
    title = b" ".join(os.fsencode(a) for a in argv)[:end - start - 2]
    # A NUL ends the title; the area's last byte not NUL says it is a title.
    area = title + b"\0" * (end - start - len(title) - 1) + b" "
    ctypes.memmove(start, area, len(area))


def _main(job, main):
    kind, target = job["kind"], job["target"]
    kind, target = job["kind"], job["target"]
    if kind == "module":
        import runpy

        _path0(os.getcwd())
        runpy._run_module_as_main(target)
        return 0
    main.__dict__.update(__name__="__main__", __doc__=None, __package__=None,
                         __spec__=None, __annotations__={})
    if kind == "command":
        _path0("")
        source, filename = target, "<string>"
        main.__loader__ = sys.modules["_frozen_importlib"].BuiltinImporter
    else:
        filename = os.path.abspath(target)
        _path0(os.path.dirname(os.path.realpath(filename)))
        main.__file__, main.__cached__ = filename, None
        main.__loader__ = sys.modules["_frozen_importlib_external"].SourceFileLoader(
            "__main__", filename)
        with open(filename, "rb") as f:
            source = f.read()
    try:
        compiled = compile(source, filename, "exec", dont_inherit=True)
    except SyntaxError as exc:
        # Printed as python3 prints it: with no traceback at all.
        sys.excepthook(type(exc), exc.with_traceback(None), None)
        return 1
    exec(compiled, main.__dict__)
    return 0


def _path0(entry):
    if not sys.flags.safe_path:
        sys.path.insert(0, entry)


def _excepthook(exc):
    # Without our frames (_run, _main): the user's code is where a traceback starts.
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code in _OUR_CODE:
        tb = tb.tb_next
    try:  # the hook prints the exception's own traceback, whatever it is given
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
    except BaseException:
        pass


def _exit_code(exc):
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):  # as C's exit() gets it: a long, or -1 when it is not one
        return code & 0xFF if -(1 << 63) <= code < 1 << 63 else 0xFF
    try:
        print(code, file=sys.stderr)
    except BaseException:
        pass
    return 1


def _finish(code, interrupted=False):
    """Join non-daemon threads, run atexit handlers, flush: what Py_FinalizeEx does; then
    exit, by SIGINT after an uncaught KeyboardInterrupt."""
    import atexit

    threading = sys.modules.get("threading")  # no thread without it
    if threading is not None:
        try:
            threading._shutdown()
        except BaseException:
            pass
    try:
        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            code = 120
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


_OUR_CODE = frozenset((_run.__code__, _main.__code__))

if __name__ == "__main__":
    serve(marshal.loads(bytes.fromhex(sys.argv[1])) if len(sys.argv) > 1 else [])
