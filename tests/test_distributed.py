"""fastenc.distributed.clip_loss / siglip_loss over 2 and 3 gloo processes on CPU: every rank's loss equals the
single-process loss of the concatenated batch, each rank's feature gradients equal its slice of the single-process
gradients, and every rank gets the full logit_scale / logit_bias gradient."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from utils import assert_close

from fastenc.ops.contrastive import clip_loss_reference, siglip_loss_reference

SCALE, BIAS = 20.0, -4.0


def _global_batch(n, d, dtype):
    g = torch.Generator().manual_seed(1234)
    i = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    t = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    return i, t


def _worker(rank, world, init_file, sizes, d, backend, out_dir):
    if backend == "triton":
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import fastenc

        i_all, t_all = _global_batch(sum(sizes), d, torch.float32)
        lo = sum(sizes[:rank])
        res = {}
        for kind in ("clip", "siglip"):
            i = i_all[lo : lo + sizes[rank]].clone().requires_grad_()
            t = t_all[lo : lo + sizes[rank]].clone().requires_grad_()
            s = torch.tensor(SCALE, requires_grad=True)
            b = torch.tensor(BIAS, requires_grad=True)
            with fastenc.trace() as tr:
                if kind == "clip":
                    loss = fastenc.distributed.clip_loss(i, t, s, backend=backend, strict=True)
                else:
                    loss = fastenc.distributed.siglip_loss(i, t, s, b, backend=backend, strict=True)
            assert tr.counts[f"{backend}.{kind}_loss"] == 1, dict(tr.counts)
            loss.backward()
            res[kind] = {"loss": loss.detach(), "gi": i.grad, "gt": t.grad, "gs": s.grad, "gb": b.grad}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "sizes, d, backend",
    [([8, 8], 16, "torch"), ([5, 13, 9], 33, "torch"), ([7, 10], 8, "triton")],
    ids=["2ranks-equal-torch", "3ranks-uneven-torch", "2ranks-triton"],
)
def test_matches_single_process(tmp_path, sizes, d, backend):
    world = len(sizes)
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), sizes, d, backend, str(tmp_path)), nprocs=world, join=True)

    i_all, t_all = _global_batch(sum(sizes), d, torch.float32)
    for kind in ("clip", "siglip"):
        i, t = i_all.clone().requires_grad_(), t_all.clone().requires_grad_()
        s, b = torch.tensor(SCALE, requires_grad=True), torch.tensor(BIAS, requires_grad=True)
        ref = clip_loss_reference(i, t, s) if kind == "clip" else siglip_loss_reference(i, t, s, b)
        ref.backward()
        lo = 0
        for rank, n in enumerate(sizes):
            got = torch.load(tmp_path / f"rank{rank}.pt")[kind]
            tag = f"{kind} rank {rank}"
            assert_close(got["loss"], ref, atol=1e-5, rtol=1e-5, name=f"{tag} loss")
            assert_close(got["gi"], i.grad[lo : lo + n], atol=1e-6, rtol=1e-4, name=f"{tag} d_image")
            assert_close(got["gt"], t.grad[lo : lo + n], atol=1e-6, rtol=1e-4, name=f"{tag} d_text")
            assert_close(got["gs"], s.grad, atol=1e-6, rtol=1e-4, name=f"{tag} d_scale")
            if kind == "siglip":
                assert_close(got["gb"], b.grad, atol=1e-6, rtol=1e-4, name=f"{tag} d_bias")
            else:
                assert got["gb"] is None
            lo += n


def test_needs_initialised_group():
    import fastenc

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(fastenc.InputError, match="group"):
        fastenc.distributed.clip_loss(torch.randn(4, 8), torch.randn(4, 8), 1.0)
