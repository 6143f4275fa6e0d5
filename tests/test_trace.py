"""memprune.trace against hand computations: retain, edit, stop after the first call, removal of exactly its own
hooks, modules found by name and by type."""
import pytest
import torch
from torch import nn

from memprune.trace import Inputs, StopForward, Trace, find_modules


def toy() -> nn.Sequential:
    """x -> 2x -> relu -> 2x + 1, with weights set by hand (one input, one output)."""
    net = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1))
    with torch.no_grad():
        net[0].weight.fill_(2.0)
        net[0].bias.fill_(0.0)
        net[2].weight.fill_(2.0)
        net[2].bias.fill_(1.0)
    return net


def hook_count(net: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules())


def test_find_modules_by_name_and_by_type():
    net = toy()
    assert find_modules(net, names=["2", "0"]) == {"2": net[2], "0": net[0]}
    assert find_modules(net, types=nn.Linear) == {"0": net[0], "2": net[2]}
    assert find_modules(net, types=nn.ReLU) == {"1": net[1]}
    assert find_modules(net, names=[""]) == {"": net}


def test_retain_input_and_output_of_the_latest_call():
    net = toy()
    with Trace(find_modules(net, types=nn.Linear), retain_input=True, retain_output=True) as trace:
        net(torch.tensor([[1.0]]))
        out = net(torch.tensor([[3.0]]))
    assert out.item() == 13.0  # 2·(2·3) + 1
    assert trace.input["0"].args[0].item() == 3.0 and trace.output["0"].item() == 6.0
    assert trace.input["2"].args[0].item() == 6.0 and trace.output["2"].item() == 13.0
    assert not trace.output["2"].requires_grad  # detached


def test_edit_output_and_input_by_hand():
    net = toy()
    x = torch.tensor([[3.0]])
    with Trace(net[0], edit_output=lambda output, name: output * 10):
        assert net(x).item() == 2 * 60 + 1
    with Trace({"last": net[2]}, edit_input=lambda inputs, name: Inputs((inputs.args[0] - 1,), inputs.kwargs)):
        assert net(x).item() == 2 * 5 + 1
    observed = []
    with Trace(net[2], edit_output=lambda output, name: observed.append((name, output.item()))):
        assert net(x).item() == 13.0  # an edit that returns None leaves the value as it is
    assert observed == [("", 13.0)]
    assert net(x).item() == 13.0  # no edit left behind


def test_stop_after_the_first_call_is_swallowed_by_its_own_trace():
    net = toy()
    calls = []
    net[2].register_forward_hook(lambda module, args, output: calls.append(output.item()))
    with Trace(net[0], retain_output=True, stop=True) as trace:
        net(torch.tensor([[3.0]]))
        calls.append("not reached")
    assert trace.output[""].item() == 6.0 and calls == []  # the last layer never ran
    with Trace(net[2], retain_input=True, stop=True) as trace:  # input only: stops before the module runs
        net(torch.tensor([[3.0]]))
    assert trace.input[""].args[0].item() == 6.0 and calls == []
    outer = Trace(net[0], stop=True)
    with pytest.raises(StopForward):  # a trace swallows only its own stop, not another trace's
        with Trace(net[2], retain_output=True):
            with outer:
                raise StopForward(Trace(net[1]))


def test_removes_exactly_its_own_hooks_also_after_an_exception():
    net = toy()
    foreign = net[0].register_forward_hook(lambda module, args, output: None)
    before = hook_count(net)
    with Trace(find_modules(net, types=nn.Linear), retain_input=True, retain_output=True, stop=False):
        assert hook_count(net) == before + 4  # a pre-hook and a forward hook per Linear
    assert hook_count(net) == before
    with pytest.raises(RuntimeError):
        with Trace(net[0], edit_output=lambda output, name: None):
            raise RuntimeError("boom")
    assert hook_count(net) == before and len(net[0]._forward_hooks) == 1
    foreign.remove()
    assert hook_count(net) == 0
