"""The prefix cache: block keys, the pool's sharing / eviction rules, placement under AFD, and
end to end: a second chat turn reuses the first turn's blocks (and skips the vision tower) and
still gives the reference model's greedy tokens."""

from __future__ import annotations

import os
import random

import pytest
import torch
from PIL import Image
from runtime_helpers import FIXED_BW, reference_tokens

from step3_edge.config import Step3Config
from step3_edge.runtime import Step3Runtime
from step3_edge.runtime.afd_attn import BlockPool, ShardedKV
from step3_edge.runtime.kv import BLOCK, KVPool, block_keys, images_digest

T = Step3Config.preset("tiny").text_config
SEED = int.from_bytes(os.urandom(4), "little")
RNG = random.Random(SEED)


def _ids(n: int) -> list[int]:
    """Fresh random token ids (the module's seed is in the failure message)."""
    return [RNG.randrange(3, T.vocab_size) for _ in range(n)]


@pytest.fixture(autouse=True)
def _print_seed() -> None:
    print(f"token id seed {SEED}")


def _pool(blocks: int) -> KVPool:
    return KVPool(T, blocks * BLOCK, torch.float32, torch.device("cpu"))


def _written(pool: KVPool, ids: list[int], extra: int = 8):
    """A sequence of prompt `ids` that wrote all of them, released with its keys."""
    keys = block_keys(ids)
    seq = pool.allocate(len(ids) + extra, keys, len(ids))
    assert seq is not None
    seq.length = len(ids)
    return seq, keys


def _blocks_of(keys: list[bytes], pool: KVPool) -> list[int]:
    """The blocks registered under `keys`."""
    return [pool.block_of[k] for k in keys]


def test_block_keys_name_everything_before_the_block_end() -> None:
    ids = _ids(70)
    keys = block_keys(ids)
    assert len(keys) == 70 // BLOCK and len(set(keys)) == len(keys)
    assert block_keys(ids[:40]) == keys[:2]                       # a prefix's keys
    assert block_keys(ids, known=keys[:2]) == keys                # extended, not recomputed
    other = list(ids)
    other[3] += 1                                                 # block 0 differs ...
    assert all(a != b for a, b in zip(block_keys(other), keys))   # ... so every key does
    other = list(ids)
    other[40] += 1                                                # block 2 differs
    assert block_keys(other)[:2] == keys[:2] and block_keys(other)[2] != keys[2]
    assert all(a != b for a, b in zip(block_keys(ids, root=b"image"), keys))


def test_images_digest_follows_the_pixels(rt) -> None:
    def views(colour: tuple[int, int, int]):
        return rt.processor.preprocess(Image.new("RGB", (96, 64), colour))

    red, blue = views((200, 40, 40)), views((40, 40, 200))
    assert images_digest([red]) == images_digest([views((200, 40, 40))])
    assert images_digest([red]) != images_digest([blue])
    assert images_digest([red, blue]) != images_digest([blue, red])
    assert images_digest(None) == images_digest([]) == b""


def test_released_blocks_are_shared_by_a_matching_prompt() -> None:
    pool = _pool(12)
    ids = _ids(50)                                  # 3 full blocks + 2 tokens
    a, keys = _written(pool, ids)
    pool.release(a, keys)
    assert pool.cached_tokens == 3 * BLOCK and pool.free_tokens == 12 * BLOCK
    longer = ids + _ids(30)
    b = pool.allocate(len(longer) + 4, block_keys(longer), len(longer))
    assert b is not None and b.length == 3 * BLOCK    # starts after the cached blocks
    assert b.blocks[:3] == _blocks_of(keys, pool) and pool.cached_tokens == 0
    c = pool.allocate(len(longer) + 4, block_keys(longer), len(longer))
    assert c is not None and c.blocks[:3] == b.blocks[:3]          # shared while in use
    assert len(set(b.blocks[3:]) | set(c.blocks[3:])) == len(b.blocks) + len(c.blocks) - 6
    pool.release(b)
    assert pool.cached_tokens == 0                     # c still uses the shared blocks
    pool.release(c)
    assert pool.cached_tokens == 3 * BLOCK and pool.free_tokens == 12 * BLOCK


def test_the_last_prompt_token_is_always_computed() -> None:
    pool = _pool(8)
    ids = _ids(48)                                  # exactly 3 blocks
    a, keys = _written(pool, ids)
    pool.release(a, keys)
    again = pool.allocate(48 + 4, keys, 48)
    assert again is not None and again.length == 2 * BLOCK   # block 3 holds the last token


def test_partial_blocks_and_duplicates_are_not_registered() -> None:
    pool = _pool(12)
    ids = _ids(40)
    a, keys = _written(pool, ids)
    a.length = 20                                      # only block 0 fully written
    pool.release(a, keys)
    assert pool.cached_tokens == BLOCK and len(pool.block_of) == 1
    b, _ = _written(pool, ids)                         # hits block 0, writes its own block 1
    c = pool.allocate(60, [], 0)                       # no keys: no sharing
    assert c is not None and c.length == 0 and not set(c.blocks) & set(b.blocks)
    pool.release(c)
    d, _ = _written(pool, ids)
    pool.release(b, keys)                              # registers b's block 1
    pool.release(d, keys)                              # same key again: d's block is freed
    assert len(pool.block_of) == 2 and pool.cached_tokens == 2 * BLOCK
    assert pool.free_tokens == 12 * BLOCK


def test_cached_blocks_are_evicted_oldest_first_when_needed() -> None:
    pool = _pool(6)
    old, new = _ids(40), _ids(40)
    for ids in (old, new):                             # 2 cached blocks each
        s, keys = _written(pool, ids, extra=0)
        pool.release(s, keys)
    assert pool.cached_tokens == 4 * BLOCK
    big = pool.allocate(4 * BLOCK)                     # 2 free + the 2 oldest cached blocks
    assert big is not None and pool.cached_tokens == 2 * BLOCK
    pool.release(big)
    again = pool.allocate(40, block_keys(old), 40)
    assert again is not None and again.length == 0     # forgotten
    pool.release(again)
    again = pool.allocate(40, block_keys(new), 40)
    assert again is not None and again.length == 2 * BLOCK   # kept


def test_afd_placement_prefers_the_rank_that_caches_the_prefix() -> None:
    kv = ShardedKV([KVPool(T, 64, torch.float32, torch.device("cpu")),
                    BlockPool(T, 64, torch.float32)])
    ids = _ids(40)
    keys = block_keys(ids)
    busy = kv.allocate(16)                              # rank 0: one live sequence
    first = kv.allocate(48, keys, 40)                   # rank 1: the least loaded
    assert kv.rank_of(first)[0] == 1
    first.length = 40
    kv.release(first, keys)
    kv.allocate(16)                                     # rank 1 busy too: 1 vs 1
    second = kv.allocate(48, keys, 40)
    assert kv.rank_of(second)[0] == 1 and second.length == 2 * BLOCK
    assert kv.rank_of(busy)[0] == 0


def _two_turns(rt: Step3Runtime, image: Image.Image | None) -> tuple[int, list, list, list]:
    """(turn 1's prompt length, turn 2's ids, its image views, its greedy tokens): a chat of
    two turns, the second after the model's first answer."""
    def user(text: str) -> dict:
        if image is None:
            return {"role": "user", "content": text}
        return {"role": "user", "content": [{"type": "image", "image": image},
                                            {"type": "text", "text": text}]}

    first = [user("Describe what you see in a few words, please.")]
    ids1, views1 = rt.processor.apply_chat(first)
    ans = rt.generate(ids1, views1, max_new_tokens=10)
    second = first + [{"role": "assistant", "content": ans.text},
                      {"role": "user", "content": "And what else is there?"}]
    ids, views = rt.processor.apply_chat(second)
    return len(ids1), ids, views, rt.generate(ids, views, max_new_tokens=10).token_ids


@pytest.mark.parametrize("image", [False, True])
def test_second_chat_turn_reuses_the_first_and_matches_reference(image: bool, bundle,
                                                                ref_model) -> None:
    img = Image.new("RGB", (96, 64), (200, 40, 40)) if image else None
    opts = dict(dtype="float32", device="cpu", bandwidths=FIXED_BW, max_prefill_tokens=24)
    with Step3Runtime.load(bundle, prefix_cache=False, **opts) as cold:
        _, ids, views, want = _two_turns(cold, img)
        assert cold.stats()["scheduler"]["prefix_cache"]["hit_tokens"] == 0
    assert want == reference_tokens(ref_model, ids, cold.processor.stop_token_ids,
                                    images=views, max_new=10)
    with Step3Runtime.load(bundle, **opts) as warm:
        encoded: list[bool] = []
        embed = warm.engine.attn.embed
        warm.engine.attn.embed = lambda ids, images=None: (encoded.append(bool(images)),
                                                           embed(ids, images))[1]
        n1, ids2, _, got = _two_turns(warm, img)
        pc = warm.stats()["scheduler"]["prefix_cache"]
    assert ids2 == ids and got == want
    assert pc["prompt_tokens"] == n1 + len(ids)
    assert BLOCK <= pc["hit_tokens"] <= n1 and pc["hit_tokens"] % BLOCK == 0
    if image:
        assert encoded == [True, False]        # turn 2's image features came from the cache


def test_other_images_share_no_block(bundle) -> None:
    with Step3Runtime.load(bundle, dtype="float32", device="cpu", bandwidths=FIXED_BW) as rt:
        def ask(colour: tuple[int, int, int]) -> None:
            msgs = [{"role": "user", "content": [
                {"type": "image", "image": Image.new("RGB", (96, 64), colour)},
                {"type": "text", "text": "What colour is this picture, exactly?"}]}]
            rt.generate(*rt.processor.apply_chat(msgs), max_new_tokens=2)

        ask((200, 40, 40))
        ask((40, 40, 200))                     # same tokens, another image
        assert rt.stats()["scheduler"]["prefix_cache"]["hit_tokens"] == 0
        ask((200, 40, 40))                     # the first image again
        assert rt.stats()["scheduler"]["prefix_cache"]["hit_tokens"] > 0
