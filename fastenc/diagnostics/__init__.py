"""Encoder diagnostics for text-to-image users: token budget, long-prompt chunking, prompt weighting, the binding
probe and SDXL / SD3 / FLUX conditioning stacks."""

from .probe import ProbeReport, binding_probe, caption_variants, probe_file, text_similarity
from .stacks import flux_conditioning, sd3_conditioning, sdxl_conditioning
from .tokens import TokenReport, chunk_prompt_ids, encode_chunks, encode_long_prompt, load_tokenizer, token_report
from .weighting import apply_weights, parse_weighted_prompt, weighted_prompt_embeds, weighted_token_ids

__all__ = [
    "ProbeReport",
    "TokenReport",
    "apply_weights",
    "binding_probe",
    "caption_variants",
    "chunk_prompt_ids",
    "encode_chunks",
    "encode_long_prompt",
    "flux_conditioning",
    "load_tokenizer",
    "parse_weighted_prompt",
    "probe_file",
    "sd3_conditioning",
    "sdxl_conditioning",
    "text_similarity",
    "token_report",
    "weighted_prompt_embeds",
    "weighted_token_ids",
]
