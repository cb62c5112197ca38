"""A Docker Swarm of docker-in-docker nodes on this one machine, for the cluster tests and
bench: the node image, the ufaas image (no registry: the python test image plus a
wheelhouse), the lab itself, and the faults a test causes on one node.

``python tests/lab.py build|up|status|down`` does the same from a shell (``.ci/run`` builds
with it). Follows ``../shared/tools/swarm-lab.sh``, whose comments explain each flag; what
differs is said here. Every address is inside 10.214.0.0/16, on networks made here: the
nodes' bridge is ``--internal`` and they resolve names through 127.0.0.1, where nothing
listens, so nothing leaves the machine.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB_DIR = Path(os.environ.get("UFAAS_LAB_DIR", "/tmp/ufaas-lab"))
NODE_IMAGE = "ufaas-lab/node:1"  # bump the tag when the node image's recipe changes
APP_REPOSITORY = "ufaas-lab/ufaas"
PYTHON_BASE = "ufaas-test/python"
TEST_IMAGES = ("ufaas-test/python", "ufaas-test/busybox")
LABEL = "ufaas.lab=1"  # on every container and network made here: down removes only those
PREFIX = "ufaas-lab"
NETWORK = f"{PREFIX}-net"
SUBNET = "10.214.0.0/24"
GATEWAY = "10.214.0.1"  # the host's end of the nodes' bridge
POOL_LOCAL = "10.214.128.0/18"  # each node's own networks
POOL_SWARM = "10.214.192.0/18"  # the swarm's overlay networks
NODE_PORT = 8001  # where `ufaas node` listens, published on each node (mode host)
FRONT_PORT = 8000
NODE_CONTAINER = f"{PREFIX}-ufaas-node"  # on each node's engine: its ufaas node
# The swarm marks a silent node down after ~3 beats: 1 s keeps fault tests short.
HEARTBEAT = "1s"
NODE_PACKAGES = "docker.io,iptables,iproute2,procps,tini,ca-certificates"
ENGINE_TIMEOUT = 90
SWARM_TIMEOUT = 60

# The node's init, mounted from LAB_DIR (so changing it needs no new image): PID 1 is
# tini, which runs this. It remounts /sys and the cgroups read-write (the node is not
# --privileged: this host's bounding set lacks CAP_SYS_RESOURCE), then keeps dockerd
# running as a machine's init would: an engine that dies is started again, and its
# containers with a restart policy (the ufaas node) with it.
ENTRYPOINT = """#!/bin/sh
set -u
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p /sys/fs/cgroup/init
    xargs -rn1 </sys/fs/cgroup/cgroup.procs >/sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
    sed -e 's/ / +/g' -e 's/^/+/' </sys/fs/cgroup/cgroup.controllers \\
        >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || :
fi
mount -o remount,rw /sys 2>/dev/null || :
for m in /sys/fs/cgroup/*; do
    if mountpoint -q "$m"; then mount -o remount,bind,rw "$m" 2>/dev/null || :; fi
done
engine=
trap 'kill -TERM $engine 2>/dev/null; wait $engine; exit 0' TERM INT
while :; do
    # a killed engine leaves its pid files, and the next one would refuse them
    rm -f /run/docker.pid /run/docker/containerd/containerd.pid
    dockerd "$@" &
    engine=$!
    wait $engine
    echo "lab: dockerd ended ($?), starting it again" >&2
    sleep 1
done
"""


def log(message: str) -> None:
    print(f"[lab {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(*argv: str, check: bool = True, input: bytes | None = None,
        timeout: float = 300, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, input=input, timeout=timeout,
                          env={**os.environ, **env} if env else None)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv[:6])}... failed ({done.returncode}): "
                       f"{done.stderr.decode(errors='replace').strip()[-2000:]}")
    return done.stdout.decode(errors="replace").strip()


class LabError(Exception):
    """The lab could not be built, brought up or changed."""


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name],
                          capture_output=True).returncode == 0


# -- images ---------------------------------------------------------------------------------

def build_node_image(force: bool = False) -> None:
    """The node: bookworm minbase with docker.io, whose entrypoint runs dockerd (~1 min)."""
    if image_exists(NODE_IMAGE) and not force:
        return
    if shutil.which("debootstrap") is None:
        raise LabError("debootstrap not found: apt-get install debootstrap")
    started = time.monotonic()
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=LAB_DIR) as root:
        log(f"debootstrap bookworm + {NODE_PACKAGES}")
        run("debootstrap", "--variant=minbase", f"--include={NODE_PACKAGES}", "bookworm", root,
            timeout=900)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                     "usr/share/man", "usr/share/locale"):
            shutil.rmtree(f"{root}/{junk}", ignore_errors=True)
        _import(root, NODE_IMAGE, 'ENTRYPOINT ["/usr/bin/tini", "--"]')
    log(f"built {NODE_IMAGE} in {time.monotonic() - started:.0f} s")


def _import(root: str, name: str, change: str) -> None:
    tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "--change", change, "-", name], stdin=tar.stdout,
                   check=True, stdout=subprocess.DEVNULL)
    if tar.wait() != 0:
        raise LabError(f"tar of {root} failed")


def _source_digest() -> str:
    """What the ufaas image is made of: the package's files and its dependencies."""
    digest = hashlib.sha256()
    paths = [ROOT / "pyproject.toml", ROOT / "README.rst"]
    for package in ("pool", "ufaas"):
        paths += sorted((ROOT / package).glob("*.py"))
    for path in paths:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def app_image() -> str:
    """The ufaas image of this source tree (``deploy/Dockerfile``'s, made without a
    registry): the python test image with ufaas and its dependencies installed from a
    wheelhouse. Built when the tree changed (~20 s with the wheelhouse cached)."""
    name = f"{APP_REPOSITORY}:{_source_digest()}"
    if image_exists(name):
        return name
    if not image_exists(PYTHON_BASE):
        raise LabError(f"no {PYTHON_BASE}: run python3 tests/images.py first")
    started = time.monotonic()
    wheels = _wheelhouse()
    with tempfile.TemporaryDirectory(dir=LAB_DIR) as own:
        # The package's own wheel, beside the cached ones of its dependencies.
        run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", own, str(ROOT))
        builder = f"{PREFIX}-build-{os.getpid()}"
        pip = next(wheels.glob("pip-*.whl")).name
        try:
            # Offline: pip runs from its own wheel (the image has none), from the wheelhouse.
            run("docker", "run", "--name", builder, "--network", "none", "--label", LABEL,
                "-v", f"{wheels}:/wheels:ro", "-v", f"{own}:/own:ro", PYTHON_BASE,
                "python3", f"/wheels/{pip}/pip", "install", "-q", "--no-index",
                "--no-cache-dir", "--break-system-packages", "--no-warn-script-location",
                "--find-links", "/wheels", "--find-links", "/own", "ufaas", timeout=600)
            run("docker", "commit", "--change", 'ENTRYPOINT ["ufaas"]', "--change",
                "CMD []", builder, name)
        finally:
            run("docker", "rm", "-f", builder, check=False)
    log(f"built {name} in {time.monotonic() - started:.0f} s")
    # the images of earlier trees: each is ~200 MB, and nothing needs them any more
    for old in run("docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}",
                   APP_REPOSITORY).split():
        if old != name:
            run("docker", "rmi", old, check=False)
    return name


def _wheelhouse() -> Path:
    """Wheels of ufaas's dependencies for the image's Python (3.11, x86-64), and pip's,
    fetched once per set of dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = sorted(project["dependencies"]) + ["pip"]
    key = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:12]
    wheels = LAB_DIR / f"wheels-{key}"
    if (wheels / ".complete").exists():
        return wheels
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    log("downloading the wheelhouse")
    run(sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels), "--only-binary=:all:",
        "--python-version", "3.11", "--implementation", "cp", "--platform",
        "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", *wanted, timeout=600)
    (wheels / ".complete").touch()
    return wheels


# -- the lab --------------------------------------------------------------------------------

class Lab:
    """``nodes`` docker-in-docker nodes on one bridge, in one swarm (node 1 its manager).

    Node ``n`` (1-based) has the address :meth:`ip`; its engine's socket appears on the
    host (:meth:`engine`). Faults (:meth:`kill`, :meth:`pause`, :meth:`disconnect`,
    :meth:`kill_engine`) each have their repair (:meth:`start`, :meth:`unpause`,
    :meth:`connect`).
    """

    def __init__(self, nodes: int = 3, directory: Path = LAB_DIR) -> None:
        self.nodes = nodes
        self.dir = directory

    def name(self, n: int) -> str:
        return f"{PREFIX}-node{n}"

    def ip(self, n: int) -> str:
        return f"10.214.0.{10 + n}"

    def socket(self, n: int) -> Path:
        return self.dir / "nodes" / f"node{n}" / "sock" / "docker.sock"

    def engine(self, n: int) -> str:
        return f"unix://{self.socket(n)}"

    def docker(self, n: int, *argv: str, check: bool = True, input: bytes | None = None,
               timeout: float = 300, env: dict[str, str] | None = None) -> str:
        """The docker CLI against node ``n``'s engine."""
        return run("docker", "-H", self.engine(n), *argv, check=check, input=input,
                   timeout=timeout, env=env)

    # -- up and down --------------------------------------------------------------------

    def up(self, images: tuple[str, ...] = TEST_IMAGES) -> None:
        """Start the nodes, load ``images`` into each, form the swarm (idempotent)."""
        if not image_exists(NODE_IMAGE):
            raise LabError(f"no {NODE_IMAGE}: run python3 tests/lab.py build")
        started = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        init = self.dir / "bin" / "lab-dockerd"
        init.parent.mkdir(exist_ok=True)
        init.write_text(ENTRYPOINT)
        init.chmod(0o755)
        if subprocess.run(["docker", "network", "inspect", NETWORK],
                          capture_output=True).returncode != 0:
            run("docker", "network", "create", "--driver", "bridge", "--internal",
                "--subnet", SUBNET, "--gateway", GATEWAY, "--label", LABEL,
                "-o", "com.docker.network.bridge.name=ufaaslab0", NETWORK)
        for n in range(1, self.nodes + 1):
            self._start_node(n)
        with concurrent.futures.ThreadPoolExecutor(self.nodes) as pool:
            list(pool.map(self.wait_engine, range(1, self.nodes + 1)))
        self.load(images)
        self._form_swarm()
        log(f"lab of {self.nodes} nodes up in {time.monotonic() - started:.1f} s")

    def _start_node(self, n: int) -> None:
        state = run("docker", "container", "inspect", "-f", "{{.State.Status}}", self.name(n),
                    check=False)
        if state == "running":
            return
        if state:  # stopped: the same data directory, so it rejoins as itself
            run("docker", "start", self.name(n))
            return
        node_dir = self.dir / "nodes" / f"node{n}"
        (node_dir / "lib").mkdir(parents=True, exist_ok=True)
        (node_dir / "sock").mkdir(parents=True, exist_ok=True)
        self.socket(n).unlink(missing_ok=True)
        run("docker", "run", "-d", "--name", self.name(n), "--hostname", self.name(n),
            "--label", LABEL, "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
            "--security-opt", "seccomp=unconfined", "--security-opt", "systempaths=unconfined",
            "--network", NETWORK, "--ip", self.ip(n), "--tmpfs", "/run",
            "-v", f"{node_dir / 'lib'}:/var/lib/docker",
            "-v", f"{node_dir / 'sock'}:/lab/sock",
            "-v", f"{self.dir / 'resolv.conf'}:/etc/resolv.conf:ro",
            "-v", f"{self.dir / 'bin'}:/lab/bin:ro",
            "-e", "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1",
            "--entrypoint", "/usr/bin/tini", NODE_IMAGE, "--", "/lab/bin/lab-dockerd",
            "--host", "unix:///lab/sock/docker.sock", "--host", "unix:///var/run/docker.sock",
            "--storage-driver", "overlay2", "--bip", f"10.214.{100 + n}.1/24",
            "--default-address-pool", f"base={POOL_LOCAL},size=24",
            "--label", f"ufaas.lab.node={n}")

    def wait_engine(self, n: int, timeout: float = ENGINE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while subprocess.run(["docker", "-H", self.engine(n), "info"], capture_output=True,
                             timeout=10).returncode != 0:
            if time.monotonic() > deadline:
                tail = run("docker", "logs", "--tail", "30", self.name(n), check=False)
                raise LabError(f"node {n}'s engine is not up after {timeout} s: {tail}")
            time.sleep(0.2)

    def load(self, images: tuple[str, ...]) -> None:
        """Put ``images`` (of the host) into every node that lacks them: one ``docker
        save``, cached by image IDs, then one ``docker load`` per node in parallel."""
        wanted = {image: run("docker", "image", "inspect", "-f", "{{.Id}}", image)
                  for image in images}
        missing = sorted({image for image, iid in wanted.items() for n in range(1, self.nodes + 1)
                          if self.docker(n, "image", "inspect", "-f", "{{.Id}}", image,
                                         check=False) != iid})
        if not missing:
            return
        cache = self.dir / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(" ".join(sorted(wanted[i] for i in missing)).encode()).hexdigest()
        tar = cache / f"images-{key[:16]}.tar"
        if not tar.exists():
            for old in cache.glob("images-*.tar"):
                old.unlink()
            run("docker", "save", "-o", f"{tar}.tmp", *missing, timeout=600)
            os.replace(f"{tar}.tmp", tar)
        with concurrent.futures.ThreadPoolExecutor(self.nodes) as pool:
            list(pool.map(lambda n: self.docker(n, "load", "-q", "-i", str(tar), timeout=600),
                          range(1, self.nodes + 1)))

    def swarm_state(self, n: int) -> str:
        return self.docker(n, "info", "-f", "{{.Swarm.LocalNodeState}}", check=False,
                           timeout=10) or "unknown"

    def _form_swarm(self) -> None:
        if self.swarm_state(1) != "active":
            self.docker(1, "swarm", "init", "--advertise-addr", self.ip(1),
                        "--listen-addr", f"{self.ip(1)}:2377", "--default-addr-pool",
                        POOL_SWARM, "--default-addr-pool-mask-length", "24",
                        "--dispatcher-heartbeat", HEARTBEAT)
        token = self.docker(1, "swarm", "join-token", "-q", "worker")
        for n in range(2, self.nodes + 1):
            if self.swarm_state(n) != "active":
                self.docker(n, "swarm", "join", "--token", token, "--advertise-addr", self.ip(n),
                            "--listen-addr", f"{self.ip(n)}:2377", f"{self.ip(1)}:2377")
        self.wait_ready(self.nodes)

    def wait_ready(self, count: int, timeout: float = SWARM_TIMEOUT) -> None:
        """Until ``count`` nodes of the swarm are Ready."""
        deadline = time.monotonic() + timeout
        while self.docker(1, "node", "ls", "--format", "{{.Status}}",
                          check=False).split().count("Ready") < count:
            if time.monotonic() > deadline:
                raise LabError("swarm not ready: " + self.docker(1, "node", "ls", check=False))
            time.sleep(0.5)

    def down(self) -> None:
        """Remove every container and network the lab made, and its nodes' data."""
        ids = run("docker", "ps", "-aq", "--filter", f"label={LABEL}",
                  "--filter", f"name={PREFIX}-").split()
        if ids:
            run("docker", "rm", "-f", "-v", *ids)
        if run("docker", "network", "inspect", "-f", '{{index .Labels "ufaas.lab"}}', NETWORK,
               check=False) == "1":
            run("docker", "network", "rm", NETWORK)
        shutil.rmtree(self.dir / "nodes", ignore_errors=True)

    def status(self) -> str:
        lines = [run("docker", "ps", "-a", "--filter", f"label={LABEL}", "--format",
                     "{{.Names}}\t{{.Status}}")]
        if self.swarm_state(1) == "active":
            lines.append(self.docker(1, "node", "ls", check=False))
            lines.append(self.docker(1, "service", "ls", check=False))
        return "\n".join(lines)

    # -- faults and repairs -------------------------------------------------------------

    def kill(self, n: int) -> None:
        """A power cut: SIGKILL of the node's container, everything in it at once."""
        run("docker", "kill", self.name(n))

    def start(self, n: int) -> None:
        """Boot a node that was killed or stopped; it rejoins the swarm as itself."""
        self._start_node(n)
        self.wait_engine(n)

    def kill_engine(self, n: int) -> None:
        """SIGKILL the node's own dockerd (``pkill`` inside the node sees only its
        processes, so no other engine is touched). The node's init starts it again, which
        kills what ran on it (no live-restore) and restarts the ufaas node."""
        run("docker", "exec", self.name(n), "pkill", "-KILL", "-x", "dockerd")

    def pause(self, n: int) -> None:
        """A hung node: every process of it frozen, its sockets open."""
        run("docker", "pause", self.name(n))

    def unpause(self, n: int) -> None:
        run("docker", "unpause", self.name(n))

    def disconnect(self, n: int) -> None:
        """A partition: the node loses its only network; its processes run on."""
        run("docker", "network", "disconnect", "-f", NETWORK, self.name(n))

    def connect(self, n: int) -> None:
        run("docker", "network", "connect", "--ip", self.ip(n), NETWORK, self.name(n))

    def heal(self) -> None:
        """Undo every fault: each node running, unfrozen, on its network."""
        for n in range(1, self.nodes + 1):
            state = run("docker", "container", "inspect", "-f",
                        "{{.State.Status}} {{len .NetworkSettings.Networks}}", self.name(n),
                        check=False)
            if state.startswith("paused"):
                self.unpause(n)
            elif not state.startswith("running"):
                self.start(n)
            if state.endswith(" 0"):
                self.connect(n)
        for n in range(1, self.nodes + 1):
            self.wait_engine(n)

    # -- ufaas node on every node -------------------------------------------------------

    def serve_nodes(self, image: str, env: dict[str, str]) -> list[str]:
        """Run ``ufaas node`` (of ``image``) on every node's engine, as a container on the
        node's own network with its engine's socket, restarted as the engine restarts;
        its URLs. ``env``: its ``UFAAS_*`` settings."""
        for n in range(1, self.nodes + 1):
            self.serve_node(n, image, env)
        for n in range(1, self.nodes + 1):
            self.wait_node(n)
        return [self.node_url(n) for n in range(1, self.nodes + 1)]

    def node_url(self, n: int) -> str:
        return f"ws://{self.ip(n)}:{NODE_PORT}"

    def stop_nodes(self) -> None:
        """Stop every node's ``ufaas node`` (one per engine: another is to run there);
        :meth:`serve_nodes` starts them again."""
        for n in range(1, self.nodes + 1):
            self.docker(n, "stop", "-t", "10", NODE_CONTAINER, check=False)

    def serve_node(self, n: int, image: str, env: dict[str, str]) -> None:
        name = NODE_CONTAINER
        running = self.docker(n, "container", "inspect", "-f",
                              "{{.Config.Image}} {{.State.Running}}", name, check=False)
        if running == f"{image} true":
            return
        self.docker(n, "rm", "-f", name, check=False)
        settings = [item for key, value in env.items() for item in ("-e", f"{key}={value}")]
        self.docker(n, "run", "-d", "--name", name, "--restart", "always", "--network", "host",
                    "-v", "/var/run/docker.sock:/var/run/docker.sock", *settings, image,
                    "node", "--port", str(NODE_PORT))

    def wait_node(self, n: int, timeout: float = ENGINE_TIMEOUT) -> None:
        """Until node ``n``'s ufaas node takes connections."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.ip(n), NODE_PORT), timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    tail = self.docker(n, "logs", "--tail", "30", NODE_CONTAINER,
                                       check=False)
                    raise LabError(f"ufaas node on node {n} not up after {timeout} s: "
                                   f"{tail}") from None
                time.sleep(0.2)

    def containers(self, n: int, label: str) -> list[dict]:
        """The containers on node ``n`` carrying ``label`` (``k`` or ``k=v``).

        Left out: those the engine lists but does not have. The nodes' Docker 20.10,
        restarted after a kill, can keep one in its list (state "dead") when its restore
        and the container's own auto-removal cross; inspect and removal find nothing, and
        only the engine's next restart drops it."""
        out = self.docker(n, "ps", "-a", "--no-trunc", "--filter", f"label={label}",
                          "--format", "{{json .}}")
        listed = [json.loads(line) for line in out.splitlines() if line]
        if not listed:
            return []
        done = subprocess.run(["docker", "-H", self.engine(n), "inspect", "--type",
                               "container", "--format", "{{.Id}}", *(c["ID"] for c in listed)],
                              capture_output=True, timeout=60)
        errors = [line for line in done.stderr.decode(errors="replace").splitlines()
                  if line and "No such container" not in line]
        if errors:
            raise LabError(f"docker inspect on node {n}: {errors[:3]}")
        held = set(done.stdout.decode().split())
        return [c for c in listed if c["ID"] in held]


def main(argv: list[str]) -> int:
    lab = Lab(int(os.environ.get("UFAAS_LAB_NODES", "3")))
    command = argv[0] if argv else ""
    if command == "build":
        build_node_image(force="--force" in argv)
        print(app_image())
    elif command == "up":
        lab.up((*TEST_IMAGES, app_image()))
    elif command == "status":
        print(lab.status())
    elif command == "down":
        lab.down()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
