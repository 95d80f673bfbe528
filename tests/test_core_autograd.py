"""The closed-form backward: gradcheck and gradgradcheck in float64 for every method, and what is saved.

Every feature norm goes through a `torch.autograd.Function` whose backward is SPEC §1's closed form;
`gradcheck` compares it with finite differences of the forward, `gradgradcheck` checks double backward
(torch.nn's norms support it, so normlab's must too). `saved_tensors_hooks` records what the Functions
keep for backward: the input itself (a view of the same storage) and O(N·C) statistics — never x̂ or
any other tensor of the input's size.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.autograd.graph import saved_tensors_hooks

import normlab.functional as NF
from conftest import randn

ALL = ("in", "ln", "bn")
SHAPE = (2, 3, 2, 2)  # tiny: every numerical Jacobian stays cheap


def f64(*shape, seed):
    return randn(*shape, seed=seed, dtype=torch.float64)


def sn_call(sources=ALL, training=True, authors_compat=False, running=False):
    def call(x, w, b, ml, vl):
        c = x.shape[1]
        rm = f64(c, seed=8) * 0.1 if running else None
        rv = torch.linspace(0.5, 2.0, c, dtype=torch.float64) if running else None
        return NF.switch_norm(x, ml, vl, w, b, rm, rv, training, 0.1, 1e-5, sources=sources,
                              authors_compat=authors_compat)
    return call


def running(c):
    return f64(c, seed=8) * 0.1, torch.linspace(0.5, 2.0, c, dtype=torch.float64)


# (name, function of the differentiable inputs, x shape, number of logits or 0) — why the case exists
GRAD_CASES = [
    ("bn-train", lambda x, w, b: NF.batch_norm(x, None, None, w, b, True), SHAPE, 0),  # batch statistics
    ("bn-train-1d", lambda x, w, b: NF.batch_norm(x, None, None, w, b, True), (3, 2), 0),  # (N, C) input
    ("bn-eval", lambda x, w, b: NF.batch_norm(x, *running(x.shape[1]), w, b, False), SHAPE, 0),  # constants
    ("ln", lambda x, w, b: NF.layer_norm(x, x.shape[1:], w, b), SHAPE, -1),  # elementwise affine (C, H, W)
    ("in", lambda x, w, b: NF.instance_norm(x, None, None, w, b), SHAPE, 0),  # per (n, c)
    ("in-eval", lambda x, w, b: NF.instance_norm(x, *running(x.shape[1]), w, b, False), SHAPE, 0),
    ("gn", lambda x, w, b: NF.group_norm(x, 2, w, b), (2, 4, 3), 0),  # 2 channels per group
    ("gn-cl", lambda x, w, b: NF.group_norm(x.contiguous(memory_format=torch.channels_last), 2, w, b),
     (2, 4, 2, 2), 0),  # the channels_last view has other reduction dims
    *[(f"sn-{'+'.join(s)}", sn_call(s), SHAPE, len(s))  # every non-empty subset of SN's sources
      for s in [("in",), ("ln",), ("bn",), ("in", "ln"), ("in", "bn"), ("ln", "bn"), ALL]],
    ("sn-1d", sn_call(("ln", "bn")), (3, 2), 2),  # (N, C): SwitchNorm1d's LN and BN
    ("sn-authors", sn_call(authors_compat=True), SHAPE, 3),  # unbiased IN variance feeding LN/BN
    ("sn-authors-1d", sn_call(("ln", "bn"), authors_compat=True), (3, 2), 2),  # unbiased over C and N
    ("sn-eval", sn_call(training=False, running=True), SHAPE, 3),  # BN source from running statistics
    ("sn-eval-authors", sn_call(training=False, authors_compat=True, running=True), SHAPE, 3),
    ("sn-cl", lambda x, *p: sn_call()(x.contiguous(memory_format=torch.channels_last), *p), SHAPE, 3),
    ("sn-3d", sn_call(), (2, 2, 2, 1, 2), 3),  # 5-d input
]


def grad_inputs(shape, logits):
    """x, weight, bias (per channel, or elementwise over shape[1:] when logits == -1) and the logits."""
    pshape = shape[1:] if logits == -1 else (shape[1],)
    inputs = [f64(*shape, seed=1), f64(*pshape, seed=2) * 0.5 + 1, f64(*pshape, seed=3)]
    if logits > 0:
        inputs += [f64(logits, seed=4), f64(logits, seed=5)]
    return [t.requires_grad_() for t in inputs]


@pytest.mark.parametrize(("name", "fn", "shape", "logits"), GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradcheck(name, fn, shape, logits):
    assert gradcheck(fn, grad_inputs(shape, logits), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("name", "fn", "shape", "logits"), GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradgradcheck(name, fn, shape, logits):
    assert gradgradcheck(fn, grad_inputs(shape, logits), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["bn-train", "in", "gn", "sn-in+ln+bn"])
def test_gradcheck_without_affine(name):
    fn, shape, logits = {c[0]: c[1:] for c in GRAD_CASES}[name]
    x, _, _, *logit_inputs = grad_inputs(shape, logits)
    assert gradcheck(lambda x, *p: fn(x, None, None, *p), [x, *logit_inputs], eps=1e-6, atol=1e-6, rtol=1e-5)


def test_double_backward_matches_torch():
    """A gradient penalty (‖∂y/∂x‖² differentiated again) agrees with torch's own group_norm."""
    x = f64(2, 4, 3, seed=1).requires_grad_()
    w, b = f64(4, seed=2).requires_grad_(), f64(4, seed=3).requires_grad_()
    results = []
    for fn in (NF.group_norm, torch.nn.functional.group_norm):
        (gx,) = torch.autograd.grad((fn(x, 2, w, b) ** 3).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (x, w, b)))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- what is saved for backward

def record_saved(fn, *args):
    """Run fn(*args) recording every tensor autograd saves; returns (output, saved tensors)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


def same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def sn(sources=ALL, **kwargs):
    return lambda x, w, b: NF.switch_norm(x, torch.zeros(len(sources), requires_grad=True),
                                          torch.zeros(len(sources), requires_grad=True), w, b,
                                          training=True, sources=sources, **kwargs)


# (name, call, shape) — shapes large enough that N·C is far below the input's numel
SAVED_CASES = [
    ("bn", lambda x, w, b: NF.batch_norm(x, None, None, w, b, True), (2, 4, 6, 6)),
    ("ln", lambda x, w, b: NF.layer_norm(x, x.shape[1:]), (2, 4, 6, 6)),  # SPEC's LN: per sample
    ("ln-last2", lambda x, w, b: NF.layer_norm(x, x.shape[-2:]), (2, 4, 6, 6)),  # torch-style, per (n, c)
    ("in", lambda x, w, b: NF.instance_norm(x, None, None, w, b), (2, 4, 6, 6)),
    ("gn", lambda x, w, b: NF.group_norm(x, 2, w, b), (2, 4, 6, 6)),
    ("gn-3d", lambda x, w, b: NF.group_norm(x, 2, w, b), (2, 4, 3, 3, 4)),
    ("sn", sn(), (2, 4, 6, 6)),
    ("sn-in+ln", sn(("in", "ln")), (2, 4, 6, 6)),
    ("sn-authors", sn(authors_compat=True), (2, 4, 6, 6)),
    ("sn-1d", sn(("ln", "bn")), (16, 4)),  # (N, C): O(N·C) is the input's size there, still no copy
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(("name", "fn", "shape"), SAVED_CASES, ids=[c[0] for c in SAVED_CASES])
def test_saves_only_input_and_per_set_statistics(name, fn, shape, layout, dtype):
    if layout == "channels_last" and len(shape) < 4:
        pytest.skip("channels_last needs spatial dims")
    if layout == "channels_last" and name == "ln-last2":
        pytest.skip("LN over trailing spatial dims of a channels_last input reads strided rows: it copies "
                    "them into (rows, elements) like torch.nn does; only LN over (C, *spatial) is copy-free")
    x = randn(*shape, seed=1, dtype=dtype)
    if layout == "channels_last":
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    x.requires_grad_()
    n, c = shape[:2]
    w = torch.ones(c, dtype=dtype, requires_grad=True)
    b = torch.zeros(c, dtype=dtype, requires_grad=True)
    out, saved = record_saved(fn, x, w, b)
    assert saved, "nothing saved: the hooks did not see the autograd Function"
    inputs_saved = [t for t in saved if same_storage(t, x)]
    assert len(inputs_saved) >= 1, "the input is not saved as a view (it must be, to avoid a copy)"
    for t in saved:
        if same_storage(t, x) or same_storage(t, w) or same_storage(t, b):
            continue
        assert t.numel() <= n * c, (
            f"saved a tensor of shape {tuple(t.shape)} ({t.numel()} values) that is not the input: "
            f"only O(N·C) = {n * c} statistics may be saved"
        )
    input_sized = [t for t in saved if t.numel() >= x.numel() > n * c]  # (N, C) input: N·C is its size
    assert all(same_storage(t, x) for t in input_sized), "an input-sized tensor other than x is saved (x̂?)"
    # the saved tensors are the ones backward uses: gradients still flow
    out.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
