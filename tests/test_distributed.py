"""fastenc.distributed.clip_loss / siglip_loss over 2 and 3 gloo processes on CPU, with DDP simulated by hand.

Setup: every rank holds the same tiny model (one Linear "tower" per modality, open_clip's log-parametrised
logit_scale, SigLIP's logit_bias) and a shard of the global batch (unequal shards). Each rank computes its features,
the loss, calls backward, and then every parameter gradient is all-reduced and divided by the world size (what DDP
does). With L the loss of the concatenated global batch on one process (dense fp32 formula, autograd) the expected
relation is, on every rank and for every parameter theta (tower weights and biases, logit_scale, logit_bias):

    loss returned on each rank             == L
    DDP-averaged gradient of theta         == dL/dtheta                     (grad_reduce="mean", the default)
    sum over ranks of the gradient         == dL/dtheta                     (grad_reduce="sum")

Why this is open_clip's convention: ClipLoss(gather_with_grad=True) all-gathers the features with
torch.distributed.nn.functional.all_gather, whose backward sums the incoming gradients over ranks (reduce-scatter);
every rank computes the same global L, so each rank's features receive world x their slice of dL/d(features) and
the towers, after averaging, dL/dtheta; logit_scale gets dL/ds on every rank, averaged to dL/ds. SigLipLoss: rank r's
loss is its image rows against every rank's texts (exchanged with gradient) over its local batch size n, so with
equal shards the per-rank losses sum to world x L; the same argument gives dL/dtheta after averaging. The in-test
open_clip reference below (all_gather with gradient, global and local_loss variants, SigLIP's per-rank form; open_clip
itself needs equal shards) is run on equal shards and compared too. Errors (an empty shard on one rank, differing
dims, a bad input on one rank) raise the same InputError on every rank and leave no rank blocked: the spawn has a
deadline and the process groups a timeout.
"""

from __future__ import annotations

import datetime
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from utils import assert_close

from fastenc.ops.contrastive import clip_loss_reference, siglip_loss_reference

SCALE, BIAS = 10.0, -3.0
D_IN, D = 12, 16
GRAD_TOL = dict(atol=1e-6, rtol=1e-4)
DEADLINE_S = 900  # generous: a rank that hangs fails here; a shared CI host is many times slower


def _global_inputs(n: int):
    g = torch.Generator().manual_seed(1234)
    return torch.randn(n, D_IN, generator=g), torch.randn(n, D_IN, generator=g)


def _model() -> torch.nn.ModuleDict:
    """The replicated model: identical on every rank and in the single-process reference (fixed seed)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(7)
    m = torch.nn.ModuleDict({"image": torch.nn.Linear(D_IN, D), "text": torch.nn.Linear(D_IN, D)})
    m.log_scale = torch.nn.Parameter(torch.tensor(math.log(SCALE)))  # open_clip: logit_scale.exp() is the multiplier
    m.bias = torch.nn.Parameter(torch.tensor(BIAS))
    torch.random.set_rng_state(gen_state)
    return m


def _features(m, xi, xt):
    return F.normalize(m["image"](xi), dim=-1), F.normalize(m["text"](xt), dim=-1)


def _grads(m) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in m.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------ open_clip's semantics


def _open_clip_clip(fi, ft, s, local_loss: bool, group):
    """open_clip ClipLoss(gather_with_grad=True, local_loss=...): all_gather with gradient, global or local rows."""
    import torch.distributed.nn.functional as dnn

    rank, n = dist.get_rank(group), fi.shape[0]
    all_i, all_t = torch.cat(dnn.all_gather(fi, group=group)), torch.cat(dnn.all_gather(ft, group=group))
    if local_loss:  # this rank's rows against every column, labels offset by rank
        per_image, per_text = s * fi @ all_t.T, s * ft @ all_i.T
        labels = torch.arange(n) + n * rank
    else:
        per_image = s * all_i @ all_t.T
        per_text = per_image.T
        labels = torch.arange(all_i.shape[0])
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def _open_clip_siglip(fi, ft, s, b, group):
    """open_clip SigLipLoss: this rank's images against every rank's texts (received with gradient; open_clip passes
    them around a ring with neighbour exchanges, an all_gather with gradient carries the same values and gradients),
    -sum(logsigmoid(labels * logits)) summed over the text shards, divided by the local batch size."""
    import torch.distributed.nn.functional as dnn

    rank, n = dist.get_rank(group), fi.shape[0]
    all_t = torch.cat(dnn.all_gather(ft, group=group))
    logits = s * fi @ all_t.T + b
    labels = -torch.ones_like(logits)
    labels[torch.arange(n), torch.arange(n) + n * rank] = 1.0
    return -F.logsigmoid(labels * logits).sum() / n


# ------------------------------------------------------------------------------------------ the ranks

# One spawn of 3 processes serves every test (each process imports fastenc once: that dominates the time): the world
# 3 cases run on the default group, the world 2 cases on the subgroup of ranks 0 and 1 (passed as `group=`).
WORLD = 3
CASES = {
    3: {"unequal": [2, 5, 4], "equal": [3, 3, 3]},
    2: {"unequal": [3, 6], "equal": [4, 4]},
}
BACKENDS = ("torch", "triton")


def _step(kind, xi, xt, loss_fn, group, reduce="mean"):
    """One training step on this rank: forward, backward, then DDP's gradient reduction done by hand."""
    m = _model()
    fi, ft = _features(m, xi, xt)
    loss = loss_fn(kind, fi, ft, m.log_scale.exp(), m.bias)
    loss.backward()
    for p in m.parameters():
        if p.grad is None:  # CLIP: no bias gradient on any rank
            continue
        dist.all_reduce(p.grad, group=group)
        if reduce == "mean":
            p.grad /= dist.get_world_size(group)
    return {"loss": loss.detach(), "grads": _grads(m)}


def _ddp_cases(fastenc, rank, group, cases):
    res = {}
    for case, sizes in cases.items():
        xi_all, xt_all = _global_inputs(sum(sizes))
        lo = sum(sizes[:rank])
        xi, xt = xi_all[lo : lo + sizes[rank]], xt_all[lo : lo + sizes[rank]]
        for kind in ("clip", "siglip"):
            for backend in BACKENDS:
                for reduce in ("mean", "sum"):

                    def fastenc_loss(kind, fi, ft, s, b, backend=backend, reduce=reduce):
                        kw = dict(group=group, grad_reduce=reduce, backend=backend, strict=True)
                        with fastenc.trace() as tr:
                            if kind == "clip":
                                out = fastenc.distributed.clip_loss(fi, ft, s, **kw)
                            else:
                                out = fastenc.distributed.siglip_loss(fi, ft, s, b, **kw)
                        assert tr.counts[f"{backend}.{kind}_loss"] == 1, dict(tr.counts)
                        return out

                    res[f"{case}/{kind}/{backend}/{reduce}"] = _step(kind, xi, xt, fastenc_loss, group, reduce)
            if len(set(sizes)) > 1:  # open_clip itself needs equal shards
                continue
            if kind == "clip":
                for local in (False, True):
                    res[f"{case}/{kind}/open_clip_local={local}/mean"] = _step(
                        kind, xi, xt, lambda k, fi, ft, s, b, lc=local: _open_clip_clip(fi, ft, s, lc, group), group
                    )
            else:
                res[f"{case}/{kind}/open_clip/mean"] = _step(
                    kind, xi, xt, lambda k, fi, ft, s, b: _open_clip_siglip(fi, ft, s, b, group), group
                )
    return res


def _error_cases(fastenc, rank, world):
    """Bad inputs on one rank: every rank must raise the same InputError, then the group must still work."""
    msgs = {}
    n = {0: 3, 1: 0, 2: 2}[rank]  # rank 1 holds an empty shard
    cases = {
        "empty-clip": lambda: fastenc.distributed.clip_loss(torch.randn(n, 8), torch.randn(n, 8), 2.0),
        "empty-siglip": lambda: fastenc.distributed.siglip_loss(torch.randn(n, 8), torch.randn(n, 8), 2.0, -1.0),
        "dim": lambda: fastenc.distributed.clip_loss(torch.randn(2, 8 + rank), torch.randn(2, 8 + rank), 2.0),
        "local": lambda: fastenc.distributed.clip_loss(
            torch.randn(2, 8), torch.randn(3 if rank == world - 1 else 2, 8), 2.0
        ),
        "grad_reduce": lambda: fastenc.distributed.clip_loss(
            torch.randn(2, 8), torch.randn(2, 8), 2.0, grad_reduce="avg"
        ),
    }
    for name, call in cases.items():
        try:
            call()
            msgs[name] = "no error"
        except fastenc.InputError as e:
            msgs[name] = str(e)
    # the collectives are still in step: a valid call works on every rank and gives the same global loss
    msgs["after"] = float(fastenc.distributed.clip_loss(torch.randn(2, 8), torch.randn(2, 8), 2.0))
    return msgs


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=900)
    )
    try:
        import fastenc

        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        out = {"errors": _error_cases(fastenc, rank, world), "world3": _ddp_cases(fastenc, rank, None, CASES[3])}
        if rank < 2:
            out["world2"] = _ddp_cases(fastenc, rank, pair, CASES[2])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Spawn the ranks once (with a deadline: a rank blocked in a collective fails the tests instead of hanging
    them) and return each rank's results."""
    out = tmp_path_factory.mktemp("dist")
    ctx = mp.start_processes(
        _worker, args=(WORLD, str(out / "init"), str(out)), nprocs=WORLD, join=False, start_method="spawn"
    )
    end = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=max(0.1, end - time.monotonic())):
        if time.monotonic() >= end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"ranks still running after {DEADLINE_S} s: a rank is blocked in a collective")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# ------------------------------------------------------------------------------------------ tests


def _single_process(kind, n):
    """The reference: the global batch on one process, dense fp32 formula, plain autograd."""
    m = _model()
    fi, ft = _features(m, *_global_inputs(n))
    s = m.log_scale.exp()
    loss = clip_loss_reference(fi, ft, s) if kind == "clip" else siglip_loss_reference(fi, ft, s, m.bias)
    loss.backward()
    return loss.detach(), _grads(m)


def _check(got, want_loss, want_grads, tag, loss_value=True):
    if loss_value:
        assert_close(got["loss"], want_loss, atol=1e-6, rtol=1e-5, name=f"{tag} loss")
    assert sorted(got["grads"]) == sorted(want_grads), f"{tag}: grads of {sorted(got['grads'])}"
    for name, g in want_grads.items():
        assert_close(got["grads"][name], g, **GRAD_TOL, name=f"{tag} d{name}")


@pytest.mark.parametrize("world", [2, 3], ids=["world2", "world3"])
def test_ddp_gradients_match_global_loss_and_open_clip(ranks, world):
    """See the module docstring for the relation checked: after DDP averaging every parameter holds dL/dtheta of the
    global loss (as open_clip's ClipLoss(gather_with_grad=True) / SigLipLoss give), torch and Triton backends,
    grad_reduce "mean" and "sum"; on equal shards also against the in-test open_clip reference directly."""
    results = [r[f"world{world}"] for r in ranks[:world]]
    for case, sizes in CASES[world].items():
        for kind in ("clip", "siglip"):
            want_loss, want = _single_process(kind, sum(sizes))
            assert ("bias" in want) == (kind == "siglip")
            for backend in BACKENDS:
                for reduce in ("mean", "sum"):
                    for r, res in enumerate(results):
                        tag = f"{case} {kind} {backend} grad_reduce={reduce} rank {r}"
                        _check(res[f"{case}/{kind}/{backend}/{reduce}"], want_loss, want, tag)
            if case != "equal":
                continue
            for key in ["open_clip_local=False", "open_clip_local=True"] if kind == "clip" else ["open_clip"]:
                per_rank = [res[f"{case}/{kind}/{key}/mean"] for res in results]
                # open_clip's local_loss / SigLIP values are per rank; their mean is the global loss
                mean = torch.stack([p["loss"] for p in per_rank]).mean()
                assert_close(mean, want_loss, atol=1e-6, rtol=1e-5, name=f"{kind} {key} mean loss")
                for r, p in enumerate(per_rank):
                    _check(p, want_loss, want, f"{kind} {key} rank {r}", loss_value=key == "open_clip_local=False")
                    mine = results[r][f"{case}/{kind}/torch/mean"]["grads"]  # and directly against fastenc
                    for name, g in p["grads"].items():
                        assert_close(mine[name], g, **GRAD_TOL, name=f"{kind} fastenc vs {key} rank {r} d{name}")


def test_bad_shard_raises_same_error_on_every_rank(ranks):
    """An empty shard on rank 1, a feature dim that differs across ranks, a bad text shape on the last rank and a
    bad grad_reduce: every rank raises the same InputError (nobody is left in a collective: the spawn has a
    deadline), and a valid call afterwards still works on every rank."""
    got = [r["errors"] for r in ranks]
    for name in ("empty-clip", "empty-siglip", "dim", "local", "grad_reduce"):
        msgs = [g[name] for g in got]
        assert msgs[0] != "no error", f"{name}: no InputError raised"
        assert msgs == [msgs[0]] * WORLD, f"{name}: ranks raised different errors: {msgs}"
    assert "empty shard" in got[0]["empty-clip"] and "rank(s) [1]" in got[0]["empty-clip"], got[0]["empty-clip"]
    assert "feature dim" in got[0]["dim"], got[0]["dim"]
    assert "rank 2: text_features" in got[0]["local"], got[0]["local"]
    assert "grad_reduce" in got[0]["grad_reduce"], got[0]["grad_reduce"]
    assert len({g["after"] for g in got}) == 1


def test_needs_initialised_group():
    import fastenc

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(fastenc.InputError, match="group"):
        fastenc.distributed.clip_loss(torch.randn(4, 8), torch.randn(4, 8), 1.0)
