"""Training end to end: gradients of whole optimized towers in train() mode against transformers (fp32, torch and
Triton backends), fastenc.train.finetune (loss goes down, the saved checkpoint loads with plain transformers),
exact gradient accumulation, 2-rank gloo data parallel == one process on the whole batch (spawned, and the example
script under torchrun), `fastenc finetune`."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import CLIPModel, SiglipModel, T5Config, T5EncoderModel

import fastenc
from fastenc.ops.contrastive import clip_loss_reference, siglip_loss_reference
from fastenc.train import (
    ContrastiveTrainer,
    FinetuneConfig,
    StepSampler,
    SyntheticPairs,
    collate,
    contrastive_loss,
    embeddings,
    finetune,
    tiny_model,
)
from tests.utils import assert_close

REPO = Path(__file__).resolve().parents[1]
GRAD = dict(atol=1e-5, rtol=1e-3)  # tests/test_clip.py's bar for whole-tower gradients, fp32


def _batch(model, n: int, seed: int = 3) -> dict:
    cfg = model.config
    ds = SyntheticPairs(
        n,
        image_size=cfg.vision_config.image_size,
        seq_len=12,
        vocab_size=cfg.text_config.vocab_size,
        eos_token_id=cfg.text_config.vocab_size - 1,
        seed=seed,
    )
    return collate([ds[i] for i in range(n)])


def _param_grads(loss, model) -> list:
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def _compare_grads(model, got, ref) -> None:
    for (name, _), g, r in zip(model.named_parameters(), got, ref, strict=True):
        if r is None:
            assert g is None or not g.any(), name
            continue
        assert g is not None, name
        assert_close(g, r, **GRAD, name=f"grad {name}")


# ---------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_train_mode_gradients_of_both_towers_and_loss_match_transformers(kind, backend):
    """Every parameter's gradient (towers, projections, logit_scale, logit_bias) of fastenc's fused towers + the
    fastenc loss in train() mode equals transformers' towers + the materialised loss."""
    model = tiny_model(kind).train()
    assert model.config.text_config.attention_dropout == 0 and model.config.vision_config.attention_dropout == 0
    fast = fastenc.optimize(model, backend=backend, strict=True).train()
    batch = _batch(model, 5)
    img, txt = embeddings(model, batch)
    scale = model.logit_scale.exp()
    if kind == "clip":
        ref_loss = clip_loss_reference(img, txt, scale)
    else:
        ref_loss = siglip_loss_reference(img, txt, scale, model.logit_bias)
    ref = _param_grads(ref_loss, model)
    with fastenc.trace() as t:
        img, txt = embeddings(fast, batch)
        bias = model.logit_bias if kind == "siglip" else None
        loss = contrastive_loss(kind, img, txt, model.logit_scale.exp(), bias, backend=backend)
    got = _param_grads(loss, model)
    layers = 4  # 2 text + 2 vision layers
    assert t.counts[f"{backend}.attention"] == layers + (kind == "siglip"), dict(t.counts)  # + SigLIP's MAP head
    assert t.counts[f"{backend}.{kind}_loss"] == 1 and not t.fallbacks, (dict(t.counts), t.fallbacks)
    assert_close(loss, ref_loss, atol=2e-5, rtol=1e-5, name="loss")
    _compare_grads(model, got, ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_train_mode_t5_encoder_gradients_match_transformers(backend):
    cfg = T5Config(vocab_size=97, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=0.0)
    torch.manual_seed(0)
    model = T5EncoderModel(cfg).train()
    fast = fastenc.optimize(model, backend=backend, strict=True).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 97, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    w = torch.randn(3, 10, 32, generator=g)
    ref = _param_grads((model(input_ids=ids, attention_mask=mask).last_hidden_state * w).sum(), model)
    with fastenc.trace() as t:
        out = fast(input_ids=ids, attention_mask=mask).last_hidden_state
    got = _param_grads((out * w).sum(), model)
    assert t.counts[f"{backend}.attention"] == 2 and not t.fallbacks, (dict(t.counts), t.fallbacks)
    _compare_grads(model, got, ref)


def test_attention_dropout_in_train_mode_falls_back_visibly():
    from fastenc.models.configs import clip_config

    cfg = clip_config("tiny")
    cfg.vision_config.attention_dropout = 0.5  # the vision tower only: its modules are built with dropout 0.5
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    fast = fastenc.optimize(model, backend="triton").train()
    batch = _batch(model, 2)
    with fastenc.trace() as t:
        embeddings(fast, batch)
    assert [(f.op, f.reason) for f in t.fallbacks] == [("attention", "attention dropout")] * 2  # 2 vision layers
    assert t.counts["torch.attention"] == 2 and t.counts["triton.attention"] == 2  # the text tower stays fused
    strict = fastenc.optimize(model, backend="triton", strict=True).train()
    with pytest.raises(fastenc.BackendUnavailableError, match="attention dropout"):
        embeddings(strict, batch)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fused_towers_under_autocast(kind, backend):
    """torch.autocast: the GEMMs return bf16 while the residual stream stays fp32 (transformers' promotion); the
    fused add + norm takes the branch in the stream's dtype. Features and gradients close to transformers'."""
    model = tiny_model(kind).train()
    fast = fastenc.optimize(model, backend=backend).train()
    batch = _batch(model, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = embeddings(model, batch)
        got = embeddings(fast, batch)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == b.dtype
        assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
    wrt = [model.text_projection.weight if kind == "clip" else model.text_model.head.weight]
    probe = torch.randn(ref[0].shape[-1], generator=torch.Generator().manual_seed(1))  # embeddings are unit-norm
    g_ref = torch.autograd.grad(sum((e.float() @ probe).square().sum() for e in ref), wrt)
    g_got = torch.autograd.grad(sum((e.float() @ probe).square().sum() for e in got), wrt)
    assert (g_got[0] - g_ref[0]).norm() <= 0.05 * g_ref[0].norm()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_materialised_baseline_loss_is_the_same_loss(kind):
    """The bench baseline (open_clip's N x N logits) and fastenc's tiled loss agree, values and gradients (fp32)."""
    g = torch.Generator().manual_seed(4)
    img = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(3.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True) if kind == "siglip" else None
    wrt = [img, txt, scale] + ([bias] if bias is not None else [])
    ref = contrastive_loss(kind, img, txt, scale, bias, impl="materialised")
    got = contrastive_loss(kind, img, txt, scale, bias, backend="torch")
    assert_close(got, ref, atol=1e-6, rtol=1e-6, name="loss")
    for a, b in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(ref, wrt), strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name="grad")
    with pytest.raises(fastenc.InputError, match="materialised"):
        contrastive_loss(kind, img, txt, scale, bias, impl="materialised", world_size=2)


# ---------------------------------------------------------------------------------------------------- accumulation


def _trainer_grads(kind: str, accum_batches: list[dict], *, world: int = 1, precision: str = "fp32"):
    model = tiny_model(kind)
    cfg = FinetuneConfig(tiny=kind, backend="torch", precision=precision, amp="master")
    trainer = ContrastiveTrainer(model, cfg, torch.device("cpu"), world_size=world)
    loss = trainer.forward_backward(accum_batches)
    if world > 1:
        trainer.all_reduce_grads()
    return loss, [m.grad.clone() for m in trainer.masters], trainer


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradient_accumulation_equals_one_pass_over_the_batch(kind):
    batch = _batch(tiny_model(kind), 8)
    halves = [{k: v[i : i + 4] for k, v in batch.items()} for i in (0, 4)]
    loss1, g1, trainer = _trainer_grads(kind, [batch])
    loss2, g2, _ = _trainer_grads(kind, halves)
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g2, g1, strict=True):
        assert_close(a, b, atol=1e-6, rtol=1e-4, name=f"grad {name}")
    scale = names.index("logit_scale")
    assert g1[scale].abs().item() > 0  # the scale's gradient is taken once, not accum times


def test_master_weight_bf16_accumulates_in_fp32_and_restores_an_fp32_model():
    batch = _batch(tiny_model("clip"), 8)
    _, g32, _ = _trainer_grads("clip", [batch])
    loss, g16, trainer = _trainer_grads("clip", [batch], precision="bf16")
    assert trainer.amp == "master" and trainer.model.text_projection.weight.dtype == torch.bfloat16
    assert trainer.model.logit_scale.dtype == torch.float32
    assert all(m.dtype == torch.float32 for m in g16)
    a, b = torch.cat([g.flatten() for g in g16]), torch.cat([g.flatten() for g in g32])
    assert (a - b).norm() <= 0.05 * b.norm()  # bf16 towers: the whole gradient close to fp32's, not equal
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    model = trainer.finish()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for p, m in zip(trainer.params, trainer.masters, strict=True):
        assert torch.equal(p, m)


def test_sampler_shards_every_step_over_ranks_and_micro_batches():
    full = list(StepSampler(10, 3, 4, 1, 0, 1, seed=5, shuffle=True))
    parts = [list(StepSampler(10, 3, 4, 2, r, 2, seed=5, shuffle=True)) for r in range(2)]
    for step in range(3):
        merged = parts[0][2 * step] + parts[0][2 * step + 1] + parts[1][2 * step] + parts[1][2 * step + 1]
        assert merged == full[step] and len(set(merged)) == 4
    assert set(full[0] + full[1]) <= set(range(10)) and not set(full[0]) & set(full[1])  # one epoch: disjoint


# ---------------------------------------------------------------------------------------------------- finetune


def test_finetune_reduces_the_loss_and_saves_a_plain_transformers_checkpoint(tmp_path):
    out = tmp_path / "ft"
    cfg = FinetuneConfig(
        tiny="clip",
        synthetic=8,
        batch_size=8,
        steps=6,
        lr=2e-3,
        schedule="constant",
        output_dir=str(out),
        backend="torch",  # the Triton kernels' gradients: the tests above (the interpreter is slow for 6 steps)
        progress=False,
    )
    res = finetune(cfg)
    assert len(res.losses) == 6 and res.losses[-1] < 0.8 * res.losses[0], res.losses
    assert res.samples_per_s > 0 and res.world_size == 1 and res.amp is None
    assert res.trace["torch.attention"] == 4 and res.trace["torch.clip_loss"] == 1 and not res.fallbacks
    loaded = CLIPModel.from_pretrained(out)
    assert type(loaded) is CLIPModel
    trained = res.model.state_dict()
    assert set(loaded.state_dict()) == set(trained)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert not torch.equal(trained["logit_scale"], tiny_model("clip").state_dict()["logit_scale"])


def test_finetune_siglip_bf16_master_weights(tmp_path):
    res = finetune(
        FinetuneConfig(
            tiny="siglip",
            synthetic=8,
            batch_size=8,
            steps=4,
            lr=2e-3,
            precision="bf16",
            amp="master",
            accum=2,
            backend="torch",
            progress=False,
            output_dir=str(tmp_path),
        )
    )
    assert res.amp == "master" and res.losses[-1] < res.losses[0], res.losses
    loaded = SiglipModel.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert torch.equal(loaded.logit_bias, res.model.logit_bias)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_plain_transformers_baseline_trains_under_autocast(precision):
    """--no-fastenc: the transformers model under torch.autocast (fp32 weights), the same loop and loss."""
    cfg = FinetuneConfig(tiny="clip", synthetic=8, batch_size=8, steps=3, lr=2e-3, schedule="constant",
                         precision=precision, fused=False, backend="torch", progress=False)  # fmt: skip
    res = finetune(cfg)
    assert res.amp == "autocast" and res.trace == {"torch.clip_loss": 1}  # no fused tower ran
    assert res.losses[-1] < res.losses[0] and {p.dtype for p in res.model.parameters()} == {torch.float32}


def test_finetune_on_an_image_text_folder(tmp_path):
    from PIL import Image
    from transformers import CLIPImageProcessor

    from fastenc.models.configs import clip_config
    from tests.tokenizer_utils import build_clip_tokenizer

    tok = build_clip_tokenizer(tmp_path / "tok", model_max_length=16)
    torch.manual_seed(0)
    model = CLIPModel(clip_config("tiny", eos_token_id=tok.eos_token_id))
    src = tmp_path / "model"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(src)
    data = tmp_path / "data" / "00000"
    data.mkdir(parents=True)
    words = ["a red cat", "two blue birds", "a tall tree", "an old house"]
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(words):
        pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{i:09d}.png")
        (data / f"{i:09d}.txt").write_text(caption)
    (data / "orphan.png").write_bytes((data / "000000000.png").read_bytes())  # no caption: skipped
    out = tmp_path / "out"
    res = finetune(
        FinetuneConfig(
            model=str(src),
            data=str(tmp_path / "data"),
            batch_size=4,
            steps=2,
            backend="torch",
            progress=False,
            output_dir=str(out),
        )
    )
    assert len(res.losses) == 2 and all(map(torch.isfinite, torch.tensor(res.losses)))
    assert (out / "tokenizer_config.json").is_file() and (out / "preprocessor_config.json").is_file()
    with pytest.raises(fastenc.InputError, match="data"):
        finetune(FinetuneConfig(model=str(src), data=str(tmp_path / "nothing"), batch_size=4, progress=False))


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(tiny="clip", synthetic=8, batch_size=8, accum=3), "divisible"),
        (dict(tiny="clip", synthetic=4, batch_size=8), "fewer than one batch"),
        (dict(tiny="clip", batch_size=8), "synthetic"),
        (dict(synthetic=8, batch_size=8), "exactly one of model"),
        (dict(tiny="clip", synthetic=8, batch_size=8, precision="fp8"), "precision"),
        (dict(tiny="clip", synthetic=8, batch_size=8, steps=0), "steps"),
        (dict(tiny="clip", data="x", synthetic=8), "exactly one of data"),
    ],
)
def test_bad_configs_raise_input_errors_naming_the_field(kw, match):
    with pytest.raises(fastenc.InputError, match=match):
        finetune(FinetuneConfig(progress=False, **kw))


# ---------------------------------------------------------------------------------------------------- 2 ranks

WORLD = 2


def _worker(rank, init_file, out_dir):
    torch.manual_seed(0)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=900)
    )
    try:
        batch = _batch(tiny_model("siglip"), 8)
        shard = {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch.items()}
        micro = [{k: v[i : i + 2] for k, v in shard.items()} for i in (0, 2)]  # 2 ranks x 2 micro-batches
        loss, grads, _ = _trainer_grads("siglip", micro, world=WORLD)
        cfg = FinetuneConfig(tiny="clip", synthetic=8, batch_size=8, steps=2, accum=2, backend="torch", progress=False)
        res = finetune(cfg)
        torch.save(
            {"loss": loss, "grads": grads, "ft_losses": res.losses, "ft_params": res.model.state_dict()},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo_equal_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    batch = _batch(tiny_model("siglip"), 8)
    loss, grads, trainer = _trainer_grads("siglip", [batch])
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    for r in ranks:
        assert r["loss"] == pytest.approx(loss, rel=1e-6)
        for name, a, b in zip(names, r["grads"], grads, strict=True):
            assert_close(a, b, atol=1e-6, rtol=1e-4, name=f"grad {name}")
    single = finetune(FinetuneConfig(tiny="clip", synthetic=8, batch_size=8, steps=2, backend="torch", progress=False))
    for r in ranks:
        assert r["ft_losses"] == pytest.approx(single.losses, rel=1e-5)
        for k, v in single.model.state_dict().items():
            assert_close(r["ft_params"][k], v, atol=1e-6, rtol=1e-5, name=k)


# ---------------------------------------------------------------------------------------------------- scripts


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_example_script_under_torchrun_and_cli_subcommand(tmp_path):
    """torchrun --nproc-per-node 2 examples/finetune_clip.py: the process group comes up from torchrun's environment
    (gloo), rank 0 prints the summary and saves; losses and weights equal one process on the whole batch."""
    out = tmp_path / "ft"
    args = ["--tiny", "siglip", "--synthetic", "8", "--batch-size", "8", "--accum", "2", "--steps", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(_free_port())]  # fmt: skip
    r = subprocess.run(
        [*torchrun, str(REPO / "examples" / "finetune_clip.py"), *args, "--backend", "torch", "--no-progress",
         "--output-dir", str(out), "--json"],
        capture_output=True, text=True, timeout=900, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["trace"]["torch.siglip_loss"] == 2  # accum 2: the loss twice
    single = finetune(
        FinetuneConfig(tiny="siglip", synthetic=8, batch_size=8, steps=2, backend="torch", progress=False)
    )
    assert summary["losses"] == pytest.approx(single.losses, rel=1e-5)
    loaded = SiglipModel.from_pretrained(out).state_dict()
    for k, v in single.model.state_dict().items():
        assert_close(loaded[k], v, atol=1e-6, rtol=1e-5, name=k)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastenc.cli",
            "finetune",
            "--tiny",
            "--synthetic",
            "8",
            "--batch-size",
            "6",
            "--accum",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stderr.strip().startswith("fastenc finetune: error: --batch-size 6"), r.stderr
