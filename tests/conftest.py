import os
import warnings

# Tests run on CPU; keep thread counts small so the 2-core CI machine isn't oversubscribed.
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
