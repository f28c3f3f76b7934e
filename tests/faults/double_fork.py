"""A command that double-forks a daemon (fork, setsid, fork: the daemon is reparented to init,
out of the command's process tree) and exits at once. Writes the daemon's pid to the file given."""

import os
import sys
import time

path = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open(path + ".tmp", "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(path + ".tmp", path)
        time.sleep(600)
    os._exit(0)
deadline = time.time() + 30
while not os.path.exists(path) and time.time() < deadline:
    time.sleep(0.01)
print("double_fork: daemon started", flush=True)
