"""Per-epoch diagnostics of a run's training perturbation: strength against PGD-10, cosine, flips.

``epoch_probe(run)`` is called by the training loop after every epoch; its values go into metrics.jsonl.
See ``apart_fast/diagnostics/STUDY.md`` for the study these diagnostics feed.
"""

from apart_fast.diagnostics.probe import epoch_probe, no_side_effects, probe_batch, probe_enabled

__all__ = ["epoch_probe", "no_side_effects", "probe_batch", "probe_enabled"]
