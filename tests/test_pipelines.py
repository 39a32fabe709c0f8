"""fastenc.optimize(pipe) for diffusers SD 1.x / SDXL / SD3 / FLUX pipelines and fastenc.PromptCache.

Tiny random-weight pipelines (tests/pipeline_utils.py) are written with save_pretrained and loaded back with
DiffusionPipeline.from_pretrained; "untouched" is a second pipeline loaded from the same folder."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import fastenc
from fastenc import InputError, UnsupportedModelError
from fastenc.models._encoder import FastencModelMixin
from tests.utils import FP32, assert_close, assert_error_within

diffusers = pytest.importorskip("diffusers")

from tests.pipeline_utils import FAMILIES, build_pipeline, load_pipeline  # noqa: E402

LONG = " ".join(["a photo of a red cat riding a blue horse under the night sky"] * 9)  # > 77 tokens
PROMPTS = ["a red cat", LONG]
NEGATIVE = ["blurry", "a dog"]
T5_LEN = 24  # max_sequence_length for SD3 / FLUX (the T5 default of 256 / 512 is slow on the interpreter)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {f: build_pipeline(f, root) for f in FAMILIES}


def _load(path, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = load_pipeline(path, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pairs(dirs):
    """family -> (untouched pipeline, optimized pipeline), fp32, backend torch (the CPU path of the fused towers)."""
    return {f: (_load(d), fastenc.optimize(_load(d), backend="torch")) for f, d in dirs.items()}


def encode(pipe, family, prompt, *, negative=None, clip_skip=None, n=1, cfg=True):
    """Every tensor the pipeline's own encode_prompt returns (tuple; None entries kept)."""
    kw = dict(device="cpu", num_images_per_prompt=n)
    with torch.no_grad():
        if family == "sd":
            return pipe.encode_prompt(
                prompt, do_classifier_free_guidance=cfg, negative_prompt=negative, clip_skip=clip_skip, **kw
            )
        if family == "sdxl":
            return pipe.encode_prompt(
                prompt, do_classifier_free_guidance=cfg, negative_prompt=negative, clip_skip=clip_skip, **kw
            )
        if family == "sd3":
            return pipe.encode_prompt(
                prompt,
                None,
                None,
                do_classifier_free_guidance=cfg,
                negative_prompt=negative,
                clip_skip=clip_skip,
                max_sequence_length=T5_LEN,
                **kw,
            )
        return pipe.encode_prompt(prompt, None, max_sequence_length=T5_LEN, **kw)


def assert_outputs_close(got, ref, fmt=FP32):
    assert len(got) == len(ref)
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert (g is None) == (r is None), i
        if r is not None:
            assert g.dtype == r.dtype, (i, g.dtype, r.dtype)
            assert_close(g, r, **fmt, name=f"output[{i}]")


# ------------------------------------------------------------------------------------------------ optimize(pipe)


@pytest.mark.parametrize("family", FAMILIES)
def test_optimize_swaps_encoders_only(dirs, family):
    ref = _load(dirs[family])
    pipe = _load(dirs[family])
    before = dict(pipe.components)
    index = dict(pipe.config)
    out = fastenc.optimize(pipe, backend="torch")
    assert out is pipe
    names = [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if before.get(n) is not None]
    for name in names:
        fast = getattr(pipe, name)
        assert isinstance(fast, FastencModelMixin) and fast is not before[name]
        assert fast._fastenc_base is type(before[name])
        for (n1, p1), (n2, p2) in zip(fast.named_parameters(), before[name].named_parameters(), strict=True):
            assert n1 == n2 and p1 is p2  # shared, not copied
        assert pipe.components[name] is fast
    denoiser = "unet" if family in ("sd", "sdxl") else "transformer"
    assert getattr(pipe, denoiser) is before[denoiser] and pipe.vae is before["vae"]
    assert dict(pipe.config) == index  # model_index.json keeps the transformers classes
    assert pipe._fastenc_components == tuple(names)
    assert not any(isinstance(getattr(ref, n), FastencModelMixin) for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompt_parity_fp32(pairs, family):
    """Batch 2 (one prompt > 77 tokens), negative prompts, 2 images per prompt; SD/SDXL/SD3 also with clip_skip."""
    ref, fast = pairs[family]
    cases = [dict(negative=NEGATIVE, n=2), dict(negative=None, n=1)]
    if family != "flux":
        cases.append(dict(negative=None, clip_skip=1, n=1))
    for case in cases:
        if case.get("clip_skip") and family == "sd" and not hasattr(ref.text_encoder, "text_model"):
            # diffusers' SD clip_skip reads text_encoder.text_model, which newer transformers' CLIPTextModel lacks:
            # the optimized pipeline fails exactly as the untouched one does
            for pipe in (ref, fast):
                with pytest.raises(AttributeError, match="text_model"):
                    encode(pipe, family, PROMPTS, **case)
            continue
        want = encode(ref, family, PROMPTS, **case)
        with fastenc.trace() as t:
            got = encode(fast, family, PROMPTS, **case)
        assert_outputs_close(got, want)
        assert t.counts["torch.attention"] > 0  # the fused towers ran


def test_encode_prompt_parity_triton_sd(pairs):
    """The Triton kernels (interpreter on CPU) behind the SD 1.x encode_prompt, clip_skip=1."""
    ref, _ = pairs["sd"]
    fast = fastenc.optimize(_load(ref.config._name_or_path), backend="triton", strict=True)
    skip = 1 if hasattr(ref.text_encoder, "text_model") else None  # see test_encode_prompt_parity_fp32
    want = encode(ref, "sd", ["a red cat"], negative=["blurry"], clip_skip=skip)
    with fastenc.trace() as t:
        got = encode(fast, "sd", ["a red cat"], negative=["blurry"], clip_skip=skip)
    assert t.counts["triton.attention"] == 2 * 3 and "torch.attention" not in t.counts
    assert_outputs_close(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompt_parity_bf16(dirs, pairs, family):
    """bf16 pipelines: error against the fp32 pipeline at most 2x the untouched bf16 pipeline's own error."""
    ref32, _ = pairs[family]
    ref16 = _load(dirs[family], torch.bfloat16)
    fast16 = fastenc.optimize(_load(dirs[family], torch.bfloat16), backend="torch")
    want32 = encode(ref32, family, PROMPTS, negative=NEGATIVE)
    base = encode(ref16, family, PROMPTS, negative=NEGATIVE)
    got = encode(fast16, family, PROMPTS, negative=NEGATIVE)
    for i, (g, b, r) in enumerate(zip(got, base, want32, strict=True)):
        if r is None:
            continue
        assert g.dtype == b.dtype
        if not r.dtype.is_floating_point or i == len(got) - 1 and family == "flux":  # FLUX text_ids: zeros
            assert torch.equal(g.float(), b.float())
            continue
        assert_error_within(g, b, r, factor=2.0, atol=1e-3, name=f"{family} output[{i}]")


@pytest.mark.parametrize("family", FAMILIES)
def test_full_call_same_latents(pairs, family):
    """pipe(...) with 2 steps: the optimized pipeline's latents equal the untouched pipeline's (fp32)."""
    ref, fast = pairs[family]
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="latent", guidance_scale=5.0)
    if family in ("sd3", "flux"):
        kw["max_sequence_length"] = T5_LEN
    with torch.no_grad():
        want = ref("a red cat", generator=torch.Generator().manual_seed(0), **kw)[0]
        got = fast("a red cat", generator=torch.Generator().manual_seed(0), **kw)[0]
    assert_close(got, want, atol=1e-4, rtol=1e-4, name=f"{family} latents")


def test_ip_adapter_image_encoder_is_swapped(dirs):
    """An image_encoder (IP-Adapter's CLIPVisionModelWithProjection) is optimized too; encode_image agrees."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    )
    enc = CLIPVisionModelWithProjection(cfg).eval()
    ref, pipe = _load(dirs["sd"]), _load(dirs["sd"])
    ref.register_modules(image_encoder=enc)
    pipe.register_modules(image_encoder=enc)
    fastenc.optimize(pipe, backend="torch")
    assert isinstance(pipe.image_encoder, FastencModelMixin)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for hidden in (False, True):
            want = ref.encode_image(pixels, "cpu", 1, output_hidden_states=hidden)
            got = pipe.encode_image(pixels, "cpu", 1, output_hidden_states=hidden)
            assert_outputs_close(got, want)


def test_unsupported_component_is_reported(dirs):
    from transformers import BertConfig, BertModel

    pipe = _load(dirs["sd"])
    pipe.register_modules(
        safety_checker=BertModel(
            BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
        )
    )
    with pytest.warns(fastenc.FallbackWarning, match=r"safety_checker \(BertModel\)"):
        fastenc.optimize(pipe, backend="torch")
    assert isinstance(pipe.text_encoder, FastencModelMixin)
    pipe2 = _load(dirs["sd"])
    pipe2.register_modules(safety_checker=pipe.safety_checker)
    with pytest.raises(UnsupportedModelError, match="safety_checker"):
        fastenc.optimize(pipe2, backend="torch", strict=True)


def test_bad_arguments(dirs):
    pipe = _load(dirs["sd"])
    with pytest.raises(InputError, match="prompt_cache"):
        fastenc.optimize(pipe, prompt_cache="yes")
    with pytest.raises(InputError, match="prompt_cache"):
        fastenc.optimize(pipe.text_encoder, prompt_cache=True)
    with pytest.raises(InputError, match="max_entries"):
        fastenc.PromptCache(max_entries=0)
    with pytest.raises(InputError, match="check_weights"):
        fastenc.PromptCache(check_weights="no")


def test_save_pretrained_writes_a_plain_pipeline(dirs, pairs, tmp_path):
    ref, fast = pairs["sd3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast.save_pretrained(str(tmp_path / "saved"))
    again = _load(tmp_path / "saved")
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        assert type(getattr(again, name)) is type(getattr(ref, name))
    assert_outputs_close(encode(again, "sd3", ["a red cat"]), encode(ref, "sd3", ["a red cat"]))


def test_import_fastenc_does_not_import_diffusers():
    code = "import sys, fastenc; fastenc.PromptCache; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ prompt cache


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_cache_hit_runs_no_encoder_op(dirs, pairs, family):
    ref, _ = pairs[family]
    cache = fastenc.PromptCache()
    pipe = fastenc.optimize(_load(dirs[family]), backend="torch", prompt_cache=cache)
    want = encode(ref, family, PROMPTS, negative=NEGATIVE)
    first = encode(pipe, family, PROMPTS, negative=NEGATIVE)
    assert cache.hits == 0 and cache.misses > 0
    misses = cache.misses
    with fastenc.trace() as t:
        again = encode(pipe, family, PROMPTS, negative=NEGATIVE)
    assert dict(t.counts) == {}  # no encoder op ran
    assert cache.misses == misses and cache.hits == misses
    assert_outputs_close(first, want)
    for a, b in zip(again, first, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    # a batch mixing a cached and a new prompt runs the encoders on the new row only
    with fastenc.trace() as t:
        mixed = encode(pipe, family, ["a red cat", "a green tree"], negative=NEGATIVE, cfg=family != "flux")
    assert cache.misses == misses + (2 if family == "sdxl" else 2)  # one new row per encoder
    assert t.counts["torch.attention"] > 0
    assert_outputs_close(mixed, encode(ref, family, ["a red cat", "a green tree"], negative=NEGATIVE))


def _layers(te):
    return getattr(te, "text_model", te).encoder.layers  # transformers >= 5.2x dropped CLIPTextModel.text_model


def _edit_in_place(pipe):
    _layers(pipe.text_encoder)[0].mlp.fc1.weight.data[0, 0] += 0.5


def _load_state_dict(pipe):
    sd = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    key = next(k for k in sd if k.endswith("layers.1.self_attn.q_proj.weight"))
    sd[key][3] *= 1.5
    pipe.text_encoder.load_state_dict(sd)


def _k_proj_data_edit(pipe):  # q/k/v live in the fused buffer: an edit through .data must still be seen
    _layers(pipe.text_encoder)[0].self_attn.k_proj.weight.data.mul_(1.25)


def _fused_optimizer_step(pipe):  # a fused / foreach optimizer step updates weights without autograd
    params = [p for p in pipe.text_encoder.parameters()]
    for p in params:
        p.grad = torch.full_like(p, 1e-2)
    torch.optim.SGD(params, lr=1.0, foreach=True).step()
    for p in params:
        p.grad = None


@pytest.mark.parametrize("edit", [_edit_in_place, _load_state_dict, _k_proj_data_edit, _fused_optimizer_step])
def test_cache_sees_weight_changes(dirs, edit):
    ref = _load(dirs["sd"])
    cache = fastenc.PromptCache()
    pipe = fastenc.optimize(_load(dirs["sd"]), backend="torch", prompt_cache=cache)
    before = encode(pipe, "sd", ["a red cat"], cfg=False)[0]
    edit(pipe)
    edit(ref)
    misses = cache.misses
    after = encode(pipe, "sd", ["a red cat"], cfg=False)[0]
    assert cache.misses == misses + 1
    assert not torch.equal(after, before)
    assert_close(after, encode(ref, "sd", ["a red cat"], cfg=False)[0], **FP32, name="after edit")


def _lora_state_dict(te, rank=4, seed=0):
    """A peft-format LoRA for every q/v projection of a CLIP text tower, as diffusers' load_lora_weights takes it."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in te.named_modules():
        if name.endswith(("self_attn.q_proj", "self_attn.v_proj")):
            sd[f"text_encoder.{name}.lora_A.weight"] = torch.randn(rank, m.weight.shape[1], generator=g) * 0.3
            sd[f"text_encoder.{name}.lora_B.weight"] = torch.randn(m.weight.shape[0], rank, generator=g) * 0.3
    return sd


def test_lora_load_and_fuse_follow_and_invalidate(dirs):
    pytest.importorskip("peft")
    ref = _load(dirs["sd"])
    cache = fastenc.PromptCache()
    pipe = fastenc.optimize(_load(dirs["sd"]), backend="torch", prompt_cache=cache)
    plain = encode(pipe, "sd", ["a red cat"], cfg=False)[0]
    lora = _lora_state_dict(ref.text_encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_weights({k: v.clone() for k, v in lora.items()}, adapter_name="x")
        pipe.load_lora_weights({k: v.clone() for k, v in lora.items()}, adapter_name="x")
    for step in ("loaded", "scaled", "fused"):
        if step == "scaled":
            ref.set_adapters(["x"], adapter_weights=[0.5])
            pipe.set_adapters(["x"], adapter_weights=[0.5])
        if step == "fused":
            ref.fuse_lora(components=["text_encoder"], lora_scale=0.7)
            pipe.fuse_lora(components=["text_encoder"], lora_scale=0.7)
        misses = cache.misses
        with fastenc.trace() as t:
            got = encode(pipe, "sd", ["a red cat"], cfg=False)[0]
        assert cache.misses == misses + 1, step
        assert t.counts["torch.module"] > 0  # the LoRA-wrapped projections ran as modules
        assert not torch.equal(got, plain)
        assert_close(got, encode(ref, "sd", ["a red cat"], cfg=False)[0], **FP32, name=f"lora {step}")
        plain = got


def test_disk_cache_round_trip(dirs, pairs, tmp_path):
    ref, _ = pairs["sd3"]
    want = encode(ref, "sd3", PROMPTS, negative=NEGATIVE)
    c1 = fastenc.PromptCache(path=tmp_path / "embeds")
    first = encode(
        fastenc.optimize(_load(dirs["sd3"]), backend="torch", prompt_cache=c1), "sd3", PROMPTS, negative=NEGATIVE
    )
    assert_outputs_close(first, want)
    assert len(list((tmp_path / "embeds").glob("*.safetensors"))) == c1.misses > 0
    c2 = fastenc.PromptCache(path=tmp_path / "embeds", max_entries=2)  # a new process: memory empty, disk full
    pipe = fastenc.optimize(_load(dirs["sd3"]), backend="torch", prompt_cache=c2)
    with fastenc.trace() as t:
        got = encode(pipe, "sd3", PROMPTS, negative=NEGATIVE)
    assert dict(t.counts) == {} and c2.misses == 0 and c2.disk_hits == c1.misses
    assert len(c2) == 2  # LRU bound
    for a, b in zip(got, first, strict=True):
        assert torch.equal(a, b)
    (tmp_path / "embeds" / "junk.safetensors").write_bytes(b"not a file")  # ignored, never loaded
    c2.clear(disk=True)
    assert not list((tmp_path / "embeds").glob("*.safetensors"))


def test_weights_fingerprint_sees_single_bit_flips():
    from fastenc.core.fingerprint import tensor_checksum

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.randn(33, 17).to(dtype)
        base = tensor_checksum(t)
        for idx in [(0, 0), (32, 16), (5, 9)]:
            u = t.clone()
            u.view(torch.int16 if dtype != torch.float32 else torch.int32)[idx] ^= 1  # lowest mantissa bit
            assert tensor_checksum(u) != base, (dtype, idx)
        u = t.clone()
        u[[1, 2]] = u[[2, 1]]  # two rows swapped
        assert tensor_checksum(u) != base or torch.equal(t[1], t[2])


def test_weights_fingerprint_follows_content_not_address():
    """The same values at an address that is not a multiple of the word size (a slice of a larger buffer, as the fused
    q/k/v layout or a memory-mapped checkpoint gives) have the checksum and fingerprint of an aligned copy."""
    from fastenc.core.fingerprint import tensor_checksum, weights_fingerprint

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        odd = torch.randn(1 + 6 * 8).to(dtype)[1:].view(6, 8)  # one element past an aligned start
        assert odd.data_ptr() % 8
        assert tensor_checksum(odd) == tensor_checksum(odd.clone()), dtype
        a, b = torch.nn.Module(), torch.nn.Module()
        a.weight, b.weight = torch.nn.Parameter(odd), torch.nn.Parameter(odd.clone())
        assert a.weight.data_ptr() % 8 and not b.weight.data_ptr() % 8
        assert weights_fingerprint(a) == weights_fingerprint(b), dtype


# ------------------------------------------------------------------------------------------------ fp16 T5


def test_flux_fp16_t5_stays_finite(dirs):
    """FLUX cast to fp16 (`pipe.to(torch.float16)`) with T5's FFN output scaled past fp16's range: transformers'
    embeddings are wrong (its residual is clamped), fastenc's (fp32 residual stream) stay finite and close to the
    fp32 pipeline's."""
    pipes = [_load(dirs["flux"]) for _ in range(3)]
    with torch.no_grad():
        for p in pipes:
            for block in p.text_encoder_2.encoder.block:
                block.layer[-1].DenseReluDense.wo.weight.mul_(4e4)  # stays finite in fp16
                block.layer[-1].DenseReluDense.wi_1.weight.mul_(4.0)
    p32, p16, f16 = pipes[0], pipes[1].to(torch.float16), pipes[2].to(torch.float16)
    fastenc.optimize(f16, backend="torch")
    assert all(torch.isfinite(p).all() for p in f16.text_encoder_2.parameters())
    with torch.no_grad():
        assert (
            max(
                h.abs().max().item()
                for h in p32.text_encoder_2(
                    p32.tokenizer_2(["a red cat"], return_tensors="pt").input_ids, output_hidden_states=True
                ).hidden_states
            )
            > 65504
        )  # fp16 cannot hold the residual stream
    want = encode(p32, "flux", ["a red cat"])[0]
    base = encode(p16, "flux", ["a red cat"])[0]
    got = encode(f16, "flux", ["a red cat"])[0]
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    err = (got.float() - want).abs().max().item()
    base_err = (base.float() - want).abs().max().item() if torch.isfinite(base).all() else float("inf")
    assert err < 2e-2 and base_err > 0.5, (err, base_err)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_encode(dirs, pairs, tmp_path, capsys):
    from safetensors.torch import load_file

    from fastenc.cli import main

    out = tmp_path / "embeds.safetensors"
    argv = ["encode", "--pipeline", str(dirs["sd3"]), "--prompt", "a red cat", "--prompt", "a dog"]
    argv += ["--negative-prompt", "blurry", "--max-sequence-length", str(T5_LEN), "--backend", "torch"]
    assert main(argv + ["--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for name in ("text_encoder_3", "FastT5EncoderModel", "pooled_prompt_embeds", f"(2, {77 + T5_LEN}, 32)"):
        assert name in text, text
    got = load_file(str(out))
    want = encode(pairs["sd3"][0], "sd3", ["a red cat", "a dog"], negative=["blurry", "blurry"])
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    assert sorted(got) == sorted(names)
    for name, w in zip(names, want, strict=True):
        assert_close(got[name], w, **FP32, name=name)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pipeline", "/nonexistent/pipe"], "is not a directory"),
        (["--clip-skip", "-1"], "--clip-skip must be >= 0"),
        (["--max-sequence-length", "8"], "takes no max_sequence_length"),  # SD 1.x has no T5
        (["--out", "/nonexistent/dir/e.safetensors"], "does not exist"),
        (["--clip-skip", "100"], "--clip-skip must be in [0, 3] for StableDiffusionPipeline (text_encoder has 3"),
        (["--images-per-prompt", "-2"], "--images-per-prompt must be >= 1, got -2"),
        (["--max-sequence-length", "100000"], "--max-sequence-length must be in [1, 512], got 100000"),
    ],
)
def test_cli_encode_bad_input(dirs, capsys, extra, message):
    from fastenc.cli import main

    argv = ["encode", "--pipeline", str(dirs["sd"]), "--prompt", "a cat", "--device", "cpu", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastenc encode: error:") and message in err[0], err


def _one_error_line(capsys, argv, message):
    from fastenc.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastenc encode: error:") and message in err[0], err


@pytest.mark.parametrize("family, skip", [("sdxl", 3), ("sd3", 3), ("sdxl", -1)])
def test_cli_encode_clip_skip_range_of_two_encoder_pipelines(dirs, capsys, family, skip):
    """SDXL / SD3 read hidden_states[-(clip_skip + 2)]: with 3-layer CLIP encoders the range is [0, 2]."""
    argv = ["encode", "--pipeline", str(dirs[family]), "--prompt", "a cat", "--device", "cpu", "--backend", "torch"]
    argv += ["--max-sequence-length", str(T5_LEN)] if family == "sd3" else []
    message = "--clip-skip must be in [0, 2]" if skip >= 0 else "--clip-skip must be >= 0"
    _one_error_line(capsys, argv + ["--clip-skip", str(skip)], message)
    if skip == 3:  # the top of the range runs
        from fastenc.cli import main

        assert main(argv + ["--clip-skip", "2"]) == 0


def test_cli_encode_sd_clip_skip_without_text_model(dirs, capsys):
    """diffusers' SD 1.x applies clip_skip through text_encoder.text_model; a transformers CLIPTextModel without it
    is one error line naming --clip-skip (where it has one, --clip-skip runs)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastenc.cli import main

    argv = ["encode", "--pipeline", str(dirs["sd"]), "--prompt", "a cat", "--device", "cpu", "--clip-skip", "1"]
    if hasattr(CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1)), "text_model"):
        assert main(argv) == 0
    else:
        _one_error_line(capsys, argv, "--clip-skip: StableDiffusionPipeline.encode_prompt applies clip_skip through")


def test_cli_encode_out_must_be_a_writable_file(dirs, tmp_path, capsys, monkeypatch):
    """--out a directory, --out under a regular file, and a disk that fills up while --out is written: one error line
    each, exit 2, and never a partial file under --out's name."""
    import errno
    import os

    argv = ["encode", "--pipeline", str(dirs["sd"]), "--prompt", "a cat", "--device", "cpu", "--backend", "torch"]
    _one_error_line(capsys, argv + ["--out", str(tmp_path)], "is a directory")
    (tmp_path / "file").write_text("x")
    _one_error_line(capsys, argv + ["--out", str(tmp_path / "file" / "e.safetensors")], "is not a directory")
    real_write = os.write

    def full_write(fd, data):
        if len(data) > 64:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "out" / "e.safetensors"
    out.parent.mkdir()
    monkeypatch.setattr(os, "write", full_write)
    _one_error_line(capsys, argv + ["--out", str(out)], "No space left on device")
    assert list(out.parent.iterdir()) == []


def test_cli_encode_truncated_weights_is_one_error_line(dirs, tmp_path, capsys):
    import shutil

    bad = tmp_path / "sd"
    shutil.copytree(dirs["sd"], bad)
    (weights,) = (bad / "text_encoder").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    argv = ["encode", "--pipeline", str(bad), "--prompt", "a cat", "--device", "cpu"]
    _one_error_line(capsys, argv, "could not be loaded as a diffusers pipeline")


def test_cli_bench_pipeline(dirs, tmp_path, capsys):
    import json

    from fastenc.cli import main

    out = tmp_path / "rows.jsonl"
    argv = ["bench", "--pipeline", str(dirs["sdxl"]), "--iters", "1", "--warmup", "0", "--batch", "1,2"]
    assert main(argv + ["--out", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(r["competitor"], r["batch"]) for r in rows}
    for b in (1, 2):
        assert {("eager", b), ("fastenc", b), ("fastenc+prompt-cache-hit", b), ("fingerprint (all encoders)", b)} <= got
    for r in rows:
        assert r["bench"] == "encode_prompt" and r["pipeline"] == "StableDiffusionXLPipeline" and r["p50_ms"] > 0
        if "max_abs_diff" in r:
            assert r["max_abs_diff"] <= 1e-5, r
    assert "| StableDiffusionXLPipeline | fastenc |" in capsys.readouterr().out


def test_cache_bypassed_with_autograd_says_so(dirs):
    """encode_prompt outside no_grad with trainable encoder weights: the encoder runs (gradients reach the weights),
    counted as bypassed, with one FallbackWarning naming the remedy."""
    cache = fastenc.PromptCache()
    pipe = fastenc.optimize(_load(dirs["sd"]), backend="torch", prompt_cache=cache)
    with pytest.warns(fastenc.FallbackWarning, match="bypass the cache"):
        out = pipe.encode_prompt("a red cat", "cpu", 1, False)[0]
    out.sum().backward()
    assert pipe.text_encoder.get_input_embeddings().weight.grad is not None
    assert cache.bypassed == 1 and cache.misses == 0
