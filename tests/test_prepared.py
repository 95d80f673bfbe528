"""Calls prepared once per geometry (normlab.functional._prepared): a call whose geometry was seen before skips
its checks and backend choice, so the key must hold everything those read — a call that differs in anything
checked is checked again, and inputs of one shape but different layouts or dtypes each get their own
preparation."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as TF

import normlab.functional as NF
from normlab.functional import _prepared

EPS = 1e-5
group_norm_module = importlib.import_module("normlab.functional.group_norm")  # (the package exports the function)


def good_calls():
    x = torch.randn(2, 6, 4, 4)
    c = torch.ones(6)
    return {
        "gn": lambda **kw: NF.group_norm(kw.get("x", x), kw.get("groups", 3), kw.get("weight", c), None,
                                         kw.get("eps", EPS)),
        "bn": lambda **kw: NF.batch_norm(kw.get("x", x), kw.get("running_mean", torch.zeros(6)), torch.ones(6),
                                         kw.get("weight", c), None, True, kw.get("momentum", 0.1), kw.get("eps", EPS)),
        "in": lambda **kw: NF.instance_norm(kw.get("x", x), None, None, kw.get("weight", c), None, True, 0.1,
                                            kw.get("eps", EPS)),
        "ln": lambda **kw: NF.layer_norm(kw.get("x", x), kw.get("shape", [4, 4]), kw.get("weight", None), None,
                                         kw.get("eps", EPS)),
        "sn": lambda **kw: switch_norm_call(x, c, **kw),
    }


def switch_norm_call(default_x, c, x=None, mean_logits=None, sources=("in", "ln", "bn"), training=True):
    logits = torch.zeros(len(sources))
    return NF.switch_norm(default_x if x is None else x, logits if mean_logits is None else mean_logits, logits, c,
                          None, torch.zeros(6), torch.ones(6), training, 0.1, EPS, sources=sources)


BAD = [  # (method, changed argument, message): the same call as a good one but for this argument
    ("gn", {"weight": torch.ones(5)}, r"weight must have 6 elements"),
    ("gn", {"groups": 4}, r"num_channels must be divisible by num_groups"),
    ("gn", {"eps": math.nan}, r"eps must be a finite number"),
    ("gn", {"x": torch.randn(2, 6, 4, 4).long()}, r"expects a floating-point input"),
    ("bn", {"running_mean": torch.zeros(4)}, r"running_mean must have 6 elements"),
    ("bn", {"momentum": 1.5}, r"momentum must be a finite number in \[0, 1\]"),
    ("bn", {"x": torch.randn(1, 6)}, r"expected more than 1 value per channel"),
    ("in", {"eps": -1.0}, r"eps must be a finite number >= 0"),
    ("in", {"x": torch.randn(2, 6, 1)}, r"more than 1 spatial element"),
    ("ln", {"weight": torch.ones(4, 3)}, r"weight must have shape \(4, 4\)"),
    ("ln", {"shape": [4, 5]}, r"expected input with shape \(\*, 4, 5\)"),
    ("ln", {"x": [1.0, 2.0]}, r"expects a torch.Tensor input"),
    ("sn", {"mean_logits": torch.zeros(2)}, r"mean_logits must have 3 elements"),
    ("sn", {"sources": ("in", "ln", "ln")}, r"sources must be distinct names"),
    ("sn", {"x": torch.randn(1, 6), "sources": ("ln", "bn")}, r"expected more than 1 value per channel"),
    ("sn", {"x": torch.randn(2, 6, 1, 1), "training": False}, r"instance statistics need more than one position"),
]


@pytest.mark.parametrize("method, change, message", BAD, ids=[f"{m}-{next(iter(c))}" for m, c, _ in BAD])
def test_a_call_that_differs_in_what_is_checked_is_checked_again(method, change, message):
    call = good_calls()[method]
    call()  # prepared and kept
    with pytest.raises((ValueError, TypeError), match=message):
        call(**change)
    call()  # and the good call still runs


def test_a_geometry_is_prepared_once(monkeypatch):
    prepared_for = []

    def counting(input, *args):
        prepared_for.append((tuple(input.shape), input.dtype, input.stride()))
        return prepare(input, *args)

    prepare = group_norm_module._prepare
    monkeypatch.setattr(group_norm_module, "_prepare", counting)
    x = torch.randn(2, 4, 3, 3)
    for _ in range(3):
        NF.group_norm(x, 2)
    assert len(prepared_for) == 1
    NF.group_norm(torch.randn(2, 4, 3, 3), 2)  # another tensor, same geometry
    assert len(prepared_for) == 1
    NF.group_norm(x.double(), 2)
    NF.group_norm(x.to(memory_format=torch.channels_last), 2)
    NF.group_norm(x, 2, eps=1e-3)
    NF.group_norm(x, 2, weight=torch.ones(4))
    assert len(prepared_for) == 5


def test_a_geometry_is_prepared_again_for_another_thread_count():
    x = torch.randn(2, 4, 3, 3)
    threads = torch.get_num_threads()
    _prepared.clear_prepared()
    try:
        NF.group_norm(x, 2)
        torch.set_num_threads(1 if threads > 1 else 2)
        NF.group_norm(x, 2)
    finally:
        torch.set_num_threads(threads)
    assert len(_prepared._prepared) == 2


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "contiguous-again"])
def test_one_shape_in_every_layout_is_right(layout):
    base = torch.randn(2, 6, 5, 4) * 3 + 1
    x = {"contiguous": base, "contiguous-again": base.clone(),
         "channels_last": base.to(memory_format=torch.channels_last),
         "strided": torch.randn(2, 6, 4, 5).transpose(2, 3) * 3 + 1}[layout]
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    torch.testing.assert_close(NF.group_norm(x, 3, w, b), TF.group_norm(x, 3, w, b))
    torch.testing.assert_close(NF.layer_norm(x, (5, 4)), TF.layer_norm(x, (5, 4)))
    rm, rv, trm, trv = torch.zeros(6), torch.ones(6), torch.zeros(6), torch.ones(6)
    torch.testing.assert_close(NF.batch_norm(x, rm, rv, w, b, True), TF.batch_norm(x, trm, trv, w, b, True))
    torch.testing.assert_close((rm, rv), (trm, trv))


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(_prepared, "MAX_PREPARED", 3)
    _prepared.clear_prepared()
    for n in range(2, 9):
        NF.group_norm(torch.randn(n, 4, 3), 2)
    assert 0 < len(_prepared._prepared) <= 3
