"""Names, architecture maps and key aliases: all of them, as data, in one place.

Every other module asks this one how a thing is spelled in a given format; none of them
builds a tensor name or a metadata key from pieces of its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# --------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    name: str                 # our family name, also APR `architecture`
    hf_architecture: str      # HF `architectures[0]`, APR `hf_architecture`
    hf_model_type: str        # HF `model_type`
    gguf_arch: str            # GGUF `general.architecture`
    attention_bias: bool      # q/k/v projections carry a bias by default
    gguf_rope_permuted: bool  # llama.cpp stores Q/K rows in adjacent-pair rotary order
    output_bias: bool         # with attention_bias, o_proj has a bias too (HF Llama; not Qwen2)
    gguf_free_head_dim: bool  # llama.cpp honours attention.key_length (head_dim != hidden/heads)
    mlp_bias_option: bool = False        # HF config has mlp_bias (gate/up/down biases)
    sliding_window_option: bool = False  # HF config has sliding-window attention layers
    gguf_mlp_bias: bool = False          # llama.cpp loads and applies ffn_{gate,up,down}.bias


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", "llama", "llama",
                    attention_bias=False, gguf_rope_permuted=True, output_bias=True,
                    gguf_free_head_dim=True, mlp_bias_option=True, gguf_mlp_bias=True),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "qwen2", "qwen2",
                    attention_bias=True, gguf_rope_permuted=False, output_bias=False,
                    gguf_free_head_dim=False, sliding_window_option=True),
}


def family_from_any(value: str | None) -> str | None:
    """Map a family name, HF class name, HF model_type or GGUF architecture to our family."""
    if not value:
        return None
    low = value.lower()
    for fam in FAMILIES.values():
        if low in (fam.name, fam.hf_architecture.lower(), fam.hf_model_type, fam.gguf_arch):
            return fam.name
    return None


# --------------------------------------------------------------------------- rotary order

ROPE_HALVES = "halves"      # HF order: rotary pairs are (i, i + d/2) ("NEOX"); APR rope_type 2
ROPE_ADJACENT = "adjacent"  # GGUF llama order: pairs are (2i, 2i + 1); APR rope_type 0
APR_ROPE_TYPE = {ROPE_ADJACENT: 0, ROPE_HALVES: 2}
APR_ROPE_TYPE_INV = {v: k for k, v in APR_ROPE_TYPE.items()}

LAYOUT_ROW_MAJOR = "row-major"
LAYOUT_ROPE_ADJACENT = "row-major, Q/K rows in adjacent-pair rotary order"
LAYOUT_GGUF = "GGUF (dims reversed)"
LAYOUT_GGUF_LLAMA_ROPE = "GGUF llama rotary order (dims reversed, Q/K rows in adjacent pairs)"

# --------------------------------------------------------------------------- APR metadata

# Known keys in the order aprender writes them; custom keys follow.
APR_KNOWN_KEYS: tuple[str, ...] = (
    "model_type", "name", "description", "author", "license", "data_source", "data_license",
    "version", "source", "original_format", "created_at", "total_size", "param_count",
    "quantization", "sharding", "chat_template", "chat_format", "special_tokens",
    "architecture", "hf_architecture", "hf_model_type", "hidden_size", "num_layers",
    "num_heads", "num_kv_heads", "vocab_size", "intermediate_size", "max_position_embeddings",
    "rope_theta", "rope_type", "rms_norm_eps", "head_dim",
)
APR_ALWAYS_PRESENT = ("license", "data_source", "data_license")

# Canonical APR key -> aliases accepted on read (never written).
APR_KEY_ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("n_embd", "d_model", "dim", "embedding_length"),
    "num_layers": ("num_hidden_layers", "n_layer", "n_layers", "block_count"),
    "num_heads": ("num_attention_heads", "n_head", "n_heads", "head_count"),
    "num_kv_heads": ("num_key_value_heads", "n_head_kv", "n_kv_heads", "head_count_kv"),
    "vocab_size": ("n_vocab",),
    "intermediate_size": ("ffn_dim", "n_inner", "feed_forward_length"),
    "max_position_embeddings": ("max_seq_len", "n_positions", "n_ctx", "context_length"),
    "rms_norm_eps": ("layer_norm_eps", "norm_eps", "layer_norm_rms_epsilon"),
    "rope_theta": ("rope_freq_base", "freq_base"),
}

DEQUANTIZED_KEY = "dequantized_from"   # {tensor: lossy dtype} of tensors a conversion decoded
NOTES_KEY = "conversion_notes"         # what a conversion changed, in words
GGUF_DEQUANTIZED_KEY = "general." + DEQUANTIZED_KEY
GGUF_NOTES_KEY = "general." + NOTES_KEY
TIED_KEY = "tied_embeddings"         # aprender's custom key for tied embeddings
ATTENTION_BIAS_KEY = "attention_bias"  # our custom key (no typed key exists)
TRAINING_PREFIX = "__training__."

# --------------------------------------------------------------------------- HF config.json

# ModelConfig field -> HF config.json key
HF_CONFIG_KEYS: dict[str, str] = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
}

# --------------------------------------------------------------------------- the closed world
#
# Every key of a config.json, APR metadata or GGUF key/value set is modeled (it changes the
# computation, and the reference implements it), inert (it provably does not change the
# logits: an explicit list), or default-only (refused unless it holds the default). A key
# in none of the lists is refused as well, unless the user names it with --ignore-key.

# hidden_act values the reference implements (transformers' ACT2FN spellings); ref.ops
# holds the functions, and a test keeps the two lists equal.
ACTIVATIONS: tuple[str, ...] = (
    "silu", "swish", "gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh", "gelu_accurate",
    "gelu_fast", "quick_gelu", "relu", "relu2", "relu6", "leaky_relu", "sigmoid", "tanh",
    "mish", "linear",
)
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# config.json keys each family's HF class reads and the reference models (besides
# HF_CONFIG_KEYS and the family keys architectures/model_type).
HF_MODELED_KEYS: dict[str, frozenset[str]] = {
    "llama": frozenset({"hidden_act", "attention_bias", "mlp_bias", "rope_theta",
                        "rope_parameters", "rope_scaling"}),
    "qwen2": frozenset({"hidden_act", "rope_theta", "rope_parameters", "rope_scaling",
                        "use_sliding_window", "sliding_window", "max_window_layers",
                        "layer_types"}),
}
# config.json keys that do not change the logits of a causal LM.
HF_INERT_KEYS: frozenset[str] = frozenset({
    # identity and provenance
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_bfloat16",
    # token ids (the tokenizer's business; generation only)
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    # initialization of new weights, caching and outputs
    "initializer_range", "use_cache", "output_hidden_states", "output_attentions",
    "return_dict", "torchscript", "output_router_logits",
    # dropout: off at inference (and the reference trains without dropout)
    "attention_dropout",
    # tensor-parallel slicing of the same products
    "pretraining_tp",
    # which attention kernel: the same function
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    # task heads that a causal LM does not have
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task",
    "tokenizer_class", "prefix", "task_specific_params", "tf_legacy_loss",
    # generation settings stored in old config.json files
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
})
# inert keys a writer sets itself instead of copying them from the source
HF_REWRITTEN_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype"})
# config.json keys refused unless they hold this value (None: refused unless absent/null).
HF_DEFAULT_ONLY: dict[str, object] = {
    "is_encoder_decoder": False, "is_decoder": False, "add_cross_attention": False,
    "cross_attention_hidden_size": None, "tie_encoder_decoder": False,
    "chunk_size_feed_forward": 0, "pruned_heads": {}, "quantization_config": None,
    "auto_map": None, "num_experts": None,
}

# APR metadata: custom keys the reference models (written only when not the default)
APR_MODELED_KEYS = ("hidden_act", "mlp_bias", "sliding_window", "layer_types")
# APR metadata keys that describe, not compute (besides tokenizer.* and training keys)
APR_INERT_KEYS: frozenset[str] = frozenset({
    "model_type", "name", "description", "author", "license", "data_source", "data_license",
    "version", "source", "original_format", "created_at", "total_size", "param_count",
    "quantization", "sharding", "chat_template", "chat_format", "special_tokens",
    "hf_architecture", "hf_model_type", "conversion_notes", "dequantized_from",
})
APR_INERT_PREFIXES = ("tokenizer.", "training.", TRAINING_PREFIX)

# GGUF: key prefixes that do not change the logits (tokenizer.* is the tokenizer's)
GGUF_INERT_PREFIXES = ("general.", "tokenizer.", "quantize.")
# {arch}.* keys refused unless they hold this value
GGUF_DEFAULT_ONLY: dict[str, object] = {
    "{arch}.rope.scaling.type": "none",
    "{arch}.rope.scaling.factor": 1.0,
    "{arch}.expert_count": 0,
    "{arch}.expert_used_count": 0,
}
# {arch}.* keys that do not change the logits
GGUF_INERT_KEYS = ("{arch}.rope.scaling.original_context_length", "{arch}.rope.scaling.finetuned")

# --------------------------------------------------------------------------- GGUF

# ModelConfig field -> GGUF key under the architecture prefix
GGUF_CONFIG_KEYS: dict[str, str] = {
    "max_position_embeddings": "{arch}.context_length",
    "hidden_size": "{arch}.embedding_length",
    "num_layers": "{arch}.block_count",
    "intermediate_size": "{arch}.feed_forward_length",
    "num_heads": "{arch}.attention.head_count",
    "num_kv_heads": "{arch}.attention.head_count_kv",
    "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "rope_theta": "{arch}.rope.freq_base",
}
GGUF_ROPE_DIM_KEY = "{arch}.rope.dimension_count"
GGUF_KEY_LENGTH_KEY = "{arch}.attention.key_length"
GGUF_VALUE_LENGTH_KEY = "{arch}.attention.value_length"
GGUF_VOCAB_SIZE_KEY = "{arch}.vocab_size"

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"

# Tensor names: (HF pattern, GGUF pattern); {i} is the layer index.
TENSOR_NAMES: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("model.layers.{i}.self_attn.o_proj.bias", "blk.{i}.attn_output.bias"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("model.layers.{i}.mlp.gate_proj.bias", "blk.{i}.ffn_gate.bias"),
    ("model.layers.{i}.mlp.up_proj.bias", "blk.{i}.ffn_up.bias"),
    ("model.layers.{i}.mlp.down_proj.bias", "blk.{i}.ffn_down.bias"),
)

# Tensors whose rows are in rotary order (permuted for llama GGUF), with the config field
# holding the head count to permute with.
ROTARY_TENSORS: dict[str, str] = {
    "self_attn.q_proj.weight": "num_heads",
    "self_attn.q_proj.bias": "num_heads",
    "self_attn.k_proj.weight": "num_kv_heads",
    "self_attn.k_proj.bias": "num_kv_heads",
}

# HF tensors that are not parameters and never go into GGUF.
HF_NON_PARAMETERS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_HF_TO_GGUF = [(_pattern(h), g) for h, g in TENSOR_NAMES]
_GGUF_TO_HF = [(_pattern(g), h) for h, g in TENSOR_NAMES]


def _translate(name: str, table) -> str | None:
    for pat, target in table:
        m = pat.match(name)
        if m:
            return target.format(i=m.group("i")) if "i" in pat.groupindex else target
    return None


def hf_to_gguf_name(name: str) -> str | None:
    """GGUF name of an HF tensor, or None if llama.cpp has no such tensor."""
    return _translate(name, _HF_TO_GGUF)


def gguf_to_hf_name(name: str) -> str | None:
    """HF (canonical) name of a GGUF tensor, or None if it is not one we know."""
    return _translate(name, _GGUF_TO_HF)


def rotary_head_field(name: str) -> str | None:
    """For a Q/K projection tensor, the config field whose head count permutes its rows."""
    for suffix, field in ROTARY_TENSORS.items():
        if name.endswith("." + suffix):
            return field
    return None


def layer_of(name: str) -> int | None:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None
