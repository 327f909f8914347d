"""Decode steps replayed from captured graphs, one per batch size.

A pure decode step (every scheduled sequence adds one token) has a shape fixed by its number
of sequences, so its forward is captured once per size (graph.OpGraph on the CPU: the library
calls replayed from one Python loop; graph.CudaGraph on a GPU: one CUDA graph launch) and
replayed with the batch rewritten in place. Mixed or prefill steps run eagerly. The most recently used sizes
are kept; each graph holds its own activations (about 2 MB per sequence for Qwen3-0.6B)."""
from collections import OrderedDict

from ..graph import CudaGraph, OpGraph
from .batch import ForwardBatch


class DecodeGraphs:
    def __init__(self, model, kv_cache, block_manager, max_model_len, max_graphs=4):
        self.model, self.kv_cache, self.blocks = model, kv_cache, block_manager
        self.width = block_manager.blocks_for(max_model_len)  # block table width: any context fits
        self.max_graphs = max_graphs
        self._graphs = OrderedDict()  # number of sequences -> (graph, its batch)

    @staticmethod
    def applies(scheduled):
        return all(n == 1 and seq.num_computed == seq.num_tokens - 1 for seq, n in scheduled)

    def run(self, scheduled, token_ids=None):
        """(logits, batch) of a decode step. token_ids: the step's token ids as a tensor on the
        model's device (the ids sampled by the step before, any integer dtype), copied there in
        stream order; None takes them from the sequences."""
        size = len(scheduled)
        entry = self._graphs.get(size)
        if entry is None:
            batch = ForwardBatch(scheduled, self.blocks, self.kv_cache, self.model.device,
                                 block_table_width=self.width)
            if token_ids is not None:
                batch.token_ids.copy_(token_ids)
            if self.model.device == "cpu":  # recording runs the forward: its output is this step's
                entry = OpGraph.capture(lambda: self.model(batch)), batch
            else:  # recording runs nothing: replayed below
                entry = CudaGraph.capture(lambda: self.model(batch), batch.token_ids.storage.device[1]), batch
            self._graphs[size] = entry
            if len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            if self.model.device == "cpu":
                return entry[0].output, batch
            return entry[0].replay(), batch
        self._graphs.move_to_end(size)
        graph, batch = entry
        batch.update(scheduled, token_ids=token_ids is None)
        if token_ids is not None:
            batch.token_ids.copy_(token_ids)  # int64 -> int32 on the device: no wait
        return graph.replay(), batch
