"""Triton Inference Server repositories from `to_triton_repository`, checked structurally: config.pbtxt parsed into
Triton's own ModelConfig protobuf (tritonclient's model_config_pb2 + google.protobuf.text_format, where tritonclient
is installed) and by a strict schema parser here (always), input / output names, data types and dims equal to the ONNX
graph's, dynamic batching and instance groups set, and the version folder's model loadable by ONNX Runtime."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import transformers as tf

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from fastenc import runtime  # noqa: E402
from fastenc.export import to_triton_repository  # noqa: E402
from fastenc.export.triton_repo import TRITON_TYPES  # noqa: E402
from tests.test_export import clip_config, t5_config  # noqa: E402

# ------------------------------------------------------------------------------------- strict config.pbtxt parser

_TENSOR = {"name": "str", "data_type": "DataType", "dims": ["int"]}
SCHEMA = {  # the subset of Triton's ModelConfig (model_config.proto) fastenc writes; anything else is an error
    "ModelConfig": {
        "name": "str",
        "backend": "str",
        "platform": "str",
        "max_batch_size": "int",
        "input": ["ModelInput"],
        "output": ["ModelOutput"],
        "instance_group": ["ModelInstanceGroup"],
        "dynamic_batching": "ModelDynamicBatching",
    },  # fmt: skip
    "ModelInput": _TENSOR,
    "ModelOutput": _TENSOR,
    "ModelInstanceGroup": {"name": "str", "kind": "Kind", "count": "int", "gpus": ["int"]},
    "ModelDynamicBatching": {
        "preferred_batch_size": ["int"],
        "max_queue_delay_microseconds": "int",
        "preserve_ordering": "bool",
    },  # fmt: skip
}
ENUMS = {"DataType": set(TRITON_TYPES.values()), "Kind": {"KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"}}
_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|(-?\d+)|([A-Za-z_][A-Za-z0-9_]*)|([{}\[\]:,]))')


class PbtxtError(ValueError):
    pass


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise PbtxtError(f"unexpected text at {pos}: {text[pos : pos + 20]!r}")
        pos = m.end()
        if m.group(1) is None and m.lastindex:
            out.append(m.group(m.lastindex))
    return out


def parse_config(text: str, message: str = "ModelConfig") -> dict:
    """config.pbtxt -> dict, enforcing SCHEMA: known fields only, singular fields once, scalar types, enum names."""
    toks = _tokens(text)
    pos = 0

    def scalar(kind):
        nonlocal pos
        tok = toks[pos]
        pos += 1
        if kind == "str":
            if not tok.startswith('"'):
                raise PbtxtError(f"expected a string, got {tok}")
            return tok[1:-1]
        if kind == "int":
            if not re.fullmatch(r"-?\d+", tok):
                raise PbtxtError(f"expected an integer, got {tok}")
            return int(tok)
        if kind == "bool":
            if tok not in ("true", "false"):
                raise PbtxtError(f"expected true/false, got {tok}")
            return tok == "true"
        if tok not in ENUMS[kind]:
            raise PbtxtError(f"{tok} is not a {kind} value")
        return tok

    def value(kind):
        nonlocal pos
        if kind in SCHEMA:
            if toks[pos] != "{":
                raise PbtxtError(f"expected {{ for {kind}, got {toks[pos]}")
            pos += 1
            return fields(kind, "}")
        return scalar(kind)

    def fields(msg, end):
        nonlocal pos
        out = {}
        while pos < len(toks) and toks[pos] != end:
            name = toks[pos]
            pos += 1
            if name not in SCHEMA[msg]:
                raise PbtxtError(f"{msg} has no field {name!r}")
            kind = SCHEMA[msg][name]
            repeated = isinstance(kind, list)
            elem = kind[0] if repeated else kind
            if toks[pos] == ":":
                pos += 1
            elif elem not in SCHEMA:
                raise PbtxtError(f"{msg}.{name}: expected ':'")
            if toks[pos] == "[":
                if not repeated:
                    raise PbtxtError(f"{msg}.{name} is not repeated")
                pos += 1
                items = []
                while toks[pos] != "]":
                    items.append(value(elem))
                    if toks[pos] == ",":
                        pos += 1
                pos += 1
                out.setdefault(name, []).extend(items)
            elif repeated:
                out.setdefault(name, []).append(value(elem))
            else:
                if name in out:
                    raise PbtxtError(f"{msg}.{name} given twice")
                out[name] = value(elem)
        if end is not None:
            if pos >= len(toks):
                raise PbtxtError(f"unterminated {msg}")
            pos += 1
        return out

    result = fields(message, None)
    if pos != len(toks):
        raise PbtxtError(f"trailing tokens: {toks[pos:]}")
    return result


def test_strict_parser_rejects_what_protobuf_would():
    good = 'name: "m"\nmax_batch_size: 4\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]\n'
    assert parse_config(good)["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 3]}]
    for bad, message in (
        (good + "nosuch: 1", "no field 'nosuch'"),
        (good + "max_batch_size: 8", "given twice"),
        ('input [ { name: "x" data_type: TYPE_FLOAT } ]', "not a DataType"),
        ("max_batch_size: many", "expected an integer"),
        ("instance_group [ { kind: KIND_TPU } ]", "not a Kind"),
        ("dynamic_batching { max_queue_delay_microseconds: 1 ", "unterminated"),
    ):
        with pytest.raises(PbtxtError, match=message):
            parse_config(bad)


def _protobuf_config():
    """tritonclient's ModelConfig message class, loaded from its file (the tritonclient.grpc package itself imports
    grpc, which the pb2 module does not need); None where tritonclient is not installed."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    file = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not file.is_file():
        return None
    mod_spec = importlib.util.spec_from_file_location("_fastenc_test_model_config_pb2", file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.ModelConfig


def load_config(entry: Path) -> dict:
    text = (entry / "config.pbtxt").read_text()
    parsed = parse_config(text)
    cls = _protobuf_config()
    if cls is not None:  # Triton's own schema: every field, type and enum name checked by protobuf
        from google.protobuf import json_format, text_format

        proto = text_format.Parse(text, cls())
        as_dict = json_format.MessageToDict(proto, preserving_proto_field_name=True)
        assert as_dict["name"] == parsed["name"] and int(as_dict.get("max_batch_size", 0)) == parsed["max_batch_size"]
        for kind in ("input", "output"):
            assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in as_dict[kind]] == [
                (t["name"], t["data_type"], t["dims"]) for t in parsed[kind]
            ]
        assert ("dynamic_batching" in as_dict) == ("dynamic_batching" in parsed)
        assert [g.get("kind", "KIND_AUTO") for g in as_dict["instance_group"]] == [
            g["kind"] for g in parsed["instance_group"]
        ]
    return parsed


def graph_io(path: Path) -> dict[str, list[tuple[str, str, list]]]:
    """name, Triton data type and dims (-1 for a named axis) of the ONNX graph's inputs and outputs."""
    proto = onnx.load(str(path), load_external_data=False)
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}
    numpy_name = {"FLOAT": "float32", "INT64": "int64", "FLOAT16": "float16", "INT32": "int32", "BOOL": "bool"}
    init = {i.name for i in proto.graph.initializer}

    def spec(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        return vi.name, TRITON_TYPES[numpy_name[names[tt.elem_type]]], dims

    return {"input": [spec(v) for v in proto.graph.input if v.name not in init],
            "output": [spec(v) for v in proto.graph.output]}  # fmt: skip


# -------------------------------------------------------------------------------------------------- repositories


def _check_entry(entry: Path, batched: bool, *, instance_count: int = 1, delay: int = 100):
    config = load_config(entry)
    model_file = entry / "1" / "model.onnx"
    assert model_file.is_file() and config["backend"] == "onnxruntime" and config["name"] == entry.name
    io = graph_io(model_file)
    for kind in ("input", "output"):
        got = [(t["name"], t["data_type"], t["dims"]) for t in config[kind]]
        want = [(n, dt, dims[1:] if batched else dims) for n, dt, dims in io[kind]]
        assert got == want, (kind, got, want)
        if batched:
            assert all(dims[0] == -1 for _, _, dims in io[kind])  # the batch axis Triton batches along
    assert config["instance_group"] == [{"count": instance_count, "kind": "KIND_AUTO"}]
    if batched:
        assert config["max_batch_size"] > 0
        assert config["dynamic_batching"] == {"max_queue_delay_microseconds": delay}
    else:
        assert config["max_batch_size"] == 0 and "dynamic_batching" not in config
    return config


def test_single_tower_repository(tmp_path):
    torch.manual_seed(0)
    model = tf.CLIPTextModelWithProjection(clip_config().text_config).eval()
    entry = to_triton_repository(model, tmp_path, "clip_text", max_batch_size=16, instance_count=2,
                                 max_queue_delay_us=500)  # fmt: skip
    config = _check_entry(entry, batched=True, instance_count=2, delay=500)
    assert config["max_batch_size"] == 16
    assert [t["name"] for t in config["input"]] == ["input_ids"]
    assert [t["name"] for t in config["output"]] == ["text_embeds", "last_hidden_state"]
    assert [t["dims"] for t in config["output"]] == [[model.config.projection_dim], [-1, 32]]
    enc = runtime.load(entry / "1" / "model.onnx")  # the repository's model runs as the drop-in encoder
    ids = torch.randint(3, 90, (2, 6))
    ids[:, -1] = 98
    with torch.no_grad():
        ref = model(ids)
    assert (enc(ids).text_embeds - ref.text_embeds).abs().max() < 1e-4


def test_masked_t5_and_joint_repositories(tmp_path):
    torch.manual_seed(0)
    t5 = tf.T5EncoderModel(t5_config()).eval()
    entry = to_triton_repository(t5, tmp_path, "t5", attention_mask=True, optimize=False)
    config = _check_entry(entry, batched=True)
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("input_ids", "TYPE_INT64", [-1]),
        ("attention_mask", "TYPE_INT64", [-1]),
    ]
    clip = tf.CLIPModel(clip_config()).eval()
    joint = to_triton_repository(clip, tmp_path, "clip", optimize=False)
    config = _check_entry(joint, batched=False)  # two independent batches: no Triton batching
    assert {t["name"]: t["dims"] for t in config["input"]} == {
        "input_ids": [-1, -1],
        "attention_mask": [-1, -1],
        "pixel_values": [-1, 3, 16, 16],
    }
    assert {t["name"]: t["dims"] for t in config["output"]}["logits_per_image"] == [-1, -1]
