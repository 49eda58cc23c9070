"""The harness around the algorithms of harmodt/train.py, one concern a module:

- session.py: one run as a process: start, checks before any file is written, continuing, the end
  (final and best evaluations, results.json), the progress bar and metric lines, the exit codes
- cli.py: the ``python -m harmodt.train`` flags, built from the config dataclasses; one-line errors
- outputs.py: metrics.jsonl (read, rewound on resume) and TensorBoard (files are written by harmodt.files)
- rng.py: capture and restore every global random stream
- resume.py: what a checkpoint of a trainer holds (its goal seeds and data fingerprint too), continuing
  from one, which settings may change, and the stop of a run whose loss or weights went NaN
- signals.py: Ctrl-C / SIGTERM as a stop request
- distributed.py: data-parallel ranks under torchrun
- data_cache.py: the training data: ``--data``, or generated once into the cache; what must hold
  between the config and the data, and the data's fingerprint
"""
