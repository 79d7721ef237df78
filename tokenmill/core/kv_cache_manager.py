"""Per-request block tables on top of the block pool: prefix lookup, allocation, free."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_full_blocks
from tokenmill.core.host_tier import HostKVTier
from tokenmill.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found in the cache
    host_hits: int = 0  # of the hits, tokens copied back from the host tier


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.host = HostKVTier(num_host_blocks) if enable_caching and num_host_blocks > 0 else None
        # This step's copies: (device block, host block) out, then (host block, device block) in.
        self.swap_out: list[tuple[int, int]] = []
        self.swap_in: list[tuple[int, int]] = []
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_hashes: dict[str, list[BlockHash]] = {}
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """The hash chain over the request's full blocks, extended as its tokens grow."""
        hashes = self.req_to_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        num_full = request.num_tokens // bs
        if num_full > len(hashes):
            new_tokens = request.all_token_ids[len(hashes) * bs:num_full * bs]
            hashes.extend(hash_full_blocks(hashes[-1] if hashes else None, new_tokens, bs))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], list[int], int]:
        """The longest cached prefix of whole blocks: device blocks, then host-tier block ids that
        continue it, and the tokens they cover; at least the last token is left to compute."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request)[:max_hit_blocks]
        hits: list[KVCacheBlock] = []
        for block_hash in hashes:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        host_ids: list[int] = []
        if self.host is not None:
            for block_hash in hashes[len(hits):]:
                host_id = self.host.lookup(block_hash)
                if host_id is None:
                    break
                host_ids.append(host_id)
        return hits, host_ids, (len(hits) + len(host_ids)) * self.block_size

    def record_prefix_lookup(self, num_queried_tokens: int, num_hit_tokens: int, num_host_hit_tokens: int) -> None:
        if self.enable_caching:
            self.prefix_stats.queries += num_queried_tokens
            self.prefix_stats.hits += num_hit_tokens
            self.prefix_stats.host_hits += num_host_hit_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[KVCacheBlock] | None = None,
                       host_hit_ids: list[int] | None = None) -> list[KVCacheBlock] | None:
        """Makes room for `num_new_tokens` more tokens after the prefix hits (device blocks, and host-tier
        blocks that get fresh device blocks and a copy in); returns the new blocks, or None if short."""
        req_blocks = self.req_to_blocks.setdefault(request.request_id, [])
        host_hit_ids = host_hit_ids or []
        if not new_computed_blocks and not host_hit_ids:
            # The common decode step: the tokens fit in the blocks held and no block becomes full.
            num_after = request.num_computed_tokens + num_new_tokens
            if num_after <= len(req_blocks) * self.block_size and (
                    not self.enable_caching
                    or min(num_after, request.num_tokens) // self.block_size
                    <= self.num_cached_blocks.get(request.request_id, 0)):
                return []
        new_computed_blocks = new_computed_blocks or []
        num_computed = request.num_computed_tokens + (len(new_computed_blocks) + len(host_hit_ids)) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new_blocks = max(0, num_required - len(req_blocks) - len(new_computed_blocks))
        # Hit blocks that nobody holds sit in the free queue: taking them shrinks it too.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_evictable_hits:
            return None
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        req_blocks.extend(new_blocks)
        self._offload_evicted(also_protected=host_hit_ids)
        for host_id, block in zip(host_hit_ids, new_blocks):
            self.swap_in.append((host_id, block.block_id))
        if self.enable_caching:
            # Blocks full once this step's tokens are written become findable now: a request that hits
            # them in this same step reads them after this step's keys are written in each layer.
            # Only blocks whose tokens are all known can be hashed (async scheduling computes a token
            # before its value reaches the host); the rest are registered on a later call.
            num_full = min(num_computed + num_new_tokens, request.num_tokens) // self.block_size
            num_cached = self.num_cached_blocks.get(request.request_id, 0)
            if num_full > num_cached:
                hashes = self._block_hashes(request)
                self.pool.cache_full_blocks(req_blocks, hashes, num_cached, num_full)
                self.num_cached_blocks[request.request_id] = num_full
        return new_blocks

    def _offload_evicted(self, also_protected: list[int] = ()) -> None:
        """Cached blocks the pool just evicted are copied to the host tier (before this step overwrites them),
        never into a host block this step copies in: those recorded, and `also_protected`, the host hits of
        the allocation that evicted them."""
        evicted, self.pool.evicted = self.pool.evicted, []
        if self.host is None:
            return
        protected = {host_id for host_id, _ in self.swap_in}.union(also_protected)
        for block_id, block_hash in evicted:
            host_id = self.host.store(block_hash, protected)
            if host_id is not None:
                self.swap_out.append((block_id, host_id))

    def take_block_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """This step's (device -> host) and (host -> device) block copies; the runner does them in that
        order before the forward pass."""
        copies = (self.swap_out, self.swap_in)
        self.swap_out, self.swap_in = [], []
        return copies

    def free(self, request: Request) -> None:
        """Returns the request's blocks to the pool, tail first (so tails are evicted first)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.pool.free_blocks(reversed(blocks))
        self.num_cached_blocks.pop(request.request_id, None)
        if request.is_finished:
            self.req_to_hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        if not self.pool.reset_prefix_cache():
            return False
        if self.host is not None:
            self.host.reset()
        return True

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        held: dict[int, int] = {}
        for blocks in self.req_to_blocks.values():
            for block in blocks:
                held[block.block_id] = held.get(block.block_id, 0) + 1
        for block in self.pool.blocks:
            assert block.ref_cnt == held.get(block.block_id, 0), (block, held.get(block.block_id, 0))
