"""Support modules under every feature: errors, the trace and fall-back policy, backend choice, the CUDA loader,
file helpers. They import nothing of fastenc above them (tests/test_structure.py)."""
