"""The host (CPU) tier of the KV cache: where full, hashed blocks go when the device pool evicts them.

    device pool --evict--> host tier (LRU by use)       a later prefix hit found only here is copied
                <--copy--                                back instead of recomputed

The tier only indexes host block ids by block hash; the runner moves the bytes, batched per step:
every copy out is done before the step's forward pass overwrites the device block.
"""

from __future__ import annotations

from collections import OrderedDict

from tokenmill.core.block_pool import BlockHash


class HostKVTier:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.by_hash: OrderedDict[BlockHash, int] = OrderedDict()  # least recently used first
        self.free_ids = list(range(num_blocks - 1, -1, -1))

    def lookup(self, block_hash: BlockHash) -> int | None:
        host_id = self.by_hash.get(block_hash)
        if host_id is not None:
            self.by_hash.move_to_end(block_hash)
        return host_id

    def store(self, block_hash: BlockHash, protected: set[int]) -> int | None:
        """A host block to copy `block_hash`'s content into; None if it is already held or every host
        block is `protected` (still to be read by a copy of this step)."""
        if block_hash in self.by_hash:
            self.by_hash.move_to_end(block_hash)
            return None
        if self.free_ids:
            host_id = self.free_ids.pop()
        else:
            victim = next((h for h, i in self.by_hash.items() if i not in protected), None)
            if victim is None:
                return None
            host_id = self.by_hash.pop(victim)
        self.by_hash[block_hash] = host_id
        return host_id

    def reset(self) -> None:
        self.by_hash.clear()
        self.free_ids = list(range(self.num_blocks - 1, -1, -1))
