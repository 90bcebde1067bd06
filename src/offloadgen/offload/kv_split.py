"""How many micro-batches attend on the GPU, adjusted between decode steps from what they took.

With the KV cache in CPU memory a decode step has two sides that run at once: the GPU side (weights
over the bus, and the cache of the micro-batches that attend on the GPU copied over it too) and
the CPU side (attention over the rest of the cache, where it lies). The start-up plan splits the
micro-batches so that both finish together (kv_cache.gpu_fraction), from a probe of the CPU's
attention bandwidth and the bus's. Probes mislead (issue 17: 33.7 and 11.9 GB/s in two leases of
the same machine kind), and the balance drifts as the context grows, so the split is corrected
from each step's observed times:

- cpu_s: seconds the CPU side worked in the step (below); per CPU micro-batch, c = cpu_s / CPU parts;
- wait_s: seconds the CPU waited for the GPU side (for q, k, v to arrive) before attending;
- issue_s: host seconds spent issuing the GPU-attended micro-batches (their attention and cache
  copies); per GPU micro-batch, i = issue_s / GPU parts. Cheap with a pinned cache (a few ms);
  with a pageable one each copy holds the host thread for its whole length (4 ranks on one node:
  0.94 s a micro-batch against 0.27 s of CPU attention), and the waits above never show it.

If issuing a GPU micro-batch costs the host more than attending it would (i > c), one goes back to
the CPU, and none moves to the GPU while the last i seen says it would not pay (i >= c). With none
on the GPU, i is no longer measured: a last figure seen in one step only (one slow step: a first
use's allocations, the host busy) lets a move be retried after `hold` steps; seen in two steps in
a row (a pageable cache), it keeps them on the CPU.

If the CPU waited longer than one more micro-batch would take it (wait > c), the GPU side is the
bottleneck and giving micro-batches back to the CPU shortens the step: each one's extra c fits in
the time the CPU spent waiting, and the bus loses that micro-batch's cache. If the CPU hardly
waited at all (wait < margin * c), the CPU is the bottleneck and micro-batches move to the GPU;
whether the bus had room for them shows in the next step, and a move that has to be undone is not
retried for `hold` steps (the count moved from is the ceiling). In between, the split stays.

How many move at once: with `bus` = (seconds the streamed weights keep the bus a decode step,
seconds one GPU micro-batch's cache adds to it = g), from the plan, the step is modelled as the
longer of the two sides, each linear in the count moved, k (k > 0: to the GPU):

    GPU side G + k * g,   CPU side C - k * c,   C = step_s - wait_s (the CPU side's busy time)

G is step_s when the CPU waited (the GPU side finished last); when it did not, the bus's own time
at this count, bus[0] + gpu * g, which is the least the GPU side can take (its compute comes on
top): an estimate that may move too many, which the next step's wait undoes. The move is the k
(at least one, in the direction above) with the shortest modelled step; towards the GPU, none
while the model says no count would shorten it by more than the dead band (margin * c), but one
after `hold` such steps in a row, or at once where the model's bus alone is longer than the CPU
side the step measured (the model is off: a probe that read the bus slow). So a split that
starts far off reaches the balance in one or two steps, not one micro-batch a step (bench decodes
~31 steps; issue 17's 4-bit run at batch 256 went 18 -> 0 of 32 over its whole run). Without `bus` (g unknown: 0), a
move is one micro-batch, as the rules above alone say.

cpu_s is the CPU side's whole time less its waits (kv_cache passes it, not the attention alone):
staging q, k and v and copying the output out are the CPU side's too (0.025 of 0.175 s a part in issue 17's
4-bit run at batch 256; 0.8 of 2.24 s a step earlier, at parts of 8).

Where the CPU side runs matters to the balance, and the controller sees it only through the
times: on the host thread that also issues the GPU's work (the default), a step is bound by that
thread's total as much as by the bus, and a part moved to the CPU lengthens it by c and shortens
it by i. With `--kv-overlap` (offload/cpu_side.py) the CPU side has a thread of its own; there
the time that thread sits idle while the other one issues (the two meet at every layer) counts in
C, not as a wait, so a step bound by issuing would read as CPU-bound.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SplitController:
    parts: int  # micro-batches
    gpu: int  # how many attend on the GPU now (the last ones)
    most: int  # the most that may: the plan reserved GPU memory for their buffers
    margin: float = 0.1  # dead band, as a share of one micro-batch's CPU attention time
    patience: int = 1  # steps that must agree before a move
    hold: int = 8  # steps a count that proved too many for the bus is not tried again
    bus: tuple | None = None  # (weights' bus seconds a step, one GPU part's cache's): sizes moves
    history: list = field(default_factory=list)  # GPU micro-batches at each observed step
    _per_part_s: float | None = None  # last seen CPU side seconds per micro-batch (c)
    _issue_per_part_s: float | None = None  # last seen host seconds issuing one GPU micro-batch
    _dear_steps: int = 0  # GPU-attending steps in a row where issuing a part cost the host >= attending it
    _pending: tuple = (0, 0)  # (direction, steps in a row)
    _ceiling: tuple = (None, 0)  # (count not to reach, steps left)
    _vetoes: int = 0  # CPU-bound steps in a row whose move to the GPU the bus model vetoed

    def observe(self, cpu_s: float, wait_s: float, step_s: float, issue_s: float = 0.0) -> int:
        """Take one decode step's times; return how many micro-batches attend on the GPU next."""
        self.history.append(self.gpu)
        cpu_parts = self.parts - self.gpu
        if self.gpu:
            self._issue_per_part_s = issue_s / self.gpu
        if cpu_parts:
            self._per_part_s = cpu_s / cpu_parts
        else:
            wait_s = step_s  # no attention on the CPU: it waited for the GPU the whole step
        if self.gpu and self._per_part_s is not None:
            dear = self._issue_per_part_s >= self._per_part_s
            self._dear_steps = self._dear_steps + 1 if dear else 0
        move = self._verdict(wait_s)
        count = self._pending[1] + 1 if move and move == self._pending[0] else 1
        self._pending = (move, count)
        limit, left = self._ceiling
        self._ceiling = (limit, left - 1) if left > 1 else (None, 0)
        if move <= 0:
            self._vetoes = 0
        if move and count >= self.patience:
            before = self.gpu
            self.gpu += move * self._size(move, wait_s, step_s)
            self._pending = (0, 0)
            if self.gpu < before:  # the count moved from was too many for the bus
                self._ceiling = (before, self.hold)
        return self.gpu

    def _room(self) -> int:
        """The most micro-batches that may attend on the GPU now."""
        limit = self._ceiling[0]
        return min(self.most, self.parts, limit - 1 if limit is not None else self.parts)

    def _verdict(self, wait_s: float) -> int:
        """+1: micro-batches to the GPU; -1: back to the CPU; 0: stay."""
        c, i = self._per_part_s, self._issue_per_part_s
        if self.gpu > 0 and (c is None or wait_s > (1 + self.margin) * c or i > (1 + self.margin) * c):
            return -1
        if self.gpu < self._room() and c is not None and wait_s < self.margin * c:
            # i is this step's with parts on the GPU; with none, the last one seen, trusted if seen twice
            if i is None or i < c or (not self.gpu and self._dear_steps < 2):
                return 1
        return 0

    def _size(self, move: int, wait_s: float, step_s: float) -> int:
        """How many micro-batches to move in direction `move`: the count whose modelled step
        (module docstring) is shortest, the fewest of equals; at least one back to the CPU (the
        wait showed one pays), none to the GPU where the bus model says it would not pay (but one
        after `hold` such steps in a row, or where the model contradicts the step). One without
        the bus model."""
        c = self._per_part_s
        if self.bus is None or c is None:
            return 1
        weights_s, g = self.bus
        cpu_side = step_s - wait_s
        if move < 0:
            gpu_side = step_s  # the CPU waited for it: it finished last
            options = range(1, self.gpu + 1)
        else:
            gpu_side = weights_s + self.gpu * g  # the bus's own time: the least the GPU side takes
            if gpu_side >= cpu_side:
                # The CPU did not wait, so the GPU side took less than this: the model is off (a
                # bandwidth probe read low; issue 17 saw 11.9 and 33.7 GB/s on one machine kind) and
                # would veto every move for the whole run. One micro-batch, as without it; the next
                # step's wait says whether it paid.
                return 1
            options = range(0, self._room() - self.gpu + 1)
        # a move must shorten the modelled step by more than the dead band: the model is rough
        modelled = lambda k: max(gpu_side + move * k * g, cpu_side - move * k * c) + (self.margin * c if k else 0.0)  # noqa: E731
        best = min(options, key=lambda k: (modelled(k), k))
        self._vetoes = self._vetoes + 1 if best == 0 else 0
        if self._vetoes > self.hold:
            # Vetoed this long, a move is tried anyway, as a count that proved too many is after
            # `hold` steps: a model whose g is too large (a probe read low) would otherwise hold
            # the split below the balance all run; where it was right, the wait sends it back.
            self._vetoes = 0
            return 1
        return best
