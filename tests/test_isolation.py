"""What a function cannot do to the agent, to the host or to the function after it, tried
for real in real containers, through both run paths where the path matters."""

from __future__ import annotations

import struct
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from pool import File, Job, Pool, Profile
from pool._docker import BadStream, MuxStream
from pool._runner import MAX_BODY, MAX_HEADER, AgentRunner, BadFrame

MiB = 1 << 20
PROFILE = Profile(memory=256 * MiB, pids=64, workdir_size=32 * MiB, tmp_size=16 * MiB)
CAP = 90


@pytest.fixture(params=["python", "busybox"])
def image(request, images):
    return getattr(images, request.param)


@asynccontextmanager
async def serving(engine, image, test_id, test_labels, **kw):
    kw.setdefault("profile", PROFILE)
    async with trio.open_nursery() as nursery:
        pool = Pool(engine, image, instance=f"{test_id}-pool", labels=test_labels, min_idle=1,
                    max=1, watch_interval=0.5, **kw)
        await nursery.start(pool.serve)
        await pool.wait_warm(timeout=60)
        yield pool
        nursery.cancel_scope.cancel()


async def run(pool, argv, near=None, **kw):
    async with pool.lease(near) as lease:
        return lease, await lease.run(Job(argv, **kw))


def sh(script):
    return ["sh", "-c", script]


# What an agent-mode function finds of the agent: its pid is that of the function's
# parent's parent at most; rather than guess, look for it by its command line.
FIND_AGENT = ('for p in /proc/[0-9]*; do case "$(tr "\\0" " " < $p/cmdline 2>/dev/null)" in '
              '*in-pool-container*) echo ${p#/proc/}; break;; esac; done')


async def test_a_function_cannot_reach_the_agent(engine, images, test_id, test_labels):
    """The forged-frame attack of the review, and its cousins: the agent's descriptors,
    memory and environment, and signals to it, are all refused to a function."""
    script = (f"a=$({FIND_AGENT}); [ -n \"$a\" ] || {{ echo no-agent; exit 1; }}; "
              'for t in fd/1 fd/0 environ mem maps; do '
              'if cat /proc/$a/$t >/dev/null 2>&1; then echo "read $t"; fi; done; '
              '( printf "\\377\\377\\377\\377\\000\\000\\000\\000" > /proc/$a/fd/1 ) 2>/dev/null '
              '&& echo wrote-frame; '
              'for s in STOP TERM KILL; do kill -$s $a 2>/dev/null && echo "signalled $s"; done; '
              "python3 -c 'import ctypes, sys; a = int(sys.argv[1]); "
              "libc = ctypes.CDLL(None, use_errno=True); "
              "print(\"ptrace\", libc.ptrace(16, a, 0, 0), ctypes.get_errno())' $a; "
              "grep -E '^(Uid|CapEff)' /proc/self/status")
    with trio.fail_after(CAP):
        async with serving(engine, images.python, test_id, test_labels) as pool:
            lease, result = await run(pool, sh(script))
            assert result.exit_code == 0, result
            lines = result.stdout.decode().splitlines()
            assert lines[0] == "ptrace -1 1", lines  # EPERM
            assert lines[1].split()[1:] == ["65534"] * 4 and lines[2] == "CapEff:\t" + "0" * 16
            assert len(lines) == 3, lines  # nothing read, written or signalled
            # The agent is alive and well, in the same container.
            _, after = await run(pool, ["echo", "fine"])
            assert after.stdout == b"fine\n" and after.place.container == lease.place.container


async def test_a_frame_bigger_than_the_bounds_is_refused_before_it_is_buffered():
    """The host end: a frame header claiming gigabytes ends the stream at once, before
    any of it is allocated, whether the engine's framing or the agent's lies."""
    # The engine's own framing: fd 1, 4 GiB.
    left, right = trio.testing.memory_stream_pair()
    stream = MuxStream(left)
    await right.send_all(struct.pack(">BxxxI", 1, 0xFFFFFFFF))
    with trio.fail_after(5), pytest.raises(BadStream):
        await stream.receive()
    # The agent's framing inside well-formed engine frames: a header of 4 GiB.
    left, right = trio.testing.memory_stream_pair()
    runner = AgentRunner(None, "c" * 64, MuxStream(left))  # type: ignore[arg-type]
    forged = struct.pack(">II", MAX_HEADER + 1, 0) + b"{}"
    await right.send_all(struct.pack(">BxxxI", 1, len(forged)) + forged)
    with trio.fail_after(5), pytest.raises(BadFrame):
        await runner._next_frame()
    left, right = trio.testing.memory_stream_pair()
    runner = AgentRunner(None, "c" * 64, MuxStream(left))  # type: ignore[arg-type]
    forged = struct.pack(">II", 2, MAX_BODY + 1) + b"{}"
    await right.send_all(struct.pack(">BxxxI", 1, len(forged)) + forged)
    with trio.fail_after(5), pytest.raises(BadFrame):
        await runner._next_frame()


async def test_nothing_reaches_the_hosts_disk(engine, image, test_id, test_labels,
                                             docker_client):
    """The root is read-only; every writable place is a tmpfs of bounded size."""
    script = ("for d in /tmp /var/tmp /dev/shm /run .; do "
              "dd if=/dev/zero of=$d/fill bs=1M count=100 2>/dev/null; "
              "echo $d $(( $(wc -c < $d/fill 2>/dev/null || echo 0) / 1048576 )); "
              "rm -f $d/fill; done; "
              "for f in /fill /etc/fill /usr/fill /run/lock/fill; do "
              "touch $f 2>/dev/null && echo wrote $f; done; true")
    with trio.fail_after(CAP):
        async with serving(engine, image, test_id, test_labels) as pool:
            lease, result = await run(pool, sh(script))
            sizes = dict(line.split() for line in result.stdout.decode().splitlines())
            assert sizes.pop(".", None) == "32", result  # the working directory's own cap
            assert sizes == {"/tmp": "16", "/var/tmp": "16", "/dev/shm": "16", "/run": "0"}, \
                result
            cid = lease.place.container
            attrs = await trio.to_thread.run_sync(docker_client.api.inspect_container, cid)
            assert attrs["HostConfig"]["ReadonlyRootfs"] is True
            (listed,) = await trio.to_thread.run_sync(lambda: docker_client.api.containers(
                all=True, size=True, filters={"id": cid}))
            assert listed.get("SizeRw", 0) == 0  # not a byte in the container's own layer


SURVIVOR = "( sleep 773 >/dev/null 2>&1 </dev/null & ); sleep 0.2; kill -9 $PPID; sleep 5"
COUNT = ('n=0; for p in /proc/[0-9]*; do case "$(tr "\\0" " " < $p/cmdline 2>/dev/null)" '
         'in "sleep 773 ") n=$((n + 1));; esac; done; echo $n')


async def test_no_process_outlives_its_function(engine, image, test_id, test_labels):
    """The review's survivor: a background process, and the function's parent killed so
    that no clean-up of its own runs (the agent is out of a function's reach: its kill
    fails there, and the function ends by itself)."""
    with trio.fail_after(CAP):
        async with serving(engine, image, test_id, test_labels) as pool:
            lease, first = await run(pool, sh(SURVIVOR), timeout=20)
            assert first.outcome == "exited", first
            _, count = await run(pool, sh(COUNT))
            assert count.place.container == lease.place.container
            assert count.stdout == b"0\n", count


async def test_ipc_and_queues_do_not_outlive_their_function(engine, images, test_id,
                                                            test_labels):
    """A 150 MiB SysV segment (filled, so charged to the container), a POSIX message
    queue and a changed mode on the workdirs' root: none outlives the function that made
    it, and the next function can use the memory the segment took."""
    make = ("import ctypes, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.shmat.restype = ctypes.c_void_p\n"
            "size = 150 << 20\n"
            "shm = libc.shmget(0, size, 0o1600)\n"  # IPC_PRIVATE, IPC_CREAT | 0600
            "addr = libc.shmat(shm, None, 0)\n"
            "ctypes.memset(addr, 1, size)\n"
            "rt = ctypes.CDLL('librt.so.1', use_errno=True)\n"
            "q = rt.mq_open(b'/ufaas-q', os.O_CREAT | os.O_RDWR, 0o600, None)\n"
            "print(shm >= 0, q >= 0, os.listdir('/dev/mqueue'))\n"
            "try:\n"
            "    os.chmod('/tmp/ufaas', 0o777)\n"
            "except PermissionError:\n"
            "    print('chmod refused')\n")
    check = ("import os\n"
             "print(len(open('/proc/sysvipc/shm').read().splitlines()) - 1, "
             "os.listdir('/dev/mqueue'), oct(os.stat('/tmp/ufaas').st_mode & 0o7777))\n"
             "b = bytearray(180 << 20)\n"
             "print('allocated')\n")
    with trio.fail_after(CAP):
        async with serving(engine, images.python, test_id, test_labels) as pool:
            lease, made = await run(pool, ["python3", "-c", make])
            assert made.stdout == b"True True ['ufaas-q']\nchmod refused\n", made
            _, after = await run(pool, ["python3", "-c", check])
            assert after.place.container == lease.place.container
            assert after.stdout == b"0 [] 0o1733\nallocated\n", after
            assert not after.oom


async def test_a_workdir_that_is_not_its_own_is_refused(engine, image, test_id, test_labels):
    """A function that swaps its working directory for a symlink, or leaves a directory
    where a follow-up's file goes: the follow-up is refused, nothing is written outside,
    and the container serves on."""
    swap = ("mkdir made; wd=$(pwd); cd ..; mv \"$wd\" \"$wd.moved\" && "
            "ln -s /tmp \"$wd\" && echo swapped")
    with trio.fail_after(CAP):
        async with serving(engine, image, test_id, test_labels) as pool:
            lease, first = await run(pool, sh("mkdir -p taken; echo x > note"))
            assert first.exit_code == 0, first
            _, refused = await run(pool, ["true"], near=first.place,
                                   files=[File("taken", b"over a directory")])
            assert refused.outcome == "refused" and "taken" in refused.error, refused
            _, swapped = await run(pool, sh(swap), near=first.place)
            assert swapped.stdout == b"swapped\n", swapped
            _, refused = await run(pool, ["true"], near=first.place,
                                   files=[File("escaped", b"outside")])
            assert refused.outcome == "refused", refused
            _, look = await run(pool, sh("ls -A /tmp; echo end"))
            assert look.place.container == lease.place.container
            assert look.stdout == b"ufaas\nend\n", look
