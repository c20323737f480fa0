"""The block pool and the prefix-cache keys (pure Python, no torch)."""

from __future__ import annotations

import hashlib

import pytest

from actors.kv_blocks import NULL_BLOCK, BlockPool, block_hashes

BS = 4


def _keys(tokens, images=()):
    return block_hashes(tokens, BS, images)


# ----------------------------------------------------------------------------- block_hashes
def test_only_full_blocks_get_keys_and_equal_prefixes_equal_keys():
    a, b = _keys(list(range(10))), _keys(list(range(8)) + [99, 98, 97])
    assert len(a) == 2 and len(b) == 2  # 10 and 11 tokens: two full blocks each
    assert a == b
    assert _keys(list(range(3))) == []
    assert len(set(a)) == 2


def test_keys_chain_over_the_previous_block():
    """A block's key depends on everything before it: same block tokens after a different first block differ."""
    x = [1, 2, 3, 4, 5, 6, 7, 8]
    y = [9, 2, 3, 4, 5, 6, 7, 8]
    kx, ky = _keys(x), _keys(y)
    assert kx[0] != ky[0] and kx[1] != ky[1]


def test_the_chain_is_sha256_of_parent_tokens_and_images():
    """Resuming at `start` with the parent key gives the same keys as hashing from 0 (the chain property)."""
    tokens = list(range(20))
    images = [(5, 11, hashlib.sha256(b"img").digest())]
    whole = block_hashes(tokens, BS, images)
    tail = block_hashes(tokens, BS, images, start=8, parent=whole[1])
    assert tail == whole[2:]
    assert all(len(k) == 32 for k in whole)


def test_same_text_different_image_differs_from_the_first_image_block_on():
    tokens = [7] * 24  # the text (and image pad tokens) identical
    img_a, img_b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    ka = _keys(tokens, [(9, 15, img_a)])
    kb = _keys(tokens, [(9, 15, img_b)])
    assert ka[:2] == kb[:2]  # blocks [0, 4) and [4, 8) hold no image token
    assert all(x != y for x, y in zip(ka[2:], kb[2:]))  # [8, 12) holds image tokens 9..11; after it the chain
    assert _keys(tokens, [(9, 15, img_a)]) == ka


def test_an_image_span_touching_a_block_edge_is_not_in_that_block():
    tokens = [3] * 12
    img = hashlib.sha256(b"a").digest()
    plain = _keys(tokens)
    ends_at_4 = _keys(tokens, [(0, 4, img)])
    starts_at_8 = _keys(tokens, [(8, 12, img)])
    assert ends_at_4[0] != plain[0]
    assert starts_at_8[:2] == plain[:2] and starts_at_8[2] != plain[2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"start": 3, "parent": b"p"}, "multiple"), ({"start": 4}, "parent"), ({"parent": b"p"}, "parent")],
)
def test_block_hashes_rejects_a_bad_start_or_parent(kwargs, match):
    with pytest.raises(ValueError, match=match):
        block_hashes(list(range(12)), BS, **kwargs)


# ----------------------------------------------------------------------------- BlockPool
def test_allocate_hands_out_blocks_never_the_null_block_and_grows():
    pool = BlockPool(num_blocks=6, block_size=BS)
    assert pool.capacity == 5 and pool.num_free() == 5
    assert pool.allocate("a", 9, []) == 0  # 9 tokens -> 3 blocks
    assert len(pool.table("a")) == 3 and NULL_BLOCK not in pool.table("a")
    assert pool.grow("a", 12) and len(pool.table("a")) == 3  # still 3 blocks
    assert pool.grow("a", 13) and len(pool.table("a")) == 4
    assert not pool.grow("a", 25) and len(pool.table("a")) == 4  # needs 3 more, 1 free: no change
    assert pool.allocate("b", 5, []) is None and pool.num_free() == 1  # refused, nothing changed
    pool.check()
    pool.free("a")
    assert pool.num_free() == 5 and pool.stats()["used"] == 0
    pool.check()


def test_two_owners_share_a_cached_prefix():
    pool = BlockPool(num_blocks=10, block_size=BS)
    tokens = list(range(14))  # 3 full blocks + 2 tokens
    keys = _keys(tokens)
    assert pool.allocate("a", 14, keys) == 0
    pool.cache("a", keys)  # a's prompt was computed
    assert pool.cached_prefix(keys) == 3
    assert pool.allocate("b", 14, keys) == 12  # 3 blocks from the cache, 1 new
    ta, tb = pool.table("a"), pool.table("b")
    assert ta[:3] == tb[:3] and ta[3] != tb[3]
    assert pool.stats()["used"] == 5
    pool.check()
    pool.free("a")
    assert pool.stats()["used"] == 4  # the shared blocks still have b
    pool.free("b")
    assert pool.stats() == {"used": 0, "free": 9, "cached": 3, "hit_tokens": 12, "query_tokens": 28, "evictions": 0}
    pool.check()


def test_never_all_tokens_from_the_cache():
    pool = BlockPool(num_blocks=10, block_size=BS)
    tokens = list(range(8))  # exactly two full blocks
    keys = _keys(tokens)
    pool.allocate("a", 8, keys)
    pool.cache("a", keys)
    pool.free("a")
    assert pool.allocate("b", 8, keys) == 4  # the last hit block is dropped: one block left to compute
    assert pool.allocate("c", 9, _keys(tokens + [1])) == 8  # one token past the cached blocks: all hits used
    pool.check()


def test_caching_off_reuses_and_registers_nothing():
    pool = BlockPool(num_blocks=10, block_size=BS, caching=False)
    keys = _keys(list(range(12)))
    pool.allocate("a", 12, keys)
    pool.cache("a", keys)
    pool.free("a")
    assert pool.cached_prefix(keys) == 0 and pool.stats()["cached"] == 0
    assert pool.allocate("b", 12, keys) == 0
    pool.check()


def test_lru_evicts_the_least_recently_freed_and_a_tables_tail_first():
    pool = BlockPool(num_blocks=7, block_size=BS)  # 6 blocks
    ka, kb = _keys([1] * 12), _keys([2] * 8)
    pool.allocate("a", 12, ka)
    pool.cache("a", ka)
    a_blocks = pool.table("a")
    pool.allocate("b", 8, kb)
    pool.cache("b", kb)
    b_blocks = pool.table("b")
    pool.free("a")  # freed first: evicted first, its tail block before its head
    pool.free("b")
    assert pool.num_free() == 6 and pool.stats()["cached"] == 5
    pool.allocate("c", 8, [])  # 1 free block, then 1 eviction: a's last block
    assert pool.stats()["evictions"] == 1
    assert pool.cached_prefix(ka) == 2 and pool.cached_prefix(kb) == 2
    pool.allocate("d", 8, [])  # evicts a's middle then head block
    assert pool.cached_prefix(ka) == 0 and pool.cached_prefix(kb) == 2
    assert set(pool.table("d")) == set(a_blocks[:2])
    pool.allocate("e", 4, [])
    assert pool.cached_prefix(kb) == 1 and pool.table("e") == [b_blocks[1]]
    pool.check()


def test_a_hit_takes_a_block_out_of_the_lru_list():
    pool = BlockPool(num_blocks=4, block_size=BS)  # 3 blocks
    k = _keys([5] * 8)
    pool.allocate("a", 8, k)
    pool.cache("a", k)
    pool.free("a")
    assert pool.allocate("b", 12, k + _keys([5] * 12)[2:]) == 8  # 2 hits + 1 new (the free block)
    assert pool.allocate("c", 4, []) is None  # the hit blocks are held now, not evictable
    pool.check()


def test_allocation_counts_its_own_idle_hits_as_not_free():
    pool = BlockPool(num_blocks=4, block_size=BS)  # 3 blocks
    k = _keys([5] * 8)
    pool.allocate("a", 8, k)
    pool.cache("a", k)
    pool.allocate("x", 4, [])  # the last free block
    pool.free("a")  # a's 2 blocks evictable
    assert pool.allocate("b", 16, k) is None  # 2 hits + 2 new, but only the 2 hit blocks are free
    assert pool.cached_prefix(k) == 2
    pool.check()


def test_a_key_cached_by_another_block_keeps_that_block():
    pool = BlockPool(num_blocks=10, block_size=BS)
    k = _keys([5] * 8)
    pool.allocate("a", 8, [])
    pool.allocate("b", 8, [])  # both computed the same prefix without a hit (admitted together)
    pool.cache("a", k)
    pool.cache("b", k)
    assert pool.stats()["cached"] == 2
    b_blocks = pool.table("b")
    pool.free("b")  # b's copies are uncached: straight to the free list
    assert pool.stats()["cached"] == 2 and all(b in pool._free for b in b_blocks)
    pool.check()


def test_cache_offers_only_new_blocks_and_refuses_a_key_too_many():
    pool = BlockPool(num_blocks=10, block_size=BS)
    k = _keys(list(range(12)))
    pool.allocate("a", 9, [])
    pool.cache("a", k[:1])
    pool.cache("a", k[:2])
    assert pool.cached_prefix(k) == 2
    with pytest.raises(ValueError, match="keys for a table of 3"):
        pool.cache("a", k + k[:1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1, BS)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, 0)
    pool = BlockPool(4, BS)
    pool.allocate("a", 1, [])
    with pytest.raises(ValueError, match="already holds"):
        pool.allocate("a", 1, [])
    with pytest.raises(ValueError, match="num_tokens"):
        pool.allocate("b", 0, [])
    with pytest.raises(KeyError, match="'nope'"):
        pool.table("nope")


def test_reset_empties_the_pool_and_keeps_the_counters():
    pool = BlockPool(num_blocks=6, block_size=BS)
    k = _keys(list(range(8)))
    pool.allocate("a", 8, k)
    pool.cache("a", k)
    pool.free("a")
    pool.allocate("b", 9, k)
    pool.reset()
    assert pool.stats() == {"used": 0, "free": 5, "cached": 0, "hit_tokens": 8, "query_tokens": 17, "evictions": 0}
    pool.check()


def _busy_pool() -> BlockPool:
    pool = BlockPool(num_blocks=8, block_size=BS)
    k = _keys(list(range(12)))
    pool.allocate("a", 12, k)
    pool.cache("a", k)
    pool.allocate("b", 13, k)
    pool.free("a")
    pool.allocate("c", 4, [])
    pool.check()
    return pool


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda p: p._free.popleft(), "lost"),
        (lambda p: p._free.append(p.table("c")[0]), "double-held"),
        (lambda p: p._ref.__setitem__(p.table("c")[0], 2), "reference count"),
        (lambda p: p._tables["c"].append(p.table("c")[0]), "holds a block twice"),
        (lambda p: p._tables["c"].append(NULL_BLOCK), "block 0"),
        (lambda p: p._key_of.__setitem__(p._free[0], b"k"), "both free and cached"),
        (lambda p: p._by_key.__setitem__(b"k", p.table("c")[0]), "key maps"),
    ],
)
def test_check_catches_a_corrupted_pool_and_names_the_block(corrupt, match):
    pool = _busy_pool()
    corrupt(pool)
    with pytest.raises(AssertionError, match=match):
        pool.check()


def test_check_names_the_lost_block():
    pool = _busy_pool()
    lost = pool._free.popleft()
    with pytest.raises(AssertionError, match=f"block {lost} is lost"):
        pool.check()
