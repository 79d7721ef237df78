"""The block pool: every KV-cache block, its reference count, the prefix-cache map and the free queue.

    blocks:       [b0 b1 b2 ... bN-1]          one KVCacheBlock per block id, allocated once
    free_queue:   front -> ... -> back         ref_cnt == 0 blocks; the front is evicted first
    cached:       block_hash -> block          full blocks whose tokens (and all before) are known

A block is in the free queue iff its ref_cnt is 0. A block with ref_cnt 0 may still carry a hash: it
is "cached but evictable" and a prefix hit takes it back out of the queue. Blocks freed without a
hash go to the front (nothing worth keeping); hashed ones go to the back, tail blocks of a request
first, so the least useful are evicted first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from tokenmill.core.request import token_array

BlockHash = bytes


def hash_full_blocks(parent_hash: BlockHash | None, token_ids: Sequence[int], block_size: int,
                     extra_keys: tuple = ()) -> list[BlockHash]:
    """The hash chain over each full block of `token_ids`: a block's hash is sha256 over its parent's
    hash (`parent_hash` for the first), its exact token ids and any extra keys.

    A 256-bit hash of the full chain makes a collision (two different prefixes, one hash) practically
    impossible, so a hit never hands a request someone else's KV. The tokens become bytes in one call
    and each block is one sha256 call: a 4096-token prompt is 256 blocks on the time-to-first-token path.
    """
    data = token_array(token_ids).tobytes()
    block_bytes = 8 * block_size
    suffix = repr(extra_keys).encode() if extra_keys else b""
    block_hash = parent_hash or b"\0"
    return [block_hash := hashlib.sha256(block_hash + data[start:start + block_bytes] + suffix).digest()
            for start in range(0, len(data) - block_bytes + 1, block_bytes)]


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, hashed={self.block_hash is not None})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[BlockHash, KVCacheBlock] = {}
        # (block id, hash) of cached blocks evicted since the last drain, for the host tier
        self.evicted: list[tuple[int, BlockHash]] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot get {num_blocks} blocks, only {self.num_free_blocks} free")
        popitem = self.free_queue.popitem
        new_blocks = [popitem(last=False)[1] for _ in range(num_blocks)]  # from the front: eviction order
        for block in new_blocks:
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
        return new_blocks

    def _evict(self, block: KVCacheBlock) -> None:
        """Drops a reused block's hash, and its cache entry where it is the canonical copy."""
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
            self.evicted.append((block.block_id, block.block_hash))
        block.block_hash = None

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Takes a reference on each block (a prefix hit); blocks with no holder leave the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference per block; pass a request's blocks tail first."""
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def cache_full_blocks(self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[BlockHash],
                          num_cached_blocks: int, num_full_blocks: int) -> None:
        """Registers blocks[num_cached_blocks:num_full_blocks] under their hashes."""
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            if block.block_hash is not None:
                continue  # a prefix hit: already registered
            block.block_hash = block_hashes[i]
            # If another block already holds this content, keep that one as the canonical copy.
            self.cached.setdefault(block.block_hash, block)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash; refuses (returns False) while any block is held by a request."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True

    def check_integrity(self) -> None:
        """Cheap invariant check for tests: raises AssertionError on any inconsistency."""
        for block in self.blocks:
            assert block.ref_cnt >= 0, block
            assert (block.ref_cnt == 0) == (block.block_id in self.free_queue), block
        for block_hash, block in self.cached.items():
            assert block.block_hash == block_hash, block
        assert len(self.free_queue) <= self.num_blocks
