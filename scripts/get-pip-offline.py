"""Stand-in for the get-pip.py that ansible-test downloads from ci-files.testing.ansible.com
(not reachable from this machine) to put pip into each sanity-test virtualenv.

ansible-test runs it inside a fresh venv without pip, with pip-install arguments
(`--disable-pip-version-check pip==X ...`, plus get-pip's own `--no-setuptools`/`--no-wheel`).
This bootstraps the pip bundled with Python (ensurepip, offline), then installs the requested
packages from the package index as get-pip.py would. scripts/setup.sh copies it to
~/.ansible/test/cache/get_pip_<version>.py.
"""

import subprocess
import sys

args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
# In a process of its own: ensurepip points PIP_CONFIG_FILE at /dev/null in its process, and
# the install below must see the machine's pip configuration (index, certificates).
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"], stdout=subprocess.DEVNULL)
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", "--quiet"] + args))
