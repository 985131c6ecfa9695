"""Pre-processing of the incoming task vector and post-processing of the merged one, for any method.

A stream's ``params.preprocess`` is a list of one-key objects applied in order to τ_t = θ_t − θ₀
before the method sees the expert (``[{"dare": {"p": 0.9}}, {"topk": {"k": 0.2}}]``);
``params.postprocess`` is applied to the merged task vector θ⁽ᵗ⁾ − θ₀ before it is stored
(``[{"lines": {"alpha": 0.5, "beta": 0.5}}]``). One module per step; the registry lists them.
"""
