"""A stand-in for offloadgen.LLM with the interface jobs.run_job uses, answering at once: for
tests of a job's bookkeeping (resume, locks, records), which does not depend on the model."""
from types import SimpleNamespace

from offloadgen.api import Completion
from offloadgen.tokenizer import ByteTokenizer


def answer(prompt: str) -> str:
    return "<" + prompt[::-1][:12] + ">"


class FakeLLM:
    def __init__(self, max_position: int = 2048, fail_after: int | None = None, on_generate=None):
        self.cfg = SimpleNamespace(max_position=max_position, eos_token_id=2, pad_token_id=1)
        self.limits = None
        self.tokenizer = ByteTokenizer(self.cfg)
        self.engine = SimpleNamespace(micro_batch_size=None)
        self.fail_after = fail_after  # batches answered before generate raises Killed (a simulated kill)
        self.on_generate = on_generate  # called before each batch, e.g. to start a rival job
        self.batches = 0

    def generate(self, prompts, sampling):
        if self.on_generate:
            self.on_generate()
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise Killed()
        self.batches += 1
        return [Completion(p, answer(p), [5] * min(3, sampling.max_new_tokens), "length") for p in prompts]


    def batcher(self, slots, max_len, prefill_chunk=512):
        """Jobs drive a continuous batcher: this one answers up to `slots` waiting requests per
        pass, all of them ending in it, with generate's answers (and its simulated kills)."""
        return FakeBatcher(self, slots)


class FakeBatcher:
    def __init__(self, llm: FakeLLM, slots: int):
        self.llm, self.slots, self.waiting, self.admitting = llm, slots, [], True

    def submit(self, prompt_ids, sampling, request_id=None):
        req = SimpleNamespace(id=request_id, prompt=self.llm.tokenizer.decode(prompt_ids), sampling=sampling)
        self.waiting.append(req)
        return req

    def stop_admitting(self):
        self.admitting = False

    def has_work(self):
        return bool(self.waiting) and self.admitting

    def step(self):
        """One pass: the next `slots` requests, answered (and counted, or killed) as one batch."""
        batch, self.waiting = self.waiting[:self.slots], self.waiting[self.slots:]
        outputs = []
        for req, c in zip(batch, self.llm.generate([r.prompt for r in batch], batch[0].sampling)):
            req.text, req.output_ids, req.finish_reason, req.finished = c.text, c.token_ids, c.finish_reason, True
            outputs.append(SimpleNamespace(request=req, new_token_ids=c.token_ids, finished=True,
                                           finish_reason=c.finish_reason))
        return outputs


class Killed(BaseException):
    """What a kill looks like to the test: the job stops between two writes."""
