import os
import warnings

# Tests run on CPU; keep thread counts small so the 2-core CI machine isn't oversubscribed. Set before anything
# imports torch (which reads it once): a torch with one thread per core stalls a loaded 2-core runner.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from lightning.fabric.utilities.warnings import PossibleUserWarning  # noqa: E402

warnings.filterwarnings("ignore", category=PossibleUserWarning)  # Lightning's advice on dataloader workers


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_ddp_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning's spawn strategies write MASTER_PORT into this process's environment, and every later DDP test then
    # reused that port: one whose previous ranks had not let go of it yet failed ("address already in use"), about
    # one suite in eight. Each test starts without it, so Lightning picks a free port.
    monkeypatch.delenv("MASTER_PORT", raising=False)
