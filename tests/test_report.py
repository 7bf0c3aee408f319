"""What a report tells: every merge and refusal (the cost model's too), parameters as parameters."""
import torch
import torchvision

import fxcompress

X = (torch.randn(1, 3, 32, 32),)


def mobilenet_v2():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=10).eval()


def test_merges_the_cost_model_refuses_are_reported_with_their_costs():
    model = mobilenet_v2()
    expand = "features.2.conv.0.2:hardtanh"  # alone, it unlocks 1x1 -> depthwise 3x3 = a dense 3x3: more MACs
    report = fxcompress.compress(model, X, plan=fxcompress.Plan.linearize([expand])).report
    refused = [skip for skip in report.skips if skip.pass_name == "merge_conv_chain" and "cost more" in skip.reason]
    assert "features.2.conv.1.0:conv#1" in [skip.node for skip in refused]  # the depthwise conv after it
    assert "params" in refused[0].reason and "merge_conv_chain: not merged with its producer" in str(report)
    forced = fxcompress.compress(model, X, plan=fxcompress.Plan.linearize([expand]), force=True).report
    assert not [skip for skip in forced.skips if "cost more" in skip.reason]


def test_params_count_parameters_and_buffers_apart_under_export_and_dynamo():
    model = mobilenet_v2()
    parameters = sum(p.numel() for p in model.parameters())
    statistics = sum(b.numel() for name, b in model.named_buffers() if "running" in name)
    exported = fxcompress.compress(model, X).report.before
    reports = []
    compiled = torch.compile(model, backend="depthprune", options={"lowering": "eager", "on_report": reports.append})
    with torch.no_grad():
        compiled(*X)
    for before in (exported, reports[0].before):
        assert before.params == parameters
        assert statistics <= before.buffers <= statistics + 52  # export keeps num_batches_tracked, dynamo not
