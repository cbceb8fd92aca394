"""Train a tiny DASGForCausalLM on random tokens with expert (and context) parallelism.

    torchrun --nproc-per-node 2 examples/train_distributed.py --ep 2
    torchrun --nproc-per-node 4 examples/train_distributed.py --ep 2          # 2 x 2 (dp x ep)
    torchrun --nproc-per-node 2 examples/train_distributed.py --ep 2 --k-max 4 --bitwise
    torchrun --nproc-per-node 2 examples/train_distributed.py --cp 2
    torchrun --nproc-per-node 2 examples/train_distributed.py --cp 2 --layout zigzag

gloo on the CPU, NCCL on GPUs (chosen by ``torch.cuda.is_available()``). The ranks form a
``(dp, cp, ep)`` device mesh (``world = dp * cp * ep``); every rank feeds its own batch
(CP ranks: their sequence shard). Each step prints the loss and tokens/s (all ranks), and
the bytes communicated per step, counted at the collectives (forward + backward, sent to
other ranks, summed over all ranks):

- EP: the all-to-alls (token rows, their routing weights and ids, the partial sums back, and
  their gradients), next to the bytes of one row per distinct remote (token, rank, level)
  destination each way (``x`` the ratio; ``--bitwise`` sends one row per (token, slot)
  instead), the byte model of :func:`dasg_model.parallel.cost.ep_bytes_per_row` on the rows
  sent, and the mean number of EP ranks a token's routed experts live on (``--n-group ep
  --topk-group 1`` bounds it at 1);
- CP: the halo all-to-all, the summary all-gather and their backwards
  (``dasg_kernels.context_parallel.cp_comm_stats``).

At the end rank 0 prints the scale-out cost model (a prediction: bytes and times per layer
at 8, 64 and 256 GPUs on NVLink and InfiniBand against the kernels' predicted compute time,
:mod:`dasg_model.parallel.cost`) for this run's EP layer and for the reference workloads of
``benchmarks/results/scaleout-cost.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dasg_model import DASGConfig, DASGForCausalLM  # noqa: E402
from dasg_model.parallel import apply_context_parallel, apply_expert_parallel  # noqa: E402
from dasg_model.parallel import cost  # noqa: E402
from dasg_model.parallel.expert import allreduce_gradients, ep_comm_stats  # noqa: E402
from dasg_kernels.context_parallel import CP_LAYOUTS, cp_comm_stats, cp_shard  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (divides the world size)")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size")
    p.add_argument("--layout", choices=list(CP_LAYOUTS), default="contiguous",
                   help="CP shard order: contiguous, or zigzag (balanced work; --seq divisible by 2 * cp)")
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
    p.add_argument("--bitwise", action="store_true", help="EP: the per-slot exchange (results bitwise "
                   "independent of ep; about k times the bytes)")
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
    n_chunks = 2 * cp if args.layout == "zigzag" else cp
    if args.seq % n_chunks:
        raise SystemExit(f"--seq {args.seq} is not divisible by {n_chunks} (--cp {cp}, --layout {args.layout}: "
                         f"CP needs equal chunks)")
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
        apply_context_parallel(model, mesh["cp"], layout=args.layout)
    if ep > 1:
        apply_expert_parallel(model, mesh["ep"], bitwise=args.bitwise)
    n_params = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    log(f"world {world} = dp {dp} x cp {cp} x ep {ep} on {device.type} ({dist.get_backend()}), {dtype}, "
        f"{n_params / 1e6:.2f} M parameters on rank 0 (experts: {args.experts // ep} of {args.experts} per level)")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    # a data shard per rank; the CP ranks of a group share one (each feeds its sequence shard)
    data_rank = mesh["dp"].get_local_rank() * ep + mesh["ep"].get_local_rank()
    gen = torch.Generator().manual_seed(args.seed + 1000 + data_rank)
    seq_local = args.seq // cp
    tokens_per_step = world * args.batch * seq_local
    row_bytes = cfg.hidden_size * torch.finfo(dtype).bits // 8
    per_row = cost.ep_bytes_per_row(cfg.hidden_size, torch.finfo(dtype).bits // 8, 2 * cfg.k_max,
                                    1 if 2 * args.experts // ep <= 127 else 4, bitwise=args.bitwise)
    a2a_phases = ("dispatch", "dispatch_meta", "combine", "dispatch_bwd", "dispatch_meta_bwd", "combine_bwd")
    cp_comm_stats(reset=True)
    for step in range(args.steps):
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=gen)
        ids = cp_shard(ids.to(device), group=mesh["cp"], layout=args.layout) if cp > 1 else ids.to(device)
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
        a2a = sum(comm.get(k, 0) for k in a2a_phases)
        ranks = [float(o.stats.get(f"{lv}/mean_ranks_per_token", 1.0)) for o in out.moe for lv in ("shallow", "deep")]
        stats = torch.tensor([out.loss.item(), dt, a2a, comm.get("rows/sent", 0), comm.get("rows/token_rank_level", 0),
                              comm["total"] - a2a, sum(ranks) / len(ranks),
                              cp_sent["total"], cp_sent.get("halo", 0) + cp_sent.get("halo_bwd", 0)],
                             dtype=torch.float64)
        dist.all_reduce(stats)
        loss, dt_mean, sent, rows_sent, rows_trl, other, ranks_mean, cp_total, cp_halo = stats.tolist()
        dt_mean /= world
        msg = f"step {step}: loss {loss / world:.4f}  {tokens_per_step / dt_mean:,.0f} tokens/s"
        if ep > 1:
            dest = 4 * rows_trl * row_bytes  # one row per distinct (token, rank, level), each way, fwd + bwd
            msg += (f"  EP sent/step, all ranks: {sent / 1e6:.3f} MB all-to-all "
                    f"(byte model on the {rows_sent:.0f} rows sent: {rows_sent * sum(per_row) / 1e6:.3f} MB) "
                    f"= {sent / dest:.2f} x one row per distinct (token, rank, level) ({rows_trl:.0f}; "
                    f"{dest / 1e6:.3f} MB), + {other / 1e3:.1f} kB counts/stats; "
                    f"{ranks_mean / world:.2f} EP ranks per routed token; "
                    f"host syncs {comm['host_syncs']} on rank 0 (1 per MoE layer)")
        if cp > 1:
            msg += (f"  CP sent/step, all ranks: {cp_total / 1e6:.3f} MB (halo {cp_halo / 1e6:.3f} MB, "
                    f"summaries + arg checks {(cp_total - cp_halo) / 1e6:.3f} MB)")
        log(msg)
    if dist.get_rank() == 0:
        print_cost_model(cfg, args.batch * seq_local, ep)
    dist.destroy_process_group()


def print_cost_model(cfg: DASGConfig, tokens: int, ep: int) -> None:
    """The scale-out cost model (a PREDICTION) for this run's MoE layer at this run's EP size
    and those of 8, 64, 256 that divide its experts (uniform routing: compare the rows per
    token with the measured ones), and for the reference workloads."""
    print("\nScale-out cost model (PREDICTION, not measured; dasg_model/parallel/cost.py): per layer, "
          "forward + backward, H100 SXM links and the kernels' predicted TFLOP/s")
    work = cost.EPWorkload.from_config(cfg, tokens)
    sizes = [g for g in sorted({ep, 8, 64, 256} - {1})
             if cfg.shallow_num_experts % g == 0 and cfg.deep_num_experts % g == 0]
    if sizes:
        print(f"this run's MoE layer ({tokens} tokens per GPU, k = k_max = {cfg.k_max}, bf16):")
        print(cost.scaleout_markdown(cost.scaleout_rows(work, None, sizes)))
    else:
        print(f"(this run's {cfg.shallow_num_experts} experts per level divide none of {ep}, 8, 64, 256 GPUs)")
    print("reference workloads (benchmarks/results/scaleout-cost.md):")
    print(cost.scaleout_markdown(cost.scaleout_rows(cost.REFERENCE_EP, cost.REFERENCE_CP, cp_weak_local=16384)))


if __name__ == "__main__":
    main()
