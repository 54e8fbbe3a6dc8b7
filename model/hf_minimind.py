"""Hugging Face interop: MiniMind weights <-> a Hugging Face model folder.

Dense models are exactly a Llama (with per-head q/k norms, as minimind-3 has them, exactly a Qwen3): they export
as a native `LlamaForCausalLM` (`Qwen3ForCausalLM`) folder that transformers (and vLLM, llama.cpp's converter,
lm-eval) load without remote code. Two layout differences are converted:
  * names: `layers.0.attention.wq` <-> `model.layers.0.self_attn.q_proj`, w1/w3/w2 <-> gate/up/down_proj, ...
  * rotary layout: we rotate interleaved pairs (2i, 2i+1) of each head, HF Llama rotates halves (i, i + hd/2).
    Reordering the rows of wq and wk per head (even rows first, then odd rows) turns one into the other; q.k
    dot products are unchanged because q and k get the same reordering. The q/k norm weights (one per position
    within a head) are reordered the same way, since they scale q and k before the rotation.
Mixture-of-experts models have no Llama equivalent: they export with this file, model.py, LMConfig.py and
common.py copied into the folder (`auto_map` in config.json), loadable with `trust_remote_code=True` and no network.

This file is itself that remote code, so it imports only installed packages and those three sibling modules.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, GenerationMixin, LlamaConfig, PreTrainedModel, Qwen3Config
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .common import ConfigError, MissingInputError, WeightsMismatchError, read_checkpoint
from .LMConfig import LMConfig
from .model import KVCache, MiniMindLM

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
REMOTE_CODE_FILES = ("hf_minimind.py", "model.py", "LMConfig.py", "common.py")  # what a MoE export ships beside its weights


# ----------------------------------------------------------------------------------------------------------------
# Rotary layout: interleaved pairs (ours) <-> rotated halves (HF Llama)


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection (n_heads*hd, dim): per head, rows 0,2,4,.. then 1,3,5,.."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of interleaved_to_halves."""
    rows, cols = weight.shape
    head_dim = rows // n_heads
    return weight.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------------------------------------------
# Dense MiniMind <-> LlamaForCausalLM

LAYER_NAMES = {  # ours (inside layers.{i}.) -> HF Llama (inside model.layers.{i}.)
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
QK_NORM_NAMES = {  # minimind-3's per-head q/k norms, as HF Qwen3 names them
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
}
GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}


def layer_names(config: LMConfig) -> dict[str, str]:
    """Our per-layer names -> HF names: Llama's, plus Qwen3's q/k norms for a qk_norm model."""
    return {**LAYER_NAMES, **(QK_NORM_NAMES if config.qk_norm else {})}


def to_hf_rotary(name: str, tensor: torch.Tensor, config: LMConfig, inverse: bool = False) -> torch.Tensor:
    """A layer tensor in HF's rotated-halves layout (inverse: back to our interleaved pairs). The q/k projections'
    rows are permuted per head, and so are the per-head q/k norm weights (one head_dim vector each)."""
    reorder = halves_to_interleaved if inverse else interleaved_to_halves
    if name == "attention.wq.weight":
        return reorder(tensor, config.n_heads)
    if name == "attention.wk.weight":
        return reorder(tensor, config.n_kv_heads)
    if name in QK_NORM_NAMES:
        return reorder(tensor[:, None], 1)[:, 0]
    return tensor


def native_to_llama_state_dict(state: dict[str, torch.Tensor], config: LMConfig) -> dict[str, torch.Tensor]:
    """HF Llama (or, with qk_norm, Qwen3) tensors for a dense MiniMind state dict. The tied output matrix is
    written once (as the embedding); tie_word_embeddings=True tells loaders to reuse it for lm_head."""
    if config.use_moe:
        raise ConfigError("a MoE model has no LlamaForCausalLM equivalent; export it with save_hf_folder (remote code)")
    check_state_matches(state, config, "state dict")
    out = {hf: state[ours] for ours, hf in GLOBAL_NAMES.items()}
    for i in range(config.n_layers):
        for ours, hf in layer_names(config).items():
            out[f"model.layers.{i}.{hf}"] = to_hf_rotary(ours, state[f"layers.{i}.{ours}"], config)
    return {k: v.contiguous() for k, v in out.items()}


def llama_to_native_state_dict(state: dict[str, torch.Tensor], config: LMConfig, source: str) -> dict[str, torch.Tensor]:
    """Inverse of native_to_llama_state_dict. source names the folder in error messages."""
    out = {ours: state[hf] for ours, hf in GLOBAL_NAMES.items() if hf in state}
    names = layer_names(config)
    for i in range(config.n_layers):
        for ours, hf in names.items():
            name = f"model.layers.{i}.{hf}"
            if name not in state:
                raise WeightsMismatchError(f"{source}: weight {name} is missing")
            out[f"layers.{i}.{ours}"] = to_hf_rotary(ours, state[name], config, inverse=True).contiguous()
    if "tok_embeddings.weight" not in out:
        raise WeightsMismatchError(f"{source}: weight model.embed_tokens.weight is missing")
    lm_head = state.get("lm_head.weight")
    if lm_head is not None and not torch.equal(lm_head, out["tok_embeddings.weight"]):
        raise WeightsMismatchError(f"{source}: lm_head.weight differs from model.embed_tokens.weight; MiniMind ties them")
    out["output.weight"] = out["tok_embeddings.weight"]
    known = {f"model.layers.{i}.{hf}" for i in range(config.n_layers) for hf in names.values()}
    unexpected = set(state) - known - set(GLOBAL_NAMES.values()) - {"lm_head.weight"}
    if unexpected:
        raise WeightsMismatchError(f"{source}: unexpected weights {sorted(unexpected)[:4]} (not a MiniMind-shaped Llama)")
    check_state_matches(out, config, source)
    return out


def check_state_matches(state: dict[str, torch.Tensor], config: LMConfig, source: str) -> None:
    """Raise ValueError, naming source, unless state has exactly the keys and shapes of MiniMindLM(config)."""
    with torch.device("meta"):  # no memory, no init
        expected = {k: v.shape for k, v in MiniMindLM(config).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsMismatchError(f"{source} does not match the model config (use_moe={config.use_moe}, n_layers="
                         f"{config.n_layers}): missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise WeightsMismatchError(f"{source}: {key} has shape {tuple(state[key].shape)}, the config (dim={config.dim}, "
                             f"n_heads={config.n_heads}, n_kv_heads={config.n_kv_heads}) expects {tuple(shape)}")


def rope_parameters_for_hf(config: LMConfig) -> dict:
    """Our RoPE settings as HF `rope_parameters`. NTK-aware scaling is a plain RoPE with a larger theta."""
    scaling, theta = config.inference_rope_scaling, float(config.rope_theta)
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    kind, factor = scaling["type"], float(scaling.get("factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if kind == "ntk":
        head_dim = config.dim // config.n_heads
        return {"rope_type": "default", "rope_theta": theta * factor ** (head_dim / (head_dim - 2))}
    return {  # yarn
        "rope_type": "yarn", "rope_theta": theta, "factor": factor,
        "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 2048)),
        "beta_fast": float(scaling.get("beta_fast", 32.0)), "beta_slow": float(scaling.get("beta_slow", 1.0)),
    }


def rope_settings_from_hf(cfg: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, inference_rope_scaling) from a Llama config.json (transformers 5 `rope_parameters`, or the
    4.x `rope_theta` + `rope_scaling` fields)."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(params["factor"])}
    if kind == "yarn":
        scaling = {"type": "yarn", "factor": float(params["factor"])}
        for key in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
            if params.get(key) is not None:
                scaling[key] = params[key]
        return theta, scaling
    raise ConfigError(f"{source}: rope type {kind!r} is not supported by MiniMind (default, linear, yarn)")


def llama_config_for(config: LMConfig, dtype: torch.dtype, bos_token_id: int, eos_token_id: int,
                     pad_token_id: int) -> LlamaConfig | Qwen3Config:
    """The transformers config that describes the same network as a dense MiniMind config: Llama, or Qwen3 for
    a model with per-head q/k norms (minimind-3)."""
    family = dict(config_class=Qwen3Config, architectures=["Qwen3ForCausalLM"], use_sliding_window=False) \
        if config.qk_norm else dict(config_class=LlamaConfig, architectures=["LlamaForCausalLM"], mlp_bias=False)
    config_class = family.pop("config_class")
    return config_class(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.dim // config.n_heads,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope_parameters_for_hf(config),
        tie_word_embeddings=True,
        attention_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=dtype,
        **family,
    )


def lmconfig_from_llama(cfg: dict, source: str) -> LMConfig:
    """A dense LMConfig from a Llama or Qwen3 config.json dict (Qwen3: per-head q/k norms); fields MiniMind
    cannot express raise ConfigError."""
    if cfg.get("model_type") == "qwen3" and cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: config.json use_sliding_window=true is not supported (MiniMind attends to all)")
    for field, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(field, allowed) != allowed:
            raise ConfigError(f"{source}: config.json {field}={cfg[field]!r} is not supported (MiniMind uses {allowed!r})")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise ConfigError(f"{source}: config.json head_dim={cfg['head_dim']} must equal hidden_size / num_attention_heads")
    rope_theta, scaling = rope_settings_from_hf(cfg, source)
    return LMConfig(
        dim=hidden, n_layers=cfg["num_hidden_layers"], n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads, vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_seq_len=cfg.get("max_position_embeddings", 8192), rope_theta=rope_theta, inference_rope_scaling=scaling,
        qk_norm=cfg.get("model_type") == "qwen3",
    )


# ----------------------------------------------------------------------------------------------------------------
# The remote-code model for MoE exports


class MiniMindConfig(LMConfig):
    """LMConfig that also answers to the standard transformers names (num_hidden_layers, hidden_size, ...), which
    generate() reads to size its KV cache and tools such as lm-eval read to find the context length."""

    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "hidden_dim",
        "max_position_embeddings": "max_seq_len",
    }


class MiniMindForCausalLM(PreTrainedModel, GenerationMixin):
    """A MiniMindLM inside a transformers PreTrainedModel, so from_pretrained / generate / pipelines work.

    Weights live under `model.` (`model.layers.0.attention.wq.weight`, ...). HF's Cache object is bridged to the
    native per-layer (keys, values) list on every call: read before the step, extended with the new positions after.
    """

    config_class = MiniMindConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.output.weight": "model.tok_embeddings.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: LMConfig):
        super().__init__(config)
        self.model = MiniMindLM(config)
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_embeddings

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.tok_embeddings = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.output

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Runs only for weights a checkpoint lacks: the same init as MiniMindLM's."""
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        native_past = (KVCache.from_tensors([(layer.keys, layer.values) for layer in past_key_values.layers])
                       if past_len else None)
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=native_past,
                         use_cache=past_key_values is not None, position_ids=position_ids,
                         logits_to_keep=logits_to_keep)
        if past_key_values is not None:  # hand transformers the new positions of every layer
            for i in range(len(self.model.layers)):
                keys, values = out.past_key_values.layer(i)
                past_key_values.update(keys[:, :, past_len:], values[:, :, past_len:], i)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                     ignore_index=-100) + out.aux_loss
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=past_key_values)


# ----------------------------------------------------------------------------------------------------------------
# Folders


def save_hf_folder(state: dict[str, torch.Tensor], config: LMConfig, hf_path: str, tokenizer,
                   dtype: torch.dtype | None = None, source: str = "state dict") -> None:
    """Write a Hugging Face model folder: config.json, model.safetensors, generation_config.json, tokenizer files
    (with the chat template); plus the model code for MoE models. dtype None keeps the weights' dtype.
    source names the weights in error messages."""
    check_state_matches(state, config, source)
    os.makedirs(hf_path, exist_ok=True)
    if not torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
        raise WeightsMismatchError(f"{source}: output.weight differs from tok_embeddings.weight; MiniMind ties them")
    state = {k: v.detach().to("cpu", dtype=dtype or v.dtype) for k, v in state.items()}
    dtype = state["tok_embeddings.weight"].dtype
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    if config.use_moe:
        weights = {f"model.{k}": v.contiguous() for k, v in state.items() if k != "output.weight"}
        config_dict = {k: v for k, v in config.to_dict().items() if k in lmconfig_fields()}
        config_dict.update(
            model_type=LMConfig.model_type, architectures=[MiniMindForCausalLM.__name__], dtype=str(dtype).removeprefix("torch."),
            tie_word_embeddings=True, auto_map={"AutoConfig": "hf_minimind.MiniMindConfig",
                                                "AutoModelForCausalLM": "hf_minimind.MiniMindForCausalLM"}, **ids,
        )
        with open(os.path.join(hf_path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config_dict, f, indent=2, ensure_ascii=False)
        here = os.path.dirname(os.path.abspath(__file__))
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(os.path.join(here, name), os.path.join(hf_path, name))
    else:
        weights = native_to_llama_state_dict(state, config)
        llama_config_for(config, dtype, **ids).save_pretrained(hf_path)
    save_file(weights, os.path.join(hf_path, WEIGHTS_NAME), metadata={"format": "pt"})
    GenerationConfig(**ids).save_pretrained(hf_path)
    tokenizer.save_pretrained(hf_path)


def lmconfig_fields() -> set[str]:
    """Names of LMConfig's own constructor arguments (the MiniMind architecture fields)."""
    return {p for p in inspect.signature(LMConfig.__init__).parameters if p not in ("self", "kwargs")}


def read_hf_weights(hf_path: str) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors, a sharded safetensors index, or pytorch_model.bin."""
    single, index = os.path.join(hf_path, WEIGHTS_NAME), os.path.join(hf_path, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(os.path.join(hf_path, shard)))
        return state
    legacy = os.path.join(hf_path, TORCH_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        return read_checkpoint(legacy, f"re-export {hf_path} with scripts/convert_model.py torch2hf")
    raise MissingInputError(f"no weights in {hf_path}: expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or {TORCH_WEIGHTS_NAME}")


def load_hf_folder(hf_path: str) -> tuple[LMConfig, dict[str, torch.Tensor]]:
    """(LMConfig, native MiniMindLM state dict) of a folder written by save_hf_folder (or any Llama of the same
    shape). The state dict loads into MiniMindLM(config) with strict=True."""
    config_path = os.path.join(hf_path, "config.json")
    if not os.path.isfile(config_path):
        raise MissingInputError(f"{config_path} not found: export a model with "
                                "`python scripts/convert_model.py torch2hf --weight out/full_sft_512.pth --hf_path DIR`")
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{config_path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    model_type = cfg.get("model_type")
    weights = read_hf_weights(hf_path)
    if model_type in ("llama", "qwen3"):
        config = lmconfig_from_llama(cfg, config_path)
        return config, llama_to_native_state_dict(weights, config, hf_path)
    if model_type == LMConfig.model_type:
        config = LMConfig(**{k: v for k, v in cfg.items() if k in lmconfig_fields()})
        prefix = f"{MiniMindForCausalLM.base_model_prefix}."
        state = {k.removeprefix(prefix): v for k, v in weights.items()}
        if "tok_embeddings.weight" in state:
            state.setdefault("output.weight", state["tok_embeddings.weight"])
        check_state_matches(state, config, hf_path)
        return config, state
    raise ConfigError(f"{config_path}: model_type {model_type!r} is not 'llama', 'qwen3' or {LMConfig.model_type!r}")
