"""fastenc.runtime serves only what it can prove is the model's (issue 25, section 4): a cached export is checked
against its digest file and its metadata (weights' fingerprint, export options, fastenc version) before a session is
built, and another model's file, a truncated one, or one without a digest is set aside and exported again; a failed
export is retried after `refresh()`, and under strict=True it is a typed error; `.data` replacements that keep the
pointer (`w.data = w.data.t()`) are noticed on the ONNX Runtime and the torch paths; token ids outside the vocabulary,
empty batches / sequences, garbage files and metadata that lies raise InputError; the export written into the cache is
announced once with its path and size."""

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import fastenc  # noqa: E402
from fastenc import runtime  # noqa: E402
from fastenc.core.errors import FastencError, InputError  # noqa: E402
from fastenc.core.files import file_digest, human_bytes  # noqa: E402
from fastenc.export import export_onnx, to_onnx  # noqa: E402
from fastenc.export.onnx_export import FP32_TOLERANCE  # noqa: E402
from tests.test_export import VOCAB, clip_config, t5_config  # noqa: E402
from tests.test_runtime import _cache  # noqa: E402, F401 - autouse: a cache folder per test, FASTENC_BACKEND unset


def text_model(seed=0):
    torch.manual_seed(seed)
    return tf.CLIPTextModelWithProjection(clip_config(layers=1).text_config).eval()


def ids_and_mask():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB - 3, (2, 7), generator=g)
    ids[:, -1] = VOCAB - 1
    return ids, torch.ones_like(ids)


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def cache_file(fast) -> Path:
    state = fast._fastenc_ort
    key = state.cache_key(fast, runtime.weights_fingerprint(fast))
    return runtime.cache_dir() / "onnx" / f"{fast._fastenc_base.__name__}-{key}" / "model.onnx"


def run_ort(fast, ids, mask):
    with torch.no_grad(), fastenc.trace() as t:
        out = fast(ids, mask)
    return out, t


# ------------------------------------------------------------------------------------------------ the cache's trust


@pytest.mark.parametrize("digest", ["rewritten", "absent"])
def test_another_models_export_under_the_key_is_rejected_and_reexported(digest):
    """Model A's model.onnx placed under model B's cache key (a shared FASTENC_CACHE): B does not serve A's graph. With
    a digest file rewritten to match A's bytes, the metadata (weights' fingerprint) rejects it; without one, the
    missing digest does. Either way B exports its own graph (with a CacheWarning) and matches transformers."""
    a, b = text_model(0), text_model(1)
    ids, mask = ids_and_mask()
    fast_a = fastenc.optimize(a, backend="onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runtime.CacheWarning)
        run_ort(fast_a, ids, mask)
    fast_b = fastenc.optimize(b, backend="onnxruntime")
    src, dst = cache_file(fast_a), cache_file(fast_b)
    assert src.is_file() and src != dst
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    if digest == "rewritten":
        runtime.write_digest(dst)
    with pytest.warns(runtime.CacheWarning, match="not trusted") as rec:
        got, t = run_ort(fast_b, ids, mask)
    reason = next(str(w.message) for w in rec if "not trusted" in str(w.message))
    assert str(dst) in reason
    assert ("fastenc.weights" in reason) if digest == "rewritten" else ("model.onnx.sha256" in reason)
    assert t.counts["onnxruntime.forward"] == 1 and fast_b._fastenc_ort.exports == 1
    with torch.no_grad():
        ref_b, ref_a = b(ids, mask), a(ids, mask)
    assert rel_err(got.text_embeds, ref_b.text_embeds) < FP32_TOLERANCE
    assert rel_err(got.text_embeds, ref_a.text_embeds) > 0.1  # the two models differ: A's graph would show
    assert runtime.check_digest(dst) is None  # the new export has its own digest file


def test_cached_export_carries_its_fingerprint_options_and_version():
    import onnx

    from fastenc._version import __version__

    fast = fastenc.optimize(text_model(), backend="onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runtime.CacheWarning)
        run_ort(fast, *ids_and_mask())
    file = cache_file(fast)
    meta = {p.key: p.value for p in onnx.load(str(file), load_external_data=False).metadata_props}
    assert meta["fastenc.weights"] == runtime.weights_fingerprint(fast)
    assert meta["fastenc.version"] == __version__ and meta["fastenc.opset"] == "18"
    assert meta["fastenc.dtype"] == "float32" and meta["fastenc.class"] == "CLIPTextModelWithProjection"
    assert '"quantize": null' in meta["fastenc.export_options"] and '"mask": true' in meta["fastenc.export_options"]
    side = file.with_name("model.onnx.sha256").read_text()
    assert side == f"{file_digest(file)}  model.onnx\n"  # sha256sum's format


@pytest.mark.parametrize("strict", [False, True])
def test_truncated_cached_export_is_reexported(strict):
    """A cached file cut short (a full disk, a killed copy): exported again, never "torch for good", and never a raw
    protobuf DecodeError under strict=True."""
    model = text_model()
    ids, mask = ids_and_mask()
    first = fastenc.optimize(model, backend="onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runtime.CacheWarning)
        run_ort(first, ids, mask)
    file = cache_file(first)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    fast = fastenc.optimize(model, backend="onnxruntime", strict=strict)
    with pytest.warns(runtime.CacheWarning, match="truncated or changed"):
        got, t = run_ort(fast, ids, mask)
    assert t.counts["onnxruntime.forward"] == 1 and not t.fallbacks and fast._fastenc_ort.exports == 1
    with torch.no_grad():
        assert rel_err(got.text_embeds, model(ids, mask).text_embeds) < FP32_TOLERANCE
    assert file.read_bytes() != data[: len(data) // 2] and runtime.check_digest(file) is None


def test_failed_export_runs_torch_until_refresh_and_is_typed_under_strict(tmp_path, monkeypatch):
    model = text_model()
    ids, mask = ids_and_mask()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("FASTENC_CACHE", str(blocker))  # the cache folder cannot be made
    strict = fastenc.optimize(model, backend="onnxruntime", strict=True)
    with pytest.raises(FastencError, match="ONNX export failed") as err:
        run_ort(strict, ids, mask)
    assert str(blocker) in str(err.value)
    fast = fastenc.optimize(model, backend="onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, t = run_ort(fast, ids, mask)
        assert "ONNX export failed" in t.fallbacks[0].reason and "onnxruntime.forward" not in t.counts
        monkeypatch.setenv("FASTENC_CACHE", str(tmp_path / "good"))  # the cause is gone
        _, t = run_ort(fast, ids, mask)
        assert "onnxruntime.forward" not in t.counts  # no retry on every call
        runtime.refresh(fast)
        again, t = run_ort(fast, ids, mask)
    assert t.counts["onnxruntime.forward"] == 1 and not t.fallbacks
    assert rel_err(again.text_embeds, got.text_embeds) < FP32_TOLERANCE


def test_the_export_written_into_the_cache_is_announced_once():
    model = text_model()
    ids, mask = ids_and_mask()
    fast = fastenc.optimize(model, backend="onnxruntime")
    with pytest.warns(runtime.CacheWarning) as rec:
        run_ort(fast, ids, mask)
        run_ort(fast, ids, mask)
    notes = [str(w.message) for w in rec if issubclass(w.category, runtime.CacheWarning)]
    assert len(notes) == 1, notes
    file = cache_file(fast)
    side = file.with_name("model.onnx.sha256")
    for f in (file, side):
        assert f"{f} ({human_bytes(f.stat().st_size)})" in notes[0]
    again = fastenc.optimize(model, backend="onnxruntime")  # a cache hit writes nothing: says nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", runtime.CacheWarning)
        run_ort(again, ids, mask)


def test_one_fingerprint_keys_the_onnx_cache_and_the_prompt_cache(tmp_path):
    """The ONNX Runtime backend and the prompt cache key their entries with one weights_fingerprint, which leaves out
    where a checkpoint was loaded from: the same weights saved and loaded again reuse the cached export."""
    assert runtime.weights_fingerprint is fastenc.pipelines.weights_fingerprint
    model = text_model()
    ids, mask = ids_and_mask()
    first = fastenc.optimize(model, backend="onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runtime.CacheWarning)
        run_ort(first, ids, mask)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = tf.CLIPTextModelWithProjection.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config._name_or_path != model.config._name_or_path
    again = fastenc.optimize(loaded, backend="onnxruntime")
    got, t = run_ort(again, ids, mask)
    assert t.counts["onnxruntime.forward"] == 1 and again._fastenc_ort.exports == 0
    assert cache_file(again) == cache_file(first)
    with torch.no_grad():
        assert rel_err(got.text_embeds, model(ids, mask).text_embeds) < FP32_TOLERANCE


def test_concurrent_first_calls_export_once_and_trust_each_other():
    """Two optimized models of the same weights (two workers sharing a cache) called at once: the cache folder is
    locked while one checks, exports and writes the digest, so the other finds a complete, trusted export."""
    import threading

    model = text_model()
    ids, mask = ids_and_mask()
    fasts = [fastenc.optimize(model, backend="onnxruntime") for _ in range(2)]
    start, outs, errors = threading.Barrier(2), [None, None], []

    def call(i):
        start.wait()
        try:
            with torch.no_grad():
                outs[i] = fasts[i](ids, mask)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert sum(f._fastenc_ort.exports for f in fasts) == 1
    assert not [w for w in rec if "not trusted" in str(w.message) or "falls back" in str(w.message)]
    with torch.no_grad():
        ref = model(ids, mask)
    for out in outs:
        assert rel_err(out.text_embeds, ref.text_embeds) < FP32_TOLERANCE


# ------------------------------------------------------------------------------------------------ weight layout


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("tower", ["clip", "t5"])
def test_data_replaced_by_its_transpose_is_noticed(backend, tower):
    """`w.data = w.data.t()` keeps the data pointer and the version counter; the strides change, and so does the
    answer: both paths must follow transformers (before: stale by ~3 on both)."""
    if tower == "clip":
        model = text_model()
        w = model.text_model.encoder.layers[0].self_attn.q_proj.weight
    else:
        if backend == "onnxruntime":
            pytest.skip("one ONNX export per test is enough: the weight check is shared by every tower")
        torch.manual_seed(0)
        model = tf.T5EncoderModel(t5_config()).eval()
        w = model.encoder.block[0].layer[0].SelfAttention.q.weight
    assert w.shape[0] == w.shape[1]
    ids, mask = ids_and_mask()
    fast = fastenc.optimize(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", runtime.CacheWarning)
        with torch.no_grad():
            fast(ids, mask)  # weights laid out / exported for the original layout
        ptr, version = w.data_ptr(), w._version
        w.data = w.data.t()
        assert (w.data_ptr(), w._version) == (ptr, version)
        with torch.no_grad(), fastenc.trace() as t:
            got = fast(ids, mask)
            ref = model(ids, mask)
    assert rel_err(got.last_hidden_state, ref.last_hidden_state) < FP32_TOLERANCE
    if backend == "onnxruntime":
        assert t.counts["onnxruntime.export"] == 1 and t.counts["onnxruntime.forward"] == 1


# ------------------------------------------------------------------------------------------------ bad input


def test_token_ids_outside_the_vocabulary_raise(tmp_path):
    model = text_model()
    enc = runtime.load(to_onnx(model, tmp_path / "t.onnx"))
    fast = fastenc.optimize(model, backend="onnxruntime")
    ids, mask = ids_and_mask()
    for bad in (-1, VOCAB):
        wrong = ids.clone()
        wrong[1, 2] = bad
        with pytest.raises(IndexError), torch.no_grad():
            model(wrong, mask)  # transformers raises
        with pytest.raises(InputError, match=rf"input_ids: token id {bad} is outside \[0, {VOCAB}\)"):
            enc(wrong, mask)
        with pytest.raises(InputError, match=rf"input_ids: token id {bad} is outside \[0, {VOCAB}\)"), torch.no_grad():
            fast(wrong, mask)
    assert fast._fastenc_ort.exports == 0  # refused before anything was exported
    with torch.no_grad():
        fast(ids, mask)  # exported now: the encoder's own checks refuse the same ids
        assert fast._fastenc_ort.exports == 1
        for bad in (-1, VOCAB):
            wrong = ids.clone()
            wrong[0, 1] = bad
            with pytest.raises(InputError, match=rf"input_ids: token id {bad} is outside \[0, {VOCAB}\)"):
                fast(wrong, mask)


def test_token_bound_of_an_export_without_the_metadata_comes_from_the_graph(tmp_path):
    import onnx

    path = to_onnx(text_model(), tmp_path / "t.onnx")
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != "fastenc.vocab_size"]
    assert len(kept) < len(proto.metadata_props)
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.save(proto, str(path))
    enc = runtime.load(path)
    assert enc.vocab_size == VOCAB
    with pytest.raises(InputError, match="token id 99 is outside"):
        enc(torch.tensor([[1, 99, VOCAB - 1]]))


@pytest.mark.parametrize("shape", [(0, 7), (2, 0)])
def test_empty_batch_or_sequence_raises_as_transformers_does(tmp_path, shape):
    model = text_model()
    enc = runtime.load(to_onnx(model, tmp_path / "t.onnx", attention_mask=True))
    fast = fastenc.optimize(model, backend="onnxruntime")
    ids = torch.ones(shape, dtype=torch.long)
    with pytest.raises(RuntimeError), torch.no_grad():
        model(ids)  # transformers gives no output for an empty batch or sequence
    for f in (enc, fast):
        with pytest.raises(InputError, match=r"input_ids: shape \(\d, \d\) is empty"), torch.no_grad():
            f(ids)
    torch.manual_seed(0)
    vision = tf.CLIPVisionModelWithProjection(clip_config(layers=1).vision_config).eval()
    venc = runtime.load(to_onnx(vision, tmp_path / "v.onnx"))
    with pytest.raises(InputError, match="pixel_values: shape .* is empty"):
        venc(torch.zeros(0, 3, 16, 16))


def test_garbage_empty_and_lying_onnx_files_raise_input_errors(tmp_path):
    import onnx

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe not a protobuf \x00" * 40)
    for p, message in ((empty, "is empty"), (garbage, "is not an ONNX model")):
        with pytest.raises(InputError, match=message) as err:
            runtime.load(p)
        assert str(p) in str(err.value)
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", 4])
    node = helper.make_node("NoSuchOp", ["input_ids"], ["last_hidden_state"], domain="no.such.domain")
    graph = helper.make_graph([node], "g", [ids], [out])
    alien = tmp_path / "alien.onnx"  # a valid ONNX file ONNX Runtime cannot build a session for
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("no.such.domain", 1)]),
        str(alien),
    )
    with pytest.raises(InputError, match="ONNX Runtime cannot load it") as err:
        runtime.load(alien)
    assert str(alien) in str(err.value)
    path = to_onnx(text_model(), tmp_path / "t.onnx")
    lies = {
        "fastenc.class": ("CLIPVisionModel", "fastenc.class='CLIPVisionModel' does not describe this graph"),
        "fastenc.output_class": ("transformers.modeling_outputs:BaseModelOutput", "has no field text_embeds"),
        "fastenc.kind": ("t5", "is a clip_text tower, but fastenc.kind says 't5'"),
        "fastenc.max_sequence": ("-3", "fastenc.max_sequence='-3' is not a positive integer"),
    }
    for key, (value, message) in lies.items():
        proto = onnx.load(str(path))
        for prop in proto.metadata_props:
            if prop.key == key:
                prop.value = value
        liar = tmp_path / f"liar-{key}.onnx"
        onnx.save(proto, str(liar))
        with pytest.raises(InputError, match=message) as err:
            runtime.load(liar)
        assert str(liar) in str(err.value), key


def test_export_metadata_argument(tmp_path):
    import onnx

    report = export_onnx(text_model(), tmp_path / "t.onnx", metadata={"my.key": "v"})
    meta = {p.key: p.value for p in onnx.load(report.path, load_external_data=False).metadata_props}
    assert meta["my.key"] == "v" and meta["fastenc.vocab_size"] == str(VOCAB)
    with pytest.raises(InputError, match="metadata must be a dict of str -> str"):
        export_onnx(text_model(), tmp_path / "u.onnx", metadata={"k": 1})
    with pytest.raises(InputError, match="written by the export itself"):
        export_onnx(text_model(), tmp_path / "u.onnx", metadata={"fastenc.class": "X"})
    assert not (tmp_path / "u.onnx").exists()
