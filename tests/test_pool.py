"""The pool library against the real engine, through both run paths (agent and exec)."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import docker.errors
import pytest
import trio

from pool import (
    BadFile,
    File,
    Job,
    Pool,
    PoolError,
    Pools,
    Profile,
    check_files,
)

# Small limits: a function that goes wild here stays cheap for the machine.
PROFILE = Profile(memory=128 << 20, pids=64, workdir_size=32 << 20)


@pytest.fixture(params=["python", "busybox"])
def image(request, images):
    return getattr(images, request.param)


@asynccontextmanager
async def serving(engine, image, test_id, test_labels, **kw):
    kw.setdefault("min_idle", 1)
    kw.setdefault("max", 2)
    kw.setdefault("profile", PROFILE)
    async with trio.open_nursery() as nursery:
        pool = Pool(engine, image, instance=f"{test_id}-pool", labels=test_labels,
                    watch_interval=0.5, **kw)
        await nursery.start(pool.serve)
        await pool.wait_warm(timeout=30)
        yield pool
        nursery.cancel_scope.cancel()


async def run(pool, job, near=None, **kw):
    async with pool.lease(near, **kw) as lease:
        return lease, await lease.run(job)


def procs_script(name: str) -> str:
    # Lists processes whose command line mentions `name`; works on busybox and Debian.
    # The bracket keeps this script's own command line from matching.
    return (f'for p in /proc/[0-9]*; do tr "\\0" " " < $p/cmdline 2>/dev/null; echo; done '
            f'| grep -c "[{name[0]}]{name[1:]}" || true')


async def test_warm_pool_runs_echo(engine, image, images, test_id, test_labels):
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels, min_idle=2, max=3) as pool:
            stats = pool.statistics()
            assert stats.idle == 2
            assert pool.mode == ("agent" if image == images.python else "exec")
            _, result = await run(pool, Job(["echo", "hi"]))
            assert (result.outcome, result.exit_code, result.stdout) == ("exited", 0, b"hi\n")
            _, result = await run(pool, Job(["sh", "-c", "exit 3"]))
            assert (result.outcome, result.exit_code) == ("exited", 3)
            _, result = await run(pool, Job(["sh", "-c", "kill -TERM $$"]))
            assert (result.outcome, result.exit_code, result.signal) == ("exited", None, 15)
            _, result = await run(pool, Job(["no-such-command-here"]))
            assert result.exit_code in (126, 127)


async def test_files_env_stdin(engine, image, test_id, test_labels):
    files = [File("main.txt", "héllo\n".encode()), File("bin/run.sh", b"#!/bin/sh\necho ran $1\n",
                                                          0o755),
             File("data.bin", bytes(range(256)), 0o600)]
    script = ('cat main.txt; ./bin/run.sh ok; echo "$GREETING"; cat; '
              'stat -c "%a %s" bin/run.sh data.bin; echo "$UFAAS_WORKDIR" "$PWD"')
    job = Job(["sh", "-c", script], files=files, env={"GREETING": "hey there"},
              stdin=b"from stdin\n")
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels) as pool:
            _, result = await run(pool, job)
    lines = result.stdout.decode().splitlines()
    assert result.exit_code == 0, result.stderr
    assert lines[:4] == ["héllo", "ran ok", "hey there", "from stdin"]
    assert lines[4:6] == ["755 22", "600 256"]
    workdir, pwd = lines[6].split()
    assert workdir == pwd and workdir.startswith("/tmp/ufaas/")


def test_bad_paths_refused_before_anything_runs():
    for bad in ("../x", "/etc/x", "a/../../x", "a\x00b", "", "x" * 4096, "./x", "a//b",
                "é" * 128):
        with pytest.raises(BadFile):
            check_files([File(bad, b"")])
    for files in ([File("a", b""), File("a", b"")], [File("a", b""), File("a/b", b"")],
                  [File("a", b"", 0o1000)]):
        with pytest.raises(BadFile):
            check_files(files)


async def test_symlink_and_raw_paths_refused_in_container(engine, image, test_id, test_labels):
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels, max=1) as pool:
            # A function leaves symlinks pointing outside its working directory...
            lease, first = await run(pool, Job(["sh", "-c", "mkdir -p /tmp/outside && "
                                                "ln -s /tmp/outside evil && ln -s /etc etc"]))
            assert first.exit_code == 0, first.stderr
            # ...and its locality follow-up tries to write through them.
            for path in ("evil/x", "etc/passwd-x"):
                _, result = await run(pool, Job(["true"], files=[File(path, b"owned")]),
                                      near=first.place)
                assert result.outcome == "refused", result
                assert path.split("/")[0] in result.error
            # A path the host would refuse is refused by the container too (agent defence).
            if pool.mode == "agent":
                sneaky = File("ok", b"owned")
                object.__setattr__(sneaky, "path", "../sneaky")
                _, result = await run(pool, Job(["true"], files=[sneaky]))
                assert result.outcome == "refused"
            _, check = await run(pool, Job(["sh", "-c", "ls -A /tmp/outside; ls /tmp/ufaas/.. "
                                            ">/dev/null; find / -name 'sneaky' -o -name "
                                            "'passwd-x' 2>/dev/null | grep -v ^/proc"]),
                                 near=first.place)
            assert check.stdout == b"", check.stdout


async def test_timeout_kills_process_group(engine, image, test_id, test_labels, docker_client):
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels) as pool:
            async with pool.lease() as lease:
                result = await lease.run(Job(["sh", "-c", "sleep 100 & sleep 100; echo no"],
                                             timeout=1))
                # Still leased, so not yet replaced: nothing of the function is left in it,
                # the background sleep included.
                check = await trio.to_thread.run_sync(lambda: docker_client.containers.get(
                    lease.container.id).exec_run(["sh", "-c", procs_script("sleep 100")]))
            assert result.outcome == "timeout"
            assert result.stdout == b""
            assert check.output.strip() == b"0", check
            # Killed and cleaned up, its container serves on: timeouts in a loop cost the
            # engine nothing.
            assert pool.container(lease.container.id) is not None
            _, ok = await run(pool, Job(["echo", "fine"]))
            assert ok.stdout == b"fine\n" and ok.place.container == lease.container.id


async def test_cancel_kills_function(engine, image, test_id, test_labels):
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels, max=1) as pool:
            place = None
            with trio.move_on_after(1) as scope:
                async with pool.lease() as lease:
                    place = lease.place
                    await lease.run(Job(["sh", "-c", "sleep 100 & sleep 100"], timeout=60))
            assert scope.cancelled_caught and place is not None
            # The same container (max=1) runs the next function, and sees none of the
            # cancelled one's processes.
            _, check = await run(pool, Job(["sh", "-c", procs_script("sleep 100")]), near=place)
            assert check.stdout.strip() == b"0", check
            assert check.place.container == place.container


async def test_output_is_live_and_ordered(engine, image, test_id, test_labels):
    seen: list[tuple[float, int, bytes]] = []
    job = Job(["sh", "-c", "echo a; echo err >&2; sleep 2; echo b; for i in $(seq 1 500); "
               "do echo line$i; done"])
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels) as pool:
            async with pool.lease() as lease:
                result = await lease.run(job, lambda fd, data: seen.append(
                    (time.monotonic(), fd, data)))
                ended = time.monotonic()
    first = next(t for t, fd, data in seen if fd == 1)
    assert ended - first >= 1.5
    expected = "a\nb\n" + "".join(f"line{i}\n" for i in range(1, 501))
    assert b"".join(d for _, fd, d in seen if fd == 1).decode() == expected
    assert b"".join(d for _, fd, d in seen if fd == 2) == b"err\n"
    # The caller that takes the output live holds the one copy of it.
    assert (result.stdout, result.stderr) == (b"", b"")


async def test_unrelated_functions_are_isolated(engine, image, test_id, test_labels):
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels, max=1) as pool:
            _, first = await run(pool, Job(
                ["sh", "-c", "echo s3cret > secret.txt; echo x > /tmp/leak.txt; "
                 "mkdir /dev/shm/leakdir; (sleep 300 &) ; sleep 300 & echo ok"],
                files=[File("given.txt", b"given")]))
            assert first.exit_code == 0
            # Same container (max=1), unrelated function: no files, no processes.
            _, other = await run(pool, Job(["sh", "-c", "ls /tmp/ufaas; find / -name "
                                            "'secret.txt' 2>/dev/null; ls -A /tmp /dev/shm; "
                                            "pwd; ls -A; " + procs_script("sleep 300")]))
            assert other.place.container == first.place.container
            assert other.place.workdir != first.place.workdir
            out = other.stdout.decode()
            assert "secret.txt" not in out and "given.txt" not in out
            assert "leak" not in out, out
            assert out.strip().endswith("0"), out
            # A locality follow-up sees its predecessor's files.
            lease, follow = await run(pool, Job(["cat", "secret.txt", "given.txt"]),
                                      near=first.place)
            assert lease.hit is True
            assert follow.stdout == b"s3cret\ngiven"


async def test_locality_waits_for_busy_container_and_misses_when_gone(
        engine, images, test_id, test_labels, docker_client):
    with trio.fail_after(60):
        async with serving(engine, images.python, test_id, test_labels, max=2) as pool:
            _, first = await run(pool, Job(["sh", "-c", "echo x > f"]))
            order = []

            async def busy(task_status=trio.TASK_STATUS_IGNORED):
                async with pool.lease(first.place) as lease:
                    order.append("busy-start")
                    task_status.started()
                    await lease.run(Job(["sleep", "1"]))
                    order.append("busy-end")

            async with trio.open_nursery() as nursery:
                await nursery.start(busy)  # the container is busy from here on
                lease, second = await run(pool, Job(["cat", "f"]), near=first.place)
                order.append("second")
            assert lease.hit is True and second.stdout == b"x\n"
            assert order == ["busy-start", "busy-end", "second"]
            docker_client.containers.get(first.place.container).remove(force=True)
            while pool.container(first.place.container) is not None:
                await trio.sleep(0.05)
            with pytest.raises(PoolError):
                await run(pool, Job(["true"]), near=first.place, strict=True)
            lease, third = await run(pool, Job(["echo", "elsewhere"]), near=first.place)
            assert lease.hit is False and third.stdout == b"elsewhere\n"
            assert third.place.container != first.place.container


async def test_dead_container_is_replaced(engine, images, test_id, test_labels, docker_client):
    with trio.fail_after(60):
        async with serving(engine, images.python, test_id, test_labels, min_idle=1) as pool:
            running = trio.Event()

            async def kill_once_running(cid):
                await running.wait()
                await trio.to_thread.run_sync(lambda: docker_client.containers.get(cid).kill())

            async with trio.open_nursery() as nursery, pool.lease() as lease:
                nursery.start_soon(kill_once_running, lease.container.id)
                result = await lease.run(Job(["sh", "-c", "echo up; sleep 30"]),
                                         lambda fd, data: running.set())
            assert result.outcome == "error", result
            idle_before = {c.id for c in pool._idle}
            for cid in idle_before:
                docker_client.containers.get(cid).kill()
            while not (pool._idle and {c.id for c in pool._idle}.isdisjoint(idle_before)):
                await trio.sleep(0.1)
            _, ok = await run(pool, Job(["echo", "back"]))
            assert ok.stdout == b"back\n"
            stats = pool.statistics()
            # Killed while busy, then while idle: each one lost, each replaced.
            assert stats.retired == {"lost": 1 + len(idle_before)}, stats
            assert stats.started == 2 + len(idle_before) and stats.start_failures == 0


async def test_retired_containers_are_counted_by_reason(engine, images, test_id,
                                                       test_labels):
    with trio.fail_after(60):
        async with serving(engine, images.busybox, test_id, test_labels, min_idle=1,
                           idle_ttl=0.2) as pool:
            async with pool.lease() as lease:
                pool.discard(lease.container.id)  # busy: it goes when the lease ends
                await lease.run(Job(["true"]))
            assert pool.statistics().retired == {"discarded": 1}
            await pool.wait_warm(timeout=30)
            async with pool.lease() as first, pool.lease() as second:
                await first.run(Job(["true"]))
                await second.run(Job(["true"]))
            # Two idle again, one beyond min_idle: it goes after idle_ttl.
            while pool.statistics().retired.get("idle", 0) < 1:
                await trio.sleep(0.1)
            assert pool.statistics().retired == {"discarded": 1, "idle": 1}


async def test_queueing_in_arrival_order(engine, images, test_id, test_labels):
    with trio.fail_after(60):
        async with serving(engine, images.python, test_id, test_labels, max=1) as pool:
            finished = []

            async def one(i):
                _, r = await run(pool, Job(["echo", str(i)]))
                finished.append(int(r.stdout))

            async with trio.open_nursery() as nursery:
                # The one container is held while the six queue, each after the one before.
                async with pool.lease():
                    for i in range(6):
                        nursery.start_soon(one, i)
                        while pool.statistics().waiting < i + 1:
                            await trio.sleep(0.01)
            assert finished == list(range(6))
            assert pool.statistics().total == 1


async def test_pools_clean_up_everything(engine, images, test_id, test_labels, docker_client):
    label = f"ufaas.instance={test_id}-pools"
    with trio.fail_after(60):
        # A container of an earlier instance of the same home is removed at start.
        stale = docker_client.containers.create(
            images.busybox, ["sleep", "60"],
            labels={**test_labels, "ufaas.home": test_id, "ufaas.instance": f"{test_id}-old"})
        async with trio.open_nursery() as nursery:
            pools = Pools(engine, home=test_id, instance=f"{test_id}-pools",
                          labels=test_labels, min_idle=1, max=2)
            await nursery.start(pools.serve)
            with pytest.raises(docker.errors.NotFound):
                stale.reload()
            python = await pools.add(images.python, PROFILE)
            busybox = await pools.add(images.busybox, PROFILE)
            assert await pools.add(images.python, PROFILE) is python
            await python.wait_warm()
            await busybox.wait_warm()
            assert len(docker_client.containers.list(filters={"label": label})) == 2
            nursery.cancel_scope.cancel()
    assert docker_client.containers.list(all=True, filters={"label": label}) == []


async def test_a_removal_says_whether_the_engine_had_the_container(images, test_labels,
                                                                   docker_client):
    """True for a container the engine had (and now has not), False for one it has not,
    which is no error (the engine answered 404)."""
    from pool import Engine

    made = docker_client.containers.create(images.busybox, ["sleep", "60"],
                                           labels=test_labels)
    engine = Engine()
    try:
        with trio.fail_after(30):
            assert await engine.remove(made.id) is True
            with pytest.raises(docker.errors.NotFound):
                made.reload()
            assert await engine.remove(made.id) is False
            assert await engine.remove("404" * 21 + "4") is False
            assert await engine.remove_each([made.id, "f" * 64]) == {made.id, "f" * 64}
    finally:
        await engine.aclose()


async def test_a_stale_container_that_cannot_be_removed_does_not_stop_the_start(
        images, test_id, test_labels, docker_client, caplog):
    """The engine refuses to remove one container of an earlier instance: the others go,
    that one is logged, and the pools start all the same."""
    from pool import Engine, EngineError

    old = {**test_labels, "ufaas.home": test_id, "ufaas.instance": f"{test_id}-old"}
    stuck = docker_client.containers.create(images.busybox, ["sleep", "60"], labels=old)
    gone = docker_client.containers.create(images.busybox, ["sleep", "60"], labels=old)

    class Refusing(Engine):
        async def remove(self, cid: str, timeout: float = 10.0) -> bool:
            if cid == stuck.id:
                raise EngineError("removal refused (the test's)")
            return await super().remove(cid, timeout)

    engine = Refusing()
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                pools = Pools(engine, home=test_id, instance=f"{test_id}-pools",
                              labels=test_labels)
                await nursery.start(pools.serve)  # started: the refusal did not end it
                with pytest.raises(docker.errors.NotFound):
                    gone.reload()
                stuck.reload()
                assert f"could not remove container {stuck.id[:12]}" in caplog.text
                nursery.cancel_scope.cancel()
    finally:
        stuck.remove(force=True)
        await engine.aclose()


async def test_containers_never_started_are_removed_whoever_made_them(
        engine, images, test_id, test_labels, docker_client, monkeypatch):
    """A container created by an instance killed before it could start it has no lifeline:
    any instance on the engine removes it once it is UNSTARTED_GRACE old, and nothing
    younger, or started."""
    import pool._pool

    other = {**test_labels, "ufaas.home": f"{test_id}-other", "ufaas.instance": f"{test_id}-x"}
    with trio.fail_after(60):
        left = docker_client.containers.create(images.busybox, ["sleep", "60"], labels=other)
        started = docker_client.containers.create(images.busybox, ["sleep", "60"],
                                                  labels=other)
        started.start()
        pools = Pools(engine, home=test_id, instance=f"{test_id}-pools", labels=test_labels)
        await pools.remove_unstarted()
        left.reload()  # younger than the grace: kept
        monkeypatch.setattr(pool._pool, "UNSTARTED_GRACE", 0.0)
        assert await pools.remove_unstarted() >= 1  # others' leftovers may go too
        with pytest.raises(docker.errors.NotFound):
            left.reload()
        started.reload()
        assert started.status == "running"


@asynccontextmanager
async def pools_serving(engine, test_id, test_labels, **kw):
    async with trio.open_nursery() as nursery:
        pools = Pools(engine, home=f"{test_id}-home", instance=f"{test_id}-pools",
                      labels=test_labels, watch_interval=0.2, **kw)
        await nursery.start(pools.serve)
        yield pools
        nursery.cancel_scope.cancel()


def containers(docker_client, test_id):
    # Removed ones may vanish between the listing and their details: not an error here.
    return docker_client.containers.list(
        all=True, filters={"label": f"ufaas.instance={test_id}-pools"}, ignore_removed=True)


async def test_every_spelling_of_an_image_is_one_pool(engine, images, test_id, test_labels,
                                                    docker_client):
    image_id = docker_client.images.get(images.python).id
    spellings = [images.python, f"{images.python}:latest", f"docker.io/{images.python}",
                 f"docker.io/{images.python}:latest", image_id,
                 image_id.removeprefix("sha256:")[:12]]
    with trio.fail_after(60):
        async with pools_serving(engine, test_id, test_labels, min_idle=1, max=2) as pools:
            found = {id(await pools.add(spelling, PROFILE)) for spelling in spellings}
            assert len(found) == 1
            (pool,) = list(pools)
            await pool.wait_warm()
            assert pool.image == image_id and pool.reference == images.python
            assert len(containers(docker_client, test_id)) == 1
            with pytest.raises(PoolError, match="not available"):
                await pools.add("ufaas-test/no-such-image", PROFILE)
            assert len(list(pools)) == 1  # nothing is left to retry it


async def test_a_cap_on_all_pools_together(engine, images, test_id, test_labels,
                                           docker_client):
    """Two containers in all: a function that needs a second python container gets it by
    retiring the idle busybox one."""
    with trio.fail_after(60):
        async with pools_serving(engine, test_id, test_labels, min_idle=1, max=2,
                                 max_containers=2) as pools:
            python = await pools.add(images.python, PROFILE)
            busybox = await pools.add(images.busybox, PROFILE)
            await python.wait_warm()
            await busybox.wait_warm()
            async with python.lease() as first:
                assert len(containers(docker_client, test_id)) == 2
                async with python.lease(timeout=30) as second:
                    assert second.container is not first.container
                    result = await second.run(Job(["echo", "room"]))
                    assert result.stdout == b"room\n"
                    assert busybox.statistics().total == 0
                    assert pools.budget.room() == 0


async def test_pools_not_configured_go_when_unused(engine, images, test_id, test_labels,
                                                   docker_client):
    with trio.fail_after(60):
        async with pools_serving(engine, test_id, test_labels, min_idle=1, max=1,
                                 idle_ttl=1.0) as pools:
            kept = await pools.add(images.python, PROFILE, configured=True)
            used = await pools.add(images.busybox, PROFILE)
            await kept.wait_warm()
            await used.wait_warm()
            _, result = await run(used, Job(["true"]))
            assert result.exit_code == 0
            while pools.get(images.busybox, PROFILE) is not None:
                await trio.sleep(0.1)
            while len(containers(docker_client, test_id)) > 1:
                await trio.sleep(0.1)
            assert pools.get(images.python, PROFILE) is kept
            (left,) = containers(docker_client, test_id)
            assert left.labels["ufaas.pool"] == kept.name


async def test_functions_run_unprivileged(engine, image, test_id, test_labels):
    # What the container's flags (checked in test_faults) mean for the function itself.
    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels) as pool:
            _, result = await run(pool, Job(["sh", "-c", "id -u; id -g; grep -E "
                                             "'^(CapEff|CapPrm|NoNewPrivs):' /proc/self/status"]))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.decode().split() == [
        "65534", "65534", "CapPrm:", "0000000000000000", "CapEff:", "0000000000000000",
        "NoNewPrivs:", "1"]


async def test_interactive_stdin(engine, image, test_id, test_labels):
    # Reads a line, answers it, reads again: each answer must come before the next line
    # is sent, so the stdin really is live.
    script = ('echo ready; while read line; do echo "got:$line"; done; echo eof')
    seen = bytearray()
    changed = trio.Event()

    def on_output(fd, data):
        nonlocal changed
        seen.extend(data)
        changed.set()
        changed = trio.Event()

    async def until(text):
        while text not in seen:
            await changed.wait()

    with trio.fail_after(60):
        async with serving(engine, image, test_id, test_labels) as pool:
            send, receive = trio.open_memory_channel(8)
            async with pool.lease() as lease, trio.open_nursery() as nursery:
                results = []

                async def run_it():
                    results.append(await lease.run(
                        Job(["sh", "-c", script], stdin=b"first\n"), on_output, receive))

                nursery.start_soon(run_it)
                await until(b"got:first\n")
                await send.send(b"one\n")
                await until(b"got:one\n")
                await send.send(b"tw")
                await send.send(b"o\n")
                await until(b"got:two\n")
                assert b"eof" not in seen
                await send.aclose()
            (result,) = results
    assert result.outcome == "exited" and result.exit_code == 0, result
    assert seen == b"ready\ngot:first\ngot:one\ngot:two\neof\n"


async def test_an_engine_that_does_not_answer_in_time_fails_as_an_engine_error(images):
    """A call past its deadline is an EngineError (EngineTimeout), as every other failure
    of the engine is, so that whoever handles those handles it too; a pool that cannot
    learn its image in time fails to start with a PoolError, not a bare TooSlowError."""
    from pool import Engine, EngineError, EngineTimeout, PoolError, Pools

    engine = Engine()
    try:
        with pytest.raises(EngineTimeout, match="within 0.05 s") as caught:
            await engine.call(time.sleep, 1, timeout=0.05)
        assert isinstance(caught.value, EngineError)
        assert isinstance(caught.value, trio.TooSlowError)  # as a deadline's end is
        await engine.api()  # connected: the next calls reach the engine, slowly
        engine.call_timeout = 1e-6  # no answer comes that fast
        pools = Pools(engine, home="timeout-test")
        with pytest.raises(PoolError, match="did not answer"):
            await pools.add(images.busybox)
    finally:
        with trio.CancelScope(shield=True):
            await engine.aclose()
