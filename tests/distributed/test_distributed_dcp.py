"""Distributed Checkpoint of an expert-parallel model: gloo on the CPU, 4 processes.

The routed expert banks are ``DTensor`` s sharded ``Shard(0)`` over the EP mesh, so
``torch.distributed.checkpoint`` stores each bank once, at its global shape, and loads it
at another EP size or into the unsharded model. Each child builds the reference model from
one seed, saves it at EP=2 (a 2 x 2 dp x ep mesh), loads it into differently initialised
models at EP=4 and EP=1 (and from EP=4 back at EP=2), and compares the logits with the
reference's (fp32).
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from _helpers import free_port, run_ranks
from test_distributed_ep import _child_env, _close, _entry
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dasg_model import DASGConfig, DASGForCausalLM
from dasg_model.parallel import apply_expert_parallel


def _config() -> DASGConfig:
    return DASGConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                      attention_window=8, group_size=4, shallow_shared_size=16, deep_shared_size=32,
                      shallow_num_experts=4, shallow_expert_size=16, deep_num_experts=8, deep_expert_size=32,
                      top_p=0.9, k_max=3, backend="torch")


def _model(seed: int, cfg: DASGConfig) -> DASGForCausalLM:
    torch.manual_seed(seed)
    model = DASGForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.moe.router.shallow_router, layer.moe.router.deep_router):
                lin.weight.normal_(std=0.3)  # tokens spread over the experts of several ranks
    return model.eval()


def _load(model: torch.nn.Module, path: str) -> None:
    sd = model.state_dict()
    dcp.load(sd, checkpoint_id=path)
    model.load_state_dict(sd)


def _dcp_worker(rank, world, path2, path4):
    cfg = _config()
    ref = _model(0, cfg)
    b = 2
    ids = torch.randint(0, cfg.vocab_size, (world * b, 12), generator=torch.Generator().manual_seed(7))
    mine = slice(rank * b, (rank + 1) * b)
    with torch.no_grad():
        want = ref(ids).logits

    def logits(model, shard=True):
        with torch.no_grad():
            return model(ids[mine] if shard else ids).logits

    # save at EP=2 on a 2 x 2 (dp x ep) mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    m2 = apply_expert_parallel(copy.deepcopy(ref), mesh["ep"])
    _close("EP=2 logits", logits(m2), want[mine], 1e-5)
    dcp.save(m2.state_dict(), checkpoint_id=path2)
    meta = dcp.FileSystemReader(path2).read_metadata().state_dict_metadata
    for name, p in ref.named_parameters():  # the banks stored once, at their global shape
        assert tuple(meta[name].size) == tuple(p.shape), f"{name}: {meta[name].size} != {tuple(p.shape)}"

    # load at EP=4 into another initialisation
    ep4 = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    m4 = apply_expert_parallel(_model(1, cfg), ep4)
    assert isinstance(m4.model.layers[0].moe.deep_experts.down_proj, DTensor)
    before = logits(m4)
    assert (before - want[mine]).abs().max() > 1e-2, "the fresh model must differ before the load"
    _load(m4, path2)
    _close("EP=4 logits after loading the EP=2 checkpoint", logits(m4), want[mine], 1e-5)

    # load at EP=1: the unsharded model gets the whole banks; same weights, same logits
    m1 = _model(2, cfg)
    _load(m1, path2)
    assert torch.equal(logits(m1, shard=False), want), "EP=1 logits differ after loading the EP=2 checkpoint"

    # and from EP=4 back to EP=2 (bitwise exchange this time)
    dcp.save(m4.state_dict(), checkpoint_id=path4)
    m2b = apply_expert_parallel(_model(3, cfg), mesh["ep"], bitwise=True)
    _load(m2b, path4)
    _close("EP=2 logits after loading the EP=4 checkpoint", logits(m2b), want[mine], 1e-5)
    dist.barrier()


def test_dcp_reshards_expert_parallel_checkpoint(tmp_path):
    """DCP save at EP=2 (dp 2 x ep 2), load at EP=4, EP=1 (unsharded) and back at EP=2 from an
    EP=4 save: the banks are stored at their global shapes and the logits equal the model's."""
    world = 4
    with _child_env():
        run_ranks(_entry, world, (world, free_port(), _dcp_worker,
                                  (str(tmp_path / "ep2"), str(tmp_path / "ep4"))))
