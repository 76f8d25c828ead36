"""A warm SuperExec for the tests and benchmarks: runs each Flower task in a fork of a process that
has already imported torch.

Not part of the package: it speaks Flower's internal Runtime API (``flwr.proto``, ``flwr.supercore``),
which can change in any flwr release; pyproject pins flwr to the versions it was tested with.

Flower 1.41 runs every message a SuperNode receives as a *task* in a fresh ``flwr-clientapp``
process (and every run as a fresh ``flwr-serverapp``). Each of those imports torch and Lightning
again: 5-20 s per message on a small machine, which made a three-node unlearning run take
minutes. Flower has no long-lived ClientApp process in this version (``--isolation process``
only means "someone else starts the SuperExec"), so this module is that someone else:

    flower-supernode --isolation process --port 9094 ...       # or flower-superlink --isolation process
    python tests/flower_support/warm_executor.py --runtime-api-address 127.0.0.1:9094 --insecure

It imports the heavy modules once, polls the Runtime API for tasks (every ``--poll-interval``
seconds instead of SuperExec's 1 s), and runs each task in ``os.fork()`` of itself by calling
Flower's own ``flwr-clientapp``/``flwr-serverapp`` entry point with the same arguments the stock
SuperExec would pass. Each task still gets its own process (a crash or a leak dies with it, and
state between messages still lives in the node's ``context.state``); it only skips interpreter
and import start-up. POSIX only (``fork``); the parent never runs torch code, so no thread pool
exists at fork time.

Several ``--runtime-api-address`` (every SuperNode and the SuperLink on one host) share one
import: the process imports once and forks one executor per address (:func:`serve_many`);
``--process-group`` puts each of them into its node's process group, so that killing a node's
group also ends its executor and tasks.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
from typing import Callable, Sequence

from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TASK_TYPE_TO_COMMAND, TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates

from fast_supernode import patch_pull_backoff  # this folder: sys.path[0] when run as a file

log = logging.getLogger(__name__)

#: The task types this executor runs, and the Flower entry point (the console script's function) for each.
ENTRY_POINTS: dict[TaskType, str] = {
    TaskType.CLIENT_APP: "flwr.supernode.cli:flwr_clientapp",
    TaskType.SERVER_APP: "flwr.superlink.cli:flwr_serverapp",
}
DEFAULT_PRELOAD = ("torch", "lightning.pytorch", "lightning_unlearn.federated.flower.app")


def _entry(ref: str) -> Callable[[], object]:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def task_argv(task_type: TaskType, address: str, token: str, insecure: bool, root_certificates: str | None,
              parent_pid: int) -> list[str]:
    """The command line the stock SuperExec would start for this task (``SubprocessExecutor.launch``)."""
    argv = [TASK_TYPE_TO_COMMAND[task_type], TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[task_type], address, "--token", token]
    if insecure:
        argv.append("--insecure")
    elif root_certificates is not None:
        argv += ["--root-certificates", root_certificates]
    return argv + ["--parent-pid", str(parent_pid)]


class ForkExecutor:
    """Runs each task in a fork of this (pre-imported) process; reaps finished children."""

    def __init__(self) -> None:
        self.children: dict[int, float] = {}  # pid -> launch time (monotonic)
        self.entries = {t: _entry(ref) for t, ref in ENTRY_POINTS.items()}

    def launch(self, task_type: TaskType, argv: Sequence[str]) -> int:
        entry = self.entries[task_type]
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the task process: Flower's own entry point, exactly as if started by exec
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                sys.argv = list(argv)
                entry()
                code = 0
            except SystemExit as err:
                code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
            except BaseException:  # noqa: BLE001 - report and leave; never return into the parent's loop
                logging.getLogger(__name__).exception("task %s failed", argv[0])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = time.monotonic()
        return pid

    def reap(self) -> None:
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                log.info("task process %d took %.2fs", pid, time.monotonic() - self.children.pop(pid))

    def close(self, grace_s: float = 3.0) -> None:
        """Stop running tasks: SIGTERM (Flower pushes the task's status), SIGKILL after ``grace_s``."""
        for pid in self.children:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in self.children:
            _signal(pid, signal.SIGKILL)
        self.reap()
        self.children.clear()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _parent_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def serve(address: str, insecure: bool, root_certificates: str | None = None, poll_interval: float = 0.05,
          preload: Sequence[str] = DEFAULT_PRELOAD, parent_pid: int | None = None,
          max_tasks: int | None = None) -> None:
    """Acquire tasks from the Runtime API at ``address`` and run each in a fork, until SIGTERM/SIGINT."""
    if not 0.001 <= poll_interval <= 60:
        raise ValueError(f"poll_interval must be in [0.001, 60] seconds, got {poll_interval!r}")
    for module in preload:
        importlib.import_module(module)
    patch_pull_backoff()
    executor = ForkExecutor()
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )

    def _stop(signum, frame) -> None:  # noqa: ARG001
        # raise, not set a flag: a poll to a Runtime API that is already gone retries (with back-off) forever
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stopped(signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("warm executor ready on %s (pid %d, preloaded %s)", address, os.getpid(), list(preload))
    launched = 0
    try:
        while _parent_alive(parent_pid) and (max_tasks is None or launched < max_tasks):
            executor.reap()
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[str(t) for t in ENTRY_POINTS]))
            if res.HasField("task") and res.token:
                task_type = TaskType(res.task.type)
                argv = task_argv(task_type, address, res.token, insecure, root_certificates, os.getpid())
                executor.launch(task_type, argv)
                launched += 1
                continue  # another task may be waiting already
            time.sleep(poll_interval)
    except _Stopped as stopped:
        log.info("stopping on signal %d", stopped.args[0])
    finally:
        executor.close()
        client.close()


def serve_many(addresses: Sequence[str], insecure: bool, root_certificates: str | None = None,
               poll_interval: float = 0.05, preload: Sequence[str] = DEFAULT_PRELOAD,
               process_groups: Sequence[int | None] | None = None) -> None:
    """Import ``preload`` once, then serve each address in a fork of this process (one executor each).

    ``process_groups[i]`` (optional): the process group the executor of ``addresses[i]`` joins (its
    node's). This process forwards SIGTERM/SIGINT to the executors and returns once all have ended.
    """
    groups = list(process_groups) if process_groups is not None else [None] * len(addresses)
    if len(groups) != len(addresses):
        raise ValueError(f"got {len(groups)} process groups for {len(addresses)} addresses; give one per address")
    if not 0.001 <= poll_interval <= 60:
        raise ValueError(f"poll_interval must be in [0.001, 60] seconds, got {poll_interval!r}")
    for module in preload:
        importlib.import_module(module)
    children: dict[int, str] = {}
    for address, group in zip(addresses, groups):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # one executor: the serving loop of a single address, imports already done
            code = 0
            try:
                if group is not None:
                    os.setpgid(0, group)
                serve(address, insecure, root_certificates, poll_interval, preload=(), parent_pid=os.getppid())
            except BaseException:  # noqa: BLE001 - report and leave; never return into the parent's loop
                log.exception("executor for %s failed", address)
                code = 1
            finally:
                _exit_now(code)
        children[pid] = address

    def _forward(signum, frame) -> None:  # noqa: ARG001
        for pid in children:
            _signal(pid, signum)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    while children:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        log.info("executor for %s ended", children.pop(pid, "?"))


class _Stopped(Exception):
    """SIGTERM/SIGINT reached the executor's loop."""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runtime-api-address", required=True, action="append",
                   help="the SuperNode's (or SuperLink's) Runtime API host:port; repeat it to serve several "
                        "from one import (one forked executor each)")
    p.add_argument("--process-group", type=int, action="append", default=None,
                   help="with several addresses: the process group each executor joins (one per address)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (same host only)")
    p.add_argument("--root-certificates", default=None, help="CA certificate of a TLS Runtime API")
    p.add_argument("--poll-interval", type=float, default=0.05, help="seconds between task polls (default 0.05)")
    p.add_argument("--preload", default=",".join(DEFAULT_PRELOAD),
                   help="comma-separated modules to import once, before the first task")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process exits")
    a = p.parse_args(argv)
    if not a.insecure and a.root_certificates is None:
        p.error("give --insecure (same host) or --root-certificates")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's imports set up its plugins: 7 lines
    preload = [m for m in a.preload.split(",") if m]
    try:
        if len(a.runtime_api_address) == 1 and not a.process_group:
            serve(a.runtime_api_address[0], a.insecure, a.root_certificates, a.poll_interval, preload, a.parent_pid)
        else:
            serve_many(a.runtime_api_address, a.insecure, a.root_certificates, a.poll_interval, preload,
                       a.process_group)
    except ValueError as err:
        print(f"warm_executor: error: {err}", file=sys.stderr)
        return 2
    return 0


def _exit_now(code: int) -> None:
    """Leave without interpreter finalisation: after SIGTERM in a deployment it hung in native code for
    seconds (the executor has nothing left to clean up once :func:`serve` returned; logs are flushed)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
