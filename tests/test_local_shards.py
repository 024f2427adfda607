"""crosschip.parallel.local_shards: a module holding plain local shards (as Transformer Engine's
tensor-parallel layers do) is seen as DTensors by state_dict / load_state_dict, and its gradients
likewise, without copies. Two gloo ranks on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from crosschip.parallel import local_shards
from gloo_spawn import spawn


def _module(rank: int, world: int):
    """A "column-parallel" layer: rank r holds rows [2r, 2r + 2) of an (2 * world, 3) weight and
    its bias; a "row-parallel" one holds columns [2r, 2r + 2) of a (3, 2 * world) weight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    module = nn.Module()
    module.column = nn.Linear(3, 2)
    module.row = nn.Linear(2, 3)
    local_shards.declare(module, {"column.weight": (mesh, [Shard(0)]), "column.bias": (mesh, [Shard(0)]),
                                  "row.weight": (mesh, [Shard(1)])})
    return module, mesh


def _check(rank: int, world: int, root) -> None:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from crosschip.checkpoint.sharded_load import local_region

    module, mesh = _module(rank, world)
    whole = {"column.weight": torch.arange(2 * world * 3.0).reshape(2 * world, 3),
             "column.bias": torch.arange(2.0 * world), "row.weight": torch.arange(3 * 2.0 * world).reshape(3, -1),
             "row.bias": torch.tensor([1.0, 2.0, 3.0])}

    # Loading DTensors (as the weight adapter's targets are placed) fills each local shard.
    state = module.state_dict()
    assert isinstance(state["column.weight"], DTensor) and state["column.weight"].shape == (2 * world, 3)
    assert isinstance(state["row.weight"], DTensor) and state["row.weight"].shape == (3, 2 * world)
    assert not isinstance(state["row.bias"], DTensor)  # undeclared: replicated, plain
    placed = {k: distribute_tensor(v, mesh, state[k].placements) if isinstance(state[k], DTensor) else v
              for k, v in whole.items()}
    module.load_state_dict(placed)
    assert torch.equal(module.column.weight, whole["column.weight"][2 * rank:2 * rank + 2])
    assert torch.equal(module.row.weight, whole["row.weight"][:, 2 * rank:2 * rank + 2])
    assert torch.equal(module.row.bias, whole["row.bias"])
    # The local shards themselves load too.
    module.load_state_dict({k: v.to_local() if isinstance(v, DTensor) else v for k, v in placed.items()})

    # Saving gathers: every rank sees the whole tensors.
    for key, value in module.state_dict().items():
        gathered = value.full_tensor() if isinstance(value, DTensor) else value
        assert torch.equal(gathered, whole[key]), key

    # A streaming load finds this rank's region and writes into the parameter through the view.
    view = module.state_dict()["row.weight"]
    assert local_region(view) == ((0, 3), (2 * rank, 2 * rank + 2))
    with torch.no_grad():
        view.to_local().fill_(7.0)
    assert bool((module.row.weight == 7.0).all())

    # Gradients: plain local tensors, presented as DTensor views sharing their storage.
    x = torch.ones(4, 3)
    module.row(module.column(x)).sum().backward()
    grads = local_shards.gradients(module.parameters())
    kinds = [isinstance(g, DTensor) for g in grads]
    assert kinds == [True, True, True, False]  # column.weight, column.bias, row.weight, row.bias
    assert grads[0].placements == (Shard(0),) and grads[2].shape == (3, 2 * world)
    before = module.column.weight.grad.clone()
    grads[0].mul_(0.5)  # scaling the view scales the gradient (what gradient clipping does)
    assert torch.equal(module.column.weight.grad, before * 0.5)
    named = local_shards.global_views(module, {n: p.grad for n, p in module.named_parameters()})
    assert isinstance(named["row.weight"], DTensor) and not isinstance(named["row.bias"], DTensor)
    _check_optimizer_state(module, root, rank, world)


def _check_optimizer_state(module, root, rank: int, world: int) -> None:
    """A distributed checkpoint of the optimizer state saves every rank's part of each shard's
    moments and loads each rank's own part back in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    optimizer.step()
    _, optim_state = get_state_dict(module, optimizer)
    views = local_shards.optimizer_state_views(module, optim_state)
    moment = views["state"]["column.weight"]["exp_avg"]
    assert isinstance(moment, DTensor) and moment.shape == (2 * world, 3)
    assert not isinstance(views["state"]["row.bias"]["exp_avg"], DTensor)
    assert not isinstance(views["state"]["column.weight"]["step"], DTensor)
    expected = {k: {n: v.clone() for n, v in e.items()} for k, e in optim_state["state"].items()}
    dcp.save({"optim": views}, checkpoint_id=str(root / "optim"))

    fresh = torch.optim.AdamW(module.parameters(), lr=0.1)
    fresh.step()  # state of the right shapes, to be overwritten
    for entry in fresh.state.values():
        entry["exp_avg"].fill_(-1.0)
    _, fresh_state = get_state_dict(module, fresh)
    dcp.load({"optim": local_shards.optimizer_state_views(module, fresh_state)}, checkpoint_id=str(root / "optim"))
    set_state_dict(module, fresh, model_state_dict={}, optim_state_dict=fresh_state)  # filled in place
    for fqn, entry in expected.items():
        assert torch.equal(fresh.state[module.get_parameter(fqn)]["exp_avg"], entry["exp_avg"]), fqn


def test_local_shards_look_like_dtensors(tmp_path):
    spawn(2, tmp_path, _check)


def test_declaring_an_unknown_parameter_is_an_error():
    with pytest.raises(KeyError, match="has no parameter 'weigth'"):
        local_shards.declare(nn.Linear(2, 2), {"weigth": (None, ())})
    assert local_shards.declared(nn.Linear(2, 2)) == {}
