"""Paged KV cache: one pool per attention device, sized by the plan, and a block table per
sequence. Step3 has one K and one V head (MFA), so a token costs 2 x layers x head_dim values.

A forward step attends in groups: all single-token (decode) sequences together, padded to the
longest and masked, and each multi-token chunk (prefill) on its own. `GroupCache` is what the
reference `Step3Attention.forward` receives as its `cache`: `update` writes the new keys/values
into the pool and returns the group's keys/values gathered from its block tables.

Prefix cache (vLLM's automatic prefix caching, by whole blocks): when a sequence is released,
each full block it wrote is registered under a digest of every token up to the block's end
(and of the prompt's images), and stays cached, evictable oldest first, until its slots are
needed. A new sequence whose prompt starts with registered blocks gets those blocks (shared,
reference-counted, never written again) and starts its prefill after them.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from step3_edge.config import Step3TextConfig
from step3_edge.errors import PromptError
from step3_edge.model import attention_mask, rope_cos_sin
from step3_edge.quantize.schemes import cast_fp8, fp8_to_float
from step3_edge.runtime import native

BLOCK = 16  # tokens per KV block


def block_keys(ids: Sequence[int], root: bytes = b"", known: Sequence[bytes] = ()
               ) -> list[bytes]:
    """Prefix-cache keys of the full blocks of `ids`: key i digests key i-1 and block i's
    tokens, key -1 is `root` (a digest of the prompt's images, `images_digest`), so a key
    names everything before its block's end. `known`: keys already computed for a prefix of
    `ids` (extended, not recomputed)."""
    keys = list(known)
    prev = keys[-1] if keys else hashlib.blake2b(root, digest_size=16).digest()
    first, n = len(keys), len(ids) // BLOCK
    data = array("i", ids[first * BLOCK:n * BLOCK]).tobytes()
    step = BLOCK * 4
    for i in range(n - first):
        prev = hashlib.blake2b(prev + data[i * step:(i + 1) * step], digest_size=16).digest()
        keys.append(prev)
    return keys


def images_digest(images: Sequence[Any] | None) -> bytes:
    """Digest of a prompt's preprocessed images (every tensor they hold, in order): the root of
    its block keys, so prompts with other images share no block."""
    if not images:
        return b""
    h = hashlib.blake2b(digest_size=16)
    for views in images:
        for t in (v for v in vars(views).values() if isinstance(v, torch.Tensor)):
            t = t.detach().cpu().contiguous()
            h.update(repr((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.digest()


def kv_bytes_per_token(cfg: Step3TextConfig, dtype: torch.dtype) -> int:
    """Pool bytes per token: one K and one V head of every layer."""
    return 2 * cfg.num_hidden_layers * cfg.head_dim * dtype.itemsize


@dataclass
class SeqKV:
    """One sequence's KV: its blocks (reserved up front) and how many tokens are written
    (a prefix-cache hit starts with its shared blocks' tokens written)."""

    blocks: list[int]
    reserved: int          # tokens the blocks hold
    length: int = 0        # tokens written
    table: torch.Tensor = field(init=False)   # [reserved] pool slot of each token position

    def __post_init__(self) -> None:
        b = torch.tensor(self.blocks, dtype=torch.long)
        self.table = (b[:, None] * BLOCK + torch.arange(BLOCK)).reshape(-1)

    def slots(self, start: int, n: int) -> torch.Tensor:
        return self.table[start:start + n]


class KVPool:
    """kv [layers, 2 (k, v), capacity, head_dim] in blocks of 16 tokens; the last block is
    scratch (padding reads point at it). One index op per layer writes or gathers a token's
    key and value together."""

    def __init__(self, cfg: Step3TextConfig, capacity_tokens: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self._init_blocks(capacity_tokens)
        shape = (cfg.num_hidden_layers, 2, (self.num_blocks + 1) * BLOCK, cfg.head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device)
        # decode steps' attention and fp8 gathers through the native kernels (set by the
        # attention worker where they run)
        self.native = False

    def _init_blocks(self, capacity_tokens: int) -> None:
        """Block bookkeeping: free blocks, reference counts, the prefix cache."""
        self.num_blocks = max(1, capacity_tokens // BLOCK)
        self.free_blocks = list(range(self.num_blocks - 1, -1, -1))
        self.pad_slot = self.num_blocks * BLOCK
        self.refs: dict[int, int] = {}              # block -> sequences using it
        self.key_of: dict[int, bytes] = {}          # registered block -> its key
        self.block_of: dict[bytes, int] = {}        # key -> registered block
        self.evictable: OrderedDict[int, None] = OrderedDict()   # cached, unused; oldest first

    @property
    def k(self) -> torch.Tensor:
        """Keys [layers, capacity, head_dim] (a view)."""
        return self.kv[:, 0]

    @property
    def v(self) -> torch.Tensor:
        """Values [layers, capacity, head_dim] (a view)."""
        return self.kv[:, 1]

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * BLOCK

    @property
    def free_tokens(self) -> int:
        """Tokens a new sequence could take (cached blocks nobody uses included)."""
        return self.available_blocks * BLOCK

    @property
    def available_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def cached_tokens(self) -> int:
        """Tokens held by cached blocks that no running sequence uses."""
        return len(self.evictable) * BLOCK

    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.cfg, self.dtype)

    def check(self, tokens: int) -> None:
        """Raise PromptError if a sequence of `tokens` could never be held (even alone)."""
        if math.ceil(tokens / BLOCK) > self.num_blocks:
            raise PromptError(f"{tokens:,} tokens (prompt + max_new_tokens) exceed the KV "
                              f"capacity of {self.capacity_tokens:,} tokens",
                              "lower max_new_tokens, shorten the prompt, or load with a larger "
                              "kv_tokens / a plan with more KV")

    def cached_prefix(self, keys: Sequence[bytes], prompt: int) -> list[int]:
        """Registered blocks matching the leading `keys` of a `prompt`-token prompt; at least
        its last token is left to compute (its logits give the first new token)."""
        hit: list[int] = []
        for key in keys[:(prompt - 1) // BLOCK]:
            b = self.block_of.get(key)
            if b is None:
                break
            hit.append(b)
        return hit

    def fits(self, blocks: int, hit: list[int]) -> bool:
        """Whether `blocks` blocks fit now, the cached prefix blocks `hit` among them."""
        return blocks - len(hit) <= self.available_blocks - sum(b in self.evictable for b in hit)

    def allocate(self, tokens: int, keys: Sequence[bytes] = (), prompt: int = 0
                 ) -> SeqKV | None:
        """Reserve blocks for `tokens`, the leading ones shared from the prefix cache when
        the prompt's block `keys` match (`prompt`: its length); None when the pool is too
        full right now."""
        self.check(tokens)
        n = math.ceil(tokens / BLOCK)
        hit = self.cached_prefix(keys, prompt)
        if not self.fits(n, hit):
            return None
        for b in hit:
            self.evictable.pop(b, None)
            self.refs[b] = self.refs.get(b, 0) + 1
        new = [self._take() for _ in range(n - len(hit))]
        for b in new:
            self.refs[b] = 1
        return SeqKV(hit + new, n * BLOCK, len(hit) * BLOCK)

    def _take(self) -> int:
        """A free block, else the least recently cached one (its key forgotten)."""
        if self.free_blocks:
            return self.free_blocks.pop()
        b, _ = self.evictable.popitem(last=False)
        del self.block_of[self.key_of.pop(b)]
        return b

    def release(self, seq: SeqKV, keys: Sequence[bytes] = ()) -> None:
        """Give back a sequence's blocks. `keys` (`block_keys` of the tokens it wrote) register
        its full blocks in the prefix cache; blocks nobody else uses then stay cached."""
        for b, key in zip(seq.blocks, keys[:seq.length // BLOCK]):
            if b not in self.key_of and key not in self.block_of:
                self.key_of[b], self.block_of[key] = key, b
        for b in reversed(seq.blocks):
            self.refs[b] -= 1
            if self.refs[b]:
                continue
            del self.refs[b]
            if b in self.key_of:
                self.evictable[b] = None
            else:
                self.free_blocks.append(b)
        seq.blocks = []


@dataclass
class Group:
    """Sequences attended together: b rows of t new tokens each (flat rows [start, start+b*t))."""

    start: int
    b: int
    t: int
    cos: torch.Tensor                   # [b, t, head_dim]
    sin: torch.Tensor
    mask: torch.Tensor | None           # [b, 1, t, S]; None: plain causal (attention_mask)
    write: torch.Tensor                 # [b*t] pool slots of the new tokens
    gather: torch.Tensor                # [b, S] pool slots of every key (padding: scratch)
    positions: torch.Tensor             # [b, t] (CPU) = keys already cached per row
    keys: torch.Tensor                  # [b] keys each row's last new token attends to


@dataclass
class StepBatch:
    """One forward step: groups in flat-row order and each sequence's last row."""

    groups: list[Group]
    seqs: list[SeqKV]
    new_tokens: list[int]
    last_rows: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(g.b * g.t for g in self.groups)

    def commit(self) -> None:
        """Advance each sequence past the tokens this step wrote."""
        for s, n in zip(self.seqs, self.new_tokens):
            s.length += n


def plan_step(pool: KVPool, segments: list[tuple[SeqKV, int]]) -> StepBatch:
    """Groups for `segments` (sequence, new tokens): the leading single-token segments attend
    as one padded group, each later segment alone; flat rows follow the same order."""
    cfg, dev = pool.cfg, pool.device
    nd = next((i for i, (_, n) in enumerate(segments) if n != 1), len(segments))
    decode = [s for s, _ in segments[:nd]]               # the leading single-token segments
    groups: list[Group] = []
    row = 0
    if decode:
        past = torch.tensor([s.length for s in decode])                   # [B]
        s_max = int(past.max()) + 1
        gather = torch.full((len(decode), s_max), pool.pad_slot, dtype=torch.long)
        for i, s in enumerate(decode):
            gather[i, :s.length + 1] = s.slots(0, s.length + 1)
        valid = torch.arange(s_max)[None] <= past[:, None]                # [B, S]
        groups.append(_group(pool, 0, past[:, None], valid, s_max - 1, gather,
                             torch.cat([s.slots(s.length, 1) for s in decode])))
        row = len(decode)
    for s, n in segments[len(decode):]:
        pos = torch.arange(s.length, s.length + n)[None]                  # [1, n]
        total = s.length + n
        gather = s.slots(0, total)[None]                                  # [1, S]
        groups.append(_group(pool, row, pos, torch.ones(1, total, dtype=torch.bool),
                             s.length, gather, s.slots(s.length, n)))
        row += n
    batch = StepBatch(groups, [s for s, _ in segments], [n for _, n in segments])
    ends, r = [], 0
    for _, n in segments:
        r += n
        ends.append(r - 1)
    batch.last_rows = ends
    assert row == batch.rows and cfg is pool.cfg and dev == pool.device
    return batch


def _group(pool: KVPool, start: int, positions: torch.Tensor, valid: torch.Tensor, past: int,
           gather: torch.Tensor, write: torch.Tensor) -> Group:
    t = pool.cfg
    cos, sin = rope_cos_sin(positions, t.head_dim, t.rope_theta, t.rope_factor)
    mask = attention_mask(positions, valid, past)                   # [b, 1, t, S] or None
    dev = pool.device
    b, n = positions.shape
    return Group(start, b, n, cos.to(dev), sin.to(dev), None if mask is None else mask.to(dev),
                 write.to(dev), gather.to(dev), positions, positions[:, -1] + 1)


class GroupCache:
    """The `cache` argument of `Step3Attention.forward` for one group."""

    def __init__(self, pool: KVPool, group: Group) -> None:
        self.pool, self.group = pool, group

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [b, t, d] into the pool; return the group's keys/values [b, S, d] in the
        compute dtype, or in float32 from an fp8 pool (exact either way: `mfa_attention`
        computes in float32)."""
        g, d = self.group, k.shape[-1]
        pool = self.pool.kv[layer]                                       # [2, slots, d]
        new = torch.stack([k, v]).reshape(2, -1, d)                       # [2, b*t, d]
        if pool.dtype == torch.float8_e4m3fn:    # index ops run on the raw bytes
            pool = pool.view(torch.uint8)
            new = cast_fp8(new.float()).view(torch.uint8)     # saturates: no NaN stored
            pool.index_copy_(1, g.write, new)
            idx = g.gather.reshape(-1)
            got = native.fp8_gather(pool, idx) if self.pool.native \
                else fp8_to_float(pool.index_select(1, idx))                 # [2, b*S, d]
        else:
            pool.index_copy_(1, g.write, new.to(pool.dtype))
            got = pool.index_select(1, g.gather.reshape(-1)).to(k.dtype)
        got = got.view(2, g.b, -1, d)
        return got[0], got[1]

    def decode_attention(self, layer: int, y: torch.Tensor, koff: int, q: torch.Tensor,
                         heads: int, scale: float) -> torch.Tensor | None:
        """A decode group's (t == 1) RoPE, KV write and attention in one native call
        (`native.decode_mfa`; y bf16 [b, >= koff + 2d] holds the key at koff and the value
        after it, q bf16 [b, heads * d] is rotated in place) -> [b, heads, 1, d]; None where
        the pool has no native kernels or the group is not a decode group (then the caller
        takes `update` and `mfa_attention`)."""
        g = self.group
        if not self.pool.native or g.t != 1:
            return None
        return native.decode_mfa(y, koff, q, heads, g.cos.view(g.b, -1), g.sin.view(g.b, -1),
                                 self.pool.kv[layer], g.write, g.gather, g.keys, scale)

