import os
import warnings

# Tests run on CPU; keep thread counts small so the 2-core CI machine isn't oversubscribed. Set before anything
# imports torch (which reads it once): a torch with one thread per core stalls a loaded 2-core runner.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from lightning.fabric.utilities.warnings import PossibleUserWarning  # noqa: E402

warnings.filterwarnings("ignore", category=PossibleUserWarning)  # Lightning's advice on dataloader workers
