"""Turns a scheduled batch into model inputs, runs the model and returns the logits that are sampled.

Owns the KV cache tensors. The flat batch is laid out as the attention kernels expect: every multi-token
chunk first, then the single-token steps (decodes), which are attended together from their block tables.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvferry.engine.model import LlamaForCausalLM, allocate_kv_caches
from kvferry.engine.scheduler import SchedulerOutput
from kvferry.kernels.attention import (
    AttentionMetadata,
    PrefillChunk,
    build_decode_metadata,
    context_slots,
)

LayerHook = Callable[[int], None]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: str = "cpu",
        dense_prompt_weights: bool = False,
    ):
        """``dense_prompt_weights``: quantized linears keep a dequantized copy for prompt-sized products."""
        self.model = model
        model.pack_weights(dtype if dense_prompt_weights else None)
        self.block_size = block_size
        self.device = device
        self.kv_caches = allocate_kv_caches(model.config, num_blocks, block_size, dtype, device)

    def prepare(self, batch: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """input_ids, positions, attention metadata and the flat rows whose logits get sampled."""
        bs = self.block_size
        ids: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        prefills: list[PrefillChunk] = []
        # Decodes as plain ints, made into tensors once for the batch (a tensor per request is ~3 us
        # each, x3 per request: ~0.6 ms a step at 64 streams).
        decode_ids: list[int] = []
        decode_positions: list[int] = []
        decode_slots: list[int] = []
        decode_tables: list[list[int]] = []
        sample_rows: list[int] = []
        offset = 0
        for item in batch.scheduled:
            req, n = item.request, item.num_new_tokens
            start = req.num_computed_tokens
            end = start + n
            if n == 1:
                decode_ids.append(req.token_id(start))
                decode_positions.append(start)
                decode_slots.append(req.block_table[start // bs] * bs + start % bs)
                decode_tables.append(req.block_table)
            else:
                prompt_len = req.num_prompt_tokens
                chunk = req.prompt_token_ids[start:min(end, prompt_len)]
                if end > prompt_len:  # recompute after preemption reaches into the output
                    chunk = chunk + req.output_token_ids[max(start - prompt_len, 0) : end - prompt_len]
                ids.append(torch.tensor(chunk))
                pos = torch.arange(start, end)
                positions.append(pos)
                table = torch.tensor(req.block_table)
                slots.append(table[pos // bs] * bs + pos % bs)
                prefills.append(
                    PrefillChunk(
                        query_start=offset,
                        query_len=n,
                        context_len=end,
                        context_slots=None if start == 0 else context_slots(req.block_table, end, bs),
                    )
                )
            offset += n
            if item.samples:
                sample_rows.append(offset - 1)
        if decode_ids:  # the flat batch has every prefill chunk first: decodes are scheduled after them
            ids.append(torch.tensor(decode_ids))
            positions.append(torch.tensor(decode_positions))
            slots.append(torch.tensor(decode_slots))
        decode_lens = [p + 1 for p in decode_positions]
        num_prefill_tokens = sum(c.query_len for c in prefills)
        tables = lens = decode_slots = decode_mask = None
        if decode_tables:
            tables, lens, decode_slots, decode_mask = build_decode_metadata(decode_tables, decode_lens, bs)
        attn = AttentionMetadata(
            slot_mapping=_cat(slots).to(self.device),
            prefills=prefills,
            num_prefill_tokens=num_prefill_tokens,
            block_tables=tables,
            context_lens=lens,
            decode_slots=decode_slots,
            decode_mask=decode_mask,
        )
        return _cat(ids).to(self.device), _cat(positions).to(self.device), attn, sample_rows

    @torch.inference_mode()
    def execute(self, batch: SchedulerOutput, layer_hook: LayerHook | None = None) -> torch.Tensor:
        """Logits [num_sampled, vocab] float32, one row per scheduled request that samples, in order."""
        input_ids, positions, attn, sample_rows = self.prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, attn, layer_hook=layer_hook)
        if not sample_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        if len(sample_rows) != hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=hidden.device)]
        return self.model.compute_logits(hidden)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
