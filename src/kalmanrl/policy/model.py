"""Policies: a tiny Qwen2 built offline for CPU runs and CI (tokenizer trained here, random weights), copies of hub or
local models, and loading for training — always through safetensors."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import MethodType

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_rope_utils import dynamic_rope_update

from kalmanrl.core.io import atomic_path
from kalmanrl.data.prompts import get_template
from kalmanrl.runtime import vendor_neutral

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (single digits, so arithmetic is tokenised digit by digit). transformers 5 reloads any
# tokenizer saved next to a qwen2 config as Qwen2Tokenizer, which re-installs exactly this normalizer/pre-tokenizer;
# training with anything else would change token ids on reload (and in vLLM, which uses the same class).
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
               r"""|\s+(?!\S)|\s+""")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU_ATTN


def tokenizer_corpus(table, template_names: Iterable[str]) -> Iterator[str]:
    """What the tiny tokenizer should compress: each problem and its target in each template's answer format, behind
    the ChatML role names (so `user` and `assistant` become single tokens), and the system prompts (once per problem,
    so their words get merged and prompts stay short)."""
    templates = [get_template(name) for name in template_names]
    columns = (table.column(c).to_pylist() for c in ("problem", "answer", "solution"))
    for problem, answer, solution in zip(*columns, strict=True):
        yield f"user\n{problem}"
        for template in templates:
            yield from (f"system\n{template.system}", f"assistant\n{template.target(answer, solution)}")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen2's normalizer and pre-tokenizer, ChatML special tokens and template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def check_spec(spec: dict) -> None:
    """Refuse shapes vLLM's CPU attention cannot run, before any work is done."""
    head_dim, rest = divmod(spec["hidden_size"], spec["num_heads"])
    if rest or head_dim not in VLLM_CPU_HEAD_DIMS:
        raise ValueError(f"hidden_size / num_heads = {spec['hidden_size'] / spec['num_heads']:g}: vLLM's CPU "
                         f"attention supports head sizes {VLLM_CPU_HEAD_DIMS} (32 or 64 suit a tiny model)")
    if spec["num_heads"] % spec["num_kv_heads"]:
        raise ValueError(f"num_kv_heads = {spec['num_kv_heads']} must divide num_heads = {spec['num_heads']}")


def tiny_config(spec: dict, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    """A Qwen2 config of the given shape whose vocabulary is exactly the trained tokenizer's."""
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"],
        intermediate_size=spec["intermediate_size"], max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=spec["tie_word_embeddings"], eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, dtype="float32")


def build_tiny_model(out_dir: str | Path, texts: Iterable[str], *, spec: dict, seed: int) -> None:
    """Train a tokenizer on `texts` and save it with a randomly initialised Qwen2 (same seed -> same weights; the
    caller's RNG is left alone)."""
    check_spec(spec)
    tokenizer = train_tokenizer(texts, spec["vocab_size"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_config(spec, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_path(out_dir, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def fetch_pretrained(source: str, out_dir: str | Path, *, revision: str | None = None, dtype: str = "auto") -> None:
    """Copy a hub model (by id) or a local save_pretrained directory into `out_dir`, as safetensors."""
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype, use_safetensors=True)
    with atomic_path(out_dir, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


# Dedicated padding tokens of common vocabularies, in order of preference (Llama 3's, then generic ones).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>")


def load_policy(model_dir: str | Path, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """Model and tokenizer from a save_pretrained directory (safetensors only); left padding for generation, and a
    pad token when the tokenizer has none (see `ensure_pad_token`)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True).to(device)
    vendor_neutral_rotary(model)
    tokenizer = load_tokenizer(model_dir)
    rows = model.get_input_embeddings().num_embeddings
    if tokenizer.pad_token_id >= rows:
        raise ValueError(f"{model_dir}: pad token {tokenizer.pad_token!r} has id {tokenizer.pad_token_id}, outside the "
                         f"model's {rows} embeddings")
    return model, tokenizer


def vendor_neutral_rotary(model: torch.nn.Module) -> None:
    """Make the rotary embeddings of `model` compute cos and sin on the CPU without MKL's VML, whose bits depend on
    the CPU's vendor (`kalmanrl.runtime.vendor_neutral`); on other devices they run transformers' forward. The
    formula is transformers' (the same in Qwen2, Qwen3, Llama and Mistral): cos and sin of position x inverse
    frequency, times the attention scaling. A rotary module without that shape (an `inv_freq` buffer, an
    `attention_scaling` factor, one rope type) is left as it is, with a warning."""
    for module in model.modules():
        if not type(module).__name__.endswith("RotaryEmbedding"):
            continue
        if not (isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(module, "attention_scaling")
                and isinstance(getattr(module, "rope_type", None), str)):
            log.warning("%s: not a rotary embedding kalmanrl knows; its CPU results may depend on the CPU's vendor",
                        type(module).__name__)
            continue
        module.forward = MethodType(_vendor_neutral_rotary_forward, module)  # deepcopy rebinds it to the copy


@torch.no_grad()
@dynamic_rope_update
def _rotary_on_cpu(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    cos, sin = vendor_neutral.cos_sin(torch.cat((freqs, freqs), dim=-1))
    return (cos * self.attention_scaling).to(dtype=x.dtype), (sin * self.attention_scaling).to(dtype=x.dtype)


def _vendor_neutral_rotary_forward(self, x: torch.Tensor, position_ids: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cpu":
        return _rotary_on_cpu(self, x, position_ids)
    return type(self).forward(self, x, position_ids)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of a save_pretrained directory, left-padding for generation, with a pad token (e.g. beside a
    vLLM engine that loads the weights itself)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one (Llama 3.2 has none): a dedicated padding token of its vocabulary
    other than EOS if there is one, else EOS itself — padding is never attended to nor trained on, the attention and
    completion masks do that, so its identity only matters for not being mistaken for a generated EOS."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    vocabulary = tokenizer.get_vocab()
    tokenizer.pad_token = next((t for t in PAD_CANDIDATES if t in vocabulary and t != tokenizer.eos_token),
                               tokenizer.eos_token)


def save_policy(policy: torch.nn.Module, tokenizer, out_dir: str | Path, *, dtype: str,
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained the policy and its tokenizer into `out_dir` with floating-point weights in `dtype` (the model's
    configured dtype, `models.<name>.dtype`), leaving the policy as it is: training may hold float32 master weights,
    while what evaluation and vLLM load (and what is stored) is the precision the model was given in. Tied weights
    stay tied; config.json records `dtype`. `state_dict`: the full weights when the policy itself is sharded (gathered
    by the caller). Not atomic: callers write into an `atomic_path`."""
    target = getattr(torch, dtype)
    converted: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in (policy.state_dict() if state_dict is None else state_dict).items():
        key = tensor.untyped_storage().data_ptr()
        if key not in converted:
            converted[key] = tensor.detach().to("cpu", target if tensor.is_floating_point() else tensor.dtype)
        state[name] = converted[key]
    policy.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    type(policy.config).from_dict({**policy.config.to_dict(), "dtype": dtype}).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
