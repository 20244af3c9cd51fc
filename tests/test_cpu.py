"""The CPU's vector maths gives the same bits from a process's first threaded call on."""

import subprocess
import sys

import pytest

# After `import vaelab`, a pause (the threads go idle, as while data loads), then the first
# threaded VML calls of the process, each compared with the same call made again.
FIRST_CALLS = """
import time, torch
import vaelab
time.sleep(0.2)
u = torch.arange(1, 8193, dtype=torch.float32) / 8193
print(all(torch.equal(f(u), f(u)) for f in (torch.exp, torch.log, torch.cos, torch.tanh)))
"""


@pytest.mark.slow
def test_the_first_threaded_vector_maths_of_a_process_agrees_with_later_calls():
    # A race: unsettled, it shows in a few fresh processes in a hundred, so ten are run, one
    # after another (side by side, they were not seen to show it).
    runs = [subprocess.run([sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True)
            for _ in range(10)]
    assert [r.stdout.strip() for r in runs] == ["True"] * 10, runs[0].stderr
