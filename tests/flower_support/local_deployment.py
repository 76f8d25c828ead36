"""A real Flower deployment on one host: a SuperLink and N SuperNodes as separate processes.

Used by the deployment test and benchmark (run from the repository; not part of the package, since
its start-up speed-ups patch Flower's internals), and handy to try a Flower App end to end before
shipping it to real sites. Every process binds 127.0.0.1 on a free port, runs in a process group
of its own (a node = its SuperNode + its warm executor + its tasks), and :meth:`LocalDeployment.stop`
(also called on leaving the ``with`` block, whatever happened) kills every group it started.

With ``warm=True`` (the default) the SuperLink and SuperNodes run with ``--isolation process``
and one ``warm_executor.py`` process (this folder) imports torch once and
forks an executor for each of them (into that one's process group), which forks its tasks in
turn; ``poll_interval`` caps the SuperNodes' idle
sleep (``fast_supernode.py``, this folder). ``warm=False, poll_interval=None``
is stock Flower: a fresh ``flwr-clientapp`` per message and a 3 s poll.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

PYTHON = sys.executable
BIN = Path(sys.executable).parent
READY_MARK = "warm executor ready"  # what a warm executor logs once it polls for tasks
SUPERNODE = Path(__file__).with_name("fast_supernode.py")  # run as a file: Flower only, no torch (~1 s start)
WARM_EXECUTOR = Path(__file__).with_name("warm_executor.py")  # run as a file: it imports its sibling


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on 127.0.0.1:{port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g}s")


def toml_value(v: Any) -> str:
    """A run-config value as ``flwr run --run-config`` parses it (TOML)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


@dataclass
class LocalDeployment:
    """SuperLink + one SuperNode per ``node_configs`` entry, on 127.0.0.1; logs under ``workdir``."""

    node_configs: Sequence[Mapping[str, Any]]
    workdir: Path
    warm: bool = True
    poll_interval: float | None = 0.1
    database: str = ":flwr-in-memory:"
    executor_poll_s: float = 0.05
    env: Mapping[str, str] = field(default_factory=dict)
    start_timeout: float = 120.0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.link_port = free_port()
        self.node_ports = [free_port() for _ in self.node_configs]
        self.groups: dict[str, list[subprocess.Popen]] = {}
        self._logs: list = []
        self._executors: dict[str, tuple[int, subprocess.Popen, list[int]]] = {}  # log name -> (offset, process, ports)
        home = self.workdir / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.link_port}"\n'
            "insecure = true\n")
        self.process_env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                            "PYTHONUNBUFFERED": "1", **dict(self.env)}

    # -- processes ---------------------------------------------------------------------------------------
    def _spawn(self, group: str, argv: Sequence[str], log_name: str) -> subprocess.Popen:
        log = open(self.workdir / f"{log_name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        members = self.groups.setdefault(group, [])
        kw = {"process_group": members[0].pid if members else 0}  # one group per node: killpg ends it
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=self.process_env,
                                cwd=self.workdir, **kw)
        members.append(proc)
        return proc

    def _warm(self, group: str, ports: Sequence[int], name: str, pgids: Sequence[int] | None = None) -> None:
        """One warm executor process for ``ports`` (one import; a forked executor per port, in ``pgids``' groups)."""
        path = self.workdir / f"{name}.log"
        offset = path.stat().st_size if path.exists() else 0  # a restarted executor appends to its old log
        argv = [PYTHON, str(WARM_EXECUTOR), "--insecure",
                "--poll-interval", str(self.executor_poll_s)]
        for i, port in enumerate(ports):
            argv += ["--runtime-api-address", f"127.0.0.1:{port}"]
            argv += ["--process-group", str(pgids[i])] if pgids is not None else []
        self._executors[name] = (offset, self._spawn(group, argv, name), list(ports))

    def start_superlink(self, executor: bool = True) -> None:
        """The SuperLink (and, with ``executor``, a warm executor of its own: a restart needs one)."""
        argv = [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1", "--port", str(self.link_port), "--database", self.database]
        if self.warm:
            argv += ["--isolation", "process"]
        proc = self._spawn("superlink", argv, "superlink")
        wait_for_port(self.link_port, self.start_timeout, proc, "flower-superlink")
        if self.warm and executor:
            self._warm("superlink", [self.link_port], "superlink-executor")

    def start_node(self, k: int, wait: bool = True, executor: bool = True) -> None:
        cfg = " ".join(f"{key}={toml_value(v)}" for key, v in self.node_configs[k].items())
        argv = [PYTHON, str(SUPERNODE)]
        argv += ["--poll-interval", str(self.poll_interval)] if self.poll_interval is not None else []
        argv += ["--insecure", "--superlink", f"127.0.0.1:{self.link_port}", "--port", str(self.node_ports[k]),
                 "--node-config", cfg]
        if self.warm:
            argv += ["--isolation", "process"]
        if self.poll_interval is None:  # stock Flower
            argv = [str(BIN / "flower-supernode"), *argv[argv.index("--insecure"):]]
        proc = self._spawn(f"node{k}", argv, f"node{k}")
        if self.warm and executor:
            self._warm(f"node{k}", [self.node_ports[k]], f"node{k}-executor")
        if wait:
            wait_for_port(self.node_ports[k], self.start_timeout, proc, f"flower-supernode {k}")

    def start(self) -> "LocalDeployment":
        """SuperLink, then every SuperNode, then one warm executor process for all of them (torch imported once,
        an executor forked per SuperLink/SuperNode into that one's process group); returns once all are ready."""
        self.start_superlink(executor=False)
        for k in range(len(self.node_configs)):  # all at once: their start-up overlaps
            self.start_node(k, wait=False, executor=False)
        if self.warm:
            names = ["superlink", *(f"node{k}" for k in range(len(self.node_configs)))]
            self._warm("executors", [self.link_port, *self.node_ports], "executors",
                       [self.groups[g][0].pid for g in names])
        for k in range(len(self.node_configs)):
            wait_for_port(self.node_ports[k], self.start_timeout, self.groups[f"node{k}"][0], f"flower-supernode {k}")
        self.wait_for_executors()
        return self

    def wait_for_executors(self, timeout: float | None = None) -> None:
        """Wait until every warm executor has imported torch and polls for tasks (its log says ``ready``).

        Without this the first ``flwr run`` would wait for the imports instead: the time is the same,
        but it would be booked to the run rather than to the start-up.
        """
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        waiting = dict(self._executors)
        while waiting:
            for name, (offset, proc, ports) in list(waiting.items()):
                text = self.log(name, offset)
                if all(f"{READY_MARK} on 127.0.0.1:{port}" in text for port in ports):
                    del waiting[name]
                elif proc.poll() is not None:
                    raise RuntimeError(f"warm executor {name} exited with code {proc.returncode}:\n{text[-2000:]}")
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"warm executors {sorted(waiting)} were not ready within {self.start_timeout:g}s")
            time.sleep(0.1)

    def kill(self, group: str, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Kill a whole process group (``"superlink"``, ``"node<k>"``) and wait for its members."""
        self._end([group], sig, timeout)

    def _end(self, groups: Sequence[str], sig: int, timeout: float) -> None:
        """Signal every group at once, wait up to ``timeout`` seconds in all, then SIGKILL what is left."""
        members = {g: self.groups.pop(g) for g in groups if self.groups.get(g)}
        for procs in members.values():
            _killpg(procs[0].pid, sig)
        deadline = time.monotonic() + timeout
        for procs in members.values():
            for p in procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _killpg(procs[0].pid, signal.SIGKILL)
                    p.wait(timeout=timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop everything this deployment started: SIGTERM to every process group, SIGKILL after ``timeout`` s."""
        self._end(list(self.groups), signal.SIGTERM, timeout)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "LocalDeployment":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- runs -------------------------------------------------------------------------------------------
    def flwr_run(self, app_dir: str | os.PathLike, run_config: Mapping[str, Any] | None = None,
                 timeout: float = 600.0, stream: bool = True) -> subprocess.CompletedProcess:
        """``flwr run <app_dir> local --run-config ...`` against this SuperLink; waits for the run to end."""
        argv = [str(BIN / "flwr"), "run", str(Path(app_dir).resolve()), "local"]
        if run_config:
            argv += ["--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
        if stream:
            argv.append("--stream")
        return subprocess.run(argv, env=self.process_env, cwd=self.workdir, capture_output=True, text=True,
                              timeout=timeout)

    def log(self, name: str, offset: int = 0) -> str:
        """The log of ``name`` (``"superlink"``, ``"node<k>"``, ``"<either>-executor"``) from byte ``offset``."""
        path = self.workdir / f"{name}.log"
        return path.read_bytes()[offset:].decode(errors="replace") if path.exists() else ""


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


__all__ = ["LocalDeployment", "free_port", "wait_for_port"]
