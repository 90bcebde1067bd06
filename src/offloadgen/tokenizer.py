"""Tokenizers: a checkpoint's own, or a byte-level one for dummy weights.

A checkpoint's tokenizer comes from its tokenizer.json through the `tokenizers` library alone when the
folder asks for transformers' generic fast tokenizer (TokenizerJson, below): importing transformers
costs seconds (9-10 s on the lent H100 host), as long as a 13B model's weights take to come off the
disk (issue 18). Every other folder (a tokenizer class of its own, sentencepiece only, remote code)
goes through transformers' AutoTokenizer as before."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import OffloadgenError


class HFTokenizer:
    """A thin wrapper so the engine needs only encode / decode / eos / pad / chat template."""

    def __init__(self, tok, cfg):
        self._tok = tok
        self.kind = "tokenizers" if isinstance(tok, TokenizerJson) else "transformers"
        eos = tok.eos_token_id if tok.eos_token_id is not None else cfg.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if isinstance(cfg.eos_token_id, list):
            self.eos_token_ids |= set(cfg.eos_token_id)
        self.pad_token_id = next(x for x in (tok.pad_token_id, cfg.pad_token_id, min(self.eos_token_ids, default=0))
                                 if x is not None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        if not getattr(self._tok, "chat_template", None):
            raise OffloadgenError("this model's tokenizer has no chat template; give a plain 'prompt'")
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_hf_tokenizer(folder: Path, cfg) -> HFTokenizer:
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise OffloadgenError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    if why_not_tokenizer_json(folder) is None:
        try:
            return HFTokenizer(TokenizerJson.load(folder), cfg)
        except Exception:  # noqa: BLE001 (a file transformers may still read, or fail on with its own message)
            pass
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise OffloadgenError(f"{folder}: cannot load its tokenizer ({e})") from None
    return HFTokenizer(tok, cfg)


# -- tokenizer.json without transformers --------------------------------------------------------
# What follows mirrors transformers 5's AutoTokenizer -> TokenizersBackend.from_pretrained on a local
# folder (tokenization_auto.py, tokenization_utils_base._from_pretrained, TokenizersBackend.__init__,
# chat_template_utils.render_jinja_template); tests/test_tokenizer_fast.py holds the two to the same
# ids, text, special ids and chat prompts.

GENERIC_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers 5 overrides a generic tokenizer class for these model types with one of their own
# (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS whose TOKENIZER_MAPPING_NAMES entry is not generic)
OWN_CLASS_MODEL_TYPES = frozenset({"hyperclovax_vision_v2", "qwen2", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text",
                                   "qwen4_exp", "siglip2"})


def _read_json(path: Path) -> dict:
    """A folder's JSON settings file ({} when absent); one that is not a JSON object is told in one line
    (transformers fails on it too, with a traceback)."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise OffloadgenError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise OffloadgenError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _transformers_major() -> int | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return int(version("transformers").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return None


def why_not_tokenizer_json(folder: Path) -> str | None:
    """None when transformers would load this folder as a plain tokenizer.json (its generic class);
    else why the tokenizer must come from AutoTokenizer."""
    if not (folder / "tokenizer.json").is_file():
        return "no tokenizer.json"
    if (_transformers_major() or 0) < 5:
        return "transformers < 5 (its tokenizers set up special tokens differently)"
    tcfg, config = _read_json(folder / "tokenizer_config.json"), _read_json(folder / "config.json")
    declared = tcfg.get("tokenizer_class") or config.get("tokenizer_class")
    byte_level_llama = (str(declared).removesuffix("Fast") == "LlamaTokenizer"
                        and '"ByteLevel"' in (folder / "tokenizer.json").read_text(encoding="utf-8"))
    if declared not in GENERIC_CLASSES and not byte_level_llama:
        return f"tokenizer class {declared!r} is not the generic fast tokenizer"
    if config.get("model_type") in OWN_CLASS_MODEL_TYPES:
        return f"model type {config.get('model_type')!r} has a tokenizer class of its own"
    odd = [k for k in ("auto_map", "fast_tokenizer_files", "fix_mistral_regex") if tcfg.get(k)]
    odd += [f for f in ("added_tokens.json", "tekken.json") if (folder / f).is_file()]
    if tcfg.get("split_special_tokens"):
        odd.append("split_special_tokens")
    return f"tokenizer_config asks for {', '.join(odd)}" if odd else None


def _added_token(value):
    """A serialized AddedToken ({"__type": "AddedToken", ...}) as one, anything else unchanged."""
    from tokenizers import AddedToken
    if isinstance(value, dict) and value.get("__type") == "AddedToken":
        return AddedToken(**{k: v for k, v in value.items() if k != "__type"})
    return value


def _special_tokens(folder: Path, tcfg: dict, tokenizer_json: dict) -> tuple[dict, list, list]:
    """(named special tokens, extra special tokens, the config's added tokens) as transformers reads them."""
    from tokenizers import AddedToken
    kwargs = {k: _added_token(v) for k, v in tcfg.items()}
    if "additional_special_tokens" in kwargs and not kwargs.get("extra_special_tokens"):
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    own = {k: kwargs.pop(k) for k in list(kwargs)
           if k not in SPECIAL_TOKEN_NAMES and k.endswith("_token") and isinstance(kwargs[k], (str, AddedToken))}
    if isinstance(kwargs.get("extra_special_tokens"), dict):
        own.update(kwargs.pop("extra_special_tokens"))
    if "added_tokens_decoder" in kwargs:
        decoder = {int(i): AddedToken(**t) for i, t in kwargs["added_tokens_decoder"].items()}
        by_text = {str(t): t for t in decoder.values()}
    else:  # older folders: special_tokens_map.json, and tokenizer.json's own added tokens
        decoder = {}
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            if isinstance(value, dict) and key != "extra_special_tokens":
                value = AddedToken(**{k: v for k, v in value.items() if k != "special"}, special=True)
            elif key == "extra_special_tokens" and isinstance(value, list):
                existing = list(kwargs.get("extra_special_tokens") or [])
                value = existing + [t for t in (AddedToken(**t, special=True) if isinstance(t, dict) else t
                                                for t in value) if t not in existing]
            kwargs[key] = value
        if isinstance(kwargs.get("extra_special_tokens"), dict):
            own.update(kwargs.pop("extra_special_tokens"))
        if "additional_special_tokens" in kwargs and "extra_special_tokens" not in kwargs:
            kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
        by_text = {t["content"]: AddedToken(**{k: v for k, v in t.items() if k != "id"})
                   for t in tokenizer_json.get("added_tokens", [])}
        own = {**{k: kwargs.pop(k) for k in list(kwargs) if k not in SPECIAL_TOKEN_NAMES and k.endswith("_token")
                  and isinstance(kwargs[k], (str, AddedToken))}, **own}
    named = {k: by_text.get(str(kwargs[k]), kwargs[k]) for k in SPECIAL_TOKEN_NAMES if kwargs.get(k) is not None}
    if "pad_token" not in kwargs and (padding := tokenizer_json.get("padding")):
        named["pad_token"] = padding["pad_token"]
    named.update({k: v for k, v in own.items() if v is not None})
    extra = kwargs.get("extra_special_tokens")
    return named, list(extra) if isinstance(extra, (list, tuple)) else [], [t for _, t in sorted(decoder.items())]


def _add_missing_special_tokens(backend, named: dict, extra: list, config_added: list) -> None:
    """TokenizersBackend.__init__: the config's added tokens, and every special token the vocabulary
    lacks as an added token, join the backend (so they match in text and are skipped in decoding)."""
    from tokenizers import AddedToken
    to_add = list(config_added)
    known = [t.content for t in backend.get_added_tokens_decoder().values()] + [str(t) for t in to_add]
    for value in [*named.values(), *extra]:
        if str(value) not in known and value not in to_add:
            to_add.append(value)
    names = [str(t) for t in named.values() if t]
    tokens = []
    for t in to_add:
        if isinstance(t, str):
            t = AddedToken(t, special=True)
        elif not t.special and str(t) in names:
            t.special = True
        tokens.append(t)
    if tokens:
        backend.add_tokens(tokens)


def _chat_template(folder: Path, tcfg: dict):
    """chat_template.jinja and additional_chat_templates/*.jinja, else the config's chat_template."""
    templates = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for f in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    template = tcfg.get("chat_template")
    return {t["name"]: t["template"] for t in template} if isinstance(template, (list, tuple)) else template


class TokenizerJson:
    """A folder's tokenizer.json through the `tokenizers` library, set up as transformers 5 sets up its
    generic fast tokenizer: the same special tokens, ids, decoding and chat prompts."""

    def __init__(self, backend, named: dict, config: dict, chat_template):
        self._backend = backend
        self._named = named
        self.chat_template = chat_template
        cleanup = config.get("clean_up_tokenization_spaces", False)
        # transformers 5 skips the clean-up on BPE models (it would strip real spaces before punctuation)
        self._clean_up = cleanup and (type(backend.model).__name__ != "BPE" or config.get(
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))

    @classmethod
    def load(cls, folder: Path) -> TokenizerJson:
        from tokenizers import Tokenizer
        text = (folder / "tokenizer.json").read_text(encoding="utf-8")
        backend = Tokenizer.from_str(text)
        backend.no_truncation()  # transformers encodes without them unless asked
        backend.no_padding()
        tcfg = _read_json(folder / "tokenizer_config.json")
        named, extra, config_added = _special_tokens(folder, tcfg, json.loads(text))
        _add_missing_special_tokens(backend, named, extra, config_added)
        backend.encode_special_tokens = False
        # add_bos_token / add_eos_token are not read: transformers drops them where there is a tokenizer.json,
        # whose post-processor alone says what encode adds
        return cls(backend, named, tcfg, _chat_template(folder, tcfg))

    def _token_id(self, name: str) -> int | None:
        token = self._named.get(name)
        if token is None:
            return None
        found = self._backend.token_to_id(str(token))
        return found if found is not None or name == "unk_token" else self._token_id("unk_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if self._clean_up:  # PreTrainedTokenizerBase.clean_up_tokenization
            for spaced, plain in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(spaced, plain)
        return text

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True):
        template = self.chat_template
        if isinstance(template, dict):
            if "default" not in template:
                raise ValueError("This model has multiple chat templates with no default specified! Available "
                                 f"template names are {sorted(template)}.")
            template = template["default"]
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        variables = {name: str(token) for name, token in self._named.items()}
        prompt = render_chat_template(template, messages, add_generation_prompt, variables)
        return self.encode(prompt, add_special_tokens=False) if tokenize else prompt


# -- chat templates -------------------------------------------------------------------------------
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, variables: dict) -> str:
    """transformers' render_jinja_template for one plain-JSON conversation: keys set to None dropped,
    reasoning under its older names copied to the standard one, no tools or documents."""
    chat = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        chat.append(message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return _compiled(template).render(messages=chat, tools=None, documents=None,
                                      add_generation_prompt=add_generation_prompt, **variables)


@lru_cache
def _compiled(template: str):
    """The template in transformers' sandbox: trim_blocks, lstrip_blocks, loop controls, the
    {% generation %} tag, and its tojson / raise_exception / strftime_now / dict / namespace."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}  # marks the assistant's part for training masks; rendered as its body

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):  # no underscore-named attributes: no way to CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"Chat templates cannot store underscore-prefixed attributes "
                                                      f"on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=Namespace)
    return env.from_string(template)


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids: dummy weights have no vocabulary of their own,
    and every model's vocabulary is larger than 256 + 3."""

    OFFSET = 3

    def __init__(self, cfg):
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else 2
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else min(self.eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
