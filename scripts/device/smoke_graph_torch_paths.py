"""Quick GPU smoke of session 4's pure-PyTorch changes (no Triton build needed except
smallest_k): aff_small with the reference attention, norms and point gather on CUDA; one eager
bf16 training step (index_select gathers, the recomputing interpolation weights), a
GraphedLoss capture and two replays against eager, then an eager no-grad reconstruction next to
the graph (the pretrain figure path). About 20 s after CUDA start-up."""
import os
import time
import warnings

os.environ.setdefault("AFFMAE_POINT_GATHER_BACKEND", "torch")
import torch  # noqa: E402

from affmae import create_model  # noqa: E402
from affmae.ops.masking import make_mask, num_masked  # noqa: E402
from affmae.train.graphs import GraphedLoss, mae_loss  # noqa: E402

t0 = time.time()
torch.manual_seed(0)
model = create_model("aff_small", drop_path=0.0, attention_backend="torch", norm_backend="torch").cuda()
g = torch.Generator().manual_seed(0)
imgs = torch.randn(4, 1, 256, 256, generator=g).cuda()
mask = make_mask(4, (32, 32), 0.5, "perlin", generator=g).cuda()
n = num_masked(32 * 32, 0.5)
ac = dict(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False)
with torch.autocast(**ac):
    le = model(imgs, mask, num_masked=n)["loss"]
le.backward()
ge = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()
print(f"eager step ok: loss {le.item():.5f}, finite grads {bool(torch.isfinite(ge).all())}, {time.time() - t0:.1f} s", flush=True)
model.zero_grad(set_to_none=False)
graphed = GraphedLoss(model, mae_loss(n))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for i in range(2):
        model.zero_grad(set_to_none=False)
        with torch.autocast(**ac):
            lg = graphed(imgs, mask)["loss"]
        lg.backward()
gg = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
rel = ((gg - ge).norm() / ge.norm()).item()
print(f"graph replays ok: loss {lg.item():.5f} (eager {le.item():.5f}), grad rel diff {rel:.2e}, "
      f"AccumulateGrad warnings {sum('AccumulateGrad' in str(w.message) for w in caught)}", flush=True)
model.eval()
with torch.no_grad(), torch.autocast(**ac):
    rec = model.reconstruct(imgs[:2], mask[:2])
model.train()
print(f"eager reconstruction next to the graph ok: {tuple(rec.shape)}, finite {bool(torch.isfinite(rec).all())}; "
      f"total {time.time() - t0:.1f} s", flush=True)
