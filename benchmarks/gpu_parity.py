"""On a GPU: streamed weights (pinned and pageable) give exactly the tokens and logits of resident ones."""
import sys

import torch
from gpu_inputs import padded_batch

from offloadgen.checkpoint import DummyCheckpoint
from offloadgen.engine import Engine
from offloadgen.models import blocks, preset
from offloadgen.offload import ResidentWeights
from offloadgen.offload.placement import Placement
from offloadgen.offload.streaming import StreamingWeights
from offloadgen.sampling import SamplingParams

dev = torch.device("cuda")
ok = True
for name in ("opt-1.3b", "smollm2-135m", "bloom-560m"):
    ck = DummyCheckpoint(preset(name))
    cfg = ck.cfg
    ids, mask = padded_batch()
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    ref = Engine(cfg, ResidentWeights(ck, dev, torch.float16, progress=False), dev, torch.float16, 3) \
        .generate(ids, mask, params, set(), 0)
    for pinned in (True, False):
        for depth in (1, 3):
            resident = ["head", "embed", cfg.n_layers - 1]
            placement = Placement(resident, [b for b in blocks(cfg) if b not in resident], depth + 1, {})
            w = StreamingWeights(ck, dev, torch.float16, placement, pinned=pinned, progress=False)
            out = Engine(cfg, w, dev, torch.float16, 3).generate(ids, mask, params, set(), 0)
            w.close()
            same = out.tokens == ref.tokens and torch.equal(out.last_logits, ref.last_logits)
            ok &= same
            print(f"{name:14s} pinned={pinned!s:5s} depth={depth}: tokens and logits identical to resident: {same}")
sys.exit(0 if ok else 1)
