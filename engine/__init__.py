"""Lyra's streaming inference engine (imported as `lyra.engine`): time, requests, caches and queues.

The model (`lyra.modeling`) owns the math; the engine drives it one chunk at a time through
`LyraForConditionalGeneration.forward(..., cache=LyraCache)` and `stream_generate`.
"""
