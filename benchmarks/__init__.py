"""dasg-kernels benchmark suite.

``python -m benchmarks`` runs every family (attention, MoE, the whole model), checks
each kernel against the PyTorch reference before timing it, and writes
``benchmarks/results/<device>-<date>.json`` plus a Markdown report and PNG plots.
See :mod:`benchmarks.runner` for the command line and :mod:`benchmarks.report`
for the report and the README snippet.

Layout (one file per op family, as in ``dasg_kernels/<family>/``):

- ``common.py``          timing (``triton.testing.do_bench`` on CUDA), FLOP counting,
                         correctness checks, the environment header, progress output
- ``bench_attention.py`` ``swa_attention`` vs SDPA (dense mask), FlexAttention, SDPA flash
- ``bench_varlen.py``    ``swa_attention_varlen`` (packed sequences) vs padding and FlexAttention
                         with a document mask
- ``bench_moe.py``       ``expert_ffn`` / ``route`` vs the per-expert loop, ``torch._grouped_mm``,
                         an equal-FLOP dense GEMM, and the decode memory bound
- ``bench_model.py``     ``DASGForCausalLM``: ours vs the PyTorch-reference model vs dense SDPA
- ``runner.py``          the command line behind ``python -m benchmarks``
- ``report.py``          JSON -> Markdown + PNG plots; ``--latest`` writes ``results/LATEST.md``
- ``offline/``           what the kernels compile to on Hopper without a GPU (the compile report,
                         its calibration, experiments); ``compile_report.py`` and ``calibrate.py``
                         here are their commands
- ``quality/``           model quality of the attention variants (``python -m benchmarks.quality``)
"""
import os as _os

# Triton reads TRITON_INTERPRET when a kernel is decorated, so on a machine without a
# GPU it must be set before anything imports dasg_kernels (this package does so first).
try:  # pragma: no cover - depends on the machine
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ.setdefault("TRITON_INTERPRET", "1")
except Exception:  # pragma: no cover
    pass
