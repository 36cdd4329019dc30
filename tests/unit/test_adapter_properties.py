"""Property tests (Hypothesis) over adapter files: random corruptions of a saved adapter.

Whatever is done to a good adapter directory (tensor dtypes and shapes changed,
keys dropped, added or renamed, extreme values written, config values replaced
by any JSON, files truncated or overwritten byte by byte), ``load_adapter``
either loads it or raises :class:`AdapterFormatError`, and:

* a refused load leaves every parameter and buffer bit-identical, and the
  layers' alpha, scaling rule and dropout as they were;
* after a load that succeeds no parameter is non-finite.

Deterministic (``derandomize=True``) and quick: the model is tiny and every
example works in its own temporary directory.
"""

import atexit
import copy
import json
import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import lora_tutorial as lt
from lora_tutorial.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFormatError

SETTINGS = settings(derandomize=True, deadline=None, max_examples=150, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _model(dtype=torch.float32):
    base = nn.ModuleDict({"q": nn.Linear(6, 4), "v": nn.Linear(6, 4), "out": nn.Linear(4, 2)})
    with lt.isolated_rng(0):
        for layer in base.values():
            layer.reset_parameters()
    model = lt.add_lora(base.to(dtype), ["q", "v"], r=2, alpha=4.0, bias="lora_only",
                        seed=1, modules_to_save=["out"])
    with torch.no_grad():
        for _, layer in lt.lora_layers(model):
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(2))
    return model


MODELS = {torch.float32: _model(torch.float32), torch.float16: _model(torch.float16)}
GOOD = Path(tempfile.mkdtemp(prefix="good_adapter_"))
atexit.register(shutil.rmtree, GOOD, ignore_errors=True)
lt.save_adapter(MODELS[torch.float32], GOOD)
GOOD_TENSORS = load_file(str(GOOD / ADAPTER_WEIGHTS))
GOOD_CONFIG = json.loads((GOOD / ADAPTER_CONFIG).read_text())
KEYS = sorted(GOOD_TENSORS)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
          torch.int32, torch.int64, torch.bool]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e5, 7e4, 1e39, 1e300, -1e300, 0.0]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**40), 10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from(["LORA", "none", "all", "lora_only", "gaussian", "pissa", "false", "4",
                       10**400, -(10**400), 1e39, 2**31]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
CONFIG_KEYS = sorted(GOOD_CONFIG) + ["use_dora", "rank_pattern", "lora_bias", "something_new"]


@st.composite
def tensor_edit(draw):
    kind = draw(st.sampled_from(["dtype", "shape", "drop", "add", "rename", "value"]))
    key = draw(st.sampled_from(KEYS))
    if kind == "dtype":
        return kind, key, draw(st.sampled_from(DTYPES))
    if kind == "shape":
        return kind, key, tuple(draw(st.lists(st.integers(0, 7), max_size=3)))
    if kind == "add":
        return kind, draw(st.sampled_from(KEYS + ["base_model.model.x.lora_A.weight"])) + draw(
            st.sampled_from(["", ".extra", "_"])), None
    if kind == "rename":
        return kind, key, draw(st.sampled_from([k for k in KEYS if k != key] + ["other"]))
    if kind == "value":
        return kind, key, (draw(st.sampled_from(SPECIAL)), draw(st.booleans()))
    return kind, key, None


@st.composite
def config_edit(draw):
    if draw(st.booleans()):
        return "set", draw(st.sampled_from(CONFIG_KEYS)), draw(JSON)
    return "drop", draw(st.sampled_from(sorted(GOOD_CONFIG))), None


@st.composite
def byte_edit(draw):
    target = draw(st.sampled_from([ADAPTER_WEIGHTS, ADAPTER_CONFIG]))
    size = (GOOD / target).stat().st_size
    kind = draw(st.sampled_from(["truncate", "flip", "delete"]))
    return kind, target, draw(st.integers(0, size - 1)), draw(st.integers(1, 255))


def _apply_tensor_edit(tensors, edit):
    kind, key, arg = edit
    if key not in tensors and kind != "add":
        return
    if kind == "dtype":
        tensors[key] = tensors[key].to(arg)
    elif kind == "shape":
        tensors[key] = torch.zeros(arg, dtype=tensors[key].dtype)
    elif kind == "drop":
        del tensors[key]
    elif kind == "add":
        tensors[key] = torch.ones(2, 2)
    elif kind == "rename":
        tensors[arg] = tensors.pop(key)
    else:  # value
        value, as_double = arg
        t = tensors[key].double() if as_double else tensors[key].clone()
        if t.numel():
            t.view(-1)[0] = torch.tensor(value, dtype=torch.float64).to(t.dtype)
        tensors[key] = t


def _write(directory, tensor_edits, config_edits, byte_edits):
    tensors = {k: v.clone() for k, v in GOOD_TENSORS.items()}
    for edit in tensor_edits:
        _apply_tensor_edit(tensors, edit)
    config = copy.deepcopy(GOOD_CONFIG)
    for kind, key, value in config_edits:
        if kind == "set":
            config[key] = value
        else:
            config.pop(key, None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))
    for kind, target, position, byte in byte_edits:
        path = directory / target
        data = bytearray(path.read_bytes())
        if kind == "delete":
            path.unlink()
        elif kind == "truncate":
            path.write_bytes(bytes(data[:position]))
        else:
            data[position % len(data)] ^= byte
            path.write_bytes(bytes(data))


def _snapshot(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = [(layer.alpha, layer.rslora, layer.dropout_p) for _, layer in lt.lora_layers(model)]
    return state, layers


def _same(a, b):
    (state_a, layers_a), (state_b, layers_b) = a, b
    return (state_a.keys() == state_b.keys() and layers_a == layers_b
            and all(torch.equal(state_a[k], state_b[k]) for k in state_a))


@SETTINGS
@given(
    tensor_edits=st.lists(tensor_edit(), max_size=2),
    config_edits=st.lists(config_edit(), max_size=2),
    byte_edits=st.lists(byte_edit(), max_size=1),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_a_corrupted_adapter_loads_cleanly_or_changes_nothing(tensor_edits, config_edits,
                                                              byte_edits, dtype):
    model = copy.deepcopy(MODELS[dtype])
    before = _snapshot(model)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        _write(directory, tensor_edits, config_edits, byte_edits)
        try:
            lt.load_adapter(model, directory)
        except AdapterFormatError:
            event("refused")
            assert _same(before, _snapshot(model)), "a refused load changed the model"
            return
    event("loaded")
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} is not finite after a successful load"


@SETTINGS
@given(dtype=st.sampled_from([torch.float32, torch.float16]))
def test_the_good_adapter_loads_exactly(dtype):
    model = copy.deepcopy(MODELS[dtype])
    with torch.no_grad():
        for _, layer in lt.lora_layers(model):
            layer.lora_B.zero_()
    lt.load_adapter(model, GOOD)
    for _, layer in lt.lora_layers(model):
        assert layer.lora_B.dtype == dtype and layer.lora_B.abs().sum() > 0
    assert torch.equal(model["q"].lora_A, GOOD_TENSORS["base_model.model.q.lora_A.weight"].to(dtype))
    assert torch.equal(model["out"].weight, GOOD_TENSORS["base_model.model.out.weight"].to(dtype))
