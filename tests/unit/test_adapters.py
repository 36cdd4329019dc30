"""add_lora / unload_lora, and adapter files in PEFT's format, checked against PEFT itself."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lora_tutorial as lt
from lora_tutorial.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFormatError

import transformers
from peft import LoraConfig, PeftModel, get_peft_model


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def setup():
    """Chapter 3's pretrained model with a trained (non-zero) rank-8 head adapter."""
    task, model = lt.pretrained_tiny_adapter()
    with torch.no_grad():
        feats = model.features(task.x_train[:1024])
    model.head.base.bias.requires_grad_(True)  # chapter 3 trains the head's bias too
    lt.fit_lora_on_stats(model.head, lt.FeatureStats.from_data(feats, task.y_new_train[:1024]), steps=30, lr=5e-3)
    model.head.base.bias.requires_grad_(False)
    return task.x_val[:64], model.eval()


def plain_copy(model):
    return lt.unload_lora(copy.deepcopy(model), merge=False)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------ add / unload
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "o_proj": nn.Linear(8, 8)})
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.attn["o_proj"](self.attn["q_proj"](x) * self.attn["v_proj"](x)) + self.norm(x)


def test_add_lora_wraps_matching_linears_and_freezes_the_rest():
    model = nn.Sequential(Block(), Block())
    x = torch.randn(4, 8)
    before = model(x)
    lt.add_lora(model, ["q_proj", "v_proj"], r=2, alpha=4.0, seed=0)
    names = [name for name, _ in lt.lora_layers(model)]
    assert names == ["0.attn.q_proj", "0.attn.v_proj", "1.attn.q_proj", "1.attn.v_proj"]
    assert torch.equal(model(x), before)  # B = 0: nothing changes yet
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{f}" for n in names for f in ("lora_A", "lora_B")}
    assert lt.count_parameters(model).trainable == 4 * 2 * (8 + 8)


def test_add_lora_errors():
    with pytest.raises(ValueError, match=r"matched no linear layer.*\['0', '1'\]"):
        lt.add_lora(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), ["q_proj"])
    with pytest.raises(ValueError, match="target_modules must be a non-empty list"):
        lt.add_lora(nn.Sequential(nn.Linear(2, 2)), [])
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        lt.add_lora(nn.Sequential(nn.Linear(2, 2)), ["0"], r=0)
    with pytest.raises(ValueError, match="bias must be one of"):
        lt.add_lora(nn.Sequential(nn.Linear(2, 2)), ["0"], bias="some")


def test_unload_lora_merges_or_restores(setup):
    x, model = setup
    expected = model(x)
    merged = lt.unload_lora(copy.deepcopy(model), merge=True)
    assert isinstance(merged.head, nn.Linear) and not list(lt.lora_layers(merged))
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)
    restored = plain_copy(model)
    assert torch.equal(restored.head.weight, model.head.base.weight)
    with pytest.raises(TypeError, match="not a LoRALinear itself"):
        lt.unload_lora(lt.LoRALinear(2, 2))


# ------------------------------------------------------------ the same maths as PEFT
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_layer_computes_the_same_outputs_and_merged_weights(setup, rslora):
    x, model = setup
    ours = copy.deepcopy(model)
    ours.head.rslora = rslora
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["head"], use_rslora=rslora)
    theirs = get_peft_model(plain_copy(model), cfg).eval()
    layer = theirs.base_model.model.head
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.head.lora_A)
        layer.lora_B["default"].weight.copy_(ours.head.lora_B)
    assert layer.scaling["default"] == pytest.approx(ours.head.scaling)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    merged = theirs.merge_and_unload()
    ours.head.merge_weights_()
    torch.testing.assert_close(ours.head.base.weight, merged.head.weight, atol=1e-6, rtol=0)


# ------------------------------------------------------------ files
def test_save_adapter_writes_peft_keys_and_config(setup, tmp_path):
    _, model = setup
    lt.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert sorted(tensors) == ["base_model.model.head.lora_A.weight", "base_model.model.head.lora_B.weight"]
    assert torch.equal(tensors["base_model.model.head.lora_A.weight"], model.head.lora_A)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16.0
    assert config["target_modules"] == ["head"] and config["bias"] == "none" and config["use_rslora"] is False
    assert config["lora_dropout"] == 0.1


def test_save_adapter_saves_biases_by_the_mode_recorded_when_lora_was_added(tmp_path):
    """Issue 10, item 5: not by requires_grad (which users switch off before saving)."""
    model = nn.Sequential(Block(), Block())
    lt.add_lora(model, ["q_proj", "v_proj"], r=2, bias="lora_only", seed=0)
    assert lt.recorded_bias(model) == "lora_only"
    with torch.no_grad():
        model[0].attn["q_proj"].base.bias.add_(1.0)  # "trained"
    model.requires_grad_(False)  # frozen, as users do before saving
    lt.save_adapter(model, tmp_path / "lora_only")
    tensors = load_file(str(tmp_path / "lora_only" / ADAPTER_WEIGHTS))
    key = "base_model.model.0.attn.q_proj.base_layer.bias"
    assert torch.equal(tensors[key], model[0].attn["q_proj"].base.bias)
    assert sum(k.endswith("base_layer.bias") for k in tensors) == 4
    assert json.loads((tmp_path / "lora_only" / ADAPTER_CONFIG).read_text())["bias"] == "lora_only"
    # bias="all": every bias, trainable or not; an explicit argument wins over the record
    model = lt.add_lora(nn.Sequential(Block()), ["q_proj"], r=2, bias="all", seed=0)
    model.requires_grad_(False)
    lt.save_adapter(model, tmp_path / "all")
    keys = set(load_file(str(tmp_path / "all" / ADAPTER_WEIGHTS)))
    assert {"base_model.model.0.norm.bias", "base_model.model.0.attn.v_proj.bias"} <= keys
    lt.save_adapter(model, tmp_path / "none", bias="none")
    assert not any("bias" in k for k in load_file(str(tmp_path / "none" / ADAPTER_WEIGHTS)))


def test_a_fresh_tiny_adapter_saves_no_bias(tmp_path):
    """Its backbone's bias is trainable (pretraining trains it), but it is no part of an adapter."""
    model = lt.TinyAdapter(seed=0)
    assert model.backbone.bias.requires_grad and lt.recorded_bias(model) is None
    lt.save_adapter(model, tmp_path)
    assert sorted(load_file(str(tmp_path / ADAPTER_WEIGHTS))) == [
        "base_model.model.head.lora_A.weight", "base_model.model.head.lora_B.weight"]
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["bias"] == "none"


def test_mark_only_lora_as_trainable_records_the_bias_mode(tmp_path):
    model = lt.TinyAdapter(seed=0)
    lt.mark_only_lora_as_trainable(model, bias="lora_only")
    model.requires_grad_(False)
    lt.save_adapter(model, tmp_path)
    assert "base_model.model.head.base_layer.bias" in load_file(str(tmp_path / ADAPTER_WEIGHTS))


def test_save_adapter_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        lt.save_adapter(nn.Linear(2, 2), tmp_path)
    model = nn.Sequential(lt.LoRALinear(4, 4, r=2), lt.LoRALinear(4, 4, r=4))
    with pytest.raises(ValueError, match=r"'0' has \(r, alpha, rslora, dropout\) = \(2, .*'1' has \(4,"):
        lt.save_adapter(model, tmp_path)


@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_round_trip_here_then_peft_then_here(setup, tmp_path, bias):
    x, model = setup
    lt.save_adapter(model, tmp_path / "ours", bias=bias)
    theirs = PeftModel.from_pretrained(plain_copy(model), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-6, rtol=0)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        fresh.head.lora_B.zero_()
        if bias == "lora_only":  # then the file carries the bias too
            fresh.head.base.bias.zero_()
    lt.load_adapter(fresh, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=0)


def test_load_adapter_trained_in_peft(setup, tmp_path):
    x, model = setup
    cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["head"], bias="lora_only", use_rslora=True)
    theirs = get_peft_model(plain_copy(model), cfg)
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        theirs(x).pow(2).mean().backward()
        opt.step()
    theirs.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(model)
    lt.load_adapter(ours, tmp_path)
    assert (ours.head.alpha, ours.head.rslora, ours.head.scaling) == (32.0, True, 32 / 8 ** 0.5)
    assert isinstance(ours.head.dropout, nn.Identity)
    ours.head.train()
    lt.load_adapter(ours, lt.save_adapter(model, tmp_path / "with_dropout"))  # back to dropout 0.1
    assert isinstance(ours.head.dropout, nn.Dropout) and ours.head.dropout.p == 0.1 and ours.head.dropout.training
    ours.eval()
    lt.load_adapter(ours, tmp_path)
    theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)


A_KEY, B_KEY = "base_model.model.head.lora_A.weight", "base_model.model.head.lora_B.weight"


def corrupt(src, dst, tensors=None, config=None):
    dst.mkdir()
    data = load_file(str(src / ADAPTER_WEIGHTS))
    cfg = json.loads((src / ADAPTER_CONFIG).read_text())
    if tensors:
        data = tensors(data)
    if config:
        cfg = config(cfg)
    save_file({k: v.contiguous() for k, v in data.items()}, str(dst / ADAPTER_WEIGHTS))
    (dst / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    return dst


def edit(d, **changes):
    d = dict(d)
    for key, value in changes.items():
        if value is KeyError:
            d.pop(key)
        else:
            d[key] = value
    return d


BAD = {
    "missing tensor": (dict(tensors=lambda t: edit(t, **{"base_model.model.head.lora_B.weight": KeyError})),
                       r"base_model.model.head.lora_B.weight is missing"),
    "mismatched tensor": (dict(tensors=lambda t: edit(t, **{"base_model.model.head.lora_A.weight": torch.zeros(8, 255)})),
                          r"lora_A.weight has shape \(8, 255\), the model expects \(8, 256\)"),
    "non-finite tensor": (dict(tensors=lambda t: edit(t, **{"base_model.model.head.lora_B.weight": torch.full((16, 8), float("nan"))})),
                          r"lora_B.weight holds 128 value\(s\) that are not finite"),
    "wrong rank": (dict(tensors=lambda t: edit(t, **{"base_model.model.head.lora_A.weight": torch.zeros(4, 256),
                                                     "base_model.model.head.lora_B.weight": torch.zeros(16, 4)}),
                        config=lambda c: edit(c, r=4)), r"r=4 in adapter_config.json, but the LoRALinear at 'head' has r=8"),
    "unknown module": (dict(tensors=lambda t: edit(t, **{"base_model.model.neck.lora_A.weight": torch.zeros(8, 256)})),
                       r"base_model.model.neck.lora_A.weight: the model has no LoRALinear, .* at this path \('neck'\)"),
    "DoRA": (dict(config=lambda c: edit(c, use_dora=True)), r"use_dora=true, but the model.s adapter .default. is LoRA"),
    "PiSSA init": (dict(config=lambda c: edit(c, init_lora_weights="pissa")), r"init_lora_weights='pissa' is not supported"),
    "rank pattern": (dict(config=lambda c: edit(c, rank_pattern={"head": 4})), r"rank_pattern=\{'head': 4\} is a feature"),
    "not LoRA": (dict(config=lambda c: edit(c, peft_type="IA3")), r"peft_type must be 'LORA', got 'IA3'"),
    "bad alpha": (dict(config=lambda c: edit(c, lora_alpha=-1)), r"lora_alpha must be a positive finite number, got -1"),
    # issue 10, item 4: integer and boolean tensors are refused, not cast
    "integer tensor": (dict(tensors=lambda t: edit(t, **{A_KEY: torch.ones(8, 256, dtype=torch.int64)})),
                       r"lora_A.weight holds torch.int64 values; .* only floating-point"),
    "boolean tensor": (dict(tensors=lambda t: edit(t, **{B_KEY: torch.zeros(16, 8, dtype=torch.bool)})),
                       r"lora_B.weight holds torch.bool values"),
    "1e300 from fp64": (dict(tensors=lambda t: edit(t, **{A_KEY: t[A_KEY].double().index_fill(1, torch.tensor([3]), 1e300)})),
                        r"lora_A.weight holds 8 value\(s\) that are not finite in the model's torch.float32"),
    # issue 10, item 6: JSON types and ranges
    "rslora as a string": (dict(config=lambda c: edit(c, use_rslora="false")), r"use_rslora must be true or false, got 'false'"),
    "alpha as a bool": (dict(config=lambda c: edit(c, lora_alpha=True)), r"lora_alpha must be a JSON number, got True"),
    "alpha as a string": (dict(config=lambda c: edit(c, lora_alpha="4")), r"lora_alpha must be a JSON number, got '4'"),
    "alpha too large for fp32": (dict(config=lambda c: edit(c, lora_alpha=1e39)), r"lora_alpha=1e\+39 is not finite in torch.float32"),
    "alpha NaN": (dict(config=lambda c: edit(c, lora_alpha=float("nan"))), r"lora_alpha must be a positive finite number, got nan"),
    "r as a float": (dict(config=lambda c: edit(c, r=8.0)), r"r must be a positive integer, got 8.0"),
    "r as a bool": (dict(config=lambda c: edit(c, r=True)), r"r must be a positive integer, got True"),
    "dropout as a string": (dict(config=lambda c: edit(c, lora_dropout="0.1")), r"lora_dropout must be a JSON number"),
    "dropout 1": (dict(config=lambda c: edit(c, lora_dropout=1.0)), r"lora_dropout must be in \[0, 1\), got 1.0"),
    "bias not a mode": (dict(config=lambda c: edit(c, bias="no")), r"bias must be one of \['none', 'all', 'lora_only'\], got 'no'"),
    "init as an int": (dict(config=lambda c: edit(c, init_lora_weights=1)), r"init_lora_weights=1 is not supported"),
    "modules_to_save as a string": (dict(config=lambda c: edit(c, modules_to_save="classifier")),
                                    r"modules_to_save must be null or a list of module names, got 'classifier'"),
    "update overflows": (dict(tensors=lambda t: edit(t, **{A_KEY: torch.full((8, 256), 1e20), B_KEY: torch.full((16, 8), 1e20)})),
                         r"the update scaling \* B @ A of 'head' would have 4096 non-finite value\(s\) in torch.float32"),
    "config not an object": (dict(config=lambda c: [c]), r"must hold a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_directories_fail_clearly_and_change_nothing(setup, tmp_path, case):
    _, model = setup
    good = lt.save_adapter(model, tmp_path / "good")
    changes, message = BAD[case]
    bad = corrupt(good, tmp_path / "bad", **changes)
    target = copy.deepcopy(model)
    before = state(target)
    with pytest.raises(AdapterFormatError, match=message):
        lt.load_adapter(target, bad)
    assert same_state(before, state(target))
    assert target.head.scaling == model.head.scaling


def test_finiteness_is_checked_after_casting_to_the_models_dtype(tmp_path):
    """Issue 10, item 4: an fp32 value above fp16's maximum (65504) would load as inf."""
    def adapted(dtype):
        return lt.add_lora(nn.Sequential(nn.Linear(8, 4)).to(dtype), ["0"], r=2, seed=0)

    source = adapted(torch.float32)
    with torch.no_grad():
        source[0].lora_B.fill_(1e5)  # finite in fp32
    lt.save_adapter(source, tmp_path)
    target = adapted(torch.float16)
    before = state(target)
    with pytest.raises(AdapterFormatError, match=r"lora_B.weight holds 8 value\(s\) that are not finite in the model's torch.float16"):
        lt.load_adapter(target, tmp_path)
    assert same_state(before, state(target))
    with torch.no_grad():
        source[0].lora_B.fill_(1e3)
    lt.save_adapter(source, tmp_path)
    lt.load_adapter(target, tmp_path)  # fits fp16: loads, cast
    assert target[0].lora_B.dtype == torch.float16 and torch.all(target[0].lora_B == 1000)


def test_refused_alpha_leaves_rslora_and_everything_else_unchanged(setup, tmp_path):
    """Issue 10, item 6: "use_rslora": "false" used to turn rsLoRA on."""
    _, model = setup
    good = lt.save_adapter(model, tmp_path / "good")
    bad = corrupt(good, tmp_path / "bad", config=lambda c: edit(c, use_rslora="false", lora_alpha=32))
    target = copy.deepcopy(model)
    with pytest.raises(AdapterFormatError, match="use_rslora must be true or false"):
        lt.load_adapter(target, bad)
    assert (target.head.rslora, target.head.alpha) == (False, 16.0)


def test_load_adapter_never_unpickles(setup, tmp_path):
    _, model = setup
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(AdapterFormatError, match=r"found \['adapter_model.bin'\]: only safetensors is read, never pickle"):
        lt.load_adapter(copy.deepcopy(model), tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(AdapterFormatError, match="not a readable safetensors file"):
        lt.load_adapter(copy.deepcopy(model), tmp_path)


def test_load_adapter_other_errors(setup, tmp_path):
    _, model = setup
    with pytest.raises(AdapterFormatError, match="adapter_config.json is missing"):
        lt.load_adapter(copy.deepcopy(model), tmp_path)
    good = lt.save_adapter(model, tmp_path / "good")
    merged = copy.deepcopy(model)
    merged.head.merge_weights_()
    with pytest.raises(AdapterFormatError, match=r"\['head'\] are merged"):
        lt.load_adapter(merged, good)
    (tmp_path / "good" / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        lt.load_adapter(copy.deepcopy(model), good)


# ------------------------------------------------------------ a transformer, by add_lora and by PEFT
def test_transformer_counts_and_outputs_match_peft(tmp_path):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    with lt.isolated_rng(0):
        base = transformers.LlamaForCausalLM(config).eval()
    ours = lt.add_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, alpha=8.0, seed=1)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (lt.count_parameters(ours).trainable, lt.count_parameters(ours).total) == (trainable, total)
    with torch.no_grad():
        for _, layer in lt.lora_layers(ours):
            layer.lora_B.normal_(std=0.05, generator=gen(2))
    lt.save_adapter(ours, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = torch.randint(0, 128, (2, 12), generator=gen(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, loaded(ids).logits, atol=1e-5, rtol=0)
        assert (ours(ids).logits - base(ids).logits).abs().max() > 1e-3  # the adapters do something


@pytest.mark.parametrize("init", [True, False, "gaussian", "orthogonal", "eva"])
def test_inits_that_leave_the_base_unchanged_are_accepted(setup, tmp_path, init):
    """They only say how training started; loading needs nothing from them."""
    x, model = setup
    good = lt.save_adapter(model, tmp_path / "good")
    edited = corrupt(good, tmp_path / "edited", config=lambda c: edit(c, init_lora_weights=init))
    target = copy.deepcopy(model)
    with torch.no_grad():
        target.head.lora_B.zero_()
    lt.load_adapter(target, edited)
    with torch.no_grad():
        assert torch.equal(target(x), model(x))
