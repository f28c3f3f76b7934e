"""A command with a grandchild in a session of its own (as torchrun starts its workers), both
sleeping: stopping it must reach both. Writes both pids to the file given as argument."""

import subprocess
import sys
import time

grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{__import__('os').getpid()} {grandchild.pid}\n")
__import__("os").replace(sys.argv[1] + ".tmp", sys.argv[1])
print("process_tree: sleeping", flush=True)
time.sleep(600)
