"""Where tensors live and when they move: storage tiers and offload files (`storage`), copy streams
(`streams`), the weight, KV cache and activation stores, the block schedule and its overlapped I/O
(`schedule`), token selection (`decoding`), checkpoint reading (`checkpoint`) and the capacity checks
(`capacity`). Model math lives in `flexgen_core.models`; the bytes of each term in `flexgen_core.memory`.
"""
