"""
State module for portfwd: declarative NAT port forwarding for Linux.

.. code-block:: yaml

    web-forwards:
      portfwd.managed:
        - params:
            forwards:
              - name: web
                listen_port: 4321
                to: "172.100.102.101:1234"

``test=True`` runs portfwd in check mode (nothing is touched; ``result`` is ``None`` when
something would change). ``changes`` holds the diff keyed by entry names
(``forwards.web``, ``masquerade.lan``, ``sysctl net.ipv4.ip_forward``, ...), each with
``old`` and ``new``; ``comment`` holds portfwd's ``msg`` and ``warnings`` its warnings. A run
that fails (bad params name the field and the value) has ``result: False`` with the message.
"""

__virtualname__ = "portfwd"


def __virtual__():
    if "portfwd.apply" in __salt__:
        return __virtualname__
    return (False, "the portfwd execution module (_modules/portfwd.py) is not loaded")


def _entries(text):
    """``key = value`` lines of portfwd's diff text, as a dict."""
    out = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            out[key] = value
    return out


def _changes(result):
    diff = result.get("diff") or {}
    before, after = _entries(diff.get("before")), _entries(diff.get("after"))
    changes = {}
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            changes[key] = {"old": before.get(key), "new": after.get(key)}
    if result.get("changed") and not changes:
        # A repair that no entry shows (an owned rule out of order, a missing jump).
        changes["portfwd"] = {"old": None, "new": result.get("msg")}
    return changes


def managed(name, params=None, binary="portfwd"):
    """
    Make the host hold exactly what ``params`` describe (portfwd's params as a dict).

    name
        The state's ID; it does not reach portfwd.
    params
        portfwd's params (forwards, masquerade, addresses, policy_routes, state, instance...).
    binary
        The portfwd binary (default: ``portfwd`` on PATH).
    """
    ret = {"name": name, "result": False, "changes": {}, "comment": ""}
    test = bool(__opts__.get("test"))
    result = __salt__["portfwd.apply"](params=params or {}, test=test, diff=True, binary=binary)
    ret["comment"] = result.get("msg", "")
    if result.get("warnings"):
        ret["warnings"] = list(result["warnings"])
    if result.get("failed"):
        return ret
    changes = _changes(result) if result.get("changed") else {}
    if test:
        ret["result"] = None if changes else True
        if changes:
            ret["changes"] = changes
        return ret
    ret["result"] = True
    ret["changes"] = changes
    return ret
