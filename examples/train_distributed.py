"""Train a tiny DASGForCausalLM on random tokens with expert (and context) parallelism.

    torchrun --nproc-per-node 2 examples/train_distributed.py --ep 2
    torchrun --nproc-per-node 4 examples/train_distributed.py --ep 2          # 2 x 2 (dp x ep)
    torchrun --nproc-per-node 2 examples/train_distributed.py --cp 2

gloo on the CPU, NCCL on GPUs (chosen by ``torch.cuda.is_available()``). The ranks form a
``(dp, cp, ep)`` device mesh (``world = dp * cp * ep``); every rank feeds its own batch
(CP ranks: their sequence shard). Each step prints the loss and tokens/s (all ranks), and
the bytes communicated per step, counted at the collectives (forward + backward, sent to
other ranks, summed over all ranks):

- EP: the two all-to-alls, beside the cost model ``2 * rows * D * dtype_size * (ep - 1) / ep``
  per direction and layer (rows = routed (token, expert) pairs, both levels), and the mean
  number of EP ranks a token's routed experts live on (``--n-group ep --topk-group 1``
  bounds it at 1);
- CP: the halo all-to-all, the summary all-gather and their backwards
  (``dasg_kernels.distributed.cp_comm_stats``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dasg_model import DASGConfig, DASGForCausalLM  # noqa: E402
from dasg_model.parallel import apply_context_parallel, apply_expert_parallel  # noqa: E402
from dasg_model.parallel.expert import allreduce_gradients, ep_comm_stats  # noqa: E402
from dasg_kernels.distributed import cp_comm_stats  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (divides the world size)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4, help="sequences per data shard")
    p.add_argument("--seq", type=int, default=128, help="sequence length (whole, before CP sharding)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8, help="routed experts per level")
    p.add_argument("--k-max", type=int, default=2)
    p.add_argument("--n-group", type=int, default=1, help="ADR expert groups per level (a multiple of ep "
                   "maps groups onto EP ranks)")
    p.add_argument("--topk-group", type=int, default=None, help="groups a token may use (bounds the EP "
                   "ranks it visits)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    world = dist.get_world_size()

    ep, cp = args.ep, args.cp
    if world % (ep * cp):
        raise SystemExit(f"world size {world} is not divisible by ep * cp = {ep * cp}")
    if args.seq % cp:
        raise SystemExit(f"--seq {args.seq} is not divisible by --cp {cp} (CP needs equal shards)")
    dp = world // (ep * cp)
    cfg = DASGConfig(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers, num_heads=4, num_kv_heads=2,
                     attention_window=32, group_size=8, shallow_shared_size=32, deep_shared_size=128,
                     shallow_num_experts=args.experts, shallow_expert_size=32, deep_num_experts=args.experts,
                     deep_expert_size=64, k_max=args.k_max, n_group=args.n_group, topk_group=args.topk_group,
                     backend=args.backend, max_position_embeddings=max(4096, args.seq))
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = DASGForCausalLM(cfg).to(device=device, dtype=dtype)

    mesh = init_device_mesh(device.type, (dp, cp, ep), mesh_dim_names=("dp", "cp", "ep"))
    if cp > 1:
        apply_context_parallel(model, mesh["cp"])
    if ep > 1:
        apply_expert_parallel(model, mesh["ep"])
    n_params = sum(p.numel() for p in model.parameters())
    log(f"world {world} = dp {dp} x cp {cp} x ep {ep} on {device.type} ({dist.get_backend()}), {dtype}, "
        f"{n_params / 1e6:.2f} M parameters on rank 0 (experts: {args.experts // ep} of {args.experts} per level)")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    # a data shard per rank; the CP ranks of a group share one (each feeds its sequence shard)
    cp_rank = mesh["cp"].get_local_rank()
    data_rank = mesh["dp"].get_local_rank() * ep + mesh["ep"].get_local_rank()
    gen = torch.Generator().manual_seed(args.seed + 1000 + data_rank)
    seq_local = args.seq // cp
    tokens_per_step = world * args.batch * seq_local
    row_bytes = cfg.hidden_size * torch.finfo(dtype).bits // 8
    cp_comm_stats(reset=True)
    for step in range(args.steps):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
        ids = ids[:, cp_rank * seq_local:(cp_rank + 1) * seq_local].to(device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(ids, labels=ids)
        out.loss.backward()
        allreduce_gradients(model, mesh["ep"], [mesh["dp"], mesh["cp"]])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        comm = ep_comm_stats(model, reset=True)
        cp_sent = cp_comm_stats(reset=True)
        # the cost model: rows this rank routed (both levels, all layers), each D * dtype bytes,
        # dispatch + combine, forward + backward, the share (ep - 1) / ep leaving the rank
        rows = sum(float(o.stats[f"{lv}/mean_experts_per_token"] * o.stats[f"{lv}/num_tokens"]) / ep
                   for o in out.moe for lv in ("shallow", "deep"))
        model_bytes = 4 * rows * row_bytes * (ep - 1) / ep
        a2a = sum(comm.get(k, 0) for k in ("dispatch", "combine", "dispatch_bwd", "combine_bwd"))
        ranks = [float(o.stats.get(f"{lv}/mean_ranks_per_token", 1.0)) for o in out.moe for lv in ("shallow", "deep")]
        stats = torch.tensor([out.loss.item(), dt, a2a, model_bytes, sum(ranks) / len(ranks),
                              cp_sent["total"], cp_sent.get("halo", 0) + cp_sent.get("halo_bwd", 0)],
                             dtype=torch.float64)
        dist.all_reduce(stats)
        loss, dt_mean, sent, est, ranks_mean, cp_total, cp_halo = stats.tolist()
        dt_mean /= world
        msg = f"step {step}: loss {loss / world:.4f}  {tokens_per_step / dt_mean:,.0f} tokens/s"
        if ep > 1:
            msg += (f"  EP sent/step: rank 0 {a2a / 1e3:.1f} kB all-to-all + {(comm['total'] - a2a) / 1e3:.2f} kB "
                    f"counts/stats; all ranks {sent / 1e6:.3f} MB all-to-all (cost model {est / 1e6:.3f} MB); "
                    f"{ranks_mean / world:.2f} EP ranks per routed token; "
                    f"host syncs {comm['host_syncs']} (1 per MoE layer)")
        if cp > 1:
            msg += (f"  CP sent/step, all ranks: {cp_total / 1e6:.3f} MB (halo {cp_halo / 1e6:.3f} MB, "
                    f"summaries + arg checks {(cp_total - cp_halo) / 1e6:.3f} MB)")
        log(msg)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
