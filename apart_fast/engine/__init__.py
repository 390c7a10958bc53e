"""The training engine, one job per file: device.py (where a run computes), run.py (assembling a run), state.py (its
checkpoint state), epoch.py (its steps and evaluation), loop.py (``train``: validation phase, epochs, results),
out_dir.py and run_folder.py (the output folder's checks, lock and backups), resume.py (resume checks), checkpoint.py
(the file format), faults.py (signals and fault reporting), graphs.py (CUDA-graph replay), ema.py (weight averaging),
capture_check.py (what breaks a capture)."""
