"""
Execution module for portfwd: declarative NAT port forwarding for Linux.

Runs the ``portfwd`` binary (on the minion's PATH, or ``binary=``) with the params as JSON on
stdin and returns its result as a dict (``changed``, ``failed``, ``msg``, ``diff``,
``commands``, ``warnings``, ``forwards``, ``masquerade``).

CLI examples:

.. code-block:: bash

    salt '*' portfwd.apply '{"forwards": [{"name": "web", "listen_port": 4321, "to": "10.0.2.2:1234"}]}'
    salt '*' portfwd.apply params='{...}' test=True
    salt '*' portfwd.show
"""

import json

__virtualname__ = "portfwd"


def __virtual__():
    return __virtualname__


def _run(binary, args, stdin=None):
    result = __salt__["cmd.run_all"](
        [binary] + args,
        stdin=stdin,
        python_shell=False,
        ignore_retcode=True,
        output_loglevel="quiet",
    )
    stdout = (result.get("stdout") or "").strip()
    try:
        # portfwd prints one JSON object on its last line.
        return json.loads(stdout.splitlines()[-1]) if stdout else None, result
    except ValueError:
        return None, result


def apply(params=None, test=False, diff=True, binary="portfwd"):
    """
    Converge the host to ``params`` (a dict, or a JSON string). With ``test=True`` nothing is
    changed and the result says what would change. Returns portfwd's result dict; a run that
    could not start returns ``{"failed": True, "msg": ...}``.
    """
    if isinstance(params, str):
        text = params
    else:
        text = json.dumps(params or {})
    args = ["apply"]
    if test:
        args.append("--check")
    if diff:
        args.append("--diff")
    parsed, raw = _run(binary, args, stdin=text)
    if parsed is None:
        return {
            "changed": False,
            "failed": True,
            "msg": "portfwd gave no result (exit {}): {}".format(
                raw.get("retcode"), (raw.get("stderr") or "").strip()
            ),
        }
    return parsed


def show(instance="portfwd", binary="portfwd"):
    """
    The instance's current managed state as params (applying them changes nothing).
    """
    raw = __salt__["cmd.run_all"](
        [binary, "show", "--instance", instance],
        python_shell=False,
        ignore_retcode=True,
        output_loglevel="quiet",
    )
    try:
        return json.loads(raw.get("stdout") or "")
    except ValueError:
        return {"failed": True, "msg": (raw.get("stdout") or raw.get("stderr") or "").strip()}


def schema(binary="portfwd"):
    """
    The JSON Schema of the params.
    """
    raw = __salt__["cmd.run_all"]([binary, "schema"], python_shell=False, output_loglevel="quiet")
    return json.loads(raw.get("stdout") or "{}")
