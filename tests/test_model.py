"""The tiny model: a tokenizer whose ids survive transformers' reload as Qwen2Tokenizer, a ChatML template, a Qwen2
that reloads through the Auto classes, seeded weights, shapes vLLM's CPU attention can run; copies of a model
directory standing in for a hub id."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from kalmanrl.policy.model import build_tiny_model, fetch_pretrained, load_policy, tokenizer_corpus

SPEC = {"vocab_size": 320, "hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
        "intermediate_size": 96, "max_position_embeddings": 128, "tie_word_embeddings": True}
CORPUS = [f"What is {a} + ({b} * -{a})? <answer>{a + b}</answer>" for a in range(0, 400, 7) for b in range(0, 90, 9)]
# Digits, signs, runs of spaces, newlines, tabs, case, accents (NFC vs NFD), emoji and CJK: where a tokenizer trained
# with another pre-tokenizer than Qwen2's would split differently after the reload.
PROBES = [
    "What is -65 - -( 45 -     27 )?", "Solve 0 *   -9", "  -7 * 5 =", "12345678901234567890", "1,234.5e-3",
    "<think>3 + 4 = 7</think>\n<answer>7</answer>", "line one\n\n  line two\r\n\tend", "I'm sure it's 42, isn't it?",
    "Caf\u00e9 vs Cafe\u0301", "\U0001F600 emoji and \u4e2d\u6587 text", "x" * 50, "   leading and trailing   ",
    "<|im_start|>user\nhi<|im_end|>\n", "MiXeD CaSe WORDS and_underscores-and-dashes",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny"
    build_tiny_model(out, CORPUS, spec=SPEC, seed=0)
    return out


def test_token_ids_are_the_same_through_transformers_as_through_the_raw_tokenizer(tiny):
    auto = AutoTokenizer.from_pretrained(tiny)
    raw = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert type(auto).__name__.startswith("Qwen2Tokenizer")  # the reload this guards against
    for text in PROBES + CORPUS[::50]:
        assert auto(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
        assert auto.decode(auto(text, add_special_tokens=False)["input_ids"]) == raw.normalizer.normalize_str(text)


def test_digits_are_single_tokens(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert tokenizer.tokenize("2026") == ["2", "0", "2", "6"]


def test_chat_template_is_chatml_with_im_end_as_eos_and_endoftext_as_pad(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer(special, add_special_tokens=False)["input_ids"]) == 1


def test_model_reloads_as_qwen2_with_the_spec_and_the_tokenizers_vocabulary(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size) == (64, 1, 2, 1, 96)
    assert config.vocab_size == len(tokenizer) <= SPEC["vocab_size"]
    assert config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert {p.name for p in tiny.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json",
                                                 "tokenizer_config.json"}
    assert not list(tiny.parent.glob(".tiny.tmp-*")), "the temporary build directory was left behind"


def test_same_seed_gives_the_same_model_and_another_seed_another(tiny, tmp_path):
    build_tiny_model(tmp_path / "again", CORPUS, spec=SPEC, seed=0)
    build_tiny_model(tmp_path / "other", CORPUS, spec=SPEC, seed=1)
    first, again, other = (load_file(d / "model.safetensors") for d in (tiny, tmp_path / "again", tmp_path / "other"))
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert (tiny / "tokenizer.json").read_bytes() == (tmp_path / "again" / "tokenizer.json").read_bytes()


def test_building_leaves_the_callers_rng_alone(tmp_path):
    state = torch.get_rng_state()
    build_tiny_model(tmp_path / "m", CORPUS[:50], spec=SPEC, seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_tokenizer_corpus_makes_roles_and_answer_tags_short_so_prompts_stay_short(tmp_path):
    problems = [f"What is {a} * {b}?" for a in range(30) for b in range(10)]
    table = pa.table({"problem": problems, "answer": ["0"] * len(problems), "solution": [None] * len(problems)})
    build_tiny_model(tmp_path / "m", tokenizer_corpus(table, ["answer_tag"]), spec=SPEC, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    # Qwen2's split keeps "<answer" together but ">" apart, and "</" apart from "answer".
    assert [len(tokenizer.tokenize(word)) for word in ("user", "assistant", "<answer>", "</answer>")] == [1, 1, 2, 3]


@pytest.mark.parametrize(("hidden_size", "num_heads", "num_kv_heads", "match"), [
    (64, 4, 2, "head sizes"),     # head_dim 16: "Unsupported CPU attention configuration" in vLLM
    (96, 2, 1, "head sizes"),     # head_dim 48
    (100, 3, 1, "head sizes"),    # not divisible
    (128, 4, 3, "must divide"),
])
def test_shapes_vllms_cpu_attention_cannot_run_are_refused_before_any_work(tmp_path, hidden_size, num_heads,
                                                                           num_kv_heads, match):
    spec = {**SPEC, "hidden_size": hidden_size, "num_heads": num_heads, "num_kv_heads": num_kv_heads}
    with pytest.raises(ValueError, match=match):
        build_tiny_model(tmp_path / "bad", iter(()), spec=spec, seed=0)  # an empty corpus: no training happened
    assert not (tmp_path / "bad").exists()


def test_fetch_copies_a_model_directory_as_safetensors_with_identical_weights(tiny, tmp_path):
    fetch_pretrained(str(tiny), tmp_path / "copy")
    original, copy = load_file(tiny / "model.safetensors"), load_file(tmp_path / "copy" / "model.safetensors")
    assert original.keys() == copy.keys() and all(torch.equal(original[k], copy[k]) for k in original)
    assert not list((tmp_path / "copy").glob("*.bin"))
    assert json.loads((tmp_path / "copy" / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads((tiny / "tokenizer.json").read_text())["model"]["vocab"]


def test_fetch_can_convert_the_dtype(tiny, tmp_path):
    fetch_pretrained(str(tiny), tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


def test_load_policy_pads_on_the_left_for_generation(tiny):
    model, tokenizer = load_policy(tiny)
    assert tokenizer.padding_side == "left"
    assert next(model.parameters()).dtype == torch.float32
    batch = tokenizer(["1", "1 + 22 * 333"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, -1] == 1 and batch["attention_mask"][0, 0] == 0


def model_without_pad(out, special_tokens: list[str]):
    """A Llama-type model whose tokenizer (ChatML, EOS <|im_end|>) was saved without a pad token, as Llama-3.2's."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kalmanrl.policy.model import CHATML_TEMPLATE

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", chat_template=CHATML_TEMPLATE)
    assert tokenizer.pad_token is None
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=96, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_tokenizer_without_pad_token_gets_its_dedicated_one_or_eos(tmp_path):
    with_spare = model_without_pad(tmp_path / "spare", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    assert AutoTokenizer.from_pretrained(with_spare).pad_token is None
    assert load_policy(with_spare)[1].pad_token == "<|endoftext|>"
    bare = model_without_pad(tmp_path / "bare", ["<|im_start|>", "<|im_end|>"])
    tokenizer = load_policy(bare)[1]
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer(["1", "1 + 22"], padding=True)["input_ids"][0][0] == tokenizer.eos_token_id


def test_a_policy_whose_tokenizer_had_no_pad_token_trains(tmp_path, arithmetic_parquet):
    import digit_share  # noqa: F401  (registers the "digit_share" reward)
    from kalmanrl.configuration.config import stage_settings, validate_config
    from kalmanrl.jobs.trainer import train
    from kalmanrl.policy.batch import build_batch
    from kalmanrl.policy.rollout import Completion

    model_dir = model_without_pad(tmp_path / "bare", ["<|im_start|>", "<|im_end|>"])
    tokenizer = load_policy(model_dir)[1]
    done = Completion(token_ids=[7, tokenizer.eos_token_id], logprobs=[0.0, 0.0], text="", finish_reason="stop")
    batch = build_batch([[5, 6, 7], [8]], [[done], [done]], torch.zeros(2, 1), tokenizer.pad_token_id)
    assert batch.input_ids[1, 0] == tokenizer.pad_token_id and batch.completion_mask.tolist() == [[1, 1], [1, 1]]
    config = validate_config({
        "train": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "mini_batches": 2, "max_tokens": 6},
        "datasets": {"arith": {"loader": "arithmetic", "template": "krpo", "reward": "digit_share"}},
        "tasks": ["arith"], "benchmarks": ["arith"]})
    settings = stage_settings(config, "train", model="tiny", task="arith", algorithm="grpo", seed="0")
    metrics = train(model_dir, arithmetic_parquet, tmp_path / "run", settings=settings)
    assert metrics["grad_norm"].notna().all() and metrics["nonfinite_total"].iloc[-1] == 0
