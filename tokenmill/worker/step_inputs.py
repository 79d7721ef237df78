"""A step's model inputs: the persistent staged buffers the forward pass reads (CUDA graphs are captured
over them), and how they are filled from the persistent batch with numpy, without per-token Python.

    rows [num_reqs] (batch rows, one-token requests first) + num_scheduled [num_reqs]
      -> input_ids, positions, slot_mapping   [padded_tokens]  (padding: token 0, position 0, slot -1)
         query_start_loc [padded_reqs + 1], seq_lens [padded_reqs] (padding requests: no tokens)
         block_table [num_reqs, max_blocks] (padding requests' rows are never read)
      -> AttentionMetadata over those device tensors

Tokens still in flight from the previous step (async scheduling: sampled on the device, not yet on the
host) are copied into input_ids on the device.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.core.kv_cache_manager import cdiv
from tokenmill.worker.buffers import StagedBuffer
from tokenmill.worker.input_batch import InputBatch


class StepInputs:
    def __init__(self, max_num_reqs: int, max_num_tokens: int, max_blocks_per_req: int, block_size: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        num_rows = max(max_num_tokens, max_num_reqs)
        self.input_ids = StagedBuffer(num_rows, torch.int64, device)
        self.positions = StagedBuffer(num_rows, torch.int64, device)
        self.slot_mapping = StagedBuffer(num_rows, torch.int64, device)
        self.seq_lens = StagedBuffer(max_num_reqs, torch.int32, device)
        self.query_start_loc = StagedBuffer(max_num_reqs + 1, torch.int32, device)
        self.block_table = StagedBuffer((max_num_reqs, max_blocks_per_req), torch.int32, device)
        self.logits_indices = StagedBuffer(num_rows, torch.int64, device)  # drafts: several rows a request
        self.decode_order = StagedBuffer(max_num_reqs, torch.int32, device)
        self.logits_order = StagedBuffer(max_num_reqs, torch.int32, device)  # the logits rows' own
        self.in_flight_dst = StagedBuffer(max_num_reqs, torch.int64, device)
        self.in_flight_src = StagedBuffer(max_num_reqs, torch.int64, device)
        self.arange = np.arange(num_rows + 1, dtype=np.int64)
        # query_start_loc of one query row per request (the logits rows' attention in the last layer)
        self.one_row_each = torch.arange(max_num_reqs + 1, dtype=torch.int32)
        self.one_row_each_gpu = self.one_row_each.to(device)

    def prepare(self, batch: InputBatch, rows: np.ndarray, num_scheduled: np.ndarray, padded_reqs: int,
                padded_tokens: int, last_sampled: torch.Tensor | None = None,
                last_sampled_index: dict[str, int] | None = None) -> AttentionMetadata:
        """Fills the staged buffers for this step and queues their copies to the device. Padding (for a
        graph's size): tokens past the real ones belong to no request and write no KV (slot -1); requests
        past the real ones have no tokens. `last_sampled` [previous step's rows] and `last_sampled_index`
        (request id -> its row there) feed the tokens the host does not have yet."""
        bs = self.block_size
        num_reqs = len(rows)
        cu_num_tokens = np.cumsum(num_scheduled)
        num_tokens = int(cu_num_tokens[-1])
        req_index = np.repeat(rows, num_scheduled)
        positions = self.positions.np[:padded_tokens]
        np.add(batch.num_computed_tokens[req_index], self.arange[:num_tokens]
               - np.repeat(cu_num_tokens - num_scheduled, num_scheduled), out=positions[:num_tokens])
        self.input_ids.np[:num_tokens] = batch.token_ids[req_index, positions[:num_tokens]]
        slots = self.slot_mapping.np
        slots[:num_tokens] = batch.block_table[req_index, positions[:num_tokens] // bs]
        slots[:num_tokens] = slots[:num_tokens] * bs + positions[:num_tokens] % bs
        seq_lens = self.seq_lens.np
        seq_lens[:num_reqs] = batch.num_computed_tokens[rows] + num_scheduled
        query_start_loc = self.query_start_loc.np
        query_start_loc[0] = 0
        query_start_loc[1:num_reqs + 1] = cu_num_tokens
        max_blocks = cdiv(int(seq_lens[:num_reqs].max()), bs)
        self.block_table.np[:num_reqs, :max_blocks] = batch.block_table[rows, :max_blocks]
        pad = slice(num_tokens, padded_tokens)
        positions[pad], self.input_ids.np[pad], slots[pad] = 0, 0, -1
        seq_lens[num_reqs:padded_reqs] = 0
        query_start_loc[num_reqs + 1:padded_reqs + 1] = num_tokens
        input_ids = self.input_ids.to_device(padded_tokens)
        in_flight = np.nonzero(positions[:num_tokens] >= batch.num_tokens[req_index])[0] \
            if last_sampled is not None else ()  # (without async scheduling, tokens past the last are drafts)
        if len(in_flight):
            sources = [last_sampled_index[batch.req_ids[r]] for r in req_index[in_flight].tolist()]
            self.in_flight_dst.np[:len(in_flight)] = in_flight
            self.in_flight_src.np[:len(in_flight)] = sources
            dst = self.in_flight_dst.to_device(len(in_flight))
            input_ids[dst] = last_sampled[self.in_flight_src.to_device(len(in_flight))]
        self.positions.to_device(padded_tokens)
        self.slot_mapping.to_device(padded_tokens)
        self.block_table.to_device(num_reqs)  # the padding requests' rows are never read
        max_query_len = int(num_scheduled.max())
        num_decodes = int((num_scheduled == 1).sum()) if max_query_len > 1 else 0
        if max_query_len == 1:
            decode_order = self.stage_decode_order(self.decode_order, num_reqs, padded_tokens)
        else:  # the one-token requests of a mixed step (they come first) get a decode launch of their own
            decode_order = self.stage_decode_order(self.decode_order, num_decodes, num_decodes) if num_decodes else None
        return AttentionMetadata(
            num_actual_tokens=num_tokens, num_reqs=padded_reqs, max_query_len=max_query_len,
            max_seq_len=int(seq_lens[:num_reqs].max()),
            query_start_loc=self.query_start_loc.to_device(padded_reqs + 1),
            seq_lens=self.seq_lens.to_device(padded_reqs), block_table=self.block_table.gpu[:padded_reqs],
            slot_mapping=self.slot_mapping.gpu[:padded_tokens],
            query_start_loc_cpu=self.query_start_loc.cpu[:padded_reqs + 1],
            seq_lens_cpu=self.seq_lens.cpu[:padded_reqs], num_decodes=num_decodes, decode_order=decode_order)

    def stage_logits_indices(self, num_reqs: int, num_drafts: np.ndarray | None = None) -> torch.Tensor:
        """int64 on the device: each request's last row (staged query_start_loc - 1), or with drafts
        (num_drafts [num_reqs]) its last 1 + num_drafts rows, request after request."""
        ends = self.query_start_loc.np[1:num_reqs + 1].astype(np.int64)
        if num_drafts is None:
            self.logits_indices.np[:num_reqs] = ends - 1
            return self.logits_indices.to_device(num_reqs)
        counts = num_drafts + 1
        total = int(counts.sum())
        offsets = self.arange[:total] - np.repeat(np.cumsum(counts) - counts, counts)
        self.logits_indices.np[:total] = np.repeat(ends - counts, counts) + offsets
        return self.logits_indices.to_device(total)

    def logits_metadata(self, metadata: AttentionMetadata, decode_order: torch.Tensor) -> AttentionMetadata:
        """The last layer's attention metadata when only the logits rows attend: one query row per request
        (its last token), as in a decode step, over the step's keys."""
        n = metadata.num_reqs
        return AttentionMetadata(
            num_actual_tokens=n, num_reqs=n, max_query_len=1, max_seq_len=metadata.max_seq_len,
            query_start_loc=self.one_row_each_gpu[:n + 1], seq_lens=metadata.seq_lens,
            block_table=metadata.block_table, slot_mapping=metadata.slot_mapping[:n],
            query_start_loc_cpu=self.one_row_each[:n + 1], seq_lens_cpu=metadata.seq_lens_cpu,
            decode_order=decode_order)

    def stage_decode_order(self, staged: StagedBuffer, num_reqs: int, padded: int) -> torch.Tensor:
        """AttentionMetadata.decode_order for the first num_reqs staged seq_lens, staged in `staged`: the
        requests by ascending length (the longest start first), then the padding rows up to `padded`."""
        staged.np[:num_reqs] = np.argsort(self.seq_lens.np[:num_reqs], kind="stable")
        staged.np[num_reqs:padded] = self.arange[num_reqs:padded]
        return staged.to_device(padded)

    def reset_for_capture(self, size: int, max_num_reqs: int) -> None:
        """The padding layout CUDA graphs are captured over: every request empty, every token in none."""
        self.input_ids.gpu[:size].zero_()
        self.positions.gpu[:size].zero_()
        self.slot_mapping.gpu[:size].fill_(-1)
        self.seq_lens.gpu.zero_()
        self.query_start_loc.gpu.zero_()
        self.block_table.gpu.zero_()
        self.decode_order.gpu.copy_(torch.arange(max_num_reqs, dtype=torch.int32))

    def capture_metadata(self, num_tokens: int, num_reqs: int, max_query_len: int, max_seq_len: int
                         ) -> AttentionMetadata:
        """Metadata over the first rows of the device buffers, as a captured graph reads them."""
        return AttentionMetadata(
            num_actual_tokens=num_tokens, num_reqs=num_reqs, max_query_len=max_query_len,
            max_seq_len=max_seq_len, query_start_loc=self.query_start_loc.gpu[:num_reqs + 1],
            seq_lens=self.seq_lens.gpu[:num_reqs], block_table=self.block_table.gpu[:num_reqs],
            slot_mapping=self.slot_mapping.gpu[:num_tokens],
            query_start_loc_cpu=self.query_start_loc.cpu[:num_reqs + 1], seq_lens_cpu=self.seq_lens.cpu[:num_reqs],
            decode_order=self.decode_order.gpu[:num_tokens] if max_query_len == 1 else None)


def made_up_metadata(q_lens: list[int], seq_lens: list[int], block_table: torch.Tensor, slot_mapping: torch.Tensor,
                     max_model_len: int, device: torch.device) -> tuple[AttentionMetadata, torch.Tensor]:
    """(metadata, positions) of a made-up step (memory profiling, warm-up): request i computes its last
    q_lens[i] of seq_lens[i] tokens; block_table and slot_mapping on the host. Its leading one-token
    requests, if longer ones follow, are the step's num_decodes."""
    assert all(0 < q <= s <= max_model_len for q, s in zip(q_lens, seq_lens)), (q_lens, seq_lens)
    qsl = torch.tensor([0] + np.cumsum(q_lens).tolist(), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    max_query_len = max(q_lens)
    num_decodes = next(i for i, q in enumerate(q_lens) if q > 1) if max_query_len > 1 else 0
    metadata = AttentionMetadata(
        num_actual_tokens=int(qsl[-1]), num_reqs=len(seq_lens), max_query_len=max_query_len,
        max_seq_len=max(seq_lens), query_start_loc=qsl.to(device), seq_lens=lens.to(device),
        block_table=block_table.to(device), slot_mapping=slot_mapping.to(device),
        query_start_loc_cpu=qsl, seq_lens_cpu=lens, num_decodes=num_decodes,
        decode_order=torch.arange(num_decodes, dtype=torch.int32, device=device) if num_decodes else None)
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(q_lens, seq_lens)]).to(device)
    return metadata, positions
