"""The trainer: compiled steps, TrainState, schedule, evaluation, reference cache, checkpoints, the run
directory, stopping (signals, faults, data-parallel agreement)."""
