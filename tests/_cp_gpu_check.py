"""Run by tests/test_pipeline_cp.py under `torchdist launch -n 2` on two CUDA devices: ring
attention (cp=2) must train like one device on the whole sequences."""

import torch
from _pipeline_models import AttentionModel
from test_pipeline_cp import ATOL, BATCHES, SEQ, reference, train

import torchdist as td

with torch.random.fork_rng():
    torch.manual_seed(0)
    MODEL = AttentionModel(seq=SEQ)

topo = td.Topology.from_env(cp=2, dp_shard=1)
with td.distributed(topo) as topo:
    torch.backends.cuda.enable_math_sdp(False)  # flash / efficient kernels: CP handles those
    on_device = [(x.to(topo.device), y.to(topo.device)) for x, y in BATCHES]
    ref_params, ref_losses, _ = reference(MODEL.to(topo.device), on_device)
    params, losses, _, _ = train(topo, MODEL)
    diff = max((params[n] - ref_params[n].cpu()).abs().max().item() for n in params)
    loss_diff = max(abs(a.item() - b.item()) for a, b in zip(losses, ref_losses))
    print(f"rank {topo.rank}: param diff {diff:.2e}, loss diff {loss_diff:.2e}")
    if diff <= 10 * ATOL and loss_diff <= 10 * ATOL:
        print("CP PARITY OK")
