"""Encoder diagnostics for text-to-image users: token budget, long-prompt chunking, prompt weighting, the binding
probe and SDXL / SD3 / FLUX conditioning stacks. Names load on first use (`import fastenc.diagnostics` imports
no torch); `fastenc tokens` / `fastenc probe` are `tokens.add_tokens_parser` / `probe.add_probe_parser`."""

from ..core.lazy import lazy_names

_LAZY = {  # public name -> its module
    "ProbeReport": ".probe",
    "binding_probe": ".probe",
    "caption_variants": ".probe",
    "probe_file": ".probe",
    "text_similarity": ".probe",
    "flux_conditioning": ".stacks",
    "sd3_conditioning": ".stacks",
    "sdxl_conditioning": ".stacks",
    "TokenReport": ".tokens",
    "chunk_prompt_ids": ".tokens",
    "encode_chunks": ".tokens",
    "encode_long_prompt": ".tokens",
    "load_tokenizer": ".tokens",
    "token_report": ".tokens",
    "apply_weights": ".weighting",
    "parse_weighted_prompt": ".weighting",
    "weighted_prompt_embeds": ".weighting",
    "weighted_token_ids": ".weighting",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY)


__all__ = sorted(_LAZY)
