"""Many adapters on one model (lora_tutorial.named_adapters) against PEFT.

A small random GPT-2 (Conv1D) in float64 holds adapters "a" (rank 2), "b"
(rank 4) and "c" (rank 2): switching gives what a one-adapter model gives, bit
for bit; files move both ways in PEFT's multi-adapter layout; combinations
equal add_weighted_adapter's (cat, svd, linear); a mixed batch equals PEFT's
adapter_names= batch; one adapter merges and unmerges while the others stay;
and every refusal leaves the model as it was.
"""

import copy
import warnings

import pytest
import torch

import lora_tutorial as lt
from lora_tutorial.adapter_io import AdapterFormatError

from peft import PeftModel
from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 40
GPT2 = dict(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16,
            bos_token_id=0, eos_token_id=0, pad_token_id=0)
TARGETS = ["c_attn", "c_proj"]
RANKS = {"a": 2, "b": 4, "c": 2}


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def base():
    with lt.isolated_rng(0):
        return GPT2LMHeadModel(GPT2Config(**GPT2)).double().eval()


def ids(n=4):
    return torch.randint(1, VOCAB, (n, 6), generator=gen(5))


def logits(model, x, **kwargs):
    with torch.no_grad():
        return model(x, **kwargs).logits


def single(base, name, seed):
    """A one-adapter model holding adapter ``name`` with moved B."""
    model = lt.add_lora(copy.deepcopy(base), TARGETS, r=RANKS[name], alpha=2 * RANKS[name],
                        seed=seed)
    with torch.no_grad():
        for _, layer in lt.lora_layers(model):
            layer.lora_B.normal_(std=0.2, generator=gen(seed + 10))
    return model.eval()


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """Each adapter trained alone and saved, and the same three in one model."""
    root = tmp_path_factory.mktemp("adapters")
    singles = {name: single(base, name, seed) for seed, name in enumerate(RANKS)}
    for name, model in singles.items():
        lt.save_adapter(model, root / name)
    many = copy.deepcopy(base)
    for seed, name in enumerate(RANKS):
        lt.add_lora(many, TARGETS, r=RANKS[name], alpha=2 * RANKS[name], adapter_name=name,
                    seed=seed + 20)
        lt.load_adapter(many, root / name, adapter_name=name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        peft = PeftModel.from_pretrained(copy.deepcopy(base), root / "a", adapter_name="a")
        for name in ("b", "c"):
            peft.load_adapter(root / name, adapter_name=name)
    return root, singles, many.eval(), peft.eval()


def test_switching_gives_each_one_adapter_model_bit_for_bit_and_peft_s_outputs(saved, base):
    _, singles, many, peft = saved
    x = ids()
    assert lt.adapter_names(many) == ["a", "b", "c"] and lt.active_adapter(many) == "a"
    for name in ("b", "a", "c", "a"):
        lt.set_adapter(many, name)
        peft.set_adapter(name)
        out = logits(many, x)
        assert torch.equal(out, logits(singles[name], x))
        torch.testing.assert_close(out, logits(peft, x), rtol=0, atol=1e-12)
        trainable = {n for n, p in many.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_parked." not in n for n in trainable)
    with lt.disable_adapter(many):
        assert torch.equal(logits(many, x), logits(base, x))


def test_a_mixed_batch_equals_peft_s_and_each_example_s_own_model(saved, base,
                                                                  global_rng_untouched):
    _, singles, many, peft = saved
    names = ["a", "b", "__base__", "c", "b", "a"]
    x = ids(len(names))
    with lt.mixed_batch(many, names):
        out = logits(many, x)
    torch.testing.assert_close(out, logits(peft, x, adapter_names=names), rtol=0, atol=1e-12)
    for i, name in enumerate(names):
        alone = base if name == "__base__" else singles[name]
        torch.testing.assert_close(out[i], logits(alone, x[i:i + 1])[0], rtol=0, atol=1e-12)
    assert torch.equal(logits(many, x), logits(singles["a"], x))  # the hooks are gone


@pytest.mark.parametrize("how, adapters, rank", [
    ("cat", ["a", "b"], None), ("svd", ["a", "b"], 3), ("svd", ["b", "c"], None),
    ("linear", ["a", "c"], None)])
def test_combinations_equal_peft_s_add_weighted_adapter(saved, how, adapters, rank):
    _, _, many, peft = saved
    model = copy.deepcopy(many)
    # PEFT rounds the weights (and, for "linear", sqrt(|w s|), s = 2) to float32: exact here
    weights = [0.5, -2.0]
    lt.combine_adapters(model, adapters, weights, "mix", how, svd_rank=rank)
    peft.add_weighted_adapter(adapters, weights, f"mix_{how}_{rank}", combination_type=how,
                              svd_rank=rank)
    lt.set_adapter(model, "mix")
    peft.set_adapter(f"mix_{how}_{rank}")
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(peft, x), rtol=0, atol=1e-10)
    layer = model.transformer.h[0].attn.c_attn
    want = {"cat": sum(RANKS[n] for n in adapters), "linear": RANKS[adapters[0]],
            "svd": rank or max(RANKS[n] for n in adapters)}[how]
    assert layer.r == want and layer.scaling == 1.0
    peft.set_adapter("a")
    if how == "cat":  # exact: the weighted sum of the updates
        parts = [layer.lora_parked[n] for n in adapters]
        exact = sum(w * p.scaling * p.lora_B @ p.lora_A for w, p in zip(weights, parts))
        torch.testing.assert_close(layer.delta_weight(), exact, rtol=0, atol=1e-12)


def test_svd_combination_is_the_best_approximation_of_its_rank(saved):
    _, _, many, _ = saved
    model = copy.deepcopy(many)
    lt.combine_adapters(model, ["a", "b"], [1.0, 1.0], "exact", "cat")
    lt.combine_adapters(model, ["a", "b"], [1.0, 1.0], "r3", "svd", svd_rank=3)
    for _, layer in lt.lora_layers(model):
        exact = layer.lora_parked["exact"]
        target = exact.lora_B @ exact.lora_A
        r3 = layer.lora_parked["r3"]
        sigma = torch.linalg.svdvals(target)
        error = torch.linalg.matrix_norm(target - r3.lora_B @ r3.lora_A)
        torch.testing.assert_close(error, sigma[3:].square().sum().sqrt(), rtol=1e-9, atol=1e-12)


def test_one_adapter_merges_while_the_others_stay_loaded(saved, base):
    _, singles, many, _ = saved
    model = copy.deepcopy(many)
    x = ids()
    lt.merge_adapter(model, "b")
    assert lt.active_adapter(model) == "b"
    assert all(layer.merged for _, layer in lt.lora_layers(model))
    torch.testing.assert_close(logits(model, x), logits(singles["b"], x), rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="cannot run a mixed batch: adapter 'b' is merged"):
        with lt.mixed_batch(model, ["a", "b", "c", "a"]):
            pass
    with pytest.raises(RuntimeError, match="cannot switch to adapter 'a': adapter 'b' is merged"):
        lt.set_adapter(model, "a")
    lt.unmerge_adapter(model)
    for name, layer in lt.lora_layers(model):
        torch.testing.assert_close(layer.base.weight, base.get_submodule(name).weight,
                                   rtol=0, atol=1e-14)
    lt.set_adapter(model, "a")  # (the base weights are back up to one rounding)
    torch.testing.assert_close(logits(model, x), logits(singles["a"], x), rtol=0, atol=1e-14)


def test_files_in_peft_s_multi_adapter_layout_move_both_ways(saved, base, tmp_path):
    _, singles, many, peft = saved
    x = ids()
    lt.save_adapter(many, tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["a", "b", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours" / "b",
                                         adapter_name="b").eval()
    torch.testing.assert_close(logits(back, x), logits(singles["b"], x), rtol=0, atol=1e-12)
    peft.save_pretrained(tmp_path / "peft")  # "a", "b", "c" and the combinations, each in its directory
    model = copy.deepcopy(base)
    lt.add_lora(model, TARGETS, r=2, adapter_name="a")
    lt.add_lora(model, TARGETS, r=4, adapter_name="b", seed=3)
    lt.load_adapter(model, tmp_path / "peft" / "b", adapter_name="b")
    lt.set_adapter(model, "b")
    assert torch.equal(logits(model, x), logits(singles["b"], x))


def test_refusals_name_the_problem_and_change_nothing(saved, base):
    _, _, many, _ = saved
    model = copy.deepcopy(many)
    before = copy.deepcopy(model.state_dict())
    x = ids()

    def unchanged():
        state = model.state_dict()
        assert state.keys() == before.keys()
        assert all(torch.equal(state[k], v) for k, v in before.items())
        assert lt.active_adapter(model) == "a" and lt.adapter_names(model) == ["a", "b", "c"]

    cases = [
        (lambda: lt.add_lora(model, ["c_attn"], adapter_name="d"), ValueError,
         "must adapt exactly the layers"),
        (lambda: lt.add_lora(model, TARGETS, adapter_name="d", use_dora=True), ValueError,
         "a layer holds adapters of one kind"),
        (lambda: lt.add_lora(model, TARGETS, adapter_name="d", modules_to_save=["ln_f"]),
         ValueError, "modules_to_save or a bias mode"),
        (lambda: lt.add_lora(model, TARGETS, adapter_name="b"), ValueError, "already an adapter"),
        (lambda: lt.add_lora(model, TARGETS, adapter_name="x.y"), ValueError, "without '.'"),
        (lambda: lt.set_adapter(model, "z"), ValueError, r"'z' is not an adapter of the model"),
        (lambda: lt.delete_adapter(model, "a"), ValueError, "is the active adapter"),
        (lambda: lt.combine_adapters(model, ["a", "b"], [1, 1], "m", "linear"), ValueError,
         "equal rank"),
        (lambda: lt.combine_adapters(model, ["a", "b"], [1, 1], "m", "svd", svd_rank=99),
         ValueError, "svd_rank must be at most 16"),
        (lambda: lt.combine_adapters(model, ["a", "b"], [1], "m", "cat"), ValueError,
         "2 finite numbers"),
        (lambda: lt.combine_adapters(model, ["a", "b"], [1, 1], "c", "cat"), ValueError,
         "already an adapter"),
        (lambda: lt.merge_adapter(model, "q"), ValueError, "not an adapter"),
        (lambda: lt.load_adapter(model, "/nonexistent", adapter_name="q"), AdapterFormatError,
         "is missing"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
        unchanged()
    with pytest.raises(ValueError, match="'q'"):
        with lt.mixed_batch(model, ["a", "q"]):
            pass
    with pytest.raises(ValueError, match="needs inputs with 3 rows"):
        with lt.mixed_batch(model, ["a", "b", "c"]):
            logits(model, x)
    model.train()
    with pytest.raises(RuntimeError, match="refusing to train in a mixed batch"):
        with lt.mixed_batch(model, ["a", "b", "c", "a"]):
            model(x)
    model.eval()
    assert torch.equal(logits(model, x), logits(many, x))  # every hook removed
    unchanged()


def test_a_state_dict_taken_with_another_adapter_active_is_refused(saved):
    _, _, many, _ = saved
    model = copy.deepcopy(many)
    state = copy.deepcopy(model.state_dict())
    lt.set_adapter(model, "b")
    after = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="parked adapters"):
        model.load_state_dict(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in after.items())
    lt.set_adapter(model, "a")
    model.load_state_dict(state)


def test_deleting_adapters_gives_a_one_adapter_model_again(saved, base):
    _, singles, many, _ = saved
    model = copy.deepcopy(many)
    lt.delete_adapter(model, "b")
    lt.delete_adapter(model, "c")
    assert lt.adapter_names(model) == ["a"]
    layer = model.transformer.h[0].attn.c_attn
    assert "lora_parked" not in layer._modules
    assert sorted(k for k in model.state_dict() if "c_attn" in k and ".h.0." in k) == [
        "transformer.h.0.attn.c_attn.base.bias", "transformer.h.0.attn.c_attn.base.weight",
        "transformer.h.0.attn.c_attn.lora_A", "transformer.h.0.attn.c_attn.lora_B"]
    assert torch.equal(logits(model, ids()), logits(singles["a"], ids()))


def test_a_single_default_adapter_is_unchanged(base, tmp_path):
    model = lt.add_lora(copy.deepcopy(base), TARGETS, r=2)
    layer = model.transformer.h[0].attn.c_attn
    assert type(layer) is lt.LoRALinear and lt.adapter_names(model) == ["default"]
    assert "adapter=" not in repr(layer)
    lt.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]


def test_a_mixed_batch_sees_factors_changed_inside_it_and_passes_gradients(saved):
    _, singles, many, _ = saved
    model = copy.deepcopy(many)
    names = ["b", "a", "b", "__base__"]
    x = ids()
    with lt.mixed_batch(model, names):
        first = logits(model, x)
        with torch.no_grad():  # a factor changed in place: the gathered copies follow
            model.transformer.h[0].attn.c_attn.lora_parked["b"].lora_B.mul_(2.0)
        second = logits(model, x)
        out = model(x).logits  # eval mode, gradients on: they reach the factors
    assert torch.equal(first[1], second[1]) and not torch.equal(first[0], second[0])
    out[1].sum().backward()
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().max() > 0


def test_svd_beyond_a_layer_s_rank_is_exact_and_padded_with_zeros(global_rng_untouched):
    model = torch.nn.Sequential(lt.make_linear(8, 8, seed=0),
                                lt.make_linear(8, 3, seed=1)).double()
    for seed, name in enumerate(("a", "b")):
        lt.add_lora(model, ["0", "1"], r=3, adapter_name=name, seed=seed)
        lt.set_adapter(model, name)
        with torch.no_grad():
            for _, layer in lt.lora_layers(model):
                layer.lora_B.normal_(generator=gen(seed))
    lt.combine_adapters(model, ["a", "b"], [1.0, -0.5], "cat", "cat")
    lt.combine_adapters(model, ["a", "b"], [1.0, -0.5], "svd", "svd", svd_rank=6)
    head = model[1]
    assert head.lora_parked["svd"].lora_A.shape == (6, 8)  # min(8, 3) = 3 < 6
    assert torch.equal(head.lora_parked["svd"].lora_A[3:], torch.zeros(3, 8))
    x = torch.randn(4, 8, generator=gen(2), dtype=torch.float64)
    lt.set_adapter(model, "cat")
    exact = model(x)
    lt.set_adapter(model, "svd")
    torch.testing.assert_close(model(x), exact, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="svd_rank must be at most 8"):
        lt.combine_adapters(model, ["a", "b"], [1.0, 1.0], "big", "svd", svd_rank=9)


def test_unloading_several_adapters_merges_the_active_one(saved):
    _, singles, many, _ = saved
    model = copy.deepcopy(many)
    lt.set_adapter(model, "c")
    plain = lt.unload_lora(model, merge=True)
    assert not list(lt.lora_layers(plain))
    torch.testing.assert_close(logits(plain, ids()), logits(singles["c"], ids()),
                               rtol=0, atol=1e-12)
