"""A real Flower deployment on 127.0.0.1: one SuperLink, three SuperNodes (separate processes), ``flwr run``.

One deployment serves the module (starting it is the expensive part), and three ``flwr run``\ s
check the issue's three claims: the run matches the in-process simulation (same trained model,
mask hash, payload bytes per round and accuracies); the server is killed mid-unlearning and
resumes from its checkpoint with the same mask; in that resumed run a node disconnects during a
masked round and the run goes on with the two others (``min-clients=2``), frozen elements exact.
Every process the fixture started is killed on teardown (one process group per node), whatever
happened. The unlearning settings the test relies on are pinned (``reset``), not taken from defaults; a class
request's default head calibration runs in both and must agree too (its feature round and rounds' bytes).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import tomllib
import torch
from flwr.app import Context, RecordDict

from lightning_unlearn import ForgetRequest
from lightning_unlearn._io import load_torch_file
from lightning_unlearn.federated import FederatedSimulation, federated_unlearn, run_fedavg
from lightning_unlearn.federated.federation import Federation
from lightning_unlearn.mask.arrays import get_arrays
from lightning_unlearn.federated import FederatedPartitions
from lightning_unlearn.federated.partitions import save_partition
from lightning_unlearn.federated.checkpoint import STATE_FILE, ServerCheckpoint
from lightning_unlearn.federated.grid import LocalGrid
from lightning_unlearn.mask import frozen_elements_equal
from lightning_unlearn.models import SmallCNN
from lightning_unlearn.mask import ParameterMask

sys.path.insert(0, str(Path(__file__).resolve().parent / "flower_support"))  # start-up speed-ups: not the package's
from local_deployment import LocalDeployment, toml_value  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="the warm executor forks (POSIX)"),
]

APP = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
PARTS = FederatedPartitions("digits", num_clients=3, partition="iid", seed=0, batch_size=32)
RUN = {"train-rounds": 1, "local-steps": 20, "unlearn-rounds": 2, "unlearn-steps": 3, "forget-class": 3, "ratio": 0.1,
       "seed": 0, "lr": 0.003, "reset": "none"}
TIMEOUT = 400  # seconds for one `flwr run` (a loaded 2-core CI runner); a healthy run takes well under a minute
ROUND_TIMEOUT = 20.0  # how long the server waits for a vanished node (a healthy masked round takes a few seconds)

# The example app plus a client mod that makes a node vanish (SIGKILL to its whole process group:
# SuperNode, warm executor and this task) when it receives the message type named in the run config.
FAULT_APP = '''
import os, signal
from lightning_unlearn.federated.flower import app
from lightning_unlearn.federated.client import make_client_app

serverapp = app.serverapp  # an assignment: `flwr run` checks the components by reading this file's top level

def disconnect(message, context, call_next):
    victim = str(context.run_config.get("disconnect-data", ""))
    if victim and message.metadata.message_type == "train.unlearn" and str(context.node_config["data-path"]) == victim:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    return call_next(message, context)

clientapp = make_client_app(app.model_from_config, app.partition_from_config, mods=[disconnect])
'''


def _fault_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = (APP / "pyproject.toml").read_text().replace('name = "unlearn-flower-app"', 'name = "unlearn-fault-app"')
    text = text.replace('"unlearn_app:', '"fault_app:') + 'disconnect-data = ""\n'
    (folder / "pyproject.toml").write_text(text)
    (folder / "fault_app.py").write_text(textwrap.dedent(FAULT_APP))
    return folder


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower-deployment")
    fdm = PARTS.datamodule()
    paths = [save_partition(fdm, k, root / f"site{k}" / f"client{k}.pt") for k in range(3)]  # one file per node
    dep = LocalDeployment([{"data-path": str(p)} for p in paths], root / "deployment", database=str(root / "link.db"),
                          start_timeout=300.0)  # four torch imports at once on a loaded 2-core runner
    t0 = time.perf_counter()
    try:
        dep.start()
        dep.paths, dep.root, dep.start_s = paths, root, time.perf_counter() - t0
        yield dep
    finally:
        dep.stop()  # every process group it started, also when a test failed


def _run(dep: LocalDeployment, out: Path, app: Path = APP, **extra) -> tuple[dict, Path]:
    t0 = time.perf_counter()
    res = dep.flwr_run(app, {**RUN, "output-dir": str(out), **extra}, timeout=TIMEOUT)
    wall = time.perf_counter() - t0
    runs = sorted(out.glob("run-*/report.json"))
    assert res.returncode == 0 and runs, (f"flwr run failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}"
                                          f"\nsuperlink log:\n{dep.log('superlink')[-3000:]}")
    report = json.loads(runs[-1].read_text())
    report["wall_s"] = wall
    return report, runs[-1].parent


@pytest.fixture(scope="module")
def in_process():
    """The same federation, model, schedule and seeds, in one process (the reference)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each node's task (OMP_NUM_THREADS=1): same float reduction order
    try:
        torch.manual_seed(RUN["seed"])
        model = SmallCNN(lr=RUN["lr"])
        sim = FederatedSimulation(PARTS.datamodule(), model, rounds=RUN["train-rounds"], progress=False,
                                  trainer_kwargs={"max_steps": RUN["local-steps"]})
        fed = Federation(sim.clients.grid, PARTS.num_clients)
        run_fedavg(sim.model, fed, RUN["train-rounds"], progress=False)
        request = ForgetRequest(classes=[RUN["forget-class"]])
        sim.request(request)
        result = federated_unlearn(sim.model, fed, request, rounds=RUN["unlearn-rounds"],
                                   max_steps=RUN["unlearn-steps"], ratio=RUN["ratio"], seed=RUN["seed"],
                                   reset=RUN["reset"], trained_epochs=RUN["train-rounds"])  # the calibration's length
    finally:
        torch.set_num_threads(before)
    return sim, result, fed.traffic


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    """The example app's own ServerApp ``main`` and ClientApp, run in this process on a :class:`LocalGrid`: the
    code a deployment runs, with the nodes answered in process."""
    from lightning_unlearn.federated.flower import app

    config = {**tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"], **RUN,
              "output-dir": str(tmp_path_factory.mktemp("local"))}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        app.main(LocalGrid(app.clientapp, config["num-clients"], run_config=config),
                 Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=config))
    finally:
        torch.set_num_threads(before)
    out = Path(config["output-dir"]) / "run-1"
    return json.loads((out / "report.json").read_text()), out


def _model(arrays) -> SmallCNN:
    model = SmallCNN(lr=RUN["lr"])
    model.load_state_dict({**model.state_dict(), **arrays})
    return model


def test_deployment_matches_the_in_process_simulation(deployment, in_process, local_grid, tmp_path):
    sim, ours, traffic = in_process
    report, out = _run(deployment, tmp_path / "out")
    trained, final = load_torch_file(out / "trained.pt"), load_torch_file(out / "model.pt")
    local, local_out = local_grid  # one request, one server and client code: deployed vs in process, bit for bit
    assert report["mask"]["sha256"] == local["mask"]["sha256"]
    for name in ("trained.pt", "model.pt"):
        theirs = load_torch_file(local_out / name)
        assert all(torch.equal(v, theirs[k]) for k, v in load_torch_file(out / name).items()), name
    assert {k: (b["down"], b["up"]) for k, b in report["bytes_moved"].items()} == {
        k: (b["down"], b["up"]) for k, b in local["bytes_moved"].items()}
    for k, v in get_arrays(sim.model).items():  # FedAvg over three processes = FedAvg in one
        assert torch.allclose(trained[k], v, atol=1e-5), k
    assert report["mask"]["sha256"] == ours.mask.sha256()
    for k, v in get_arrays(ours.model).items():
        assert torch.allclose(final[k], v, atol=1e-5), k
    moved = report["bytes_moved"]
    for prefix in ("fedavg/", "deploy", "score", "unlearn/", "head_features", "calibrate/"):  # the same payload bytes
        mine = [(b["down"], b["up"]) for label, b in moved.items() if label.startswith(prefix)]
        assert mine and mine == [(b.down, b.up) for k, b in traffic.payload.items() if k.startswith(prefix)], prefix
    mine, theirs = sim.evaluate(_model(final)), sim.evaluate(ours.model)
    assert mine["forget_acc"] == theirs["forget_acc"] and mine["remaining_acc"] == theirs["remaining_acc"]
    assert mine["forget_acc"] < sim.evaluate(_model(trained))["forget_acc"]
    assert frozen_elements_equal(_model(final), _model(trained).state_dict(), ours.mask)
    print(f"\ndeployment start-up {deployment.start_s:.1f}s, flwr run {report['wall_s']:.1f}s, "
          f"server phases {json.dumps({k: round(v, 2) for k, v in report['timings_s'].items()})}")


def test_server_restart_resumes_with_the_same_mask_then_a_node_drops_out(deployment, in_process, tmp_path):
    """Kill the SuperLink (and its ServerApp) after masked round 0; restart it; the resumed run takes the
    checkpoint's mask and continues with round 1, where node 2 vanishes (SIGKILL to its process group)
    on receiving its message: the round goes on with the two others, never a silent partial average."""
    _, ours, _ = in_process
    app = _fault_app(tmp_path / "fault-app")  # not "fault_app": the folder would shadow the module
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    cfg = {**RUN, "output-dir": str(out), "checkpoint-dir": str(ckpt), "min-clients": 2, "round-timeout": ROUND_TIMEOUT}
    first = subprocess.Popen(  # the run the crash interrupts
        [str(Path(sys.executable).parent / "flwr"), "run", str(app), "local", "--stream", "--run-config",
         " ".join(f"{k}={toml_value(v)}" for k, v in cfg.items())],
        env=deployment.process_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        state = None
        while time.monotonic() < deadline and not (state and state.rounds_done >= 1):
            time.sleep(0.1)
            if (ckpt / STATE_FILE).exists():
                state = ServerCheckpoint.open(ckpt, _key(ckpt))
        assert state is not None and state.rounds_done >= 1, (
            f"the first run never finished a masked round\nsuperlink log:\n{deployment.log('superlink')[-3000:]}")
        deployment.kill("superlink", signal.SIGKILL)  # the server dies mid-unlearning (SuperLink + ServerApp)
    finally:
        first.kill()
        first.wait(timeout=30)
    assert state.rounds_done == 1, "the crash must come before the last masked round"
    assert not list(out.glob("run-*/report.json")), "the interrupted run must not have finished"
    deployment.start_superlink()  # same port, same state database: the SuperNodes reconnect on their own

    victim = str(deployment.paths[2])
    report, run_dir = _run(deployment, out, app=app, **{k: cfg[k] for k in ("checkpoint-dir", "min-clients", "round-timeout")},
                           **{"disconnect-data": victim})
    resumed = report["extra"]["resumed"]
    assert resumed == {"fedavg_rounds": RUN["train-rounds"], "mask": True, "rounds_done": 1}
    assert report["mask"]["sha256"] == state.mask.sha256() == ours.mask.sha256()
    rows = report["extra"]["unlearning"]
    assert [r["round"] for r in rows] == [0, 1]
    assert report["extra"]["dropped"] == {"2": "unlearning round 1"}
    assert rows[0]["clients"] == 3 and rows[1]["clients"] == 2 and rows[1]["dropped"] == [2]
    final, trained = load_torch_file(run_dir / "model.pt"), load_torch_file(run_dir / "trained.pt")
    mask = ParameterMask.load(run_dir / "mask.pt")
    assert mask.sha256() == report["mask"]["sha256"]
    # exact on frozen elements although round 1 averaged only two clients; the selected ones moved
    assert frozen_elements_equal(_model(final), _model(trained).state_dict(), mask)
    assert any(not torch.equal(final[k], trained[k]) for k in mask.masks)
    assert report["metrics"]["unlearned"]["forget_acc"] < 0.5
    assert deployment.groups.get("node2") is None or deployment.groups["node2"][0].poll() is not None


def _key(folder: Path) -> str:
    """The key stored in the checkpoint (the test reads the run's own state, whatever its plan key)."""
    return load_torch_file(folder / STATE_FILE)["key"]
