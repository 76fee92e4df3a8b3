"""Which parameters' gradients the Triton-norm bf16 step gets worse than the torch-norm bf16 step.

``python scripts/device/norm_step_diag.py [--unchain]``: the inputs of
``tests/ops/test_layer_norm.py::test_gpu_small_step_same_with_triton_norms[aff_small]``; prints,
per merge score bias and for the five worst parameters, the error against the float32 step of
the torch-norm step (four runs: their spread is the noise) and of the Triton-norm step.
``--unchain``: the encoder's blocks run one by one (no residual-norm fusion across blocks).
"""
import sys

import torch

from affmae import create_model
from affmae.ops.masking import make_mask

if "--unchain" in sys.argv:
    import affmae.models.aff as aff

    def unchained(blocks, checkpointed, x, *args, per_block=None, each=None):
        for i, blk in enumerate(blocks):
            x = blk(x, *args, *(() if per_block is None else (per_block[i],)))
        return x

    aff.run_chained = unchained
g = torch.Generator().manual_seed(0)
imgs = torch.randn(4, 1, 128, 128, generator=g).cuda()
mask = make_mask(4, (16, 16), 0.5, "perlin", generator=g).cuda()
res = {}
runs = [("fp32", "torch", False)] + [(f"torch{i}", "torch", True) for i in range(4)] + [
    (f"triton{i}", "triton", True) for i in range(2)]
for run, backend, amp in runs:
    torch.manual_seed(0)
    m = create_model("aff_small", norm_backend=backend, drop_path=0.0).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        loss = m(imgs, mask)["loss"]
    loss.backward()
    res[run] = {n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}
ex = res["fp32"]
err = {r: {n: (res[r][n] - ex[n]).norm().item() for n in ex} for r in res if r != "fp32"}
for n in [n for n in ex if "score.bias" in n]:
    print(n, f"|grad| {ex[n].norm().item():.3e}", " ".join(f"{r} {err[r][n]:.2e}" for r in err))
ratio = {n: err["triton0"][n] / max(max(err[f"torch{i}"][n] for i in range(4)), 1e-30) for n in ex}
for n in sorted(ratio, key=ratio.get)[-5:]:
    print("worst", n, f"triton/torch-max {ratio[n]:.2f}", f"|grad| {ex[n].norm().item():.3e}")
