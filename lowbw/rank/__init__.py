"""The rank runtime: one process of a run, built from typed parts and run by a thin loop.

- :mod:`lowbw.rank.build` -- :func:`build_rank`: stages, codecs, clock, link model, transport, executor,
  optimizer, corpus, energy meter, from the config and the validated plan.
- :mod:`lowbw.rank.loop` -- the step loop (train, evaluate, report, checkpoint).
- :mod:`lowbw.rank.reporting` -- the two roles: rank 0 records the run, the others send it their reports.
- :mod:`lowbw.rank.state` -- what a checkpoint holds of a rank, and restoring it.
- :mod:`lowbw.rank.faults` -- stragglers and crashes injected on purpose.
- :mod:`lowbw.rank.process` -- the process entry (joining the group, errors naming the rank).
"""
