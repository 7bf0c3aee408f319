"""The caller's model under concurrent calls, and verification of models that edit their inputs in place."""
import copy
import threading

import torch
from torch import nn

import fxcompress
from helpers import randomize_batchnorm

THREADS = 4


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                             nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())).eval()


def run_in_threads(calls) -> list:
    """Run each call in its own thread, all released at once; return what each raised (None if nothing)."""
    start = threading.Barrier(len(calls))
    raised = [None] * len(calls)

    def worker(index):
        start.wait()
        try:
            calls[index]()
        except Exception as error:  # collected and judged by the test
            raised[index] = error

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return raised


def test_concurrent_compress_find_plan_and_backend_leave_the_model_intact():
    model = small_net()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)  # built before any call: an independent copy of the weights
    parameters = list(model.parameters())
    results = {}

    def compress(index):
        results[index] = fxcompress.compress(model, (x,)).module

    def find_plan():
        fxcompress.find_plan(model, (x,), criterion="bn")

    def backend(index):
        with torch.no_grad():
            compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager"})
            compiled(x)  # compilation happens at the first call
            results[index] = compiled

    calls = [lambda: compress(0), find_plan, lambda: backend(2), lambda: compress(3)][:THREADS]
    raised = run_in_threads(calls)

    assert [id(p) for p in model.parameters()] == [id(p) for p in parameters]
    for parameter, original in zip(model.parameters(), reference.parameters()):
        assert type(parameter) is nn.Parameter
        assert not isinstance(parameter.data, torch._subclasses.FakeTensor)
        assert torch.equal(parameter, original)
    assert all(error is None or isinstance(error, fxcompress.FxCompressError) for error in raised), raised
    assert raised == [None] * THREADS, raised
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(model(x), expected)
        for module in results.values():
            assert torch.allclose(module(x), expected, rtol=1e-4, atol=1e-5)


class SubtractsInPlace(nn.Module):
    """conv -> BN -> ReLU after editing its input in place, as some preprocessing layers do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        x.sub_(0.5)
        return self.relu(self.bn(self.conv(x)))


def test_model_that_edits_its_input_in_place_is_folded_not_rolled_back():
    torch.manual_seed(0)
    model = randomize_batchnorm(SubtractsInPlace()).eval()
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    caller_x = x.clone()
    result = fxcompress.compress(model, (caller_x,))
    assert torch.equal(caller_x, x)  # the caller's input is not edited either
    assert [r.pass_name for r in result.report.rewrites].count("fold_batchnorm") == 1
    assert not [check for check in result.report.checks if check.rolled_back], result.report.checks
    # reference in plain torch: subtract, conv, BN in eval mode, ReLU
    conv, bn = model.conv, model.bn
    fresh = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.relu((nn.functional.conv2d(fresh - 0.5, conv.weight, conv.bias, padding=1)
                               - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
                              * bn.weight[:, None, None] + bn.bias[:, None, None])
        actual = result.module(fresh.clone())
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)
