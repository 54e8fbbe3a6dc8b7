"""Hugging Face export: a MiniMind model -> a Hugging Face model folder, and the remote code MoE folders run.

Dense models are exactly a Llama (with per-head q/k norms, as minimind-3 has them, exactly a Qwen3): they export
as a native `LlamaForCausalLM` (`Qwen3ForCausalLM`) folder that transformers (and vLLM, llama.cpp's converter,
lm-eval) load without remote code: the names and rotary order of the later MiniMind releases (model/releases.py).
Mixture-of-experts models have no Llama equivalent: they export with this file and the modules it imports copied
into the folder (`auto_map` in config.json), loadable with `trust_remote_code=True` and no network.
Reading folders back (ours, and every release's) is model/loading.py's job.

This file is itself that remote code, so it imports only installed packages and the sibling modules it ships with.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, GenerationMixin, LlamaConfig, PreTrainedModel, Qwen3Config
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .common import ConfigError, WeightsMismatchError
from .LMConfig import LMConfig, architecture_fields
from .model import KVCache, MiniMindLM
from .releases import release_names, reorder_rotary

WEIGHTS_NAME = "model.safetensors"
# What a MoE export ships beside its weights: this file and the modules it imports.
REMOTE_CODE_FILES = ("hf_minimind.py", "model.py", "LMConfig.py", "common.py", "releases.py")


# ----------------------------------------------------------------------------------------------------------------
# Dense MiniMind -> LlamaForCausalLM / Qwen3ForCausalLM


def release_state_dict(state: dict[str, torch.Tensor], config: LMConfig) -> dict[str, torch.Tensor]:
    """HF Llama (or, with qk_norm, Qwen3) tensors for a dense MiniMind state dict, q/k rows in rotated-halves
    order. A tied output matrix is written once (as the embedding): tie_word_embeddings tells loaders to reuse it."""
    if config.use_moe:
        raise ConfigError("a MoE model has no LlamaForCausalLM equivalent; export it with save_hf_folder (remote code)")
    check_state_matches(state, config, "state dict")
    state = reorder_rotary(state, config, config.rope_layout, "half")
    if config.tie_word_embeddings:
        state.pop("output.weight")
    return {k: v.contiguous() for k, v in release_names(state).items()}


def check_state_matches(state: dict[str, torch.Tensor], config: LMConfig, source: str) -> None:
    """Raise WeightsMismatchError, naming source, unless state has exactly the keys and shapes of MiniMindLM(config)."""
    with torch.device("meta"):  # no memory, no init
        expected = {k: v.shape for k, v in MiniMindLM(config).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsMismatchError(f"{source} does not match the model config (use_moe={config.use_moe}, n_layers="
                                   f"{config.n_layers}): missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise WeightsMismatchError(
                f"{source}: {key} has shape {tuple(state[key].shape)}, the config (dim={config.dim}, n_heads="
                f"{config.n_heads}, n_kv_heads={config.n_kv_heads}) expects {tuple(shape)}")


def rope_parameters_for_hf(config: LMConfig) -> dict:
    """Our RoPE settings as HF `rope_parameters`. NTK-aware scaling is a plain RoPE with a larger theta."""
    scaling, theta = config.inference_rope_scaling, float(config.rope_theta)
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    kind, factor = scaling["type"], float(scaling.get("factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    if kind == "ntk":
        head_dim = config.head_dim
        return {"rope_type": "default", "rope_theta": theta * factor ** (head_dim / (head_dim - 2))}
    yarn = {
        "rope_type": "yarn", "rope_theta": theta, "factor": factor,
        "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 2048)),
        "beta_fast": float(scaling.get("beta_fast", 32.0)), "beta_slow": float(scaling.get("beta_slow", 1.0)),
    }
    if "attention_factor" in scaling:
        yarn["attention_factor"] = float(scaling["attention_factor"])
    return yarn


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
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope_parameters_for_hf(config),
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=dtype,
        **family,
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
    if config.tie_word_embeddings and not torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
        raise WeightsMismatchError(f"{source}: output.weight differs from tok_embeddings.weight, but the config ties them")
    state = {k: v.detach().to("cpu", dtype=dtype or v.dtype) for k, v in state.items()}
    dtype = state["tok_embeddings.weight"].dtype
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    if config.use_moe:
        tied = {"output.weight"} if config.tie_word_embeddings else set()
        weights = {f"model.{k}": v.contiguous() for k, v in state.items() if k not in tied}
        config_dict = {k: v for k, v in config.to_dict().items() if k in architecture_fields()}
        config_dict.update(
            model_type=LMConfig.model_type, architectures=[MiniMindForCausalLM.__name__], dtype=str(dtype).removeprefix("torch."),
            auto_map={"AutoConfig": "hf_minimind.MiniMindConfig",
                      "AutoModelForCausalLM": "hf_minimind.MiniMindForCausalLM"}, **ids,
        )
        with open(os.path.join(hf_path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config_dict, f, indent=2, ensure_ascii=False)
        here = os.path.dirname(os.path.abspath(__file__))
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(os.path.join(here, name), os.path.join(hf_path, name))
    else:
        weights = release_state_dict(state, config)
        llama_config_for(config, dtype, **ids).save_pretrained(hf_path)
    save_file(weights, os.path.join(hf_path, WEIGHTS_NAME), metadata={"format": "pt"})
    GenerationConfig(**ids).save_pretrained(hf_path)
    tokenizer.save_pretrained(hf_path)
