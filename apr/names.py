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
    """A family is the Llama skeleton plus flags: which optional tensors and attention
    options its HF class has, and how llama.cpp stores it."""
    name: str                 # our family name, also APR `architecture`
    hf_architecture: str      # HF `architectures[0]`, APR `hf_architecture`
    hf_model_type: str        # HF `model_type`
    gguf_arch: str            # GGUF `general.architecture`
    attention_bias: bool      # q/k/v projections carry a bias by default
    gguf_rope_permuted: bool  # llama.cpp stores Q/K rows in adjacent-pair rotary order
    output_bias: bool         # with attention_bias, o_proj has a bias too (HF Llama; not Qwen2)
    gguf_free_head_dim: bool  # llama.cpp honours attention.key_length (head_dim != hidden/heads)
    attention_bias_option: bool = False  # HF config has attention_bias (else fixed by family)
    mlp_bias_option: bool = False        # HF config has mlp_bias (gate/up/down biases)
    sliding_window_option: bool = False  # HF config has sliding-window attention layers
    sliding_all_layers: bool = False     # HF's sliding_window applies to every layer (Mistral)
    qk_norm: bool = False                # RMSNorm over each head of q and k before rotary
    gguf_mlp_bias: bool = False          # llama.cpp loads and applies ffn_{gate,up,down}.bias
    gguf_attention_bias: bool = True     # llama.cpp loads and applies the q/k/v(/o) biases
    gguf_family: str = ""                # the family a GGUF of this one reads back as ("": itself)
    pretraining_tp: bool = False         # HF config has pretraining_tp (written as 1)
    norm_offset: float = 0.0             # RMSNorm multiplies by (norm_offset + w) (Gemma: 1)
    gguf_norm_fold: bool = False         # llama.cpp stores norm weights as norm_offset + w
    embed_scale: bool = False            # embeddings multiplied by sqrt(hidden_size) (Gemma)
    post_norms: bool = False             # a norm after attention and after the MLP (Gemma)
    softcap_option: bool = False         # final logit soft-capping (Gemma 2, 3) ...
    attn_softcap: bool = False           # ... and attention logit soft-capping (Gemma 2 only:
                                         # Gemma 3's config has the key, its model ignores it)
    query_scalar_option: bool = False    # query_pre_attn_scalar replaces head_dim in the scale
    hf_act_key: str = "hidden_act"       # the config.json key of the MLP activation
    default_act: str = "silu"
    # transformers' defaults for keys a config.json may leave out
    fused: bool = False                  # q/k/v and gate/up as one matrix each (Phi-3)
    default_window: int | None = None    # sliding_window when config.json leaves it out
    local_rope: bool = False             # sliding layers have a RoPE of their own (Gemma 3)
    window_pattern: int = 0              # default layer types: every n-th layer full, others slide
    default_head_dim: int = 0            # 0: hidden_size // num_heads
    default_tied: bool = False
    default_pad: int | None = None       # pad_token_id when config.json leaves it out
    rope_theta_range: tuple[float, float] = (1e3, 1e8)   # what qa calls plausible


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", "llama", "llama",
                    attention_bias=False, gguf_rope_permuted=True, output_bias=True,
                    gguf_free_head_dim=True, attention_bias_option=True, mlp_bias_option=True,
                    gguf_mlp_bias=True, pretraining_tp=True),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "qwen2", "qwen2",
                    attention_bias=True, gguf_rope_permuted=False, output_bias=False,
                    gguf_free_head_dim=False, sliding_window_option=True,
                    rope_theta_range=(1e5, 1e8)),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", "qwen3", "qwen3",
                    attention_bias=False, gguf_rope_permuted=False, output_bias=True,
                    gguf_free_head_dim=True, attention_bias_option=True,
                    sliding_window_option=True, qk_norm=True, gguf_attention_bias=False,
                    rope_theta_range=(1e5, 1e8), default_head_dim=128),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", "gemma2", "gemma2",
                     attention_bias=False, gguf_rope_permuted=False, output_bias=True,
                     gguf_free_head_dim=True, attention_bias_option=True,
                     sliding_window_option=True, gguf_attention_bias=False, norm_offset=1.0,
                     gguf_norm_fold=True, embed_scale=True, post_norms=True, softcap_option=True,
                     attn_softcap=True, query_scalar_option=True, hf_act_key="hidden_activation",
                     default_act="gelu_pytorch_tanh", default_head_dim=256, default_tied=True,
                     window_pattern=2, default_pad=0),
    "gemma3": Family("gemma3", "Gemma3ForCausalLM", "gemma3_text", "gemma3",
                     attention_bias=False, gguf_rope_permuted=False, output_bias=True,
                     gguf_free_head_dim=True, attention_bias_option=True,
                     sliding_window_option=True, qk_norm=True, gguf_attention_bias=False,
                     norm_offset=1.0, gguf_norm_fold=True, embed_scale=True, post_norms=True,
                     softcap_option=True, query_scalar_option=True, local_rope=True,
                     window_pattern=6, hf_act_key="hidden_activation",
                     default_act="gelu_pytorch_tanh", default_head_dim=256, default_tied=True,
                     default_pad=0),
    "phi3": Family("phi3", "Phi3ForCausalLM", "phi3", "phi3",
                   attention_bias=False, gguf_rope_permuted=False, output_bias=False,
                   gguf_free_head_dim=True, sliding_window_option=True, sliding_all_layers=True,
                   fused=True, default_pad=32000),
    # llama.cpp stores a Mistral as a llama (and does not apply its sliding window)
    "mistral": Family("mistral", "MistralForCausalLM", "mistral", "llama",
                      attention_bias=False, gguf_rope_permuted=True, output_bias=False,
                      gguf_free_head_dim=True, sliding_window_option=True,
                      sliding_all_layers=True, gguf_family="llama"),
}


def family_from_any(value: str | None) -> str | None:
    """Map a family name, HF class name, HF model_type or GGUF architecture to our family."""
    if not value:
        return None
    low = value.lower()
    for fam in FAMILIES.values():
        if low in (fam.name, fam.hf_architecture.lower(), fam.hf_model_type):
            return fam.name
    return family_of_gguf_arch(low)


def family_of_gguf_arch(arch: str | None) -> str | None:
    """The family a GGUF `general.architecture` reads as (a Mistral GGUF is a llama)."""
    for fam in FAMILIES.values():
        if fam.gguf_arch == arch and not fam.gguf_family:
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
LAYOUT_GGUF_NORM_FOLD = "GGUF, norm weight stored as 1 + w (llama.cpp's Gemma fold)"

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
PAD_KEY = "pad_token_id"             # our custom key: the embedding's padding row (HF's pad_token_id)
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
    "pad_token_id": "pad_token_id",       # training only: the padding_idx of the embedding
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
    "qwen3": frozenset({"hidden_act", "attention_bias", "rope_theta", "rope_parameters",
                        "rope_scaling", "use_sliding_window", "sliding_window",
                        "max_window_layers", "layer_types"}),
    "mistral": frozenset({"hidden_act", "rope_theta", "rope_parameters", "rope_scaling",
                          "sliding_window"}),
    "gemma3": frozenset({"hidden_activation", "hidden_act", "attention_bias", "rope_theta",
                         "rope_parameters", "rope_scaling", "rope_local_base_freq",
                         "sliding_window", "sliding_window_pattern", "_sliding_window_pattern",
                         "layer_types", "query_pre_attn_scalar", "attn_logit_softcapping",
                         "final_logit_softcapping"}),
    "phi3": frozenset({"hidden_act", "rope_theta", "rope_parameters", "rope_scaling",
                       "sliding_window", "original_max_position_embeddings"}),
    "gemma2": frozenset({"hidden_activation", "hidden_act", "attention_bias", "rope_theta",
                         "rope_parameters", "rope_scaling", "sliding_window", "layer_types",
                         "query_pre_attn_scalar", "attn_logit_softcapping",
                         "final_logit_softcapping"}),
}
# config.json keys that do not change the logits of a causal LM.
HF_INERT_KEYS: frozenset[str] = frozenset({
    # identity and provenance
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_bfloat16",
    # token ids (the tokenizer's business; generation only)
    "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    # initialization of new weights, caching and outputs
    "initializer_range", "use_cache", "output_hidden_states", "output_attentions",
    "return_dict", "torchscript", "output_router_logits",
    # dropout: off at inference (and the reference trains without dropout)
    "attention_dropout", "resid_pdrop", "embd_pdrop",
    # tensor-parallel slicing of the same products
    "pretraining_tp",
    # which attention kernel: the same function
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    # which software runs the model, not what it computes: remote-code classes (transformers
    # uses its own class when it has one), the cache class, a converter's marks, another
    # runtime's settings
    "auto_map", "cache_implementation", "is_llama_config", "transformers.js_config",
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
# (auto_map too: it names code files that a written directory does not hold)
HF_REWRITTEN_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                               "auto_map"})
# config.json keys refused unless they hold this value (None: refused unless absent/null).
HF_DEFAULT_ONLY: dict[str, object] = {
    "is_encoder_decoder": False, "is_decoder": False, "add_cross_attention": False,
    "cross_attention_hidden_size": None, "tie_encoder_decoder": False,
    "chunk_size_feed_forward": 0, "pruned_heads": {}, "quantization_config": None,
    "num_experts": None, "use_bidirectional_attention": None,
    # semantic keys of other code that stock configs carry at the value that changes nothing
    # (SmolLM2's rope_interleaved: false is HF's halves order; DeepSeek-R1-Distill-Qwen's
    # use_mrope: false is Qwen2's plain RoPE); any other value is refused
    "rope_interleaved": False, "use_mrope": False,
}

# APR metadata: custom keys the reference models (written only when not the default)
APR_MODELED_KEYS = (PAD_KEY, "hidden_act", "mlp_bias", "sliding_window", "layer_types", "rope_scaling",
                    "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                    "rope_local_theta", "rope_local_scaling")
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
    "{arch}.attention.sliding_window": 0,     # modeled for gemma2, gemma3 and phi3
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
GGUF_ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
GGUF_SLIDING_WINDOW_KEY = "{arch}.attention.sliding_window"
# which layers slide: a bool per layer, or n (every n-th layer full); llama.cpp's gemma2/gemma3
# read it, defaulting to 2 and 6
GGUF_SLIDING_PATTERN_KEY = "{arch}.attention.sliding_window_pattern"
GGUF_ROPE_BASE_SWA_KEY = "{arch}.rope.freq_base_swa"
GGUF_ATTN_SOFTCAP_KEY = "{arch}.attn_logit_softcapping"
GGUF_FINAL_SOFTCAP_KEY = "{arch}.final_logit_softcapping"
GGUF_ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"

# --------------------------------------------------------------------------- tensor kinds
#
# One entry per kind of tensor, in the spirit of gguf-py's MODEL_TENSOR / TENSOR_NAMES: how HF
# (our canonical and APR name) and GGUF spell it, its HF shape as ModelConfig attributes, the
# config attribute that must be true for a model to have it, the head count its rows are
# rotary-permuted with in a llama-order GGUF, whether AdamW decays it, and how a new model
# initializes it. Shapes, name maps, permutation, optimizer groups, random init, diff's
# alignment and qa's checks all read this table.


@dataclass(frozen=True)
class TensorKind:
    kind: str                    # our id: the GGUF name without "blk.{i}."
    hf: str                      # HF / APR template; {i} is the layer index
    gguf: str                    # GGUF template
    shape: tuple[str, ...]       # ModelConfig attributes, one per dimension (HF order)
    when: str = ""               # ModelConfig attribute that must be true ("": always there)
    rotary_heads: str = ""       # config field: the head count its rows are permuted with
    init: str = "normal"         # "normal" (N(0, 0.02^2)), "zeros", or "norm" (the identity
                                 # norm: 1, or 0 where the family computes x * (1 + w))
    families: tuple[str, ...] = ()   # only these families ((): every family without a row
                                     # of its own for this kind)
    not_in: tuple[str, ...] = ()     # families that have no such tensor (fused ones instead)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    @property
    def decays(self) -> bool:
        """AdamW decays the matrices (embedding and projections), not norms or biases."""
        return len(self.shape) >= 2

    @property
    def is_norm(self) -> bool:
        return self.init == "norm"


_L = "model.layers.{i}."
GEMMA = ("gemma2", "gemma3")
FUSED = ("phi3",)
# Rows in table order; a family-specific row comes before the general row of its kind.
TENSOR_KIND_ROWS: tuple[TensorKind, ...] = (
    TensorKind("token_embd.weight", "model.embed_tokens.weight", "token_embd.weight",
               ("vocab_size", "hidden_size")),
    TensorKind("attn_norm.weight", _L + "input_layernorm.weight", "blk.{i}.attn_norm.weight",
               ("hidden_size",), init="norm"),
    # Phi-3: q, k and v as one matrix (rows q, then k, then v)
    TensorKind("attn_qkv.weight", _L + "self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight",
               ("qkv_size", "hidden_size"), families=FUSED),
    TensorKind("attn_q.weight", _L + "self_attn.q_proj.weight", "blk.{i}.attn_q.weight",
               ("q_size", "hidden_size"), rotary_heads="num_heads", not_in=FUSED),
    TensorKind("attn_k.weight", _L + "self_attn.k_proj.weight", "blk.{i}.attn_k.weight",
               ("kv_size", "hidden_size"), rotary_heads="num_kv_heads", not_in=FUSED),
    TensorKind("attn_v.weight", _L + "self_attn.v_proj.weight", "blk.{i}.attn_v.weight",
               ("kv_size", "hidden_size"), not_in=FUSED),
    TensorKind("attn_q.bias", _L + "self_attn.q_proj.bias", "blk.{i}.attn_q.bias", ("q_size",),
               when="attention_bias", rotary_heads="num_heads", init="zeros"),
    TensorKind("attn_k.bias", _L + "self_attn.k_proj.bias", "blk.{i}.attn_k.bias", ("kv_size",),
               when="attention_bias", rotary_heads="num_kv_heads", init="zeros"),
    TensorKind("attn_v.bias", _L + "self_attn.v_proj.bias", "blk.{i}.attn_v.bias", ("kv_size",),
               when="attention_bias", init="zeros"),
    TensorKind("attn_q_norm.weight", _L + "self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight",
               ("head_dim",), when="qk_norm", init="norm"),
    TensorKind("attn_k_norm.weight", _L + "self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight",
               ("head_dim",), when="qk_norm", init="norm"),
    TensorKind("attn_output.weight", _L + "self_attn.o_proj.weight", "blk.{i}.attn_output.weight",
               ("hidden_size", "q_size")),
    TensorKind("attn_output.bias", _L + "self_attn.o_proj.bias", "blk.{i}.attn_output.bias",
               ("hidden_size",), when="output_bias", init="zeros"),
    # Gemma: a norm after attention and after the MLP, and the pre-MLP norm under its own name
    TensorKind("attn_post_norm.weight", _L + "post_attention_layernorm.weight",
               "blk.{i}.post_attention_norm.weight", ("hidden_size",), init="norm",
               families=GEMMA),
    TensorKind("ffn_norm.weight", _L + "pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight",
               ("hidden_size",), init="norm", families=GEMMA),
    TensorKind("ffn_norm.weight", _L + "post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight",
               ("hidden_size",), init="norm"),
    TensorKind("ffn_gate.weight", _L + "mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight",
               ("intermediate_size", "hidden_size"), not_in=FUSED),
    # Phi-3: gate and up as one matrix (rows gate, then up); llama.cpp keeps it as ffn_up
    TensorKind("ffn_up.weight", _L + "mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight",
               ("gate_up_size", "hidden_size"), families=FUSED),
    TensorKind("ffn_up.weight", _L + "mlp.up_proj.weight", "blk.{i}.ffn_up.weight",
               ("intermediate_size", "hidden_size")),
    TensorKind("ffn_down.weight", _L + "mlp.down_proj.weight", "blk.{i}.ffn_down.weight",
               ("hidden_size", "intermediate_size")),
    TensorKind("ffn_gate.bias", _L + "mlp.gate_proj.bias", "blk.{i}.ffn_gate.bias",
               ("intermediate_size",), when="mlp_bias", init="zeros"),
    TensorKind("ffn_up.bias", _L + "mlp.up_proj.bias", "blk.{i}.ffn_up.bias",
               ("intermediate_size",), when="mlp_bias", init="zeros"),
    TensorKind("ffn_down.bias", _L + "mlp.down_proj.bias", "blk.{i}.ffn_down.bias",
               ("hidden_size",), when="mlp_bias", init="zeros"),
    TensorKind("ffn_post_norm.weight", _L + "post_feedforward_layernorm.weight",
               "blk.{i}.post_ffw_norm.weight", ("hidden_size",), init="norm", families=GEMMA),
    TensorKind("output_norm.weight", "model.norm.weight", "output_norm.weight", ("hidden_size",),
               init="norm"),
    TensorKind("output.weight", "lm_head.weight", "output.weight", ("vocab_size", "hidden_size"),
               when="untied"),
)
_KIND_CACHE: dict[str | None, dict[str, TensorKind]] = {}


def kinds_for(family: str | None) -> dict[str, TensorKind]:
    """The kinds a family's tensors can be, by kind id, in table order: for each kind the
    first row that names the family, else its general row. ``None``: every general row."""
    if family not in _KIND_CACHE:
        out: dict[str, TensorKind] = {}
        for row in TENSOR_KIND_ROWS:
            if row.kind in out:
                continue
            if (family in row.families) if row.families else family not in row.not_in:
                out[row.kind] = row
        _KIND_CACHE[family] = out
    return _KIND_CACHE[family]


TENSOR_KINDS = kinds_for(None)

EMBED = TENSOR_KINDS["token_embd.weight"].hf
LM_HEAD = TENSOR_KINDS["output.weight"].hf
FINAL_NORM = TENSOR_KINDS["output_norm.weight"].hf

# llama.cpp's per-pair RoPE divisors (llama3 scaling): GGUF only, derived from the config.
GGUF_ROPE_FREQS = "rope_freqs.weight"

# HF tensors that are not parameters and never go into GGUF.
HF_NON_PARAMETERS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def tensor_name(kind: str, layer: int | None = None, family: str | None = None) -> str:
    """The canonical (HF / APR) name of a tensor of ``kind`` (in ``layer``) in ``family``."""
    k = kinds_for(family)[kind]
    return k.hf.format(i=layer) if k.per_layer else k.hf


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


_PATTERNS: dict[tuple[str | None, str], list[tuple[re.Pattern, TensorKind]]] = {}


def _table(family: str | None, side: str) -> list[tuple[re.Pattern, TensorKind]]:
    """(pattern, kind) per row: the family's rows, or every row (``None``: any family)."""
    key = (family, side)
    if key not in _PATTERNS:
        rows = TENSOR_KIND_ROWS if family is None else list(kinds_for(family).values())
        _PATTERNS[key] = [(_pattern(getattr(k, side)), k) for k in rows]
    return _PATTERNS[key]


def _match(name: str, table) -> tuple[TensorKind, int | None] | None:
    for pat, kind in table:
        m = pat.match(name)
        if m:
            return kind, int(m.group("i")) if "i" in pat.groupindex else None
    return None


def kind_of(name: str, family: str | None = None) -> tuple[TensorKind, int | None] | None:
    """(kind, layer) of a canonical tensor name (in ``family``; None: the first row of any
    family that has the name), or None for a name no kind has."""
    return _match(name, _table(family, "hf"))


def hf_to_gguf_name(name: str, family: str | None = None) -> str | None:
    """GGUF name of an HF tensor of ``family``, or None if llama.cpp has no such tensor."""
    found = _match(name, _table(family, "hf"))
    return None if found is None else found[0].gguf.format(i=found[1])


def gguf_to_hf_name(name: str, family: str | None = None) -> str | None:
    """HF (canonical) name of a GGUF tensor of ``family``, or None if it is not one we know."""
    found = _match(name, _table(family, "gguf"))
    return None if found is None else found[0].hf.format(i=found[1])


def rotary_head_field(name: str) -> str | None:
    """For a Q/K projection tensor, the config field whose head count permutes its rows."""
    found = kind_of(name)
    return (found[0].rotary_heads or None) if found else None


def decays(name: str) -> bool:
    """Whether AdamW applies weight decay to this parameter (by its kind)."""
    found = kind_of(name)
    return found[0].decays if found else False


def init_of(name: str) -> str:
    """How a new model initializes this parameter: "normal", "zeros" or "norm"."""
    found = kind_of(name)
    return found[0].init if found else "normal"


def is_norm(name: str) -> bool:
    found = kind_of(name)
    return bool(found and found[0].is_norm)


def layer_of(name: str) -> int | None:
    """The layer index of a canonical per-layer tensor name (None: not in a layer)."""
    found = kind_of(name)
    return found[1] if found else None
