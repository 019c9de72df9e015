import os

# As jobs/__init__.py (why is said there): set before any benchmark loads torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
