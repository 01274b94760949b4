"""fix_mmap_threshold: memory freed by a training loop goes back to the system instead
of staying resident in glibc's heap (the build-up behind a rank's extra memory)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

# 30 AdamW steps of a small MLP on batches of changing size (as length-grouped batches
# are), then how many MiB of anonymous memory the loop left resident: the model, its
# gradients' and optimizer's few MiB, plus whatever freed memory the heap kept.
PROBE = """
import sys
if sys.argv[1] == "fixed":
    from fedmpi.allocator import fix_mmap_threshold
    assert fix_mmap_threshold()
import torch
def rss_anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
torch.manual_seed(0)
torch.set_num_threads(1)
layers = [torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384)]
model = torch.nn.Sequential(*layers * 4)
optimizer = torch.optim.AdamW(model.parameters(), fused=True)
before = rss_anon_mib()
for step in range(30):
    model(torch.randn(16 * (20 + step % 40), 384)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(rss_anon_mib() - before)
"""


def retained_mib(mode: str) -> float:
    env = {"PATH": "/usr/bin:/bin"}  # no MALLOC_* from the caller's environment
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True, env=env
    )
    return float(out.stdout)


def test_fixed_threshold_returns_what_training_freed() -> None:
    fixed, default = retained_mib("fixed"), retained_mib("default")
    # Measured here: 23 MiB fixed, 187 MiB with glibc's sliding threshold.
    assert fixed < 50
    assert default > 2 * fixed


def test_user_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmpi.allocator import fix_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False
