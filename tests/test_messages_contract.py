"""The message contract, end to end: what a hostile client tried to smuggle past the server is refused.

Fake clients (no training) answer the server's calls with crafted messages; ``run_fedavg``,
``federated_unlearn``, the aggregation functions and Flower's record decoding must each reject
the smuggle with one line naming the client and the key, and still accept honest replies.
"""
from __future__ import annotations

import base64
import dataclasses
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lightning_unlearn import ForgetRequest, ParameterMask
from lightning_unlearn.scoring import SCORING_METHODS, discover_layers
from lightning_unlearn.federated import federated_unlearn, run_fedavg
from lightning_unlearn.federated.messages import Reply, read_down, read_reply, up
from lightning_unlearn.federated.server import fedavg_aggregate, masked_aggregate
from lightning_unlearn.mask.arrays import get_arrays
from lightning_unlearn.mask.arrays import selected_values
from lightning_unlearn.federated.federation import Federation
from lightning_unlearn.federated.grid import LocalGrid
from lightning_unlearn.federated.messages import METRIC_KEYS, check_metrics
from lightning_unlearn.models import SmallCNN

TINY = dict(channels=(8, 16), hidden=32)
N_ARRAYS = 16  # SmallCNN(TINY)'s float state: 4 layers x (weight, bias) + 2 BatchNorms x 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SmallCNN(**TINY)


@pytest.fixture(scope="module")
def layers(model):
    return discover_layers(model, torch.zeros(2, 1, 8, 8))


@pytest.fixture(scope="module")
def images(digits):
    """Real training images and labels: what a hostile client would try to send."""
    x, y = digits[0].tensors
    return x[:10], y[:10]


class FakeClient:
    """Answers the server like the library's ClientApp without training; ``tamper`` rewrites one reply kind."""

    def __init__(self, client_id: int, model, layers, tamper: dict | None = None) -> None:
        self.client_id, self.model, self.layers, self.tamper = client_id, model, layers, tamper or {}
        self.mask: ParameterMask | None = None
        self.deployed = get_arrays(model)

    def _reply(self, kind: str, honest):
        return self.tamper[kind](honest) if kind in self.tamper else honest

    def fit(self, arrays, config, channels):
        arrays = {k: v + 0.01 * (self.client_id + 1) for k, v in arrays.items()}
        return self._reply("fit", Reply("parameters", arrays, 10 * (self.client_id + 1), {"local_compute_s": 0.1, "fit_s": 0.2}))

    def deploy(self, arrays, config, channels):
        self.deployed = {k: v.clone() for k, v in arrays.items()}

    def score(self, arrays, config, channels):
        gen = torch.Generator().manual_seed(self.client_id)
        scores = {n: torch.rand(i.out_channels, generator=gen) for n, i in self.layers.items()}
        meta = {n: (i.out_channels, i.batchnorm, i.is_head) for n, i in self.layers.items()}
        return self._reply("score", Reply("scores", scores, 5, method=config["method"], layers=meta))

    def masked_update(self, arrays, config, channels):
        if channels is not None:
            self.mask = ParameterMask.from_channels(self.model, channels, self.layers)
        values = {k: v + 0.5 for k, v in selected_values(self.deployed, self.mask).items()}
        return self._reply("masked_update", Reply("masked_update", values, 20, {"local_compute_s": 0.1}))


def one_line(err: pytest.ExceptionInfo, pattern: str) -> str:
    """The error is one short line (no echoed dump) matching ``pattern``."""
    text = str(err.value)
    assert "\n" not in text and len(text) < 400, text[:500]
    assert re.search(pattern, text), text
    return text


OPERATIONS = {"train": "fit", "query.deploy": "deploy", "query.score": "score", "train.unlearn": "masked_update"}


def _fed(clients) -> Federation:
    """The fake clients behind a ClientApp on a LocalGrid: their replies cross the same records as real ones."""
    app = ClientApp()

    def handle(message, context):
        client = clients[context.node_config["partition-id"]]
        reply = getattr(client, OPERATIONS[message.metadata.message_type])(*read_down(message.content))
        return Message(_content(reply), reply_to=message)

    for kind in OPERATIONS:
        category, _, action = kind.partition(".")
        getattr(app, category)(*([action] if action else []))(handle)

    @app.query("hello")
    def hello(message, context):
        cid = clients[context.node_config["partition-id"]].client_id
        return Message(RecordDict({"metrics": MetricRecord({"client-id": cid, "num-examples": 1})}), reply_to=message)

    return Federation(LocalGrid(app, len(clients)), len(clients))


def _fedavg(model, clients):
    return run_fedavg(model, _fed(clients), rounds=1, deploy=False, progress=False)


def _unlearn(model, clients):
    # the masked rounds' contract; the statistics round of reset="reinit" has its own (test_federated_reset.py), the
    # head calibration's feature round too (test_federated_calibration.py)
    return federated_unlearn(model, _fed(clients), ForgetRequest(classes=[3]), rounds=2, reset="none", calibrate="none")


def _content(reply):
    """A reply as a client's records (what :func:`up` builds), None: nothing to send."""
    if reply is None:
        return up(None)
    meta = dict(method=reply.method, tag=reply.tag, layers=reply.layers) if reply.kind == "scores" else {}
    return up(reply.kind, reply.tensors, reply.num_samples, reply.metrics, **meta)


def _swap(message, **changes):
    """A copy of a reply with fields replaced (replies are frozen)."""
    return dataclasses.replace(message, **changes)


# -- honest replies still work ---------------------------------------------------------------------------------
def test_honest_fake_clients_pass_fedavg_and_unlearning(model, layers):
    clients = [FakeClient(i, model, layers) for i in range(3)]
    work = SmallCNN(**TINY)
    work.load_state_dict(model.state_dict())
    before = get_arrays(work)
    run_fedavg(work, _fed(clients), rounds=1, progress=False)  # deploys the global model to the clients
    weights = np.array([10, 20, 30]) / 60
    for k, v in get_arrays(work).items():  # the count-weighted mean of the clients' offsets
        assert torch.allclose(v, before[k] + sum(w * 0.01 * (i + 1) for i, w in enumerate(weights)), atol=1e-6), k
    result = _unlearn(work, clients)
    assert 0 < result.mask.fraction < 1
    for name, m in result.mask.masks.items():  # selected values moved by the clients' +0.5, nothing else did
        after = get_arrays(result.model)[name]
        assert torch.equal(after[~m], get_arrays(work)[name][~m]), name
        assert torch.allclose(after[m], get_arrays(work)[name][m] + 0.5), name


# -- parameters replies -----------------------------------------------------------------------------------------
def test_float_images_in_an_extra_key_are_refused(model, layers, images):
    x, _ = images
    bad = {"fit": lambda m: _swap(m, tensors={**m.tensors, "x_train": x})}
    clients = [FakeClient(0, model, layers), FakeClient(1, model, layers, bad)]
    with pytest.raises(ValueError) as err:
        _fedavg(SmallCNN(**TINY), clients)
    one_line(err, rf"^client 1: a 'parameters' reply has unexpected key 'x_train' \(expected the {N_ARRAYS} model arrays\)$")


def test_float_images_in_a_parameters_place_are_refused(model, layers, images):
    x, _ = images  # (10, 1, 8, 8) instead of conv1.weight's (8, 1, 3, 3)
    bad = {"fit": lambda m: _swap(m, tensors={**m.tensors, "conv1.weight": x})}
    with pytest.raises(ValueError) as err:
        _fedavg(SmallCNN(**TINY), [FakeClient(0, model, layers, bad)])
    one_line(err, r"^client 0: a 'parameters' reply 'conv1.weight' has shape \(10, 1, 8, 8\), expected \(8, 1, 3, 3\)$")


def test_a_missing_key_a_wrong_dtype_and_nan_are_refused(model, layers):
    expected = get_arrays(model)
    honest = Reply("parameters", dict(expected), 3)
    missing = Reply("parameters", {k: v for k, v in expected.items() if k != "fc2.bias"}, 3)
    with pytest.raises(ValueError) as err:
        fedavg_aggregate([_swap(honest, client=4), _swap(missing, client=7)], expected)
    one_line(err, rf"^client 7: a 'parameters' reply is missing key 'fc2.bias' \(expected the {N_ARRAYS} model arrays\)$")
    double = Reply("parameters", {**expected, "fc2.bias": expected["fc2.bias"].double()}, 3)
    with pytest.raises(ValueError) as err:
        fedavg_aggregate([_swap(double, client=2)], expected)
    one_line(err, r"^client 2: a 'parameters' reply 'fc2.bias' has dtype torch.float64, expected torch.float32$")
    nan = Reply("parameters", {**expected, "fc2.bias": torch.full((10,), float("nan"))}, 3)
    with pytest.raises(ValueError) as err:
        fedavg_aggregate([nan], expected)
    one_line(err, r"^reply 0: a 'parameters' reply 'fc2.bias' holds non-finite values")


def test_labels_in_the_metrics_are_refused(model, layers, images):
    _, y = images
    labels = {f"label_{i}": float(v) for i, v in enumerate(y)}
    bad = {"fit": lambda m: _swap(m, metrics={**m.metrics, **labels})}
    clients = [FakeClient(0, model, layers), FakeClient(1, model, layers), FakeClient(2, model, layers, bad)]
    with pytest.raises(ValueError) as err:
        _fedavg(SmallCNN(**TINY), clients)
    one_line(err, r"^client 2: a 'parameters' reply has unexpected metric 'label_0' \(allowed: .*local_compute_s")
    oversized = {**{k: 0.0 for k in METRIC_KEYS}, **{f"k{i}": 0.0 for i in range(6)}}  # more than the keys allowed
    with pytest.raises(ValueError) as err:
        check_metrics(oversized, "client 5", "a 'parameters' reply")
    one_line(err, r"^client 5: a 'parameters' reply has unexpected metric 'k0' \(allowed: ")
    with pytest.raises(ValueError) as err:
        check_metrics({"fit_s": float("inf")}, "client 5", "a 'parameters' reply")
    one_line(err, r"^client 5: a 'parameters' reply metric 'fit_s' must be a finite scalar, got inf$")


# -- masked updates ---------------------------------------------------------------------------------------------
def test_masked_updates_carry_exactly_the_selected_elements(model, layers, images):
    x, _ = images
    extra = {"masked_update": lambda m: _swap(m, tensors={**m.tensors, "x_train": x.flatten()})}
    clients = [FakeClient(0, model, layers), FakeClient(1, model, layers, extra)]
    with pytest.raises(ValueError) as err:
        _unlearn(model, clients)
    one_line(err, r"^client 1: a 'masked_update' reply has unexpected key 'x_train' \(expected the \d+ masked parameters\)$")

    def longer(m):  # the right key, with images appended to the selected values
        name = next(iter(m.tensors))
        return _swap(m, tensors={**m.tensors, name: torch.cat([m.tensors[name], x.flatten()])})

    with pytest.raises(ValueError) as err:
        _unlearn(model, [FakeClient(0, model, layers, {"masked_update": longer}), FakeClient(1, model, layers)])
    one_line(err, r"^client 0: a 'masked_update' reply '[\w.]+' has \d+ values for \d+ selected elements$")

    def missing(m):
        return _swap(m, tensors=dict(list(m.tensors.items())[1:]))

    with pytest.raises(ValueError) as err:
        _unlearn(model, [FakeClient(0, model, layers), FakeClient(1, model, layers, {"masked_update": missing})])
    one_line(err, r"^client 1: a 'masked_update' reply is missing key '[\w.]+' \(expected the \d+ masked parameters\)$")


def test_masked_aggregate_checks_dtype_against_the_reference():
    reference = {"w": torch.zeros(4, 2)}
    mask = ParameterMask({"w": torch.tensor([[True, False]] * 4)})
    with pytest.raises(ValueError) as err:
        wide = Reply("masked_update", {"w": torch.zeros(4, dtype=torch.float64)}, 1, client=9)
        masked_aggregate(reference, mask, [wide])
    one_line(err, r"^client 9: a 'masked_update' reply 'w' has dtype torch.float64, expected torch.float32$")
    out = masked_aggregate(reference, mask, [Reply("masked_update", {"w": torch.ones(4)}, 1, client=9)])
    assert torch.equal(out["w"], torch.tensor([[1.0, 0.0]] * 4))


# -- scores replies ----------------------------------------------------------------------------------------------
def test_flattened_images_in_scores_are_refused(model, layers, images):
    x, _ = images
    flat = x.flatten()  # 640 pixel values dressed up as one layer's "channel scores"

    def as_layer(m):  # claims conv1 has 640 channels, consistently with its metadata
        return _swap(m, tensors={**m.tensors, "conv1": flat}, layers={**m.layers, "conv1": (flat.numel(), "bn1", False)})

    clients = [FakeClient(0, model, layers), FakeClient(1, model, layers, {"score": as_layer})]
    with pytest.raises(ValueError) as err:
        _unlearn(model, clients)  # the first reply is honest: client 1's metadata differs from it
    one_line(err, r"^client 1: a 'scores' reply layers differ from client 0's at 'conv1'$")
    hostile_first = [FakeClient(0, model, layers, {"score": as_layer}), FakeClient(1, model, layers)]
    with pytest.raises(ValueError) as err:
        _unlearn(model, hostile_first)  # a hostile first reply is caught against the server's model
    one_line(err, r"^client 0: a 'scores' reply layer 'conv1' claims 640 channels; the model's has 8$")

    def extra_layer(m):
        return _swap(m, tensors={**m.tensors, "x_train": flat}, layers={**m.layers, "x_train": (flat.numel(), None, False)})

    with pytest.raises(ValueError) as err:
        _unlearn(model, [FakeClient(0, model, layers, {"score": extra_layer})])
    one_line(err, r"^client 0: a 'scores' reply has unexpected layer 'x_train' \(expected scorable layers of SmallCNN")

    def scores_only(m):  # an extra score vector the metadata does not describe
        return _swap(m, tensors={**m.tensors, "x_train": flat})

    with pytest.raises(ValueError) as err:
        _unlearn(model, [FakeClient(0, model, layers), FakeClient(1, model, layers, {"score": scores_only})])
    one_line(err, r"^client 1: a 'scores' reply has unexpected key 'x_train' \(expected the 4 scored layers\)$")


def test_a_huge_base64_tag_or_an_unknown_method_is_refused(model, layers, images):
    x, _ = images
    dump = base64.b64encode(np.repeat(x.numpy(), 600, axis=0).tobytes()).decode()  # ~2 MB of images as text
    assert len(dump) > 476_000
    clients = [FakeClient(0, model, layers), FakeClient(1, model, layers, {"score": lambda m: _swap(m, tag=dump)})]
    with pytest.raises(ValueError) as err:
        _unlearn(model, clients)
    one_line(err, rf"^client 1: a 'scores' reply has unknown tag '[\w+/]{{39}}\.\.\. \({len(dump)} characters\) "
                  r"\(allowed: 'forget' or 'class_<int>'\)$")  # the dump is not echoed
    with pytest.raises(ValueError) as err:  # short, but not a known tag: refused where the server reads replies
        read_reply(_content(_swap(FakeClient(0, model, layers).score({}, {"method": "grad_x_act"}, None),
                                  tag="label=3")), 6)
    one_line(err, r"^client 6: a 'scores' reply has unknown tag 'label=3' \(allowed: 'forget' or 'class_<int>'\)$")
    method = {"score": lambda m: _swap(m, method="grad_x_act;" + dump[:40])}
    with pytest.raises(ValueError) as err:
        _unlearn(model, [FakeClient(0, model, layers, method)])
    text = one_line(err, r"^client 0: a 'scores' reply has unknown method 'grad_x_act;.*\(allowed: ")
    assert all(m in text for m in SCORING_METHODS) and "cdp_activation" in text
    cdp = {"score": lambda m: _swap(m, tag="class_3")}  # a CDP document where the forget set was asked for
    with pytest.raises(ValueError) as err:
        _unlearn(model, [FakeClient(0, model, layers, cdp)])
    one_line(err, r"^client 0: a 'scores' reply tag 'class_3' in the scoring round \(expected 'forget'\)$")


# -- Flower: the same contract on records ----------------------------------------------------------------------
def test_flower_replies_are_checked_and_name_the_client(model, layers, images):
    x, y = images
    fed = _fed([FakeClient(i, model, layers) for i in range(4)])
    _flower_reply = lambda content: SimpleNamespace(  # noqa: E731 (a reply as client 3's node would send it)
        content=content, metadata=SimpleNamespace(src_node_id=fed.nodes[3]))
    _client_replies = lambda replies, label: fed.decode(replies, label)  # noqa: E731
    expected = get_arrays(model)
    honest = up("parameters", dict(expected), 4, {"fit_s": 0.1})
    replies = _client_replies([_flower_reply(honest)], "fedavg/0")
    assert replies[0].client == 3 and torch.equal(fedavg_aggregate(replies, expected)["fc2.bias"], expected["fc2.bias"])

    extra_record = up("parameters", dict(expected), 4)
    extra_record["labels"] = ConfigRecord({"y": [int(v) for v in y]})
    with pytest.raises(ValueError) as err:
        _client_replies([_flower_reply(extra_record)], "fedavg/0")
    one_line(err, r"^client 3: a 'parameters' reply has unexpected key 'labels' \(expected records")

    extra_meta = up("parameters", dict(expected), 4)
    extra_meta["reply"]["x_train"] = base64.b64encode(x.numpy().tobytes()).decode()
    with pytest.raises(ValueError) as err:
        _client_replies([_flower_reply(extra_meta)], "fedavg/0")
    one_line(err, r"^client 3: a 'parameters' reply has unexpected key 'x_train'")

    extra_array = up("parameters", dict(expected), 4)
    extra_array["arrays"]["x_train"] = Array(x.numpy())
    with pytest.raises(ValueError) as err:  # an Array beside the packed one: refused before any is decoded
        _client_replies([_flower_reply(extra_array)], "fedavg/0")
    one_line(err, r"^client 3: a 'parameters' reply 'arrays' must hold one array, 'packed'; "
                  r"got \['packed', 'x_train'\]$")
    extra_packed = up("parameters", {**expected, "x_train": x}, 4)  # packed with the model's arrays
    msg, = _client_replies([_flower_reply(extra_packed)], "fedavg/0")
    with pytest.raises(ValueError) as err:  # decoded fine; the aggregation knows the model's keys
        fedavg_aggregate([msg], expected)
    one_line(err, r"^client 3: a 'parameters' reply has unexpected key 'x_train' \(expected the 16 model arrays\)$")

    scores = _content(FakeClient(0, model, layers).score({}, {"method": "grad_x_act"}, None))
    scores["metrics"] = MetricRecord({"num-examples": 5, "label_0": float(y[0])})
    with pytest.raises(ValueError) as err:
        _client_replies([_flower_reply(scores)], "score")
    one_line(err, r"^client 3: a 'scores' reply carries no metrics besides 'num-examples'; got 'label_0'$")
    scores["metrics"] = MetricRecord({"num-examples": 5})
    scores["reply"]["layers"] = "[1, 2, 3]"
    with pytest.raises(ValueError) as err:
        _client_replies([_flower_reply(scores)], "score")
    one_line(err, r"^client 3: a 'scores' reply layers metadata must be JSON")


def test_arrays_beside_the_packed_one_are_refused_naming_the_key(images):
    x, y = images
    for smuggled in (np.array([str(v) for v in y.tolist()]), x.numpy().astype(">f4")):  # labels as text, odd order
        content = up("parameters", {"w": torch.zeros(3)}, 3)
        content["arrays"]["x_train"] = Array(smuggled)
        with pytest.raises(ValueError) as err:
            read_reply(content, 4)
        one_line(err, r"^client 4: a 'parameters' reply 'arrays' must hold one array, 'packed'; got \['packed', "
                      r"'x_train'\]$")
    content = up("parameters", {"w": torch.zeros(3)}, 3)
    content["arrays"] = ArrayRecord({"w": Array(np.zeros(3, np.float32))})  # by name, not packed
    with pytest.raises(ValueError) as err:
        read_reply(content, 4)
    one_line(err, r"^client 4: a 'parameters' reply 'arrays' must hold one array, 'packed'; got \['w'\]$")


def test_a_packed_layout_that_does_not_fit_is_refused_naming_the_client(images):
    """Tensors travel packed with a JSON layout the client writes: a layout that is not JSON of known dtypes, names
    a key twice, or describes other bytes than the packed array holds is refused before any tensor is built."""
    x, _ = images
    honest = up("parameters", {"w": torch.zeros(3), "b": torch.zeros(2)}, 3)
    assert set(read_reply(honest, 4).tensors) == {"w", "b"}
    bad = {
        "not JSON": ("not json", r"'arrays-layout' must be JSON"),
        "pickled dtype": ('[["w", "|O", [3]]]', r"'arrays-layout' must be JSON"),
        "twice": ('[["w", "<f4", [3]], ["w", "<f4", [2]]]', r"with unique names"),
        "more bytes": ('[["w", "<f4", [3]], ["x_train", "<f4", [10, 64]]]', r"the layout describes 2572 bytes, the "
                       r"packed array holds 20 \(uint8, 1-D; expected uint8, 1-D\)$"),
    }
    for case, (layout, message) in bad.items():
        content = up("parameters", {"w": torch.zeros(3), "b": torch.zeros(2)}, 3)
        content["arrays-layout"] = ConfigRecord({"layout": layout})
        with pytest.raises(ValueError) as err:
            read_reply(content, 4)
        one_line(err, r"^client 4: a 'parameters' reply .*" + message)
    packed_images = up("parameters", {"w": torch.zeros(3)}, 3)
    packed_images["arrays"]["packed"] = Array(x.numpy())  # float images in place of the packed bytes
    with pytest.raises(ValueError) as err:
        read_reply(packed_images, 4)
    one_line(err, r"^client 4: a 'parameters' reply 'arrays': the layout describes 12 bytes, the packed array holds "
                  r"640 \(float32, 4-D; expected uint8, 1-D\)$")


def test_metric_keys_cover_what_the_library_clients_send():
    """Training replies (local_fit), the DP callback's epsilon, Flower's count, hello and evaluation replies."""
    sent = {"local_compute_s", "fit_s", "dp/epsilon", "num-examples", "client-id"}
    sent |= {f"{split}-{what}" for split in ("forget", "retain", "all") for what in ("acc", "examples")}
    assert sent == set(METRIC_KEYS)
    check_metrics({k: 1 for k in sent}, "client 0", "evaluation reply")  # all at once are accepted
