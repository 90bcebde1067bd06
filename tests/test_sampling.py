import pytest
import torch

import offloadgen
from offloadgen.sampling import SamplingParams, sample


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams(), None), logits.argmax(-1))


def test_top_k_only_draws_from_the_k_best():
    logits = torch.randn(2, 100)
    best = set(map(tuple, torch.topk(logits, 3).indices.tolist()))
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        tok = sample(logits, SamplingParams(temperature=1.0, top_k=3), g)
        for row in range(2):
            assert tok[row].item() in torch.topk(logits[row], 3).indices.tolist()
    assert best


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    seen = {sample(logits, SamplingParams(temperature=1.0, top_p=0.75), g).item() for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are never drawn


def test_seed_makes_sampling_reproducible():
    llm = offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False)
    p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    a = llm.generate(["x", "yy"], p)
    b = llm.generate(["x", "yy"], p)
    c = llm.generate(["x", "yy"], SamplingParams(max_new_tokens=6, temperature=1.0, seed=12, ignore_eos=True))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_eos_and_stop_strings_end_a_row():
    llm = offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False)
    [free] = llm.generate(["abc"], SamplingParams(max_new_tokens=8, ignore_eos=True))
    # Stop at the text of the 3rd generated token: generation must end there, the string not returned.
    third = llm.tokenizer.decode(free.token_ids[:3])
    if third:
        [c] = llm.generate(["abc"], SamplingParams(max_new_tokens=8, stop=[third[-1]], ignore_eos=True))
        assert c.finish_reason == "stop" and third[-1] not in c.text and len(c.token_ids) <= 3
    # Declare the 2nd generated token to be EOS: the row stops after it.
    llm.tokenizer.eos_token_ids = {free.token_ids[1]}
    [d] = llm.generate(["abc"], SamplingParams(max_new_tokens=8))
    assert d.finish_reason == "stop" and len(d.token_ids) <= 1


@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_nan_and_infinite_sampling_values_are_refused(field):
    from offloadgen.errors import OffloadgenError
    from offloadgen.sampling import SamplingParams
    for bad in (float("nan"), float("inf")):
        with pytest.raises(OffloadgenError, match=f"{field} must be a finite number"):
            SamplingParams(**{field: bad})


def test_bad_api_inputs_are_one_clear_error_not_a_crash_or_a_default():
    from offloadgen.errors import OffloadgenError
    for bad in (2.5, True, "3"):  # 2.5 ran as 3 tokens, True as 1
        with pytest.raises(OffloadgenError, match="max_new_tokens must be a whole number"):
            SamplingParams(max_new_tokens=bad)
    llm = offloadgen.load("opt-125m", dummy=True, device="cpu", progress=False)
    for bad in (None, 5, ["hi"]):  # the tokenizer raised AttributeError
        with pytest.raises(OffloadgenError, match="prompt 0 must be a string"):
            llm.generate([bad])
    with pytest.raises(OffloadgenError, match="batch_size must be at least 1; got 0"):  # 0 ran with the default
        llm.generate(["hi"], SamplingParams(max_new_tokens=1), batch_size=0)
